"""The STE forward's incremental assignment equals a full assignment, however the blocks move."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import momos
from momos import assign
from momos.api import prepared_tensors
from momos.blocks import to_blocks
from momos.incremental import NEIGHBORS, MosaicTracker, motif_index, search


def _bank(seed: int, k: int, s: int, duplicates: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, s, generator=g)
    if duplicates and k > 2:
        motifs[1] = motifs[2]  # a tie on every block nearest to it
    motifs[0] = 0
    return motifs


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([1, 2, 7, NEIGHBORS, 3 * NEIGHBORS, 300]),
       s=st.sampled_from([1, 2, 4]), duplicates=st.booleans(),
       scales=st.lists(st.sampled_from([0.0, 1e-4, 1e-2, 0.3, 3.0]), min_size=1, max_size=6))
def test_tracker_equals_full_assignment_along_a_random_walk(seed: int, k: int, s: int, duplicates: bool,
                                                            scales: list[float]) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    motifs = _bank(seed, k, s, duplicates)
    blocks = torch.randn(300, s, generator=g)
    blocks[:20] = motifs[torch.arange(20) % k]  # blocks exactly on motifs, some on duplicated ones
    tracker = MosaicTracker()
    guess = torch.randint(0, k, (300,), generator=g)  # any start mosaic must give the same answer
    for scale in [0.0, *scales]:
        blocks = blocks + scale * torch.randn(blocks.shape, generator=g)
        assert torch.equal(tracker.mosaic(blocks, motifs, guess), assign.nearest(blocks, motifs))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([2, 5, 3 * NEIGHBORS, 300]))
def test_slack_is_a_safe_radius(seed: int, k: int) -> None:
    """Any move shorter than the slack keeps the nearest motif (checked on the slack's own boundary)."""
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, 3, generator=g, dtype=torch.float64)
    blocks = torch.randn(200, 3, generator=g, dtype=torch.float64)
    found = search(blocks, torch.zeros(200, dtype=torch.int64), motif_index(motifs, torch.float64))
    nearest, radius = found.nearest, found.radius
    assert torch.equal(nearest, assign.nearest(blocks, motifs))
    safe = radius > 0
    direction = torch.nn.functional.normalize(torch.randn(200, 3, generator=g, dtype=torch.float64), dim=1)
    moved = blocks + direction * radius.clamp_min(0).unsqueeze(1) * 0.999
    assert torch.equal(assign.nearest(moved[safe], motifs), nearest[safe])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([2, 5, 3 * NEIGHBORS, 300]), s=st.sampled_from([2, 4]))
def test_search_radii_confine_the_nearest_motif(seed: int, k: int, s: int) -> None:
    """Within the pair radius the nearest motif is the nearest or the first listed one; within the bound
    it is the nearest or any listed one (checked just inside each radius, in random directions)."""
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, s, generator=g, dtype=torch.float64)
    blocks = torch.randn(200, s, generator=g, dtype=torch.float64)
    found = search(blocks, torch.zeros(200, dtype=torch.int64), motif_index(motifs, torch.float64))
    assert torch.equal(found.nearest, assign.nearest(blocks, motifs))
    for radius, allowed in ((found.pair_radius, found.listed[:, :1]), (found.bound, found.listed)):
        safe = radius > 0
        radius = torch.where(torch.isfinite(radius), radius, 10.0)  # unbounded: any move
        direction = torch.nn.functional.normalize(torch.randn(200, s, generator=g, dtype=torch.float64), dim=1)
        moved = blocks + direction * radius.clamp_min(0).unsqueeze(1) * 0.999
        candidates = torch.cat([found.nearest.unsqueeze(1), allowed], 1)
        assert (candidates == assign.nearest(moved, motifs).unsqueeze(1)).any(1)[safe].all()


def test_tracker_follows_blocks_oscillating_across_a_facet() -> None:
    """STE drives blocks back and forth across the facet between two motifs by ever smaller steps: each
    call must still give assign's answer, ties (exactly on the facet) included."""
    g = torch.Generator().manual_seed(0)
    motifs = torch.randn(300, 4, generator=g)
    pairs = torch.randint(0, 300, (500, 2), generator=g)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    middle = (motifs[pairs[:, 0]] + motifs[pairs[:, 1]]) / 2
    across = torch.nn.functional.normalize(motifs[pairs[:, 1]] - motifs[pairs[:, 0]], dim=1)
    tracker = MosaicTracker()
    guess = torch.zeros(middle.shape[0], dtype=torch.int64)
    for step in range(12):
        blocks = middle + across * ((-1) ** step) * 10.0 ** -(step % 7)
        assert torch.equal(tracker.mosaic(blocks, motifs, guess), assign.nearest(blocks, motifs))
    assert tracker.searched < tracker.rechecked  # most calls settled without a search


def test_tracker_reassigns_only_moved_blocks_and_restarts_on_a_new_bank() -> None:
    g = torch.Generator().manual_seed(0)
    motifs = torch.randn(50, 4, generator=g)
    blocks = torch.randn(1000, 4, generator=g)
    tracker = MosaicTracker()
    tracker.mosaic(blocks, motifs, torch.zeros(1000, dtype=torch.int64))
    assert tracker.rechecked == 1000
    tracker.mosaic(blocks, motifs, torch.zeros(1000, dtype=torch.int64))
    assert tracker.rechecked == 0
    blocks[:10] += 5.0
    assert torch.equal(tracker.mosaic(blocks, motifs, torch.zeros(1000, dtype=torch.int64)),
                       assign.nearest(blocks, motifs))
    assert 0 < tracker.rechecked <= 10
    motifs.copy_(torch.randn(50, 4, generator=g))  # an in-place refresh
    assert torch.equal(tracker.mosaic(blocks, motifs, torch.zeros(1000, dtype=torch.int64)),
                       assign.nearest(blocks, motifs))
    assert tracker.rechecked == 1000


@pytest.mark.parametrize(("block_size", "capacity", "width"), [(2, 0.2, 64), (4, 0.25, 256)])  # lists; KD-tree
def test_ste_training_forward_is_the_full_assignment_at_every_step(block_size: int, capacity: float,
                                                                   width: int) -> None:
    torch.manual_seed(0)
    model = momos.prepare(torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 4)),
                          momos.MoMosConfig(block_size=block_size, capacity=capacity, mode="ste"))
    momos.refresh(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    for step in range(12):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 6:
            momos.refresh(model)
        for _, param, latent in prepared_tensors(model):
            motifs = param.bank.motifs
            expected = motifs[assign.nearest(to_blocks(latent, block_size), motifs)].reshape(-1)[:param.numel]
            assert torch.equal(param(latent).detach().reshape(-1), expected)


def test_ste_forward_follows_writes_the_version_counter_does_not_see() -> None:
    """Weights changed through ``.data`` (old-style optimizers) or padded tensors (a fresh block copy per
    call) must still get the full assignment of what they hold now."""
    torch.manual_seed(0)
    model = momos.prepare(torch.nn.Sequential(torch.nn.Linear(8, 40), torch.nn.Linear(40, 3)),  # bias 3: padded
                          momos.MoMosConfig(block_size=4, capacity=0.3, mode="ste"))
    momos.refresh(model)
    for _ in range(3):
        for _, param, latent in prepared_tensors(model):
            latent.data.add_(0.05 * torch.randn_like(latent))
            motifs = param.bank.motifs
            expected = motifs[assign.nearest(to_blocks(latent, 4), motifs)].reshape(-1)[:param.numel]
            assert torch.equal(param(latent).detach().reshape(-1), expected)
