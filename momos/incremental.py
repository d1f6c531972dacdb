"""Exact nearest-motif assignment of blocks that move a little at a time (the STE forward's hot path).

Two facts from the triangle inequality make it cheap, and neither gives up exactness:

- Drift bound. After an exact assignment, a block ``x0`` whose nearest motif is at distance ``d1`` and
  whose second-nearest is at ``d2`` keeps its nearest motif while it stays closer than ``(d2 - d1) / 2``
  to ``x0``. So a forward pass reassigns only the blocks that drifted that far since their last exact
  assignment (`MosaicTracker`).
- Neighbour lists. A block at distance ``r`` from motif ``a`` has every motif within distance ``t`` of it
  inside the ball of radius ``r + t`` around ``a``. With each motif's nearest motifs listed
  (`MotifIndex`), a reassigned block searches only its previous motif's list; the few blocks for which
  the list is provably too short are searched against the whole bank.

Every bound keeps a relative margin (`MARGIN`) for float rounding, and blocks with no provable margin
(near ties) are handed to `momos.assign.nearest`, which decides ties; so the result always equals
``assign.nearest(blocks, motifs)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from momos import assign

# Motifs listed per motif: long enough that almost every reassigned block is settled by its list.
NEIGHBORS = 64
# Relative margin kept below every exact bound for float rounding (ours and the assignment engine's).
MARGIN = 1e-6
# Elements of the largest temporary distance array.
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class MotifIndex:
    """Each motif's `NEIGHBORS` nearest motifs, complete within `reach`.

    `neighbors[a]` holds every motif closer to motif ``a`` than ``reach[a]`` (and some more, up to the
    list length); `motifs` is the bank in float64, the precision every distance here is computed in.
    """

    motifs: torch.Tensor  # (k, s) float64
    neighbors: torch.Tensor  # (k, L) int64
    reach: torch.Tensor  # (k,) float64

    @classmethod
    def build(cls, motifs: torch.Tensor) -> MotifIndex:
        """The index of a ``(k, s)`` bank: O(k^2 s) work, once per bank."""
        z = motifs.detach().to(torch.float64)
        k = z.shape[0]
        if k <= NEIGHBORS:
            everyone = torch.arange(k, device=z.device).expand(k, k)
            return cls(z, everyone, torch.full((k,), math.inf, dtype=torch.float64, device=z.device))
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
        return cls(z, torch.cat(neighbors), reach)


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


def _full_search(x: torch.Tensor, index: MotifIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest motif of each float64 row of `x` over the whole bank, and a slack radius it provably keeps
    it within: half the gap between (bounds on) the nearest and second-nearest distances."""
    z = index.motifs
    z_sq = (z * z).sum(1)
    k = z.shape[0]
    nearest, radius = [], []
    step = max(1, _CHUNK_ELEMENTS // k)
    for start in range(0, x.shape[0], step):
        rows = x[start:start + step]
        values, indices = _squared_distances(rows, z, z_sq).topk(2, dim=1, largest=False)
        error = _rounding(rows, z_sq)
        d1 = (values[:, 0] + error).clamp_min(0).sqrt()
        d2 = (values[:, 1] - error).clamp_min(0).sqrt()
        nearest.append(indices[:, 0])
        radius.append((d2 - d1) / 2 - MARGIN * (d1 + d2))
    return torch.cat(nearest), torch.cat(radius)


def _list_search(x: torch.Tensor, centers: torch.Tensor,
                 index: MotifIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_full_search` within the neighbour list of each row's center motif, and where that list provably
    held the answer (elsewhere the results are not to be used).

    The radius is the distance to the nearest Voronoi facet among listed motifs, ``(d_j^2 - d_1^2) /
    (2 |z_j - z_1|)``, capped by what the list's reach guarantees for the motifs off it; it is at least
    the half-gap of `_full_search`, so blocks are reassigned less often.
    """
    z = index.motifs
    lists = index.neighbors[centers]  # (c, L)
    listed = z[lists]  # (c, L, s)
    d_sq = (x.unsqueeze(1) - listed).square_().sum(2)  # exact differences: no expansion rounding
    d1_sq, first = d_sq.min(1)
    nearest = lists.gather(1, first.unsqueeze(1)).squeeze(1)
    others = d_sq.scatter(1, first.unsqueeze(1), math.inf)
    d1, d2 = d1_sq.sqrt(), others.min(1).values.sqrt()
    r = (x - z[centers]).square_().sum(1).sqrt()
    reach = index.reach[centers]
    # A motif off the list lies at least reach - r from x; the list settles x if that exceeds d2.
    settled = (r + d2) * (1 + MARGIN) < reach
    spacing = (listed - z[nearest].unsqueeze(1)).square_().sum(2).sqrt()  # |z_j - z_1|
    # A listed duplicate of the nearest motif (spacing 0) is a tie: no slack.
    facet = torch.where(spacing > 0, (others - d1_sq.unsqueeze(1)) / (2 * spacing), 0.0)
    facet.scatter_(1, first.unsqueeze(1), math.inf)
    off_list = (reach - r - d1) / 2  # (d_j - d_1) / 2 for every motif j off the list
    radius = torch.minimum(facet.min(1).values, off_list) - MARGIN * (d1 + d2)
    return nearest, radius, settled


def assign_with_slack(blocks: torch.Tensor, centers: torch.Tensor,
                      index: MotifIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest motif of each block, equal to ``assign.nearest(blocks, index.motifs)``, and its squared
    slack: a block closer than ``sqrt(slack)`` to where it is now keeps that nearest motif.

    `centers` are any motif indices per block (the closer to the nearest, the cheaper the search). The
    slack (float64) is negative where no margin can be proven (a near tie): such blocks must be
    reassigned on every move, and their nearest motif is the assignment engine's tie-break.
    """
    x = blocks.detach().to(torch.float64)
    m, k = x.shape[0], index.motifs.shape[0]
    if k == 1:
        return (torch.zeros(m, dtype=torch.int64, device=x.device),
                torch.full((m,), math.inf, dtype=torch.float64, device=x.device))
    nearest = torch.empty(m, dtype=torch.int64, device=x.device)
    radius = torch.empty(m, dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // (index.neighbors.shape[1] * x.shape[1]))
    for start in range(0, m, step):
        part = slice(start, start + step)
        nearest[part], radius[part], settled = _list_search(x[part], centers[part], index)
        unsettled = (~settled).nonzero().squeeze(1)
        if unsettled.numel():
            rows = unsettled + start
            nearest[rows], radius[rows] = _full_search(x[rows], index)
    slack = torch.where(radius > 0, radius * radius, -1.0)
    ties = (radius <= 0).nonzero().squeeze(1)
    if ties.numel():
        nearest[ties] = assign.nearest(blocks[ties], index.motifs.to(blocks.dtype))
    return nearest, slack


class MosaicTracker:
    """Follows ``assign.nearest(blocks, motifs)`` for one tensor across calls, reassigning only blocks
    that may have changed their nearest motif since their last exact assignment.

    Holds a copy of the blocks as last assigned, their mosaic and slack: about the tensor's size again.
    A different bank (a refresh, a load, another device or dtype) starts it over.
    """

    def __init__(self) -> None:
        self._index: MotifIndex | None = None  # of the bank the state belongs to
        self._blocks = torch.empty(0)
        self._mosaic = torch.empty(0, dtype=torch.int64)
        self._slack = torch.empty(0)
        self.reassigned = 0  # blocks reassigned by the latest call, for diagnostics and benchmarks

    def mosaic(self, blocks: torch.Tensor, motifs: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
        """``assign.nearest(blocks, motifs.to(blocks.dtype))`` for `blocks` ``(m, s)`` and the bank tensor
        `motifs` ``(k, s)`` (the bank's own buffer: its identity and version tell a refresh apart).

        `guess` is a mosaic to start from when the bank changed (the refresh's own assignment is ideal;
        any valid mosaic gives the same result, only slower). The result must not be modified.
        """
        blocks = blocks.detach()
        work = torch.promote_types(blocks.dtype, torch.float32)
        index = motif_index(motifs, blocks.dtype)
        if self._index is not index or self._blocks.shape != blocks.shape or self._blocks.dtype != work \
                or self._blocks.device != blocks.device:
            self._index = index
            self._blocks = blocks.to(work, copy=True)
            self._mosaic, slack = assign_with_slack(blocks, guess.to(blocks.device), index)
            self._slack = slack.to(work)
            self.reassigned = blocks.shape[0]
            return self._mosaic
        drift = (blocks.to(work) - self._blocks).square_().sum(1)
        moved = (drift >= self._slack).nonzero().squeeze(1)
        self.reassigned = moved.numel()
        if self.reassigned:
            rows = blocks[moved]
            self._mosaic[moved], slack = assign_with_slack(rows, self._mosaic[moved], index)
            self._slack[moved] = slack.to(work)
            self._blocks[moved] = rows.to(work)
        return self._mosaic


@torch.library.custom_op("momos::nearest", mutates_args=())
def nearest_op(blocks: torch.Tensor, motifs: torch.Tensor) -> torch.Tensor:
    """``assign.nearest`` as one opaque operator, so torch.compile captures it whole (the engines branch on
    data and leave torch for faster libraries, which a compiled graph cannot trace)."""
    return assign.nearest(blocks, motifs).to(blocks.device)


@nearest_op.register_fake
def _(blocks: torch.Tensor, motifs: torch.Tensor) -> torch.Tensor:
    return blocks.new_empty(blocks.shape[0], dtype=torch.int64)
