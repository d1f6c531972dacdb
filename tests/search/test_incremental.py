"""The STE forward's incremental assignment equals a full assignment, however the blocks move."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import momos
from momos.blocks import to_blocks
from momos.errors import MoMosValueError
from momos.nn.parametrize import prepared_tensors
from momos.search import assign, incremental
from momos.search.incremental import NEIGHBORS, SEARCHED, MosaicTracker, motif_index, search

# Every test below runs both ways: the compiled CPU loops (`momos.search._compiled`) and the torch version.
ENGINES = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])


@contextmanager
def engine(compiled: bool) -> Iterator[None]:
    """Run the block below with the compiled loops on or off (hypothesis tests cannot take monkeypatch)."""
    previous = incremental.KERNELS
    incremental.KERNELS = compiled
    try:
        yield
    finally:
        incremental.KERNELS = previous


def _bank(seed: int, k: int, s: int, duplicates: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, s, generator=g)
    if duplicates and k > 2:
        motifs[1] = motifs[2]  # a tie on every block nearest to it
    motifs[0] = 0
    return motifs


def _around_copies(k: int, copies: int, count: int,
                   spread: float) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """(the generator, a bank of `k` motifs of 4 in which motif 2 is followed by `copies` copies of it, `count`
    blocks within about `spread` of it)."""
    g = torch.Generator().manual_seed(0)
    motifs = torch.randn(k, 4, generator=g)
    motifs[3:3 + copies] = motifs[2]
    return g, motifs, motifs[2] + spread * torch.randn(count, 4, generator=g)


@ENGINES
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([1, 2, 7, NEIGHBORS, 3 * NEIGHBORS, 300]),
       s=st.sampled_from([1, 2, 4]), duplicates=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       scales=st.lists(st.sampled_from([0.0, 1e-4, 1e-2, 0.3, 3.0]), min_size=1, max_size=6))
def test_tracker_equals_full_assignment_along_a_random_walk(compiled: bool, seed: int, k: int, s: int,
                                                            duplicates: bool, dtype: torch.dtype,
                                                            scales: list[float]) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    motifs = _bank(seed, k, s, duplicates).to(dtype)
    blocks = torch.randn(300, s, generator=g, dtype=dtype)
    blocks[:20] = motifs[torch.arange(20) % k]  # blocks exactly on motifs, some on duplicated ones
    guess = torch.randint(0, k, (300,), generator=g)  # any start mosaic must give the same answer
    with engine(compiled):
        tracker = MosaicTracker()
        for scale in [0.0, *scales]:
            blocks = blocks + scale * torch.randn(blocks.shape, generator=g, dtype=dtype)
            assert torch.equal(tracker.mosaic(blocks, motifs, guess), assign.nearest(blocks, motifs))


@ENGINES
@pytest.mark.parametrize("k", [40, 300])  # neighbour lists / KD-tree
def test_tracker_resolves_ties_of_more_motifs_than_a_search_lists(compiled: bool, k: int) -> None:
    """Blocks equidistant from more than `SEARCHED` motifs (copies of one motif) go to the lowest index,
    as in `assign`, whichever way they are searched."""
    g, motifs, blocks = _around_copies(k, SEARCHED + 5, 500, 0.01)
    with engine(compiled):
        tracker = MosaicTracker()
        for _ in range(4):
            assert torch.equal(tracker.mosaic(blocks, motifs, torch.zeros(500, dtype=torch.int64)),
                               assign.nearest(blocks, motifs))
            blocks = blocks + 0.05 * torch.randn(blocks.shape, generator=g)


@ENGINES
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([2, 5, 3 * NEIGHBORS, 300]), copies=st.booleans())
def test_slack_is_a_safe_radius(compiled: bool, seed: int, k: int, copies: bool) -> None:
    """Any move shorter than the slack keeps the nearest motif (checked on the slack's own boundary), copies of
    the nearest motif in the bank included."""
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, 3, generator=g, dtype=torch.float64)
    if copies:
        motifs[1:4] = motifs[0]
    blocks = torch.randn(200, 3, generator=g, dtype=torch.float64)
    with engine(compiled):
        found = search(blocks, torch.zeros(200, dtype=torch.int64), motif_index(motifs, torch.float64))
    nearest, radius = found.nearest, found.radius
    assert torch.equal(nearest, assign.nearest(blocks, motifs))
    safe = radius > 0
    radius = torch.where(torch.isfinite(radius), radius, 10.0)  # every other motif a copy: any move
    direction = torch.nn.functional.normalize(torch.randn(200, 3, generator=g, dtype=torch.float64), dim=1)
    moved = blocks + direction * radius.clamp_min(0).unsqueeze(1) * 0.999
    assert torch.equal(assign.nearest(moved[safe], motifs), nearest[safe])


@ENGINES
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([2, 5, 3 * NEIGHBORS, 300]), s=st.sampled_from([2, 4]))
def test_search_radii_confine_the_nearest_motif(compiled: bool, seed: int, k: int, s: int) -> None:
    """Within the pair radius the nearest motif is the nearest or the first listed one; within the bound
    it is the nearest or any listed one (checked just inside each radius, in random directions)."""
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, s, generator=g, dtype=torch.float64)
    blocks = torch.randn(200, s, generator=g, dtype=torch.float64)
    with engine(compiled):
        found = search(blocks, torch.zeros(200, dtype=torch.int64), motif_index(motifs, torch.float64))
    assert torch.equal(found.nearest, assign.nearest(blocks, motifs))
    for radius, allowed in ((found.pair_radius, found.listed[:, :1]), (found.bound, found.listed)):
        safe = radius > 0
        radius = torch.where(torch.isfinite(radius), radius, 10.0)  # unbounded: any move
        direction = torch.nn.functional.normalize(torch.randn(200, s, generator=g, dtype=torch.float64), dim=1)
        moved = blocks + direction * radius.clamp_min(0).unsqueeze(1) * 0.999
        candidates = torch.cat([found.nearest.unsqueeze(1), allowed], 1)
        assert (candidates == assign.nearest(moved, motifs).unsqueeze(1)).any(1)[safe].all()


@ENGINES
def test_tracker_follows_blocks_oscillating_across_a_facet(compiled: bool) -> None:
    """STE drives blocks back and forth across the facet between two motifs by ever smaller steps: each
    call must still give assign's answer, ties (exactly on the facet) included."""
    g = torch.Generator().manual_seed(0)
    motifs = torch.randn(300, 4, generator=g)
    pairs = torch.randint(0, 300, (500, 2), generator=g)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    middle = (motifs[pairs[:, 0]] + motifs[pairs[:, 1]]) / 2
    across = torch.nn.functional.normalize(motifs[pairs[:, 1]] - motifs[pairs[:, 0]], dim=1)
    guess = torch.zeros(middle.shape[0], dtype=torch.int64)
    with engine(compiled):
        tracker = MosaicTracker()
        for step in range(12):
            blocks = middle + across * ((-1) ** step) * 10.0 ** -(step % 7)
            assert torch.equal(tracker.mosaic(blocks, motifs, guess), assign.nearest(blocks, motifs))
    assert tracker.searched < tracker.rechecked  # most calls settled without a search


@ENGINES
def test_tracker_reassigns_only_moved_blocks_and_restarts_on_a_new_bank(compiled: bool) -> None:
    g = torch.Generator().manual_seed(0)
    motifs = torch.randn(50, 4, generator=g)
    blocks = torch.randn(1000, 4, generator=g)
    guess = torch.zeros(1000, dtype=torch.int64)
    with engine(compiled):
        tracker = MosaicTracker()
        tracker.mosaic(blocks, motifs, guess)
        assert tracker.rechecked == 1000
        tracker.mosaic(blocks, motifs, guess)
        assert tracker.rechecked == 0
        blocks[:10] += 5.0
        assert torch.equal(tracker.mosaic(blocks, motifs, guess), assign.nearest(blocks, motifs))
        assert 0 < tracker.rechecked <= 10
        motifs.copy_(torch.randn(50, 4, generator=g))  # an in-place refresh
        assert torch.equal(tracker.mosaic(blocks, motifs, guess), assign.nearest(blocks, motifs))
        assert tracker.rechecked == 1000


@ENGINES
@pytest.mark.parametrize("k", [40, 300])  # neighbour lists / KD-tree
def test_copies_of_the_nearest_motif_cost_no_recheck(compiled: bool, k: int) -> None:
    """A copy of a block's nearest motif (a bank drawn from blocks that repeat, as norm layers' ones and zeros
    do) is never nearest: it takes nothing from the slack, so blocks that did not move are not looked at again."""
    _, motifs, blocks = _around_copies(k, 4, 200, 0.05)
    with engine(compiled):
        tracker = MosaicTracker()
        for _ in range(2):
            assert torch.equal(tracker.mosaic(blocks, motifs, torch.zeros(200, dtype=torch.int64)),
                               assign.nearest(blocks, motifs))
    assert tracker.rechecked == 0


@ENGINES
@pytest.mark.parametrize(("block_size", "capacity", "width"), [(2, 0.2, 64), (4, 0.25, 256)])  # lists; KD-tree
def test_ste_training_forward_is_the_full_assignment_at_every_step(compiled: bool, block_size: int,
                                                                   capacity: float, width: int) -> None:
    with engine(compiled):
        _train_checking_every_step(block_size, capacity, width)


def _train_checking_every_step(block_size: int, capacity: float, width: int) -> None:
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


@ENGINES
def test_ste_forward_follows_writes_the_version_counter_does_not_see(compiled: bool) -> None:
    """Weights changed through ``.data`` (old-style optimizers) or padded tensors (a fresh block copy per
    call) must still get the full assignment of what they hold now."""
    torch.manual_seed(0)
    model = momos.prepare(torch.nn.Sequential(torch.nn.Linear(8, 40), torch.nn.Linear(40, 3)),  # bias 3: padded
                          momos.MoMosConfig(block_size=4, capacity=0.3, mode="ste"))
    momos.refresh(model)
    with engine(compiled):
        for _ in range(3):
            for _, param, latent in prepared_tensors(model):
                latent.data.add_(0.05 * torch.randn_like(latent))
                motifs = param.bank.motifs
                expected = motifs[assign.nearest(to_blocks(latent, 4), motifs)].reshape(-1)[:param.numel]
                assert torch.equal(param(latent).detach().reshape(-1), expected)


def test_ste_gradient_passes_straight_through_to_the_latent_weights() -> None:
    """The forward is exactly the MoMos weight; the latent weight gets the gradient of that weight."""
    torch.manual_seed(0)
    model = momos.prepare(torch.nn.Linear(8, 6), momos.MoMosConfig(block_size=4, capacity=0.3, mode="ste"))
    momos.refresh(model)
    with torch.no_grad():
        model.parametrizations.weight.original.add_(0.03)  # off the mosaic: MoMos weight != latent
    latent = model.parametrizations.weight.original
    weight = model.weight
    assert not torch.equal(weight, latent)
    upstream = torch.randn_like(weight)
    (weight * upstream).sum().backward()
    assert torch.equal(latent.grad, upstream)


def test_a_copied_model_tracks_its_own_weights() -> None:
    """A deep copy (prepare, convert and users make them) follows its own latent weights, not the original's."""
    import copy

    torch.manual_seed(0)
    model = momos.prepare(torch.nn.Linear(16, 32), momos.MoMosConfig(block_size=4, capacity=0.2, mode="ste"))
    momos.refresh(model)
    model.weight  # noqa: B018 (builds the tracker's state)
    twin = copy.deepcopy(model)
    for m in (model, twin):
        with torch.no_grad():
            m.parametrizations.weight.original.add_(0.02 * torch.randn(32, 16))
    for m in (twin, model, twin):
        param, latent = m.parametrizations.weight[0], m.parametrizations.weight.original
        expected = param.bank.motifs[assign.nearest(to_blocks(latent, 4), param.bank.motifs)].reshape(32, 16)
        assert torch.equal(m.weight, expected)


@ENGINES
def test_tracker_starts_from_any_guess_even_an_invalid_one(compiled: bool) -> None:
    """The start mosaic only speeds the first call up: out-of-range or misshapen guesses (a corrupted
    state dict) still give assign's answer, never a read outside the bank."""
    g = torch.Generator().manual_seed(0)
    motifs = torch.randn(300, 4, generator=g)
    blocks = torch.randn(200, 4, generator=g)
    for guess in (torch.full((200,), 300), torch.full((200,), -1), torch.zeros(7, dtype=torch.int64)):
        with engine(compiled):
            assert torch.equal(MosaicTracker().mosaic(blocks, motifs, guess), assign.nearest(blocks, motifs))


@ENGINES
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("k", [50, 300])  # neighbour lists; KD-tree
def test_non_finite_latent_weights_are_refused_and_the_tracker_starts_over(compiled: bool, bad: float,
                                                                            k: int) -> None:
    """A diverged training gets a clear error, on a first call and on a later one alike, instead of the last
    motifs its blocks had; once the weights are finite again the answer is assign's."""
    g = torch.Generator().manual_seed(k)
    motifs = torch.randn(k, 4, generator=g)
    blocks = torch.randn(5000, 4, generator=g)
    guess = torch.zeros(5000, dtype=torch.int64)
    with engine(compiled):
        tracker = MosaicTracker()
        tracker.mosaic(blocks, motifs, guess)
        broken = blocks.clone()
        broken[4321, 2] = bad
        for _ in range(2):  # a later call, then a restart on a new bank
            with pytest.raises(MoMosValueError, match=r"latent weights hold NaN or Inf values: 1 of 5000 blocks, "
                                                      r"the first block 4321"):
                tracker.mosaic(broken, motifs, guess)
            motifs.add_(0.0)  # an in-place write: the next call restarts as after a refresh
        blocks += 0.01 * torch.randn(blocks.shape, generator=g)
        assert torch.equal(tracker.mosaic(blocks, motifs, guess), assign.nearest(blocks, motifs))
