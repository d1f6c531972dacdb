"""The compiled CPU loops compute what `momos.search.incremental`'s torch version defines."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momos.search import _compiled, assign, incremental
from momos.search.incremental import FACETS, Search, motif_index


def _torch_settle(x: torch.Tensor, lists: torch.Tensor, rest: torch.Tensor,
                  motifs: torch.Tensor) -> tuple[Search, torch.Tensor, torch.Tensor]:
    previous = incremental.KERNELS
    incremental.KERNELS = False
    try:
        return incremental._settle(x, lists, rest, motif_index(motifs, torch.float64))
    finally:
        incremental.KERNELS = previous


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([2, 3, 12, 40, 200]), s=st.sampled_from([1, 2, 4, 8]),
       width=st.sampled_from([2, 5, FACETS + 2, 24, 64, 128]), copies=st.booleans())  # 44+: the prefilter
def test_settle_equals_the_torch_settle(seed: int, k: int, s: int, width: int, copies: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, s, generator=g, dtype=torch.float64)
    if copies:  # copies of one motif, which are never nearest: no facet
        motifs[k // 2:] = motifs[0]
    x = torch.randn(100, s, generator=g, dtype=torch.float64)
    width = min(width, k)
    lists = torch.stack([torch.randperm(k, generator=g)[:width] for _ in range(100)])  # distinct per row
    # Lower bounds on the off-list distances: exact, loose, or too small to prove anything.
    off = torch.where(torch.arange(k) == lists[..., None], math.inf, torch.cdist(x, motifs)[:, None, :]).amin((1, 2))
    rest = off * torch.rand(100, generator=g, dtype=torch.float64).clamp_min(0.5) if width < k else off
    want, want_proven, want_runner_up = _torch_settle(x, lists, rest, motifs)
    c = x.shape[0]
    got = Search(torch.empty(c, dtype=torch.int64), torch.empty(c, dtype=torch.float64),
                 torch.empty(c, FACETS, dtype=torch.int64), torch.empty(c, dtype=torch.float64),
                 torch.empty(c, dtype=torch.float64))
    proven, runner_up = torch.empty(c, dtype=torch.bool), torch.empty(c, dtype=torch.bool)
    _compiled.settle(x.numpy(), lists.numpy(), rest.numpy(), motifs.numpy(), got.nearest.numpy(), got.radius.numpy(),
                   got.listed.numpy(), got.bound.numpy(), got.pair_radius.numpy(), proven.numpy(), runner_up.numpy())
    assert torch.equal(got.nearest, want.nearest)
    assert torch.equal(proven, want_proven)
    assert torch.equal(runner_up, want_runner_up)
    assert torch.equal(got.listed, want.listed)
    for name in ("radius", "bound", "pair_radius"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-15)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, math.inf]) | st.floats(0, 4), min_size=1, max_size=200),
       wanted=st.integers(1, 20))
def test_smallest_ranks_finite_values_by_value_then_position(values: list[float], wanted: int) -> None:
    array, order = np.array(values), np.full(2 * len(values), -1, dtype=np.int64)
    count = _compiled._smallest(array, len(values), wanted, order, np.empty(wanted))
    finite = [j for j in np.argsort(array, kind="stable") if array[j] < math.inf]
    assert count == min(wanted, len(finite))
    assert order[:count].tolist() == finite[:wanted]


def test_a_search_its_list_cannot_prove_is_proven_in_the_kd_tree() -> None:
    # A block far from every motif: its nearest motif's list reaches too short, the tree's search settles it.
    g = torch.Generator().manual_seed(0)
    motifs = torch.randn(600, 4, generator=g, dtype=torch.float64) * 0.1
    blocks = motifs[:50] + 0.01 * torch.randn(50, 4, generator=g, dtype=torch.float64)
    tracker = incremental.MosaicTracker()
    tracker.mosaic(blocks, motifs, assign.nearest(blocks, motifs))
    index = tracker._index
    assert index.tree is not None
    state, _, _ = tracker._arrays
    z, lists = index.motifs.numpy(), index.lazy
    far = blocks.clone()
    far[0] = torch.tensor([0.9, -0.7, 0.8, 0.6], dtype=torch.float64)
    center = int(tracker._mosaic[0])
    scratch, work = _compiled._scratch(lists[0].shape[1], z.shape[0])
    assert not _compiled._search_near(0, far.numpy(), 0, center, z, lists, state, scratch, work)
    query = _compiled._tree_scratch(index.tree.arrays, z, incremental.SEARCHED, index.marks(1), 0)
    assert _compiled._search_again(0, far.numpy(), center, z, lists, index.tree.arrays, state, scratch, work, query, 0)
    want = int(assign.nearest(far[:1], motifs)[0])
    assert state[1][0] == want and state[6][0, 0] == want  # recorded: its nearest motif, first of its candidates
    assert state[7][0] > 0  # and a bound to move in


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([1, 5, 128, 129, 400]), duplicates=st.booleans())
def test_neighbour_lists_hold_the_nearest_motifs_and_a_safe_reach(seed: int, k: int, duplicates: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(k, 4, generator=g, dtype=torch.float64)
    if duplicates and k > 4:
        z[1:4] = z[0]  # equal distances: the lowest index first
    index = motif_index(z, torch.float64)
    neighbors, spacing, reach, built = index.lazy
    width = neighbors.shape[1]
    assert width == min(k, incremental.KERNEL_NEIGHBORS)
    _, work = _compiled._scratch(width, k)
    d = sum((z[:, None, c] - z[None, :, c]) ** 2 for c in range(4))  # D of every pair, coordinate by coordinate
    for center in range(k):
        _compiled._near(z.numpy(), center, index.lazy, work)
        order = torch.from_numpy(np.argsort(d[center].numpy(), kind="stable"))
        listed = torch.from_numpy(neighbors[center]).long()
        assert torch.equal(listed.sort().values, order[:width].sort().values)  # in no particular order
        # Each listed motif's distance to the center, in float32 and never below the exact one.
        exact = d[center][listed].sqrt()
        spaced = torch.from_numpy(spacing[center]).double()
        assert (spaced >= exact).all() and (spaced <= exact * (1 + 2**-23)).all()
        off_list = d[center][order[width:]]
        assert reach[center] == (math.sqrt(off_list.min().item()) if k > width else math.inf)
    assert built.all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), duplicates=st.booleans())
def test_lists_from_the_kd_tree_are_the_lists_brute_force_builds(seed: int, duplicates: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(600, 4, generator=g, dtype=torch.float64) * 0.05
    if duplicates:
        z[1:4] = z[0]  # equal distances: the lowest index first
    index = motif_index(z, torch.float64)
    assert index.tree is not None
    centers = torch.randint(0, 600, (300,), generator=g)
    index.enlist(centers)
    neighbors, spacing, reach, built = index.lazy
    width = neighbors.shape[1]
    assert built.sum() == centers.unique().numel()
    d = sum((z[:, None, c] - z[None, :, c]) ** 2 for c in range(4))
    for center in centers.unique().tolist():
        order = torch.from_numpy(np.argsort(d[center].numpy(), kind="stable"))
        listed = torch.from_numpy(neighbors[center]).long()
        assert torch.equal(listed.sort().values, order[:width].sort().values)  # in no particular order
        assert reach[center] == math.sqrt(d[center][order[width]].item())  # the first motif left off
        exact = d[center][listed].sqrt()
        spaced = torch.from_numpy(spacing[center]).double()
        assert (spaced >= exact).all() and (spaced <= exact * (1 + 2**-23)).all()


@pytest.mark.parametrize("k", [200, 600])  # lists built on first use (no tree) / by the KD-tree
def test_threads_split_the_blocks_and_agree_with_one_thread(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    motifs = torch.randn(k, 4, generator=g) * 0.1
    start = torch.randn(3 * _compiled.CHUNK + 100, 4, generator=g) * 0.1  # several chunks, a partial last one
    guess = torch.randint(0, k, (start.shape[0],), generator=g)
    steps = [start + 0.003 * (t + 1) * torch.randn(start.shape, generator=g) for t in range(4)]
    previous = torch.get_num_threads()
    mosaics = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            tracker, bank = incremental.MosaicTracker(), motifs.clone()  # a bank of its own: lists built anew
            mosaics[count] = [tracker.mosaic(blocks, bank, guess).clone() for blocks in [start, *steps]]
    finally:
        torch.set_num_threads(previous)
    for blocks, one, two in zip([start, *steps], mosaics[1], mosaics[2], strict=True):
        assert torch.equal(one, assign.nearest(blocks, motifs))
        assert torch.equal(two, one)


def test_the_compiled_loops_leave_torch_thread_count_alone() -> None:
    # numba's OpenMP pool sets OpenMP's thread count when it starts: in a fresh process, as a user's first
    # STE forward would meet it.
    script = (
        "import torch, momos\n"
        "from momos.apps.models import mlp\n"
        "torch.set_num_threads(1)\n"
        "model = momos.prepare(mlp((64,), 10), momos.MoMosConfig(capacity=0.05, mode='ste'))\n"
        "momos.refresh(model)\n"
        "model(torch.randn(4, 64))\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "1"
