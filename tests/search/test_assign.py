"""`momos.search.assign`: every engine returns the exact nearest motif, lowest index on ties, as defined there."""

from __future__ import annotations

import faiss
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momos.errors import MoMosConfigError, MoMosValueError
from momos.search import assign

ENGINES = ("torch", "kdtree", "faiss", "auto")


def reference(blocks: torch.Tensor, motifs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent brute force in float64: (first argmin index, the (m, k) distance matrix)."""
    d = (blocks.double()[:, None, :] - motifs.double()[None, :, :]).pow(2).sum(-1)
    return d.argmin(1), d


@st.composite
def grid_problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks and motifs on a coarse dyadic grid, so every distance is exact in float64 and ties are genuine:
    duplicate motifs, repeated and zero blocks, blocks halfway between motifs; optionally far from the
    origin, where faiss's float32 |x|^2 + |z|^2 - 2xz cannot tell the candidates apart."""
    s = draw(st.integers(1, 9))
    m, k = draw(st.integers(1, 50)), draw(st.integers(1, 25))
    values = st.integers(-3, 3)
    blocks = torch.tensor(draw(st.lists(st.lists(values, min_size=s, max_size=s), min_size=m, max_size=m)))
    motifs = torch.tensor(draw(st.lists(st.lists(values, min_size=s, max_size=s), min_size=k, max_size=k)))
    if draw(st.booleans()):
        motifs[0] = 0
    if draw(st.booleans()):  # motifs drawn from the blocks, as the paper's bank is
        motifs[: min(k, m)] = blocks[: min(k, m)]
    scale = 2.0 ** draw(st.integers(-12, 4))
    offset = 2.0 ** draw(st.sampled_from([0, 10, 40])) if draw(st.booleans()) else 0.0
    return (blocks * scale + offset).float(), (motifs * scale + offset).float()


@settings(max_examples=150, deadline=None)
@given(grid_problems(), st.sampled_from(ENGINES))
def test_every_engine_is_the_exact_nearest_with_lowest_index_on_ties(problem, engine):
    blocks, motifs = problem
    expected, _ = reference(blocks, motifs)
    assert torch.equal(assign.nearest(blocks, motifs, engine=engine), expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 300), st.integers(1, 80), st.integers(0, 2**31 - 1),
       st.sampled_from([1e-3, 1.0, 1e3]))
