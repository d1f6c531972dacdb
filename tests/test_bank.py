import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import momos
from momos import bank
from momos.bank import draw_without_replacement, gather_blocks, kmeans_motifs, sample_motifs
from momos.blocks import to_blocks
from momos.search.assign import nearest


@given(population=st.integers(1, 5000), share=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_draw_without_replacement_gives_distinct_members_deterministically(population, share, seed):
    count = int(share * population)
    rows = draw_without_replacement(population, count, torch.Generator().manual_seed(seed))
    again = draw_without_replacement(population, count, torch.Generator().manual_seed(seed))
    assert rows.numel() == count == len(set(rows.tolist()))
    assert count == 0 or 0 <= int(rows.min()) <= int(rows.max()) < population
    assert torch.equal(rows, again)


def test_draw_without_replacement_is_uniform():
    # 20000 draws of 5 from 100 (the rejection path): every member's frequency near 5/100
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(100)
    for _ in range(20000):
        hits[draw_without_replacement(100, 5, g)] += 1
    freq = hits / 20000
    assert (freq - 0.05).abs().max() < 0.006  # ~4 standard deviations


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), s=st.integers(1, 6), seed=st.integers(0, 9))
def test_gather_blocks_equals_rows_of_the_concatenated_blocks(sizes, s, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g) for n in sizes]
    blocks = torch.cat([to_blocks(t, s) for t in tensors])
    rows = torch.randint(blocks.shape[0], (30,), generator=g)
    assert torch.equal(gather_blocks(tensors, s, rows), blocks[rows])


@given(m=st.integers(1, 60), s=st.integers(1, 5), k=st.integers(1, 60), zero=st.booleans(), seed=st.integers(0, 99))
def test_sample_draws_distinct_block_positions(m, s, k, zero, seed):
    k = min(k, m)
    blocks = torch.arange(m * s, dtype=torch.float32).view(m, s) + 1  # every block distinct and nonzero
    motifs = sample_motifs([blocks], s, k, force_zero=zero, generator=torch.Generator().manual_seed(seed))
    assert motifs.shape == (k, s)
    drawn = motifs[1:] if zero else motifs
    if zero:
        assert torch.equal(motifs[0], torch.zeros(s))
    rows = {tuple(r.tolist()) for r in drawn}
    assert len(rows) == len(drawn)  # without replacement
    assert rows <= {tuple(b.tolist()) for b in blocks}


def test_sample_is_deterministic_for_a_seed():
    blocks = torch.randn(500, 4)
    a = sample_motifs([blocks], 4, 20, force_zero=True, generator=torch.Generator().manual_seed(3))
    b = sample_motifs([blocks], 4, 20, force_zero=True, generator=torch.Generator().manual_seed(3))
    c = sample_motifs([blocks], 4, 20, force_zero=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), zero=st.booleans())
def test_kmeans_never_increases_distortion_and_keeps_zero(seed, zero):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(300, 3, generator=g)
    start = sample_motifs([blocks], 3, 12, force_zero=zero, generator=g)

    def distortion(motifs):
        return float(((blocks - motifs[nearest(blocks, motifs)]) ** 2).sum())

    refined = kmeans_motifs([blocks], 3, start, iterations=5, force_zero=zero)
    assert distortion(refined) <= distortion(start) + 1e-4
    if zero:
        assert torch.equal(refined[0], torch.zeros(3))


def test_kmeans_reads_blocks_in_chunks_with_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 5, generator=g), torch.randn(101, generator=g)]
    start = sample_motifs(tensors, 4, 9, force_zero=True, generator=g)
    whole = kmeans_motifs(tensors, 4, start, iterations=4, force_zero=True)
    monkeypatch.setattr(bank, "_CHUNK", 8)  # two blocks per chunk
    assert torch.allclose(kmeans_motifs(tensors, 4, start, iterations=4, force_zero=True), whole, atol=1e-6)


def test_kmeans_of_a_large_bank_runs_on_a_uniform_sample_of_its_blocks():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(900, 4, generator=g), torch.randn(1203, generator=g)]  # 1,201 blocks of 4
    start = sample_motifs(tensors, 4, 10, force_zero=True, generator=g)
    sampled = kmeans_motifs(tensors, 4, start, iterations=6, force_zero=True, points_per_motif=50,
                            generator=torch.Generator().manual_seed(7))
    # The same iterations over the 500 blocks the generator draws.
    rows = draw_without_replacement(1201, 500, torch.Generator().manual_seed(7)).sort().values
    want = kmeans_motifs([gather_blocks(tensors, 4, rows)], 4, start, iterations=6, force_zero=True)
    assert torch.equal(sampled, want) and torch.equal(sampled[0], torch.zeros(4))
    everything = kmeans_motifs(tensors, 4, start, iterations=6, force_zero=True)
    blocks = torch.cat([to_blocks(t, 4) for t in tensors])

    def distortion(motifs):
        return float(((blocks - motifs[nearest(blocks, motifs)]) ** 2).sum())

    assert distortion(sampled) < distortion(start) and distortion(sampled) < 1.05 * distortion(everything)
    with pytest.raises(momos.MoMosConfigError, match="generator"):
        kmeans_motifs(tensors, 4, start, iterations=1, force_zero=True, points_per_motif=50)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), zero=st.booleans())
def test_weighted_kmeans_equals_kmeans_over_blocks_repeated_by_their_weight(seed, zero):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(60, 3, generator=g, dtype=torch.float64)
    weights = torch.randint(0, 4, (60,), generator=g)
    start = sample_motifs([blocks], 3, 7, force_zero=zero, generator=g)
    weighted = kmeans_motifs([blocks], 3, start, iterations=4, force_zero=zero, weights=weights.float())
    repeated = kmeans_motifs([blocks.repeat_interleave(weights, dim=0)], 3, start, iterations=4, force_zero=zero)
    assert torch.allclose(weighted, repeated, atol=1e-9)


def test_weighted_kmeans_samples_weights_with_their_blocks_and_refuses_bad_weights():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(900, 4, generator=g), torch.randn(1203, generator=g)]  # 1,201 blocks of 4
    weights = torch.rand(1201, generator=g)
    start = sample_motifs(tensors, 4, 10, force_zero=True, generator=g)
    sampled = kmeans_motifs(tensors, 4, start, iterations=3, force_zero=True, points_per_motif=50,
                            generator=torch.Generator().manual_seed(7), weights=weights)
    rows = draw_without_replacement(1201, 500, torch.Generator().manual_seed(7)).sort().values
    want = kmeans_motifs([gather_blocks(tensors, 4, rows)], 4, start, iterations=3, force_zero=True,
                         weights=weights[rows])
    assert torch.equal(sampled, want)
    for bad in (weights[:-1], -weights, weights * float("nan")):
        with pytest.raises(momos.MoMosValueError, match="weights"):
            kmeans_motifs(tensors, 4, start, iterations=1, force_zero=True, weights=bad)
