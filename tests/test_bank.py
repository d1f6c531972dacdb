import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momos.assign import nearest
from momos.bank import kmeans_motifs, sample_motifs


@given(m=st.integers(1, 60), s=st.integers(1, 5), k=st.integers(1, 60), zero=st.booleans(), seed=st.integers(0, 99))
def test_sample_draws_distinct_block_positions(m, s, k, zero, seed):
    k = min(k, m)
    blocks = torch.arange(m * s, dtype=torch.float32).view(m, s) + 1  # every block distinct and nonzero
    motifs = sample_motifs(blocks, k, force_zero=zero, generator=torch.Generator().manual_seed(seed))
    assert motifs.shape == (k, s)
    drawn = motifs[1:] if zero else motifs
    if zero:
        assert torch.equal(motifs[0], torch.zeros(s))
    rows = {tuple(r.tolist()) for r in drawn}
    assert len(rows) == len(drawn)  # without replacement
    assert rows <= {tuple(b.tolist()) for b in blocks}


def test_sample_is_deterministic_for_a_seed():
    blocks = torch.randn(500, 4)
    a = sample_motifs(blocks, 20, force_zero=True, generator=torch.Generator().manual_seed(3))
    b = sample_motifs(blocks, 20, force_zero=True, generator=torch.Generator().manual_seed(3))
    c = sample_motifs(blocks, 20, force_zero=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), zero=st.booleans())
def test_kmeans_never_increases_distortion_and_keeps_zero(seed, zero):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(300, 3, generator=g)
    start = sample_motifs(blocks, 12, force_zero=zero, generator=g)

    def distortion(motifs):
        return float(((blocks - motifs[nearest(blocks, motifs)]) ** 2).sum())

    refined = kmeans_motifs(blocks, start, iterations=5, force_zero=zero)
    assert distortion(refined) <= distortion(start) + 1e-4
    if zero:
        assert torch.equal(refined[0], torch.zeros(3))