def test_engines_agree_bit_for_bit_on_random_floats(s, m, k, seed, scale):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(m, s, generator=g) * scale
    motifs = torch.randn(k, s, generator=g) * scale
    motifs[: min(k, m) // 2] = blocks[: min(k, m) // 2]
    results = {e: assign.nearest(blocks, motifs, engine=e) for e in ENGINES}
    for e in ENGINES[1:]:
        assert torch.equal(results[e], results["torch"]), e
    expected, d = reference(blocks, motifs)
    rows = torch.arange(m)
    differ = results["torch"] != expected
    # Only where the two sums of squares (in different orders) tie to float64 rounding.
    picked, best = d[rows, results["torch"]], d[rows, expected]
    assert torch.allclose(picked[differ], best[differ], rtol=1e-12, atol=0)


def test_faiss_near_ties_far_from_the_origin_are_decided_exactly():
    g = torch.Generator().manual_seed(0)
    blocks = 1000 + torch.randn(4000, 4, generator=g) * 1e-3
    motifs = blocks[:300].clone()
    motifs[1] = motifs[2]  # a duplicate: its blocks go to index 1
    expected, _ = reference(blocks, motifs)
    for engine in ("faiss", "kdtree"):
        assert torch.equal(assign.nearest(blocks, motifs, engine=engine), expected)


@pytest.mark.parametrize(("dtype", "offset", "noise", "blas"), [
    (torch.float64, 1e3, 1e-4, False),  # faiss rounds float64 blocks to float32: noise near that rounding
    (torch.float64, 1e4, 1e-3, False),
    (torch.float32, 1e2, 1e-1, True),  # |x|^2 + |z|^2 - 2 x.z in float32 cancels all but ~1e-7 |x|^2
    (torch.float32, 1e3, 1.0, True),
])
def test_faiss_float32_error_far_from_the_origin_is_bounded(dtype, offset, noise, blas, monkeypatch):
    # Blocks and motifs in a small cloud far from the origin: faiss's float32 distances err by about the gaps
    # between a block's nearest motifs and rank them wrongly for many blocks; faiss's answer may stand only
    # where the engine's error bound proves it.
    if blas:  # faiss takes its BLAS path only for many queries at once
        monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 0)
    g = torch.Generator().manual_seed(3)
    blocks = offset + noise * torch.randn(2000, 8, generator=g, dtype=torch.float64).to(dtype)
    motifs = offset + noise * torch.randn(200, 8, generator=g, dtype=torch.float64).to(dtype)
    expected = assign.nearest(blocks, motifs, engine="torch")
    wrong = int((assign.nearest(blocks, motifs, engine="faiss") != expected).sum())
    assert wrong == 0, f"faiss's engine answered {wrong} of 2000 blocks wrongly"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    g = torch.Generator().manual_seed(1)
    blocks = torch.randn(500, 4, generator=g).to(dtype)
    motifs = blocks[:40].clone()
    motifs[0] = 0
    expected = assign.nearest(blocks, motifs, engine="torch")
    for engine in ENGINES[1:]:
        assert torch.equal(assign.nearest(blocks, motifs, engine=engine), expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_chunked_queries_match_one_call_and_large_inputs_work(engine, monkeypatch):
    monkeypatch.setattr(assign, "_QUERY_ROWS", 37)
    monkeypatch.setattr(assign, "_CHUNK_ELEMENTS", 50)
    g = torch.Generator().manual_seed(2)
    blocks = torch.randn(1000, 3, generator=g)
    motifs = torch.randn(60, 3, generator=g)
    search = assign.MotifSearch(motifs, num_queries=1000, engine=engine)
    parts = torch.cat([search.nearest(blocks[i:i + 101]) for i in range(0, 1000, 101)])
    expected, _ = reference(blocks, motifs)
    assert torch.equal(parts, expected)
    assert torch.equal(search.nearest(blocks), expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_single_motif_and_no_blocks(engine):
    motifs = torch.ones(3, 2)  # three copies of one motif: index 0 always
    assert torch.equal(assign.nearest(torch.randn(10, 2), motifs, engine=engine), torch.zeros(10, dtype=torch.int64))
    assert assign.nearest(torch.empty(0, 2), motifs, engine=engine).shape == (0,)


def test_auto_choice_follows_the_measured_rule():
    assert assign.choose_engine(4, 100, 1000) == "torch"  # few pairs
    assert assign.choose_engine(4, 16, 100_000) == "torch"  # a tiny bank
    assert assign.choose_engine(4, 12_000, 250_000) == "kdtree"
    assert assign.choose_engine(4, 64, 100_000) == "kdtree"
    assert assign.choose_engine(6, 300, 60_000) == "faiss"
    assert assign.choose_engine(6, 1000, 60_000) == "kdtree"
    assert assign.choose_engine(8, 12_000, 120_000) == "kdtree"
    assert assign.choose_engine(8, 600, 60_000) == "faiss"
    assert assign.choose_engine(16, 300_000, 1_000_000) == "faiss"


def test_faiss_thread_setting_is_restored():
    before = faiss.omp_get_max_threads()
    assign.nearest(torch.randn(2000, 16), torch.randn(100, 16), engine="faiss")
    assert faiss.omp_get_max_threads() == before


def test_errors_name_the_field_and_value():
    with pytest.raises(MoMosConfigError, match="engine.*'gpu'"):
        assign.nearest(torch.zeros(2, 2), torch.zeros(1, 2), engine="gpu")
    with pytest.raises(MoMosValueError, match="blocks hold NaN"):
        assign.nearest(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2))
    with pytest.raises(MoMosValueError, match="motifs hold NaN"):
        assign.nearest(torch.zeros(1, 2), torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(MoMosValueError, match=r"shape \(m, 2\)"):
        assign.nearest(torch.zeros(3, 4), torch.zeros(1, 2))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 60), s=st.integers(1, 6), repeats=st.integers(0, 20))
def test_unique_rows_equal_torch_unique(seed: int, k: int, s: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (k, s), generator=g).double() * 0.5  # few values: many equal rows and columns
    rows = torch.randint(0, k, (min(repeats, k),), generator=g)
    x[rows] = -0.0 * x[rows]  # zeros of either sign are equal rows
    want_unique, want_inverse = torch.unique(x, dim=0, return_inverse=True)
    unique, inverse = assign._unique_rows(x)
    assert torch.equal(unique, want_unique)
    assert torch.equal(inverse, want_inverse)
