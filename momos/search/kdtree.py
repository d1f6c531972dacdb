"""A compiled KD-tree over a motif bank: the nearest motifs of each block exactly as `momos.search.assign` ranks them.

It serves `momos.search.assign`'s "kdtree" engine (a refresh's assignment on CPU, small block sizes) and the
STE tracker's searches and neighbour lists (`momos.search.incremental`). The tree computes assign's D itself
(`_distance`: float64, coordinate by coordinate), ranks equal distances by the lower index, and
skips a subtree only when its box lies farther than the worst motif kept so far by more than float
rounding. Every skipped motif is then strictly farther than every motif kept, so the answer is the
definition's and needs no re-check, as a tree that rounds its own way would. Two things make it fast:

- The queries are visited grid cell by grid cell over the bank's bounding box (`locality_order`), so
  queries that follow each other walk the same branches, which stay in cache.
- A query for a few motifs starts from the previous query's answer, whose distances prune most of the
  tree before the first leaf.

Its timings, and the choice of its constants: docs/benchmarks.md (nearest-motif search).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from momos.errors import MoMosValueError
from momos.search._compiled import _build, _search

__all__ = ["LEAF_SIZE", "NO_TREE", "QUERY_CHUNK", "MotifTree"]

# Motifs per leaf: smaller leaves prune more but cost more branches; 16 balances the two.
LEAF_SIZE = 16
# Fewest queries worth a thread of their own: a thread answers one run of consecutive queries, in which a
# query for a few motifs starts from the previous answer, so splitting a shorter run costs more than a
# second thread gains.
QUERY_CHUNK = 16384
# Grid over the bank's bounding box that orders the queries (cells per axis, on the first axes; at most
# 2^16 cells in all).
_GRID_CELLS = 16
_GRID_DIMS = 4


# What compiled callers pass for a bank without a tree: `_build`'s arrays, empty.
NO_TREE = (*(np.empty(0, np.int64) for _ in range(3)), np.empty(0), *(np.empty(0, np.int64) for _ in range(3)),
           np.empty((0, 1)), 1, 1)


class MotifTree:
    """Exact nearest-motif queries against one float64 bank ``(k, s)``, ``k >= 1``, of finite motifs.

    Raises:
        MoMosValueError: `motifs` is not a ``(k, s)`` array with ``k >= 1``.
    """

    def __init__(self, motifs: np.ndarray) -> None:
        if motifs.ndim != 2 or motifs.shape[0] < 1:
            raise MoMosValueError(f"motifs must be a (k, s) array with k >= 1, got shape {motifs.shape}")
        self.motifs = np.ascontiguousarray(motifs, dtype=np.float64)
        self.arrays = _build(self.motifs, LEAF_SIZE)  # for compiled callers: `_query`
        self._low = self.motifs.min(0)
        extent = self.motifs.max(0) - self._low
        self._scale = np.divide(_GRID_CELLS, extent, out=np.zeros_like(extent), where=extent > 0)  # cells per unit

    def locality_order(self, x: np.ndarray) -> np.ndarray:
        """An order of the queries `x` that visits them grid cell by grid cell over the bank's bounding box.

        Queries that follow each other then walk the same branches, which stay in cache, and start from a
        near answer.

        Args:
            x: the queries, ``(m, s)`` float64.

        Returns:
            A permutation of ``range(m)`` (int64).
        """
        cell = np.clip((x - self._low) * self._scale, 0, _GRID_CELLS - 1).astype(np.int64)
        key = np.zeros(x.shape[0], dtype=np.int64)
        for column in cell.T[:_GRID_DIMS]:
            key = key * _GRID_CELLS + column
        # At most 16^4 cells: as 16-bit keys numpy's stable sort is a radix sort, far cheaper than comparisons.
        return np.argsort(key.astype(np.uint16), kind="stable")

    def nearest(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """The nearest motif (int64) of each finite float64 row of `x` ``(m, s)``, on `threads` threads."""
        return self.neighbors(x, 1, threads)[0][:, 0]

    def neighbors(self, x: np.ndarray, count: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The `count` nearest motifs (at most all) of each finite float64 row of `x` ``(m, s)``, ranked by D
        then index: ``(m, count)`` indices, the farthest first and the others in no order, and their D.

        Raises:
            MoMosValueError: `count` is below 1.
        """
        if count < 1:
            raise MoMosValueError(f"count must be at least 1, got {count}")
        count = min(count, self.motifs.shape[0])
        order = self.locality_order(x)
        queries = np.ascontiguousarray(x[order])
        found = np.empty((x.shape[0], count), dtype=np.int64)
        found_d = np.empty((x.shape[0], count))
        runs = max(1, min(threads, x.shape[0] // QUERY_CHUNK))
        bounds = [x.shape[0] * r // runs for r in range(runs + 1)]

        def search(run: int) -> None:
            _search(queries, bounds[run], bounds[run + 1], self.motifs, self.arrays, found, found_d)

        if runs > 1:
            # The compiled search releases the GIL, so Python threads run it in parallel (a numba parallel
            # loop would lengthen the compilation on first use).
            with ThreadPoolExecutor(runs) as pool:
                list(pool.map(search, range(runs)))
        else:
            search(0)
        unsorted, unsorted_d = np.empty_like(found), np.empty_like(found_d)
        unsorted[order], unsorted_d[order] = found, found_d
        return unsorted, unsorted_d
