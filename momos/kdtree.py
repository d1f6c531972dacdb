"""A compiled KD-tree over a motif bank: the nearest motifs of each block exactly as `momos.assign` ranks them.

It serves `momos.assign`'s "kdtree" engine (a refresh's assignment on CPU, small block sizes) and the
STE tracker's searches and neighbour lists (`momos.incremental`). The tree computes assign's D itself
(`_distance`: float64, coordinate by coordinate), ranks equal distances by the lower index, and
skips a subtree only when its box lies farther than the worst motif kept so far by more than float
rounding. Every skipped motif is then strictly farther than every motif kept, so the answer is the
definition's and needs no re-check (scipy's cKDTree, used before, rounds its own way: its candidates had
to be checked again, and its bounds widened). Two things make it fast:

- The queries are visited grid cell by grid cell over the bank's bounding box (`locality_order`), so
  queries that follow each other walk the same branches, which stay in cache.
- A query for a few motifs starts from the previous query's answer, whose distances prune most of the
  tree before the first leaf.

On the benchmark's MLP (54k blocks of 4, 2,707 motifs, one thread) the nearest motifs take 25-35 ms
where cKDTree took 55-60 ms for the two nearest, before the check; each motif's 129 nearest (the
tracker's lists) 50-56 ms against 74-78 ms.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from momos.errors import MoMosValueError

# numba infers every argument's type at the first call: the loops carry no annotations. `momos.kernels`
# shares this and `_distance`.
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")

# Motifs per leaf: smaller leaves prune more but cost more branches (8 and 32 measured slower than 16).
LEAF_SIZE = 16
# Fewest queries worth a thread of their own: a thread answers one run of consecutive queries, in which a
# query for a few motifs starts from the previous answer. Measured on 2 cores: 16k queries (a refresh's
# chunk) took 54-69 ms on 2 threads against 49-58 ms on one; 216k took 116-136 against 164-182 ms.
QUERY_CHUNK = 16384
# Relative slack on a box's distance before its subtree is skipped: far above the rounding of D and of
# the box's distance (~1e-15 relative), so a skipped motif is never as near as the worst motif kept.
_PRUNE_SLACK = 1e-9
# Queries of up to this many motifs start from the previous query's answer: for more, the heap fills
# faster from the query's own leaf (129 motifs a query: 50 against 62 ms on 2,707 motifs).
_WARM_COUNT = 24
# Grid over the bank's bounding box that orders the queries (cells per axis, on the first axes; at most
# 2^16 cells in all).
_GRID_CELLS = 16
_GRID_DIMS = 4


@numba.njit(cache=True, nogil=True, inline="always")
def _distance(x, i, z, j):
    """D(x_i, z_j): float64, summed coordinate by coordinate. Blocks of 4 (the default) are spelled out:
    a loop over a length unknown at compile time keeps LLVM from vectorizing the loops over motifs around
    it, which made a search 2-3x slower."""
    if x.shape[1] == 4:
        a, b = float(x[i, 0]) - float(z[j, 0]), float(x[i, 1]) - float(z[j, 1])
        c, e = float(x[i, 2]) - float(z[j, 2]), float(x[i, 3]) - float(z[j, 3])
        return ((a * a + b * b) + c * c) + e * e  # the loop's order of summation, so the same value
    total = 0.0
    for c in range(x.shape[1]):
        diff = float(x[i, c]) - float(z[j, c])
        total += diff * diff
    return total


@_jit
def _kth_smallest(values, kth):
    """The `kth` smallest (from 0) of the float array `values`, which it reorders: Hoare's selection."""
    lo, hi = 0, values.shape[0] - 1
    while lo < hi:
        pivot = values[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            break  # values[j + 1..i - 1] all equal the pivot
    return values[kth]


@_jit
def _build(z, leaf_size):
    """A KD-tree over the rows of `z` ``(k, s)``: each node splits its motifs at the median of its widest
    axis. Returns, as one flat tuple, the nodes' ``first, end, axis, split, left, right`` (axis -1 for a
    leaf, which holds motifs ``first..end`` of the tree's order), that order, the motifs in it, the tree's
    depth and its largest leaf. O(k log k)."""
    k, s = z.shape
    capacity = 2 * k + 1
    first, end = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
    axis, split = np.full(capacity, -1, np.int64), np.zeros(capacity)
    left, right = np.full(capacity, -1, np.int64), np.full(capacity, -1, np.int64)
    level = np.zeros(capacity, np.int64)
    order = np.arange(k)
    end[0] = k
    count, depth, largest = 1, 1, 1
    pending = np.zeros(capacity, np.int64)  # nodes to split, as a stack
    waiting = 1
    while waiting:
        waiting -= 1
        node = pending[waiting]
        a, b = first[node], end[node]
        depth = max(depth, level[node] + 1)
        if b - a <= leaf_size:
            largest = max(largest, b - a)
            continue
        widest, spread = 0, 0.0
        for c in range(s):
            low, high = np.inf, -np.inf
            for t in range(a, b):
                low, high = min(low, z[order[t], c]), max(high, z[order[t], c])
            if high - low > spread:
                widest, spread = c, high - low
        if not spread > 0:  # all its motifs are equal: a leaf, however many
            largest = max(largest, b - a)
            continue
        keys = np.empty(b - a)
        for t in range(a, b):
            keys[t - a] = z[order[t], widest]
        middle = a + (b - a) // 2
        median = _kth_smallest(keys.copy(), middle - a)
        # Below the median, then at it, then above: motifs on the left have coordinates <= the split on
        # this axis, those on the right >= it.
        members = order[a:b].copy()
        t = a
        for side in range(-1, 2):
            for r in range(b - a):
                if (keys[r] > median) - (keys[r] < median) == side:
                    order[t] = members[r]
                    t += 1
        axis[node], split[node], left[node], right[node] = widest, median, count, count + 1
        first[count], end[count], first[count + 1], end[count + 1] = a, middle, middle, b
        level[count] = level[count + 1] = level[node] + 1
        pending[waiting], pending[waiting + 1] = count, count + 1
        waiting += 2
        count += 2
    points = np.empty((k, s))
    for t in range(k):
        for c in range(s):  # element by element: a row assignment took numba 3.5 s more to compile
            points[t, c] = z[order[t], c]
    return first[:count], end[:count], axis[:count], split[:count], left[:count], right[:count], order, points, \
        depth, largest


@numba.njit(cache=True, nogil=True, inline="always")
def _worse(d_a, a, d_b, b):
    """Whether motif `a` at distance `d_a` ranks after motif `b` at `d_b`: farther, or as far with a higher index."""
    return d_a > d_b or (d_a == d_b and a > b)


@_jit
def _keep(heap_d, heap, size, d, j):
    """Put motif `j` at distance `d` into the max-heap ``heap[:size]`` (by rank, the worst on top), which
    holds fewer than its capacity; returns the new size."""
    t = size
    while t > 0 and _worse(d, j, heap_d[(t - 1) // 2], heap[(t - 1) // 2]):
        heap_d[t], heap[t] = heap_d[(t - 1) // 2], heap[(t - 1) // 2]
        t = (t - 1) // 2
    heap_d[t], heap[t] = d, j
    return size + 1


@_jit
def _replace_top(heap_d, heap, size, d, j):
    """Put motif `j` at distance `d`, which ranks before the top, into the full heap ``heap[:size]`` in place of
    its top."""
    t = 0
    while True:
        child = 2 * t + 1
        if child >= size:
            break
        if child + 1 < size and _worse(heap_d[child + 1], heap[child + 1], heap_d[child], heap[child]):
            child += 1
        if not _worse(heap_d[child], heap[child], d, j):
            break
        heap_d[t], heap[t] = heap_d[child], heap[child]
        t = child
    heap_d[t], heap[t] = d, j


@_jit
def _query(x, i, tree, heap_d, heap, size, seen, stamp, work):
    """Complete the max-heap ``heap[:size]`` (by rank, the worst on top) of motifs near row `i` of `x` into its
    ``count = heap.shape[0]`` nearest motifs (``count <= k``) of the tree's bank, ranked by D and then index.
    The heap may start with any distinct motifs and their D (a warm start: their distances prune the tree at
    once), each marked ``seen[j] == stamp``; every motif kept is marked so, and `stamp` must be new to
    `seen`. `work` is `_work`'s scratch space. Returns the heap's size, `count`."""
    first, end, axis, split, left, right, order, points, _, _ = tree
    stack, box, offsets, offset, distances = work
    s, count = x.shape[1], heap.shape[0]
    stack[0], box[0], top = 0, 0.0, 1
    for c in range(s):
        offsets[0, c] = 0.0
    while top:
        top -= 1
        node = stack[top]
        if size == count and box[top] * (1 - _PRUNE_SLACK) > heap_d[0]:
            continue
        reach = box[top]
        for c in range(s):
            offset[c] = offsets[top, c]
        while axis[node] >= 0:  # down to a leaf, the nearer child first, the farther one kept for later
            c = axis[node]
            gap = x[i, c] - split[node]
            near, far = (left[node], right[node]) if gap < 0 else (right[node], left[node])
            # The far child's box: this axis's distance becomes the gap to the split.
            farther = reach - offset[c] * offset[c] + gap * gap
            if size < count or farther * (1 - _PRUNE_SLACK) <= heap_d[0]:
                stack[top], box[top] = far, farther
                for axis_c in range(s):
                    offsets[top, axis_c] = offset[axis_c]
                offsets[top, c] = gap
                top += 1
            node = near
        a = first[node]
        for t in range(a, end[node]):
            distances[t - a] = _distance(x, i, points, t)
        for t in range(a, end[node]):
            d, j = distances[t - a], order[t]
            if size < count:
                if seen[j] != stamp:
                    size = _keep(heap_d, heap, size, d, j)
                    seen[j] = stamp
            elif d <= heap_d[0] and _worse(heap_d[0], heap[0], d, j) and seen[j] != stamp:
                _replace_top(heap_d, heap, size, d, j)
                seen[j] = stamp
    return size


@_jit
def _work(tree, s):
    """`_query`'s scratch space for a tree over motifs of size `s`: the pending far children (node, the box's
    distance and the query's distance to it on each axis) and one leaf's distances."""
    depth, largest = tree[8], tree[9]
    return (np.empty(depth + 1, np.int64), np.empty(depth + 1), np.empty((depth + 1, s)), np.empty(s),
            np.empty(largest))


@_jit
def _search(x, lo, hi, z, tree, found, found_d):
    """The ``count = found.shape[1]`` nearest motifs (``count <= k``) of rows ``lo..hi`` of `x`, ranked by D and
    then index, into `found` (the farthest first, the others in no order) and their D into `found_d`. A query
    for up to `_WARM_COUNT` motifs starts from the previous one's answer, whose distances prune most of the
    tree at once."""
    count = found.shape[1]
    work = _work(tree, x.shape[1])
    heap_d, heap = np.empty(count), np.empty(count, np.int64)
    seen = np.full(z.shape[0], -1, np.int64)  # the query that last put each motif into the heap
    for i in range(lo, hi):
        size = 0
        if i > lo and count <= _WARM_COUNT:
            for r in range(count):
                j = found[i - 1, r]
                size = _keep(heap_d, heap, size, _distance(x, i, z, j), j)
                seen[j] = i
        _query(x, i, tree, heap_d, heap, size, seen, i, work)
        for r in range(count):
            found[i, r], found_d[i, r] = heap[r], heap_d[r]


# What compiled callers pass for a bank without a tree: `_build`'s arrays, empty.
NO_TREE = (*(np.empty(0, np.int64) for _ in range(3)), np.empty(0), *(np.empty(0, np.int64) for _ in range(3)),
           np.empty((0, 1)), 1, 1)


class MotifTree:
    """Exact nearest-motif queries against one float64 bank ``(k, s)``, ``k >= 1``, of finite motifs."""

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
        near answer: on the benchmark's MLP this made the queries 1.2x faster, and scipy's cKDTree 3.5x on
        a 312k-motif bank (s=4, 2 threads).
        """
        cell = np.clip((x - self._low) * self._scale, 0, _GRID_CELLS - 1).astype(np.int64)
        key = np.zeros(x.shape[0], dtype=np.int64)
        for column in cell.T[:_GRID_DIMS]:
            key = key * _GRID_CELLS + column
        # At most 16^4 cells: as 16-bit keys numpy's stable sort is a radix sort (12x faster on 16k queries).
        return np.argsort(key.astype(np.uint16), kind="stable")

    def nearest(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """The nearest motif (int64) of each finite float64 row of `x` ``(m, s)``, on `threads` threads."""
        return self.neighbors(x, 1, threads)[0][:, 0]

    def neighbors(self, x: np.ndarray, count: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The `count` nearest motifs (at most all) of each finite float64 row of `x` ``(m, s)``, ranked by D
        then index: ``(m, count)`` indices, the farthest first and the others in no order, and their D."""
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
            # loop would add ~10 s of compilation on first use).
            with ThreadPoolExecutor(runs) as pool:
                list(pool.map(search, range(runs)))
        else:
            search(0)
        unsorted, unsorted_d = np.empty_like(found), np.empty_like(found_d)
        unsorted[order], unsorted_d[order] = found, found_d
        return unsorted, unsorted_d
