"""Exact nearest-motif search: the index of the closest motif (squared Euclidean) for every block.

What "exact" means here, for every engine: block ``x`` gets the lowest index ``j`` that minimises

    D(x, z_j) = (x_0 - z_j0)^2 + (x_1 - z_j1)^2 + ... + (x_{s-1} - z_j,s-1)^2

evaluated in float64, coordinate by coordinate in that order. For float32 (or 16-bit) inputs every
difference is exact in float64 and each square and sum is rounded relative to the distance itself, so
this is the true nearest motif except between two distances that agree to ~1e-15 relative; and it is the
same function whichever engine computes it, bit for bit.

Engines (`ENGINES`), chosen per ``(s, k, m)`` by `choose_engine` (its timings: docs/benchmarks.md):

- ``"torch"``: chunked brute force of D itself, O(m k s), no setup cost; the choice for small ``m * k``
  or small banks, and faiss's fallback.
- ``"kdtree"``: a compiled KD-tree (`momos.search.kdtree`, O(m log k) for small s) that computes D itself and
  answers exactly; the choice for s <= 4, and for s <= 8 with larger banks: the only engine that stays
  near-linear in model size at fixed capacity.
- ``"faiss"``: faiss ``IndexFlatL2`` brute force with BLAS in float32, O(m k s); the choice for small
  banks of s 5-8 and for larger s, where a KD-tree degrades towards brute force anyway. It runs on a bank
  without duplicate motifs (a duplicate's block goes to its lowest index) and returns each block's two
  nearest motifs by its float32 distances; the nearest's D is recomputed exactly, and a block is settled
  only where an error bound on the second's distance proves every other motif farther. Every other block
  (near ties, and rows faiss's float32 cannot separate) is decided by the torch engine.

Work runs on ``torch.get_num_threads()`` threads, so ``torch.set_num_threads`` is the one knob for all of
it; faiss's own OpenMP setting is changed only for the duration of a search and restored afterwards.
"""

from __future__ import annotations

import numpy as np
import torch

from momos.errors import MoMosConfigError, MoMosValueError
from momos.search.kdtree import MotifTree

__all__ = ["ENGINES", "KDTREE_RULES", "TORCH_MAX_MOTIFS", "TORCH_MAX_PAIRS", "MotifSearch", "choose_engine", "nearest"]

ENGINES = ("auto", "faiss", "kdtree", "torch")

# Engine choice (`choose_engine`). Brute force in torch has no setup cost, so it beats building an index
# for few pairs of blocks and motifs and for banks of a few motifs. Beyond that the compiled KD-tree wins
# where it prunes well: any bank at small block sizes, and ever larger banks as the block size grows
# (`KDTREE_RULES`); faiss's BLAS brute force wins elsewhere. The timings behind each threshold:
# docs/benchmarks.md.
TORCH_MAX_PAIRS = 1 << 17
TORCH_MAX_MOTIFS = 16
KDTREE_RULES = ((4, 1), (6, 500), (8, 4000))  # (largest block size, fewest motifs) where the KD-tree wins
# Elements of the largest temporary (rows x motifs) float64 array of the torch engine.
_CHUNK_ELEMENTS = 1 << 21
# Blocks per query of a fast engine: bounds its float64 copies and results (~100 bytes a row).
_QUERY_ROWS = 1 << 14
# faiss computes |x|^2 + |z|^2 - 2 x.z in float32. Each of the three terms, their sum and the rounding of
# float64 inputs to float32 err by at most (2s + 8) u (|x|^2 + |z|^2) with u = 2^-24; `_FaissEngine`
# uses twice that.
_FLOAT32_UNIT = 2.0 ** -24
# faiss's float32 can underflow to zero for tiny values: an absolute allowance far above what that loses.
_FLOAT32_TINY = 2.0 ** -100
# Relative slack under faiss's float64 floor (our D rounds at ~1e-16 relative).
_FLOAT64_SLACK = 1e-9


