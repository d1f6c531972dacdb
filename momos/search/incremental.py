"""Exact nearest-motif assignment of blocks that move a little at a time (the STE forward's hot path).

Facts from the triangle inequality make it cheap, and none gives up exactness:

- Slack. A block at ``x`` is nearest to motif ``a`` while it stays closer to ``x`` than the nearest
  Voronoi facet of ``a``'s cell, ``min_j (d_j^2 - d_a^2) / (2 |z_j - z_a|)``. So a forward pass looks
  again only at the blocks that drifted that far since they were last evaluated (`MosaicTracker`).
- Pairs. Closer than the second-nearest facet, the nearest motif is ``a`` or the motif ``b`` behind the
  nearest facet: two distances decide. This is the common case under STE, whose updates drive blocks
  back and forth across one facet (and Adam's shrinking steps pin them onto it).
- Candidates. A search keeps, per block, the `FACETS` motifs with the nearest facets and a bound on the
  distance to every other facet; within that bound of where it was searched, the nearest motif of a
  block is one of these candidates. Only blocks that move beyond their bound are searched again.
- Searches. On CPU with small blocks a KD-tree over the bank finds each block's `SEARCHED` nearest
  motifs, the last one's distance bounding all others. Elsewhere each motif's `NEIGHBORS` nearest
  motifs are listed (`MotifIndex`): a block at distance ``r`` from motif ``c`` has every motif within
  ``t`` of it inside the ball of radius ``r + t`` around ``c``, so it searches only its previous motif's
  list, and the whole bank where the list is provably too short.

On CPU (`KERNELS`) the tracker's per-step pass, its restart on a new bank and the settling of searches
run as compiled loops (`momos.search._compiled`), which first search a block again among the `KERNEL_NEIGHBORS`
nearest motifs of its nearest candidate, listed for any bank; this module's torch version serves other
devices.

Distances are computed as `momos.search.assign` defines them (float64, coordinate by coordinate) and ties go to
the lowest index as there; every bound keeps a relative margin (`MARGIN`) for float rounding, and motifs
too close to separate from rounding are ties. So the result always equals ``assign.nearest(blocks,
motifs)``, which decides the rare blocks where more than `SEARCHED` motifs tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from momos.errors import MoMosValueError
from momos.search import _compiled, assign, kdtree
from momos.search._compiled import _TIE_SPACING, MARGIN
from momos.search.kdtree import MotifTree

__all__ = ["FACETS", "KERNELS", "KERNEL_NEIGHBORS", "NEIGHBORS", "SEARCHED", "MosaicTracker", "MotifIndex", "Search",
           "motif_index", "nearest_op", "search"]

# Motifs listed per motif (banks without a KD-tree): long enough to settle almost every search.
NEIGHBORS = 64
# Motifs listed per motif for the compiled loops, whose search is a vectorized pass over the list: long
# enough that blocks far from every motif rarely fall back to brute force (1 KB per motif listed).
KERNEL_NEIGHBORS = 128
# Motifs besides the nearest a block keeps as candidates after a search: those with the nearest facets.
FACETS = 10
# Nearest motifs a KD-tree search fetches (at least FACETS + 2): more fetch slower, but bound farther.
SEARCHED = 24
# Banks searched with a KD-tree (CPU only): block sizes up to this, with at least this many motifs.
_TREE_MAX_BLOCK = 8
_TREE_MIN_MOTIFS = 256
# Elements of the largest temporary distance array.
_CHUNK_ELEMENTS = 1 << 21
# Largest bank (motifs x block size) without a KD-tree in which the compiled pass searches a block its
# neighbour lists do not settle by brute force (larger: the torch way, after the pass).
_BRUTE_FORCE = 1 << 14
# On CPU the per-block loops run compiled (`momos.search._compiled`, numba); False runs the torch version
# everywhere, which computes the same answers (the tests compare both).
KERNELS = True


@dataclass(frozen=True)
class MotifIndex:
    """What searches of one bank start from: a KD-tree over the motifs where that pays (CPU, small block
    sizes, larger banks), else each motif's `NEIGHBORS` nearest motifs, complete within `reach`.

    `neighbors[a]` holds every motif closer to motif ``a`` than ``reach[a]`` (and some more, up to the
    list length); `motifs` is the bank in float64, the precision every distance here is computed in.
    """

    motifs: torch.Tensor  # (k, s) float64
    tree: MotifTree | None = None  # over `motifs`
    neighbors: torch.Tensor | None = None  # (k, L) int64 where there is no tree
    reach: torch.Tensor | None = None  # (k,) float64 where there is no tree
    # The compiled CPU loops' neighbour lists, built when first needed (`enlist`, or by brute force, O(k s)):
    # (k, L) int32 lists, (k, L) float32 distances to the listing motif, (k,) float64 reaches and (k,) bool
    # built flags, as numpy arrays (1 KB a motif at L = 128); None off the CPU.
    lazy: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    # The compiled KD-tree searches' marks (`marks`), grown on demand.
    _marks: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)

    def marks(self, runs: int) -> tuple[np.ndarray, np.ndarray]:
        """For each of `runs` threads of the compiled loops, the query that last kept each motif in its KD-tree
        search ``(runs, k)`` and its count of queries ``(runs,)``: kept with the bank, so that no call clears
        O(k) memory (empty rows where there is no tree)."""
        if not self._marks or self._marks[0].shape[0] < runs:
            k = self.motifs.shape[0] if self.tree is not None else 0
            self._marks[:] = [np.full((runs, k), -1, dtype=np.int64), np.zeros(runs, dtype=np.int64)]
        return self._marks[0], self._marks[1]

    def enlist(self, centers: torch.Tensor) -> None:
        """Build the compiled loops' lists of the motifs `centers` (any indices) in one query of the KD-tree,
        where there is one and the bank is longer than a list: O(L log k) a motif against O(k) by brute force,
        which a list built on first use costs."""
        if self.lazy is None or self.tree is None or self.motifs.shape[0] <= self.lazy[0].shape[1]:
            return
        neighbors, _, _, built = self.lazy
        wanted = np.unique(centers.numpy())
        wanted = wanted[~built[wanted]]
        if not wanted.size:
            return
        z = self.motifs.numpy()
        found, d = self.tree.neighbors(z[wanted], neighbors.shape[1] + 1, torch.get_num_threads())
        # The farthest found is the first left off the list: its distance bounds every other motif's.
        _compiled.enlist(z, wanted, np.ascontiguousarray(found[:, 1:]), np.sqrt(d[:, 0]), self.lazy)

    @classmethod
    def build(cls, motifs: torch.Tensor) -> MotifIndex:
        """The index of a ``(k, s)`` bank, once per bank: O(k log k) for a tree, else O(k^2 s)."""
        z = motifs.detach().to(torch.float64)
        k, s = z.shape
        lazy = None
        if KERNELS and z.device.type == "cpu":
            width = min(KERNEL_NEIGHBORS, k)
            lazy = (np.empty((k, width), dtype=np.int32), np.empty((k, width), dtype=np.float32), np.empty(k),
                    np.zeros(k, dtype=np.bool_))
        if k <= NEIGHBORS:
            everyone = torch.arange(k, device=z.device).expand(k, k)
            return cls(z, None, everyone, torch.full((k,), math.inf, dtype=torch.float64, device=z.device), lazy)
        if z.device.type == "cpu" and s <= _TREE_MAX_BLOCK and k >= _TREE_MIN_MOTIFS:
            return cls(z, MotifTree(z.numpy()), lazy=lazy)
        squared, neighbors = [], []
        z_sq = (z * z).sum(1)
        step = max(1, _CHUNK_ELEMENTS // k)
        for start in range(0, k, step):
            rows = z[start:start + step]
            d = _squared_distances(rows, z, z_sq)
            values, indices = d.topk(NEIGHBORS + 1, dim=1, largest=False)
            # The (L+1)-th smallest estimate, less its rounding bound, is a lower bound on the true
            # distance of every motif left off the list.
            squared.append(values[:, NEIGHBORS] - _rounding(rows, z_sq))
            neighbors.append(indices[:, :NEIGHBORS])
        reach = torch.cat(squared).clamp_min(0).sqrt()
        return cls(z, None, torch.cat(neighbors), reach, lazy)


_INDEXES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def motif_index(motifs: torch.Tensor, dtype: torch.dtype) -> MotifIndex:
    """The `MotifIndex` of the bank tensor `motifs` cast to `dtype`, built once per content of that
    tensor and shared by its callers (every tensor of a global bank)."""
    cached = _INDEXES.get(motifs)
    if cached is not None and cached[1] == dtype:
        if cached[0] == motifs._version:
            return cached[2]
        # Rewritten in place, perhaps with the same values (a DDP buffer broadcast does that).
        if torch.equal(cached[2].motifs, motifs.to(dtype).to(torch.float64)):
            _INDEXES[motifs] = (motifs._version, dtype, cached[2])
            return cached[2]
    index = MotifIndex.build(motifs.to(dtype))
    _INDEXES[motifs] = (motifs._version, dtype, index)
    return index


def _squared_distances(x: torch.Tensor, z: torch.Tensor, z_sq: torch.Tensor) -> torch.Tensor:
    """``|x - z|^2`` for all pairs by the expansion (float64); `_rounding` bounds its absolute error."""
    x_sq = (x * x).sum(1, keepdim=True)
    return torch.addmm(z_sq.unsqueeze(0), x, z.T, alpha=-2.0).add_(x_sq)


def _rounding(x: torch.Tensor, z_sq: torch.Tensor) -> torch.Tensor:
    """A generous bound on the float64 rounding of `_squared_distances` for each row of `x`."""
    return 1e-12 * ((x * x).sum(1) + z_sq.max())


def _pad_listed(listed: torch.Tensor) -> torch.Tensor:
    """`listed` ``(c, n)``, ``n >= 1``, widened to `FACETS` columns by repeating its first (a candidate
    listed twice is harmless)."""
    if listed.shape[1] >= FACETS:
        return listed[:, :FACETS]
    return torch.cat([listed, listed[:, :1].expand(-1, FACETS - listed.shape[1])], dim=1)


def _exact_distances(x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """D of each float64 row of `x` ``(c, s)`` to its candidate motifs ``(c, n, s)``, summed coordinate by
    coordinate as `momos.search.assign` defines it, so that values equal here are equal there."""
    d = (x[:, None, 0] - candidates[:, :, 0]).square_()
    for i in range(1, x.shape[1]):
        d += (x[:, None, i] - candidates[:, :, i]).square_()
    return d


@dataclass
class _Cell:
    """Where a block lies among its candidate motifs: the nearest (``assign``'s answer among them), its
    distance and the runner-up's, and the distance to each candidate's Voronoi facet with the nearest
    (inf for the nearest itself and its copies, 0 for a motif too close to it to separate from rounding: a tie)."""

    nearest: torch.Tensor  # (c,) int64
    d1: torch.Tensor  # (c,) float64
    d2: torch.Tensor  # (c,) float64
    facet: torch.Tensor  # (c, n) float64

    @classmethod
    def of(cls, x: torch.Tensor, lists: torch.Tensor, z: torch.Tensor) -> _Cell:
        candidates = z[lists]  # (c, n, s)
        d = _exact_distances(x, candidates)
        d1_sq = d.min(1).values
        # The lowest index among the smallest D: assign's tie-break.
        nearest = torch.where(d == d1_sq.unsqueeze(1), lists, torch.iinfo(torch.int64).max).min(1).values
        own = lists == nearest.unsqueeze(1)
        others = d.masked_fill(own, math.inf)
        d1, d_j = d1_sq.sqrt(), others.sqrt()
        spacing = (candidates - z[nearest].unsqueeze(1)).square_().sum(2).sqrt()  # |z_j - z_1|
        separable = spacing > _TIE_SPACING * (d1.unsqueeze(1) + d_j)
        facet = torch.where(separable, (others - d1_sq.unsqueeze(1)) / (2 * spacing), 0.0)
        # The nearest's own entries, and its copies (equal in every coordinate: at the same D from every block,
        # with a higher index, so never nearest), are no facet.
        copies = (candidates == z[nearest].unsqueeze(1)).all(2)
        return cls(nearest, d1, d_j.min(1).values, facet.masked_fill_(copies, math.inf))

    def margin(self) -> torch.Tensor:
        return MARGIN * (self.d1 + self.d2)


def _settle(x: torch.Tensor, lists: torch.Tensor, rest: torch.Tensor,
            index: MotifIndex) -> tuple[Search, torch.Tensor, torch.Tensor]:
    """`Search` of each float64 row of `x` among the motifs `lists` ``(c, L)`` (distinct), given `rest`: a
    lower bound on its distance to every motif off its list. Also where that proves the nearest on the
    list (elsewhere the nearest is not to be used), and the runner-up too (a useful radius).

    The radius is the distance to the nearest Voronoi facet, ``(d_j^2 - d_1^2) / (2 |z_j - z_1|)`` for
    listed motifs and at least ``(rest - d_1) / 2`` for the others; the bound is the same beyond the
    `FACETS` listed motifs with the nearest facets.
    """
    if KERNELS and x.device.type == "cpu":
        c = x.shape[0]
        found = Search(torch.empty(c, dtype=torch.int64), torch.empty(c, dtype=torch.float64),
                       torch.empty(c, FACETS, dtype=torch.int64), torch.empty(c, dtype=torch.float64),
                       torch.empty(c, dtype=torch.float64))
        proven, runner_up = torch.empty(c, dtype=torch.bool), torch.empty(c, dtype=torch.bool)
        _compiled.settle(x.contiguous().numpy(), lists.contiguous().numpy(), rest.contiguous().numpy(),
                       index.motifs.numpy(), found.nearest.numpy(), found.radius.numpy(),
                       found.listed.numpy(), found.bound.numpy(), found.pair_radius.numpy(), proven.numpy(),
                       runner_up.numpy())
        return found, proven, runner_up
    cell = _Cell.of(x, lists, index.motifs)
    off_list = (rest - cell.d1) / 2  # (d_j - d_1) / 2 for every motif j off the list
    margin = cell.margin()
    width = min(FACETS + 1, lists.shape[1] - 1)  # the nearest's own entry (inf) is never among them
    # Equal facets (copies of one motif) ranked by position, as the compiled loops rank them.
    nearest_facets, order = (t[:, :width] for t in cell.facet.sort(dim=1, stable=True))
    beyond = torch.full_like(off_list, math.inf)
    radius = torch.minimum(nearest_facets[:, 0], off_list) - margin
    pair_radius = torch.minimum(nearest_facets[:, 1] if width > 1 else beyond, off_list) - margin
    bound = torch.minimum(nearest_facets[:, FACETS] if width > FACETS else beyond, off_list) - margin
    # No facet (every other listed motif a copy of the nearest): the first facet's motif, or else the nearest.
    listed, finite = lists.gather(1, order[:, :FACETS]), torch.isfinite(nearest_facets[:, :FACETS])
    listed = torch.where(finite, listed, torch.where(finite[:, :1], listed[:, :1], cell.nearest.unsqueeze(1)))
    found = Search(cell.nearest, radius, _pad_listed(listed), bound, pair_radius)
    return found, cell.d1 * (1 + MARGIN) < rest, cell.d2 * (1 + MARGIN) < rest


def _full_search(x: torch.Tensor, index: MotifIndex) -> tuple[Search, torch.Tensor]:
    """`Search` of each float64 row of `x` among its `SEARCHED` nearest motifs (found by the KD-tree, or by
    brute force), the last one's distance bounding all others; and where the nearest is proven (not so
    only when that many motifs tie)."""
    z = index.motifs
    k = z.shape[0]
    width = min(SEARCHED, k)
    if index.tree is not None:
        found, d = index.tree.neighbors(x.numpy(), width, torch.get_num_threads())
        rest = torch.from_numpy(np.sqrt(d[:, 0]))  # the farthest found bounds every other motif
        lists = torch.from_numpy(found)
    else:
        z_sq = (z * z).sum(1)
        rests, found = [], []
        step = max(1, _CHUNK_ELEMENTS // k)
        for start in range(0, x.shape[0], step):
            rows = x[start:start + step]
            values, indices = _squared_distances(rows, z, z_sq).topk(width, dim=1, largest=False)
            rests.append((values[:, -1] - _rounding(rows, z_sq)).clamp_min(0).sqrt())
            found.append(indices)
        rest, lists = torch.cat(rests), torch.cat(found)
    if width == k:  # every motif listed
        rest = torch.full_like(rest, math.inf)
    found, proven, _ = _settle(x, lists, rest, index)
    return found, proven


@dataclass
class Search:
    """Per block: its nearest motif; the radius of a ball around the block in which that stays nearest;
    the `FACETS` other motifs with the nearest Voronoi facets; and the radius of a ball in which the
    nearest motif is always one of those or the nearest. Radii are float64 with the rounding margins
    already taken; a radius <= 0 proves nothing."""

    nearest: torch.Tensor  # (c,) int64
    radius: torch.Tensor  # (c,) float64
    listed: torch.Tensor  # (c, FACETS) int64, the nearest facet's first
    bound: torch.Tensor  # (c,) float64
    pair_radius: torch.Tensor  # (c,) float64: the nearest stays the nearest or the first listed

    @staticmethod
    def cat(parts: list[Search]) -> Search:
        """The searches `parts` concatenated, block after block."""
        return Search(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Search)))

    def put(self, rows: torch.Tensor, other: Search) -> None:
        """Overwrite the blocks `rows` with the search `other` (one block of it per row)."""
        for f in fields(Search):
            getattr(self, f.name)[rows] = getattr(other, f.name)


def search(blocks: torch.Tensor, centers: torch.Tensor, index: MotifIndex) -> Search:
    """`Search` of each block; its nearest motif equals ``assign.nearest(blocks, index.motifs)``.

    With a KD-tree every block is searched in it; else within the neighbour list of its center motif
    (`centers`: any motif indices, the closer to the nearest the better), and over the whole bank where
    that list is provably too short.
    """
    x = blocks.detach().to(torch.float64)
    m, k = x.shape[0], index.motifs.shape[0]
    if k == 1:
        inf = torch.full((m,), math.inf, dtype=torch.float64, device=x.device)
        return Search(torch.zeros(m, dtype=torch.int64, device=x.device), inf,
                      torch.zeros(m, FACETS, dtype=torch.int64, device=x.device), inf.clone(), inf.clone())
    if index.tree is not None:
        result, proven = _full_search(x, index)
        ties = (~proven).nonzero().squeeze(1)
    else:
        parts, unproven = [], []
        step = max(1, _CHUNK_ELEMENTS // (index.neighbors.shape[1] * x.shape[1]))
        for start in range(0, m, step):
            rows, own = x[start:start + step], centers[start:start + step]
            # A motif off the center's list lies at least reach - r from the block.
            rest = index.reach[own] - (rows - index.motifs[own]).square_().sum(1).sqrt()
            part, _, settled = _settle(rows, index.neighbors[own], rest, index)
            unsettled = (~settled).nonzero().squeeze(1)
            if unsettled.numel():
                found, proven = _full_search(rows[unsettled], index)
                part.put(unsettled, found)
                unproven.append(unsettled[~proven] + start)
            parts.append(part)
        result = Search.cat(parts)
        ties = torch.cat(unproven) if unproven else torch.empty(0, dtype=torch.int64, device=x.device)
    if ties.numel():  # more than `SEARCHED` motifs at one distance: the assignment engine decides
        result.nearest[ties] = assign.nearest(blocks[ties], index.motifs.to(blocks.dtype))
        for radius in (result.radius, result.bound, result.pair_radius):
            radius[ties] = -1.0
    return result


class MosaicTracker:
    """Follows ``assign.nearest(blocks, motifs)`` for one tensor across calls, reassigning only blocks
    that may have changed their nearest motif since their last exact assignment.

    Each block is judged by how far it moved since its last evaluation: within its slack nothing can have
    changed; within its pair slack only its motif and one partner can be nearest (two distances, the
    usual case of a block oscillating across one facet, as STE makes them); within the bound of its last
    search only its candidates can (``FACETS + 1`` distances); beyond that it is searched again. State:
    two points and 18 numbers per block, 124 bytes per float32 block of 4 (7.75 times the tensor), and
    the bank's neighbour lists on CPU (1 KB a motif). A different bank (a refresh, a load, another device
    or dtype) starts it over.
    """

    def __init__(self) -> None:
        self._index: MotifIndex | None = None  # of the bank the state belongs to
        self._mosaic = torch.empty(0, dtype=torch.int64)  # the latest answer
        # Where each block was last evaluated, its nearest motif there, the motif behind its nearest
        # facet, and the squared radii around it that keep the nearest (slack) and keep it one of the two
        # (pair slack); negative radii prove nothing.
        self._point = torch.empty(0)
        self._owner = torch.empty(0, dtype=torch.int64)
        self._partner = torch.empty(0, dtype=torch.int64)
        self._slack = torch.empty(0)
        self._pair_slack = torch.empty(0)
        # Where each block was last searched, its candidates there (the nearest, then `FACETS` listed),
        # and the radius around it in which the nearest motif is a candidate.
        self._anchor = torch.empty(0)
        self._candidates = torch.empty(0, FACETS + 1, dtype=torch.int32)
        self._bound = torch.empty(0, dtype=torch.float64)
        self._lost = torch.empty(0, dtype=torch.int64)  # the compiled pass's list of blocks left to search
        self._arrays: tuple | None = None
        # The compiled pass's copy of the blocks and its other arguments; the bank tensor of the latest call, its
        # version and the blocks' dtype then: a call on the same bank skips `motif_index`.
        self._blocks = torch.empty(0)
        self._step_args: tuple = ()
        self._bank: torch.Tensor | None = None
        self._bank_version = -1
        self._bank_dtype: torch.dtype | None = None
        self.rechecked = 0  # blocks that moved past their slack in the latest call
        self.searched = 0  # of those, blocks that left their bound and were searched again

    def __getstate__(self) -> dict:
        """Copies and pickles start over, empty: the state is a cache 7.75x the size of the tensor (and its
        numpy views would not follow a copy of the tensors they view)."""
        return MosaicTracker().__dict__

    def _reset(self, blocks: torch.Tensor, work: torch.dtype, index: MotifIndex) -> None:
        m, device = blocks.shape[0], blocks.device
        self._mosaic = torch.empty(m, dtype=torch.int64, device=device)
        self._point = torch.empty(blocks.shape, dtype=work, device=device)
        self._anchor = torch.empty(blocks.shape, dtype=work, device=device)
        self._owner = torch.empty(m, dtype=torch.int64, device=device)
        self._partner = torch.empty(m, dtype=torch.int64, device=device)
        self._slack = torch.empty(m, dtype=work, device=device)
        self._pair_slack = torch.empty(m, dtype=work, device=device)
        self._candidates = torch.empty(m, FACETS + 1, dtype=torch.int32, device=device)
        self._bound = torch.empty(m, dtype=torch.float64, device=device)
        self._lost = torch.empty(m, dtype=torch.int64, device=device)
        # The compiled pass's view of the state, in its argument order (numpy views share the memory).
        compiled = KERNELS and index.lazy is not None and index.motifs.shape[0] > 1
        self._arrays = None if not compiled else (tuple(t.numpy() for t in (
            self._point, self._owner, self._partner, self._slack, self._pair_slack, self._anchor,
            self._candidates, self._bound)), self._mosaic.numpy(), self._lost.numpy())
        if compiled:
            # A copy of the blocks, not a view: numpy's view of a tensor makes its storage unresizable, and FSDP
            # frees the storage of unsharded parameters by resizing it after each backward.
            self._blocks = torch.empty(blocks.shape, dtype=work)
            tree, searched = _searches(index, _BRUTE_FORCE)
            # `_compiled.step`'s arguments before and after the marks, which depend on the thread count.
            self._step_args = ((self._blocks.numpy(), index.motifs.numpy(), index.lazy, tree),
                               (*self._arrays, searched))

    def _evaluated(self, rows: torch.Tensor | slice, blocks: torch.Tensor, nearest: torch.Tensor,
                   partner: torch.Tensor, radius: torch.Tensor, pair_radius: torch.Tensor) -> None:
        work = self._slack.dtype
        self._point[rows] = blocks.to(work)
        self._owner[rows] = nearest
        self._partner[rows] = partner
        self._slack[rows] = torch.where(radius > 0, radius.square(), -1.0).to(work)
        self._pair_slack[rows] = torch.where(pair_radius > 0, pair_radius.square(), -1.0).to(work)

    def _search(self, rows: torch.Tensor | slice, blocks: torch.Tensor, centers: torch.Tensor) -> None:
        found = search(blocks, centers, self._index)
        self._anchor[rows] = blocks.to(self._anchor.dtype)
        self._candidates[rows] = torch.cat([found.nearest.unsqueeze(1), found.listed], 1).to(torch.int32)
        self._bound[rows] = found.bound
        self._evaluated(rows, blocks, found.nearest, found.listed[:, 0], found.radius, found.pair_radius)

    def mosaic(self, blocks: torch.Tensor, motifs: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
        """``assign.nearest(blocks, motifs.to(blocks.dtype))`` for `blocks` ``(m, s)`` and the bank tensor
        `motifs` ``(k, s)`` (the bank's own buffer: its identity and version tell a refresh apart).

        `guess` is a mosaic to start from when the bank changed (the refresh's own assignment is ideal;
        any valid mosaic gives the same result, only slower). The result must not be modified.

        Returns:
            The int64 mosaic ``(m,)``, on the device of `blocks`: the tracker's own buffer.

        Raises:
            MoMosValueError: `blocks` hold NaN or Inf values (a diverged training); the state starts over.
        """
        blocks = blocks.detach()
        work = torch.promote_types(blocks.dtype, torch.float32)
        if self._index is not None and motifs is self._bank and motifs._version == self._bank_version \
                and blocks.dtype == self._bank_dtype:  # the same bank, unchanged: `motif_index` gives this index
            index = self._index
        else:
            index = motif_index(motifs, blocks.dtype)
            self._bank, self._bank_version, self._bank_dtype = motifs, motifs._version, blocks.dtype
        if self._index is not index or self._point.shape != blocks.shape or self._point.dtype != work \
                or self._point.device != blocks.device:
            self._refuse_non_finite(blocks, slice(None))
            self._index = index
            self._reset(blocks, work, index)
            guess = guess.to(blocks.device)
            if guess.shape != (blocks.shape[0],) or (guess.numel() and not 0 <= int(guess.min()) <= int(guess.max())
                                                      < index.motifs.shape[0]):
                guess = torch.zeros(blocks.shape[0], dtype=torch.int64, device=blocks.device)  # any valid start
            if self._arrays is not None:
                self._owner.copy_(guess)  # where a block's neighbour search proves nothing, its search starts
                index.enlist(guess)
                tree, searched = _searches(index, 0)
                threads = _compiled.torch_threads()
                ties = _compiled.on_torch_threads(_compiled.start, blocks.to(work, copy=True).numpy(),
                                                  index.motifs.numpy(), guess.clone().numpy(), index.lazy, tree,
                                                  index.marks(threads), *self._arrays, searched, threads)
                self._search_lost(ties, blocks)
            else:
                self._search(slice(None), blocks, guess)
                self._mosaic.copy_(self._owner)
            self.rechecked = self.searched = blocks.shape[0]
            return self._mosaic
        # No shortcut on the tensor's version counter: writes through `.data` do not bump it, and padded
        # blocks are a fresh copy each call.
        if self._arrays is not None:
            return self._compiled_step(blocks)
        self._mosaic.copy_(self._owner)
        drift = (blocks.to(work) - self._point).square_().sum(1)
        if torch.isnan(drift).any():  # NaN blocks, which no distance orders
            self._refuse_non_finite(blocks, slice(None))
        moved = (drift >= self._slack).nonzero().squeeze(1)
        self.rechecked, self.searched = moved.numel(), 0
        if not self.rechecked:
            return self._mosaic
        z = index.motifs
        in_pair = drift[moved] < self._pair_slack[moved]
        pair = moved[in_pair]
        if pair.numel():
            owner, partner = self._owner[pair], self._partner[pair]
            x = blocks[pair].to(torch.float64)
            d = _exact_distances(x, z[torch.stack([owner, partner], 1)])
            # The nearer of the two; on equal D the lower index (assign's tie-break).
            second = (d[:, 1] < d[:, 0]) | ((d[:, 1] == d[:, 0]) & (partner < owner))
            self._mosaic[pair] = torch.where(second, partner, owner)
        rows = moved[~in_pair]
        if not rows.numel():
            return self._mosaic
        x = blocks[rows].to(torch.float64)
        # How far each block still is inside the bound of its last search (exact differences).
        left = self._bound[rows] - (x - self._anchor[rows].to(torch.float64)).square_().sum(1).sqrt()
        candidates = self._candidates[rows].long()
        cell = _Cell.of(x, candidates, z)
        margin = cell.margin()
        inside = left > margin
        nearest_facets, order = cell.facet.topk(2, dim=1, largest=False)
        radius = torch.minimum(nearest_facets[:, 0], left) - margin
        pair_radius = torch.minimum(nearest_facets[:, 1], left) - margin
        kept = inside.nonzero().squeeze(1)
        self._evaluated(rows[kept], blocks[rows[kept]], cell.nearest[kept],
                        candidates[kept].gather(1, order[kept, :1]).squeeze(1), radius[kept], pair_radius[kept])
        self._mosaic[rows[kept]] = cell.nearest[kept]
        lost = rows[~inside]
        self.searched = lost.numel()
        if self.searched:
            self._refuse_non_finite(blocks, lost)
            self._search(lost, blocks[lost], self._owner[lost])
            self._mosaic[lost] = self._owner[lost]
        return self._mosaic

    def _refuse_non_finite(self, blocks: torch.Tensor, rows: torch.Tensor | slice) -> None:
        """A clear error for latent weights with NaN or Inf values (a diverged training) among the blocks `rows`;
        the state, which no longer describes them, starts over on the next call."""
        finite = torch.isfinite(blocks[rows]).all(1)
        if not finite.all():
            self._index = None
            bad = torch.arange(blocks.shape[0], device=blocks.device)[rows][~finite]
            raise MoMosValueError(f"latent weights hold NaN or Inf values: {bad.numel()} of {blocks.shape[0]} blocks, "
                                  f"the first block {int(bad[0])} = {blocks[bad[0]].tolist()}; the training diverged?")

    def _compiled_step(self, blocks: torch.Tensor) -> torch.Tensor:
        """The incremental call above as one compiled pass (`_compiled`) over a copy of `blocks`; the blocks
        it could not prove (ties of more motifs than a search lists, NaN blocks) are left to `_search_lost`."""
        self._blocks.copy_(blocks)
        head, tail = self._step_args
        if blocks.shape[0] > _compiled.CHUNK and torch.get_num_threads() > 1:
            threads = _compiled.torch_threads()
            self.rechecked, self.searched, lost = _compiled.on_torch_threads(
                _compiled.step, *head, self._index.marks(threads), *tail, threads)
        else:
            self.rechecked, self.searched, lost = _compiled.step_serial(*head, self._index.marks(1), *tail)
        if lost:
            self._search_lost(lost, self._blocks)
        return self._mosaic

    def _search_lost(self, count: int, blocks: torch.Tensor) -> None:
        """Search the first `count` blocks listed in `_lost`, which a compiled pass could not prove: NaN blocks
        (refused here), or blocks with more than `SEARCHED` motifs at one distance, which the torch way
        (`search`) decides."""
        if not count:
            return
        rows = self._lost[:count].clone()
        self._refuse_non_finite(blocks, rows)
        self._search(rows, blocks[rows], self._owner[rows])
        self._mosaic[rows] = self._owner[rows]


def _searches(index: MotifIndex, brute_force: int) -> tuple[tuple, int]:
    """How the compiled loops search a block of `index`'s bank that its neighbour list does not settle: among its
    `SEARCHED` nearest motifs in the bank's KD-tree where there is one; else by brute force in banks of up to
    `brute_force` values, or not at all (0: the caller searches). The tree's arrays (`kdtree.NO_TREE` for
    none) and that count."""
    k, s = index.motifs.shape
    if index.tree is not None:
        return index.tree.arrays, min(SEARCHED, k)
    return kdtree.NO_TREE, SEARCHED if k * s <= brute_force else 0


@torch.library.custom_op("momos::nearest", mutates_args=())
def nearest_op(blocks: torch.Tensor, motifs: torch.Tensor) -> torch.Tensor:
    """``assign.nearest`` as one opaque operator, so torch.compile captures it whole (the engines branch on
    data and leave torch for faster libraries, which a compiled graph cannot trace)."""
    return assign.nearest(blocks, motifs).to(blocks.device)


@nearest_op.register_fake
def _(blocks: torch.Tensor, motifs: torch.Tensor) -> torch.Tensor:
    return blocks.new_empty(blocks.shape[0], dtype=torch.int64)
