"""Compiled CPU loops (numba) for the STE forward's hot path: one pass over a tensor's blocks per step.

`momos.search.incremental` defines what is computed and holds the torch version, which serves every other
device. The loops here do the same block by block in one compiled pass instead of a hundred whole-array
torch operations, whose dispatch, not their arithmetic, would dominate a step (docs/benchmarks.md,
the STE tracker). Every distance is `momos.search.assign`'s D (float64, coordinate by coordinate),
ties go to the lowest index and every bound keeps the same margin, so the mosaic is the same bit for bit.

One thing only the compiled path has: a block that must be searched again is searched among the
`KERNEL_NEIGHBORS` nearest motifs of a motif close to it, kept with the bank's `MotifIndex` with each
listed motif's distance to it (a restart builds the lists of its start motifs in one query of the bank's
KD-tree, `enlist`; any other list is built on first use by brute force over the bank). A block at
distance r from motif c has every motif that is not on c's list at least ``reach(c) - r`` away, which
usually proves the nearest on the list. A block it does not prove (far from every motif) is searched among
its `SEARCHED` nearest motifs: in the bank's KD-tree where there is one (`momos.search.kdtree`, from a heap of the
list's nearest, whose distances prune most of the tree), else by brute force in small banks; the rest are
left to the caller (`MosaicTracker`), which searches them the torch way (many motifs tie).

The inner loops run over a row's motifs with no branch and no division check (numba's numpy error
model: a zero spacing gives inf or nan, replaced right after), so LLVM vectorizes them; the rows of a
step that go past the cheapest test are listed first and worked on after. `start` and `step` split the
blocks into chunks shared among numba's threads, as many as torch's (`on_torch_threads`, each call), each
thread with scratch space of its own (O(k) for the tree's searches): a chunk searches only among lists
already built, and one thread then builds the lists missing and searches the blocks left (`step_serial`
does the same on the calling thread, for small tensors and one thread). This module imports numba;
`momos.search.incremental` imports it on first use. numba compiles each loop once per argument types and caches
the machine code on disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

# Relative margin kept below every exact bound for float rounding (ours and the assignment engine's).
MARGIN = 1e-6
# Two motifs closer than this (relative to the block's distances) are a tie: rounding could order them.
_TIE_SPACING = 1e-6

# numba infers every argument's type at the first call: the loops carry no annotations.
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")

# Relative slack on a box's distance before its subtree is skipped: far above the rounding of D and of
# the box's distance (~1e-15 relative), so a skipped motif is never as near as the worst motif kept.
_PRUNE_SLACK = 1e-9
# Queries of up to this many motifs start from the previous query's answer; a query for more fills its heap
# from its own leaf.
_WARM_COUNT = 24


@numba.njit(cache=True, nogil=True, inline="always")
def _distance(x, i, z, j):
    """D(x_i, z_j): float64, summed coordinate by coordinate. Blocks of 4 (the default) are spelled out:
    a loop over a length unknown at compile time keeps LLVM from vectorizing the loops over motifs around
    it."""
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
        for c in range(s):  # element by element: numba compiles a row assignment much more slowly
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


# The entry points split a tensor's blocks among threads (numba's, as many as torch's: `on_torch_threads`).
_parallel = numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
# Blocks a thread works on at a time.
CHUNK = 2048

# Relative rounding allowed on a neighbour list's reach and a block's distance to the list's motif.
_REACH_ROUNDING = 1e-12


@_jit
def _within(values, n, wanted, minima):
    """A value that at least `wanted` of ``values[:n]`` (``n >= wanted``) do not exceed: the largest of their
    minima over `wanted` disjoint sets, in branch-free passes. `minima` is scratch space for `wanted` values."""
    for c in range(wanted):
        minima[c] = values[c]
    for r in range(1, n // wanted):
        for c in range(wanted):
            minima[c] = min(minima[c], values[r * wanted + c])
    within = -math.inf
    for c in range(wanted):
        within = max(within, minima[c])
    return within


@numba.njit(cache=True, nogil=True, inline="always")
def _rank(values, j, order, kept, wanted):
    """Rank position `j` into the sorted ``order[:kept]`` of at most `wanted` positions; returns the new count."""
    v = values[j]
    if kept == wanted and not v < values[order[wanted - 1]]:
        return kept
    u = min(kept, wanted - 1)
    while u > 0 and values[order[u - 1]] > v:
        order[u] = order[u - 1]
        u -= 1
    order[u] = j
    return min(kept + 1, wanted)


@_jit
def _smallest(values, n, wanted, order, minima):
    """The positions of the `wanted` smallest finite values of ``values[:n]`` into `order`, smallest first and the
    first position first among equals; returns how many (``min(wanted, finite ones)``). `order` has room for
    ``2 n`` positions and `minima` for `wanted` values: scratch space."""
    kept = 0
    if n < 4 * wanted:
        for j in range(n):
            if values[j] < math.inf:
                kept = _rank(values, j, order, kept, wanted)
        return kept
    # Only the values within `_within` are ranked, listed first in one branch-free pass: ranking every value of
    # a list, a branch each, would dominate the search.
    within = _within(values, n, wanted, minima)
    ranked, count = order[n:], 0
    for j in range(n):
        ranked[count] = j
        count += (values[j] <= within) & (values[j] < math.inf)
    for t in range(count):
        kept = _rank(values, ranked[t], order, kept, wanted)
    return kept


@numba.njit(cache=True, nogil=True, inline="always")
def _same(z, a, b):
    """Whether motifs `a` and `b` are equal in every coordinate (copies of one motif)."""
    same = True
    for c in range(z.shape[1]):
        same &= z[a, c] == z[b, c]
    return same


@_jit
def _settle_row(x, i, lists, z, listed, row, d, facet, order, gap, spacing, center):
    """Row `i` of `x` among the motifs `lists` (1-D), as `momos.search.incremental._Cell` and `_settle` see it:
    returns (nearest, its distance d1, the runner-up's d2, the nearest Voronoi facet, the second nearest,
    the one after the `listed` motifs) and writes into ``listed[row]`` the motifs with the nearest facets
    (repeating the first when fewer are listed). `spacing`, where it has an entry per listed motif, holds
    their distances to motif `center`, used when that is the nearest. `d`, `facet`, `order` (twice as long)
    and `gap` are scratch space."""
    width = lists.shape[0]
    facets = listed.shape[1]
    for j in range(width):
        d[j] = _distance(x, i, z, lists[j])
    d1_sq, d2_sq = math.inf, math.inf  # d2: the nearest of the motifs other than the nearest
    best = -1
    for j in range(width):
        if d[j] < d1_sq or (d[j] == d1_sq and lists[j] < best):
            if lists[j] != best:
                d2_sq = min(d2_sq, d1_sq)
            d1_sq, best = d[j], lists[j]
        elif lists[j] != best:
            d2_sq = min(d2_sq, d[j])
    d1 = math.sqrt(d1_sq)
    if best == center and spacing.shape[0] == width:
        for j in range(width):
            gap[j] = spacing[j]
    else:
        for j in range(width):
            gap[j] = math.sqrt(_distance(z, lists[j], z, best))
    for j in range(width):
        facet[j] = (d[j] - d1_sq) / (2 * gap[j])
    # A motif too close to the nearest to separate from rounding is a tie, its facet at 0. The nearest's own
    # entries and its copies are no facet: a copy is at the same D from every block and has a higher index (else
    # it would be the nearest), so it is never nearest. Only a gap below tie * (2 d1 + gap), a bound on
    # tie * (d1 + d_j), can be a tie or a copy.
    close = 2 * _TIE_SPACING * d1 / (1 - _TIE_SPACING)
    for j in range(width):
        if gap[j] <= close:
            if _same(z, lists[j], best):  # the nearest itself or a copy
                facet[j] = math.inf
            elif not gap[j] > _TIE_SPACING * (d1 + math.sqrt(d[j])):
                facet[j] = 0.0
    count = _smallest(facet, width, facets + 1, order, gap)  # the nearest's own entries (inf) left out
    for j in range(facets):
        listed[row, j] = lists[order[j if j < count else 0]] if count else best
    first = facet[order[0]] if count > 0 else math.inf
    second = facet[order[1]] if count > 1 else math.inf
    beyond = facet[order[facets]] if count > facets else math.inf
    return best, d1, math.sqrt(d2_sq), first, second, beyond


@_jit
def settle(x, lists, rest, z, nearest, radius, listed, bound, pair_radius, proven, runner_up):
    """`momos.search.incremental._settle` of every row of `x` ``(c, s)`` among its distinct motifs `lists` ``(c, L)``,
    given `rest`, a lower bound on its distance to every motif off its list; writes the outputs."""
    width = lists.shape[1]
    d, facet, gap, order = np.empty(width), np.empty(width), np.empty(width), np.empty(2 * width, dtype=np.int64)
    spacing = np.empty(0, dtype=np.float32)
    for i in range(x.shape[0]):
        best, d1, d2, first, second, beyond = _settle_row(x, i, lists[i], z, listed, i, d, facet, order, gap,
                                                          spacing, -1)
        off_list = (rest[i] - d1) / 2  # (d_j - d_1) / 2 for every motif j off the list
        margin = MARGIN * (d1 + d2)
        nearest[i] = best
        radius[i] = min(first, off_list) - margin
        pair_radius[i] = min(second, off_list) - margin
        bound[i] = min(beyond, off_list) - margin
        proven[i] = d1 * (1 + MARGIN) < rest[i]
        runner_up[i] = d2 * (1 + MARGIN) < rest[i]


@_jit
def _evaluated(i, x, r, point, owner, partner, slack, pair_slack, nearest, behind, radius, pair_radius):
    """Block `i`, now at row `r` of `x`, was evaluated there: its nearest motif, the one behind its nearest
    facet, and the radii that keep the nearest (slack) and keep it one of the two (pair slack), squared."""
    for c in range(x.shape[1]):
        point[i, c] = x[r, c]
    owner[i], partner[i] = nearest, behind
    slack[i] = radius * radius if radius > 0 else -1.0
    pair_slack[i] = pair_radius * pair_radius if pair_radius > 0 else -1.0


@_jit
def _searched(i, x, r, lists, rest, z, state, scratch, spacing, center):
    """Block `i`, at row `r` of `x`, was searched there: `lists` are its nearest motifs, `rest` a lower bound
    on its distance to every other. Records it as `MosaicTracker._search` does and returns True, or returns
    False when `rest` cannot prove the nearest (the block's state is then to be rewritten)."""
    point, owner, partner, slack, pair_slack, anchor, candidates, bound = state
    d, facet, gap, order = scratch
    best, d1, d2, first, second, beyond = _settle_row(x, r, lists, z, candidates[i:i + 1, 1:], 0, d, facet, order,
                                                      gap, spacing, center)
    if not d1 * (1 + MARGIN) < rest:
        return False
    off_list = (rest - d1) / 2  # (d_j - d_1) / 2 for every motif j off the list
    margin = MARGIN * (d1 + d2)
    candidates[i, 0] = best
    bound[i] = min(beyond, off_list) - margin
    for c in range(x.shape[1]):
        anchor[i, c] = x[r, c]
    _evaluated(i, x, r, point, owner, partner, slack, pair_slack, best, candidates[i, 1],
               min(first, off_list) - margin, min(second, off_list) - margin)
    return True


@_jit
def _sift(d, heap, size, t):
    """Restore the max-heap `heap[:size]` of motifs, by (D, index), below position `t`."""
    while True:
        top, left = t, 2 * t + 1
        for child in range(left, min(left + 2, size)):
            a, b = heap[child], heap[top]
            if d[a] > d[b] or (d[a] == d[b] and a > b):
                top = child
        if top == t:
            return
        swap = heap[t]
        heap[t] = heap[top]
        heap[top] = swap
        t = top


@_jit
def _nearest(x, i, z, wanted, work):
    """Brute force over the bank: the `wanted` motifs (at most k) nearest row `i` of `x`, the lowest index
    first among equals, into ``best[:wanted]`` of ``work = (best, d, positions, minima)``, in no order
    but the farthest first, and each motif's D into `d`; returns how many (``min(wanted, k)``)."""
    best, d, positions, minima = work
    k = z.shape[0]
    for j in range(k):
        d[j] = _distance(x, i, z, j)
    count = 0
    if k >= 2 * wanted:
        # Motifs beyond `_within` cannot be among the nearest. One branch-free pass each.
        within = _within(d, k, wanted, minima)
        for j in range(k):
            positions[count] = j
            count += d[j] <= within
    else:
        for j in range(k):
            positions[j] = j
        count = k
    # A max-heap of the nearest so far: its top is the farthest kept.
    size = min(wanted, count)
    for t in range(size):
        best[t] = positions[t]
    for t in range(size // 2 - 1, -1, -1):
        _sift(d, best, size, t)
    for t in range(size, count):
        j, top = positions[t], best[0]
        if d[top] > d[j] or (d[top] == d[j] and top > j):
            best[0] = j
            _sift(d, best, size, 0)
    return size


@numba.njit(cache=True, nogil=True, inline="always")
def _rounded_up(value):
    """`value` in float32, rounded up."""
    rounded = np.float32(value)
    return rounded if rounded >= value else np.nextafter(rounded, np.float32(np.inf))


@_jit
def _near(z, center, lists, work):
    """Motif `center`'s list of its ``L`` nearest motifs (itself included; the lowest index first among
    equals; in no order), their distances to it (float32, rounded up: a larger spacing only lowers a facet
    bound) and its reach, a lower bound on the distance of every other motif; built on first use."""
    neighbors, spacing, reach, built = lists
    if built[center]:
        return
    best, d, _, _ = work
    width = neighbors.shape[1]
    if z.shape[0] > width:  # the farthest of the L + 1 nearest is the first left off
        _nearest(z, center, z, width + 1, work)
        reach[center] = math.sqrt(d[best[0]])
        kept = best[1:width + 1]
    else:
        _nearest(z, center, z, width, work)
        reach[center] = math.inf
        kept = best[:width]
    for j in range(width):
        neighbors[center, j] = kept[j]
        spacing[center, j] = _rounded_up(math.sqrt(d[kept[j]]))
    built[center] = True


@_jit
def enlist(z, centers, found, reach, lists):
    """Record the lists of the motifs `centers` from a KD-tree's answer: `found` ``(c, L)``, each center's L
    nearest motifs, and `reach` ``(c,)``, a lower bound on the distance of every other motif to it."""
    neighbors, spacing, reaches, built = lists
    for r in range(centers.shape[0]):
        center = centers[r]
        for j in range(neighbors.shape[1]):
            neighbors[center, j] = found[r, j]
            spacing[center, j] = _rounded_up(math.sqrt(_distance(z, center, z, found[r, j])))
        reaches[center] = reach[r]
        built[center] = True


@_jit
def _search_near(i, x, r, center, z, lists, state, scratch, work):
    """Search block `i` (row `r` of `x`) among the neighbour list of motif `center`; True where that proves
    its nearest motif (and records the search)."""
    _near(z, center, lists, work)
    neighbors, spacing, reach, _ = lists
    distance = math.sqrt(_distance(x, r, z, center))
    rest = reach[center] * (1 - _REACH_ROUNDING) - distance * (1 + _REACH_ROUNDING)
    return _searched(i, x, r, neighbors[center], rest, z, state, scratch, spacing[center], center)


@_jit
def _search_all(i, x, z, searched, state, scratch, work):
    """Search block `i` of `x` among its `searched` nearest motifs, found by brute force over the bank; True
    where that proves its nearest motif."""
    best, d, _, _ = work
    count = _nearest(x, i, z, searched, work)
    rest = math.sqrt(d[best[0]]) if count < z.shape[0] else math.inf
    return _searched(i, x, i, best[:count], rest, z, state, scratch, np.empty(0, dtype=np.float32), -1)


@_jit
def _search_tree(i, x, z, tree, state, scratch, query, seeds, seed_d):
    """Search block `i` of `x` among its nearest motifs, as many as `query` holds, found in the bank's KD-tree
    (`momos.search.kdtree`) from a heap seeded with the distinct motifs `seeds` at D `seed_d` (near ones prune the tree
    at once); True where that proves its nearest motif (and records the search)."""
    heap_d, heap, seen, stamp, work = query
    stamp[0] += 1
    size, count = 0, heap.shape[0]
    for r in range(seeds.shape[0]):
        j, d = seeds[r], seed_d[r]
        if size < count:
            size = _keep(heap_d, heap, size, d, j)
            seen[j] = stamp[0]
        elif _worse(heap_d[0], heap[0], d, j):
            seen[heap[0]] = 0  # left out: a motif the tree may offer again
            _replace_top(heap_d, heap, size, d, j)
            seen[j] = stamp[0]
    _query(x, i, tree, heap_d, heap, size, seen, stamp[0], work)
    rest = math.sqrt(heap_d[0]) if count < z.shape[0] else math.inf  # the farthest found bounds every other
    return _searched(i, x, i, heap, rest, z, state, scratch, np.empty(0, dtype=np.float32), -1)


@_jit
def _tree_scratch(tree, z, count, marks, run):
    """`_search_tree`'s scratch space for queries of `count` motifs on thread run `run`: the heap, that run's
    row of `marks` (each motif's last query, and the count of queries: kept with the bank,
    `MotifIndex.marks`, so that no call clears O(k) memory) and `momos.search.kdtree._work`."""
    return np.empty(count), np.empty(count, np.int64), marks[0][run], marks[1][run:run + 1], _work(tree, z.shape[1])


@_jit
def _search_again(i, x, center, z, lists, tree, state, scratch, work, query, searched):
    """Search block `i` of `x` among the neighbour list of motif `center` and, where that proves nothing, among
    its nearest motifs: in the bank's KD-tree where there is one (`query` then has room for them), else by brute
    force where `searched` > 0. True where a search proves its nearest motif (and records it)."""
    if _search_near(i, x, i, center, z, lists, state, scratch, work):
        return True
    if query[0].shape[0] > 0:  # from the list's distances, which the search left in its scratch space
        return _search_tree(i, x, z, tree, state, scratch, query, lists[0][center], scratch[0])
    return searched > 0 and _search_all(i, x, z, searched, state, scratch, work)


@_jit
def _scratch(width, k):
    """Scratch space for rows of up to `width` motifs, (d, facet, gap, order), and for searches of up to
    `width` + 1 motifs over a bank of `k`, `_nearest`'s work."""
    return ((np.empty(width), np.empty(width), np.empty(width), np.empty(2 * width, dtype=np.int64)),
            (np.empty(width + 1, dtype=np.int64), np.empty(k), np.empty(k, dtype=np.int64), np.empty(width + 1)))


@_jit
def _start_run(x, z, guess, lists, tree, marks, state, mosaic, ties, searched, run, runs, left):
    """`start` on chunks ``run, run + runs, ...`` of the blocks, with one allocation of scratch space: the
    blocks whose guess's list is built; the others into their chunk of `ties`."""
    m = x.shape[0]
    built = lists[3]
    scratch, work = _scratch(max(state[6].shape[1], lists[0].shape[1], searched), 0)  # no brute force here
    query = _tree_scratch(tree, z, searched if tree[0].shape[0] > 0 else 0, marks, run)
    for chunk in range(run, left.shape[0], runs):
        lo, hi = chunk * CHUNK, min(chunk * CHUNK + CHUNK, m)
        for i in range(lo, hi):
            if not built[guess[i]]:
                mosaic[i] = guess[i]  # the motif `_search_left` searches it from
                ties[lo + left[chunk]] = i
                left[chunk] += 1
            elif _search_again(i, x, guess[i], z, lists, tree, state, scratch, work, query, 0):
                mosaic[i] = state[1][i]
            else:  # searched already: a tie, entered as -1 - i
                ties[lo + left[chunk]] = -1 - i
                left[chunk] += 1


@_parallel
def start(x, z, guess, lists, tree, marks, state, mosaic, ties, searched, threads):
    """Search every block of `x` ``(m, s)`` among the neighbours of its `guess` motif and, where that proves
    nothing, among its `searched` nearest motifs in the bank's KD-tree `tree` (`momos.search.kdtree.NO_TREE`: none);
    record it. Writes into `ties` the blocks that does not prove and returns how many. The chunks of blocks
    are shared among `threads` runs."""
    chunks = (x.shape[0] + CHUNK - 1) // CHUNK
    left = np.zeros(chunks, dtype=np.int64)
    runs = min(threads, chunks)
    for run in numba.prange(runs):
        _start_run(x, z, guess, lists, tree, marks, state, mosaic, ties, searched, run, runs, left)
    return _search_left(x, z, lists, tree, marks, state, mosaic, ties, searched, left)


@_jit
def _step_blocks(x, z, lists, tree, state, mosaic, lost, searched, lo, hi, scratch, work, query):
    """`step` on the blocks ``lo..hi`` with a thread's scratch space, searching only among lists already built
    (another thread may be reading any of them): returns (blocks past their slack, blocks searched, blocks
    left), those left in ``lost[lo:]``: a block whose list is not built yet with the motif to search it from
    in its `mosaic` entry, a block searched in vain as ``-1 - i``."""
    point, owner, partner, slack, pair_slack, anchor, candidates, bound = state
    built = lists[3]
    # The candidate check needs only the two nearest facets.
    listed = np.empty((1, 2), dtype=candidates.dtype)
    empty = np.empty(0, dtype=np.float32)
    # Every block keeps its motif unless it drifted past its slack: those are listed first, with no branch
    # (into `lost`, whose entries are rewritten only behind the one being read).
    moved = lost[lo:hi]
    count = 0
    for i in range(lo, hi):
        mosaic[i] = owner[i]
        drift = _distance(x, i, point, i)
        moved[count] = i
        count += not drift < slack[i]  # a NaN block too, left to the caller below
    found = 0
    num_left = 0
    for t in range(count):
        i = moved[t]
        drift = _distance(x, i, point, i)
        if drift != drift:  # a NaN block: no search proves anything, the caller refuses it
            moved[num_left] = -1 - i
            num_left += 1
            continue
        if drift < pair_slack[i]:  # only the owner and its partner can be nearest: two distances decide
            a, b = owner[i], partner[i]
            d_a, d_b = _distance(x, i, z, a), _distance(x, i, z, b)
            if d_b < d_a or (d_b == d_a and b < a):
                mosaic[i] = b
            continue
        # How far the block still is inside its last search's bound.
        left = bound[i] - math.sqrt(_distance(x, i, anchor, i))
        # A block outside its bound is searched (from its last nearest motif) without settling it among its
        # candidates first: that would prove nothing.
        nearest = owner[i]
        if left > 0:
            d, facet, gap, order = scratch
            nearest, d1, d2, first, second, _ = _settle_row(x, i, candidates[i], z, listed, 0, d, facet, order, gap,
                                                            empty, -1)
            margin = MARGIN * (d1 + d2)
            if left > margin:  # the nearest is a candidate: settled, with radii capped by the bound
                _evaluated(i, x, i, point, owner, partner, slack, pair_slack, nearest, listed[0, 0],
                           min(first, left) - margin, min(second, left) - margin)
                mosaic[i] = nearest
                continue
        found += 1
        if not built[nearest]:
            mosaic[i] = nearest
            moved[num_left] = i  # num_left <= t: behind the entry just read
            num_left += 1
        elif _search_again(i, x, nearest, z, lists, tree, state, scratch, work, query, searched):
            mosaic[i] = owner[i]
        else:
            moved[num_left] = -1 - i
            num_left += 1
    return count, found, num_left


@_jit
def _step_run(x, z, lists, tree, marks, state, mosaic, lost, searched, run, runs, rechecked, found, left):
    """`_step_blocks` on chunks ``run, run + runs, ...`` of the blocks, with one allocation of scratch space."""
    m = x.shape[0]
    scratch, work = _scratch(max(state[6].shape[1], lists[0].shape[1], searched), z.shape[0])
    query = _tree_scratch(tree, z, searched if tree[0].shape[0] > 0 else 0, marks, run)
    for chunk in range(run, rechecked.shape[0], runs):
        lo, hi = chunk * CHUNK, min(chunk * CHUNK + CHUNK, m)
        rechecked[chunk], found[chunk], left[chunk] = _step_blocks(x, z, lists, tree, state, mosaic, lost, searched,
                                                                   lo, hi, scratch, work, query)


@_parallel
def step(x, z, lists, tree, marks, state, mosaic, lost, searched, threads):
    """`MosaicTracker.mosaic` on an established state, in one pass over the blocks `x` ``(m, s)``.

    Writes each block's nearest motif (over the float64 bank `z`) into `mosaic` and updates the state of
    the blocks it looked at again. A block that left the bound of its last search is searched among the
    neighbours of its nearest candidate and, where that proves nothing, among its `searched` nearest motifs:
    in the bank's KD-tree `tree` (`momos.search.kdtree.NO_TREE`: none), else by brute force where `searched` > 0
    (`_search_again`). A block still unproven is written into `lost`, its mosaic entry left to the caller.
    Returns (blocks that moved past their slack, blocks searched, blocks lost). The chunks of blocks are
    shared among `threads` runs, each with its own scratch space.
    """
    chunks = (x.shape[0] + CHUNK - 1) // CHUNK
    rechecked, found, left = np.zeros(chunks, np.int64), np.zeros(chunks, np.int64), np.zeros(chunks, np.int64)
    runs = min(threads, chunks)
    for run in numba.prange(runs):
        _step_run(x, z, lists, tree, marks, state, mosaic, lost, searched, run, runs, rechecked, found, left)
    return rechecked.sum(), found.sum(), _search_left(x, z, lists, tree, marks, state, mosaic, lost, searched, left)


@_jit
def step_serial(x, z, lists, tree, marks, state, mosaic, lost, searched):
    """`step` on the calling thread: entering numba's parallel region costs more than the work of a small
    tensor, or of any tensor on one thread."""
    chunks = (x.shape[0] + CHUNK - 1) // CHUNK
    rechecked, found, left = np.zeros(chunks, np.int64), np.zeros(chunks, np.int64), np.zeros(chunks, np.int64)
    _step_run(x, z, lists, tree, marks, state, mosaic, lost, searched, 0, 1, rechecked, found, left)
    return rechecked.sum(), found.sum(), _search_left(x, z, lists, tree, marks, state, mosaic, lost, searched, left)


@_jit
def _search_left(x, z, lists, tree, marks, state, mosaic, lost, searched, left):
    """The end of a `start` or `step`, on one thread (run 0 of `marks`): build the lists missing and search the
    blocks that waited for them (``left[c]`` of them at the start of chunk c of `lost`, each from its `mosaic`
    entry; those searched in vain already as ``-1 - i``), as `_search_again` does. Writes the blocks still
    unproven at the start of `lost`; returns how many."""
    if left.sum() == 0:  # the usual step: no scratch space of O(k) to allocate
        return 0
    owner = state[1]
    scratch, work = _scratch(max(state[6].shape[1], lists[0].shape[1], searched), z.shape[0])
    query = _tree_scratch(tree, z, searched if tree[0].shape[0] > 0 else 0, marks, 0)
    num_lost = 0
    for chunk in range(left.shape[0]):
        for t in range(left[chunk]):
            i = lost[chunk * CHUNK + t]
            if i >= 0 and _search_again(i, x, mosaic[i], z, lists, tree, state, scratch, work, query, searched):
                mosaic[i] = owner[i]
            else:
                lost[num_lost] = i if i >= 0 else -1 - i  # behind the entry just read
                num_lost += 1
    return num_lost


def torch_threads() -> int:
    """The threads `on_torch_threads` runs a loop on: torch's, at most numba's pool."""
    import torch

    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def on_torch_threads(loop: Callable[..., Any], *args: Any) -> Any:
    """Run the parallel compiled `loop` on torch's threads (at most numba's pool). numba's OpenMP pool sets
    OpenMP's thread count when it starts, under torch's feet: torch's is put back."""
    import torch

    before = torch.get_num_threads()
    numba.set_num_threads(torch_threads())
    try:
        return loop(*args)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