def choose_engine(block_size: int, num_motifs: int, num_queries: int) -> str:
    """The engine ``"auto"`` picks for `num_queries` blocks of `block_size` against `num_motifs` motifs.

    Returns:
        ``"torch"``, ``"kdtree"`` or ``"faiss"``.
    """
    if num_queries * num_motifs <= TORCH_MAX_PAIRS or num_motifs <= TORCH_MAX_MOTIFS:
        return "torch"
    if any(block_size <= size and num_motifs >= fewest for size, fewest in KDTREE_RULES):
        return "kdtree"
    return "faiss"


def nearest(blocks: torch.Tensor, motifs: torch.Tensor, *, engine: str = "auto") -> torch.Tensor:
    """Index (int64, shape ``(m,)``) of the nearest motif for each row of `blocks` ``(m, s)``, exact as
    defined in this module (lowest index on ties) whichever `engine` computes it.

    Args:
        blocks: ``(m, s)`` finite blocks, any float dtype and device.
        motifs: ``(k, s)`` finite motifs, ``k >= 1``.
        engine: one of `ENGINES`; ``"auto"`` lets `choose_engine` pick.

    Returns:
        The int64 mosaic ``(m,)``, on the device of `blocks`.

    Raises:
        MoMosConfigError: an unknown `engine`.
        MoMosValueError: shapes that do not fit, or NaN or Inf values.
    """
    return MotifSearch(motifs, num_queries=blocks.shape[0], engine=engine).nearest(blocks)


class MotifSearch:
    """Exact nearest-motif queries against one fixed ``(k, s)`` bank: built once, queried in any chunks.

    `num_queries` (the blocks that will be asked in all) lets ``engine="auto"`` weigh the index's setup
    against the queries it serves. Motifs must be finite; so must every block asked.
    """

    def __init__(self, motifs: torch.Tensor, *, num_queries: int, engine: str = "auto") -> None:
        if engine not in ENGINES:
            raise MoMosConfigError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
        if motifs.ndim != 2 or motifs.shape[0] < 1:
            raise MoMosValueError(f"motifs must be a (k, s) tensor with k >= 1, got shape {tuple(motifs.shape)}")
        self.motifs = motifs.detach().cpu().to(torch.float64)
        if not torch.isfinite(self.motifs).all():
            raise MoMosValueError("motifs hold NaN or Inf values")
        k, s = self.motifs.shape
        self.engine = choose_engine(s, k, num_queries) if engine == "auto" else engine
        self._fast: _FaissEngine | None = None
        self._tree: MotifTree | None = None
        if self.engine == "kdtree":
            self._tree = MotifTree(self.motifs.numpy())
        elif self.engine == "faiss":
            # Duplicate motifs would make every block near them a tie; keep one copy, under its lowest index.
            unique, inverse = _unique_rows(self.motifs)
            lowest = torch.full((unique.shape[0],), k, dtype=torch.int64)
            self._lowest = lowest.scatter_reduce_(0, inverse, torch.arange(k), "amin")
            self._unique = unique
            if unique.shape[0] > 1:
                self._fast = _FaissEngine(unique)

    @property
    def block_size(self) -> int:
        """The bank's block size s."""
        return self.motifs.shape[1]

    def nearest(self, blocks: torch.Tensor) -> torch.Tensor:
        """Index (int64, shape ``(m,)``, on the device of `blocks`) of the nearest motif of each row of `blocks`
        ``(m, block_size)``; `MoMosValueError` for another shape or NaN or Inf values."""
        if blocks.ndim != 2 or blocks.shape[1] != self.block_size:
            raise MoMosValueError(f"blocks must have shape (m, {self.block_size}), got {tuple(blocks.shape)}")
        blocks = blocks.detach()
        out = torch.empty(blocks.shape[0], dtype=torch.int64)
        for start in range(0, blocks.shape[0], _QUERY_ROWS):
            x = blocks[start:start + _QUERY_ROWS].cpu().to(torch.float64)
            if not torch.isfinite(x).all():
                raise MoMosValueError(f"blocks hold NaN or Inf values (in rows {start}..{start + x.shape[0] - 1})")
            out[start:start + x.shape[0]] = self._nearest64(x)
        return out.to(blocks.device)

    def _nearest64(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine == "torch":
            return _brute_force(x, self.motifs)
        if self._tree is not None:
            return torch.from_numpy(self._tree.nearest(x.numpy(), torch.get_num_threads()))
        if self._fast is None:  # a single distinct motif
            return self._lowest[0].expand(x.shape[0]).clone()
        candidate, floor = self._fast.nearest(x)
        out = self._lowest[candidate]
        # Settled: every other motif is provably farther than faiss's nearest (strictly, so no lower index can
        # tie with it). The floor holds for faiss's second nearest too, so a block whose second is as near as
        # its first is never settled. The rest are few, and often equal to each other: brute-force each once.
        unsettled = (~(_distance(x, self._unique[candidate]) < floor)).nonzero().squeeze(1)
        if unsettled.numel():
            rows, inverse = torch.unique(x[unsettled], dim=0, return_inverse=True)
            out[unsettled] = _brute_force(rows, self.motifs)[inverse]
        return out


def _unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(x, dim=0, return_inverse=True)`` for a float64 ``(k, s)`` `x`, in one lexicographic
    sort (5x faster than torch's on a bank of a few thousand motifs)."""
    rows = x.numpy()
    order = np.lexsort(rows.T[::-1])  # by the first column, then the next...
    ordered = rows[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(1)
    inverse = np.empty(len(rows), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return torch.from_numpy(ordered[first]), torch.from_numpy(inverse)


def _distance(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D of paired rows of float64 `x` and `z` ``(n, s)``, in the coordinate order of the definition."""
    d = (x[:, 0] - z[:, 0]).square_()
    for i in range(1, x.shape[1]):
        d += (x[:, i] - z[:, i]).square_()
    return d


def _brute_force(x: torch.Tensor, motifs: torch.Tensor) -> torch.Tensor:
    """The definition itself: argmin over all motifs of D (float64 `x` and `motifs`), chunked over rows."""
    k, s = motifs.shape
    out = torch.empty(x.shape[0], dtype=torch.int64)
    chunk = max(1, _CHUNK_ELEMENTS // k)
    columns = motifs.T.contiguous()
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk]
        d = (rows[:, 0:1] - columns[0]).square_()
        for i in range(1, s):
            d += (rows[:, i:i + 1] - columns[i]).square_()
        out[start:start + rows.shape[0]] = d.argmin(1)  # argmin returns the first minimum
    return out


class _FaissEngine:
    """The nearest distinct motif per block by faiss's float32 BLAS search, with a proven floor under the others."""

    def __init__(self, unique: torch.Tensor) -> None:
        import faiss  # imported on first use: importing faiss is slow

        self.faiss = faiss
        self.index = faiss.IndexFlatL2(unique.shape[1])
        self.index.add(unique.to(torch.float32).numpy())
        # Bound on |faiss distance - D| is c (|x|^2 + |z|^2); see _FLOAT32_UNIT.
        self.error = 2 * (2 * unique.shape[1] + 8) * _FLOAT32_UNIT

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """faiss's nearest motif ``(n,)`` and a floor ``(n,)``: every other motif has D above it.

        Every other motif z has faiss distance f >= f2 (the second nearest's), and f <= D + c (|x|^2 +
        |z|^2) <= D + c (3 |x|^2 + 2 D) since |z|^2 <= 2 |x|^2 + 2 D; so D >= (f2 - 3 c |x|^2) / (1 + 2 c).
        """
        previous = self.faiss.omp_get_max_threads()
        self.faiss.omp_set_num_threads(torch.get_num_threads())
        try:
            distance, index = self.index.search(x.to(torch.float32).numpy(), 2)
        finally:
            self.faiss.omp_set_num_threads(previous)
        index = torch.from_numpy(index)
        c = self.error
        floor = (torch.from_numpy(distance[:, 1]).to(torch.float64) - 3 * c * (x * x).sum(1) - _FLOAT32_TINY)
        floor = floor / (1 + 2 * c) * (1 - _FLOAT64_SLACK)
        # faiss answers -1 where it found no second motif (non-finite float32 distances): decide those by hand.
        missing = (index < 0).any(1)
        floor[missing | ~torch.isfinite(floor)] = -torch.inf
        return index[:, 0].clamp(min=0), floor
