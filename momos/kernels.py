"""Compiled CPU loops (numba) for the STE forward's hot path: one pass over a tensor's blocks per step.

`momos.incremental` defines what is computed and holds the torch version, which serves every other
device. The loops here do the same block by block in one compiled pass instead of a hundred whole-array
torch operations, whose dispatch, not their arithmetic, was the cost of a step (17 ms against a 2.4 ms
dense step on the MLP 64-256x4-10). Every distance is `momos.assign`'s D (float64, coordinate by coordinate),
ties go to the lowest index and every bound keeps the same margin, so the mosaic is the same bit for bit.

One thing only the compiled path has: a block that must be searched again is searched among the
`NEIGHBORS` nearest motifs of a motif close to it (its list is built on first use, by brute force over
the bank, and kept with the bank's `MotifIndex`). A block at distance r from motif c has every motif
that is not on c's list at least ``reach(c) - r`` away, which usually proves the nearest on the list.
Blocks it does not prove (far from every motif) are searched by brute force in small banks; the rest are
left to the caller (`MosaicTracker`), which searches them in the bank's KD-tree and records them here
(`adopt`), or the torch way where many motifs tie.

This module imports numba; `momos.incremental` imports it on first use. numba compiles each loop once
per argument types and caches the machine code on disk.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from momos.incremental import _TIE_SPACING, MARGIN

# numba infers every argument's type at the first call: the loops below carry no annotations.

# Relative rounding allowed on a neighbour list's reach and a block's distance to the list's motif.
_REACH_ROUNDING = 1e-12
# Relative rounding allowed on the lower bound (d_j - d_1) / 2 of a facet's distance.
_SKIP_ROUNDING = 1e-9


@numba.njit(cache=True, nogil=True, inline="always")
def _distance(x, i, z, j):
    """D(x_i, z_j): float64, summed coordinate by coordinate."""
    total = 0.0
    for c in range(x.shape[1]):
        diff = float(x[i, c]) - z[j, c]
        total += diff * diff
    return total


@numba.njit(cache=True, nogil=True)
def _settle_row(x, i, lists, z, listed, row, d, facet, order):
    """Row `i` of `x` among the motifs `lists` (1-D), as `momos.incremental._Cell` and `_settle` see it:
    returns (nearest, its distance d1, the runner-up's d2, the nearest Voronoi facet, the second nearest,
    the one after the `listed` motifs) and writes into ``listed[row]`` the motifs with the nearest facets
    (repeating the first when fewer are listed). `d`, `facet` and `order` are scratch space."""
    width = lists.shape[0]
    facets = listed.shape[1]
    d1_sq, d2_sq = math.inf, math.inf  # d2: the nearest of the motifs other than the nearest
    best = -1
    for j in range(width):
        d[j] = _distance(x, i, z, lists[j])
        if d[j] < d1_sq or (d[j] == d1_sq and lists[j] < best):
            if lists[j] != best:
                d2_sq = min(d2_sq, d1_sq)
            d1_sq, best = d[j], lists[j]
        elif lists[j] != best:
            d2_sq = min(d2_sq, d[j])
    d1 = math.sqrt(d1_sq)
    count = 0  # order[:count]: the nearest facets so far, nearest first, at most facets + 1
    for j in range(width):
        if lists[j] == best:
            continue
        dj = math.sqrt(d[j])
        # A facet is at least (d_j - d_1) / 2 away (triangle inequality): one that cannot be among the nearest
        # kept is skipped (with an allowance far above rounding), unless it may be a tie (facet 0, below).
        if count == facets + 1 and (dj - d1) * (0.5 - _SKIP_ROUNDING) >= facet[order[facets]] \
                and dj - d1 > 2 * _TIE_SPACING * (d1 + dj):
            continue
        spacing = 0.0
        for c in range(x.shape[1]):
            diff = z[lists[j], c] - z[best, c]
            spacing += diff * diff
        spacing = math.sqrt(spacing)
        # A motif too close to the nearest to separate from rounding is a tie: its facet is at 0.
        facet[j] = (d[j] - d1_sq) / (2 * spacing) if spacing > _TIE_SPACING * (d1 + dj) else 0.0
        if count == facets + 1 and not facet[j] < facet[order[facets]]:
            continue
        t = min(count, facets)
        while t > 0 and facet[order[t - 1]] > facet[j]:
            order[t] = order[t - 1]
            t -= 1
        order[t] = j
        count = min(count + 1, facets + 1)
    for j in range(facets):
        listed[row, j] = lists[order[j if j < count else 0]] if count else best
    first = facet[order[0]] if count > 0 else math.inf
    second = facet[order[1]] if count > 1 else math.inf
    beyond = facet[order[facets]] if count > facets else math.inf
    return best, d1, math.sqrt(d2_sq), first, second, beyond


@numba.njit(cache=True, nogil=True)
def settle(x, lists, rest, z, nearest, radius, listed, bound, pair_radius, proven, runner_up):
    """`momos.incremental._settle` of every row of `x` ``(c, s)`` among its distinct motifs `lists` ``(c, L)``,
    given `rest`, a lower bound on its distance to every motif off its list; writes the outputs."""
    width = lists.shape[1]
    d, facet, order = np.empty(width), np.empty(width), np.empty(width, dtype=np.int64)
    for i in range(x.shape[0]):
        best, d1, d2, first, second, beyond = _settle_row(x, i, lists[i], z, listed, i, d, facet, order)
        off_list = (rest[i] - d1) / 2  # (d_j - d_1) / 2 for every motif j off the list
        margin = MARGIN * (d1 + d2)
        nearest[i] = best
        radius[i] = min(first, off_list) - margin
        pair_radius[i] = min(second, off_list) - margin
        bound[i] = min(beyond, off_list) - margin
        proven[i] = d1 * (1 + MARGIN) < rest[i]
        runner_up[i] = d2 * (1 + MARGIN) < rest[i]


@numba.njit(cache=True, nogil=True)
def _evaluated(i, x, r, point, owner, partner, slack, pair_slack, nearest, behind, radius, pair_radius):
    """Block `i`, now at row `r` of `x`, was evaluated there: its nearest motif, the one behind its nearest
    facet, and the radii that keep the nearest (slack) and keep it one of the two (pair slack), squared."""
    for c in range(x.shape[1]):
        point[i, c] = x[r, c]
    owner[i], partner[i] = nearest, behind
    slack[i] = radius * radius if radius > 0 else -1.0
    pair_slack[i] = pair_radius * pair_radius if pair_radius > 0 else -1.0


@numba.njit(cache=True, nogil=True)
def _searched(i, x, r, lists, rest, z, point, owner, partner, slack, pair_slack, anchor, candidates, bound,
              d, facet, order):
    """Block `i`, at row `r` of `x`, was searched there: `lists` are its nearest motifs, `rest` a lower bound
    on its distance to every other. Records it as `MosaicTracker._search` does and returns True, or returns
    False when `rest` cannot prove the nearest (the block's state is then to be rewritten)."""
    best, d1, d2, first, second, beyond = _settle_row(x, r, lists, z, candidates[i:i + 1, 1:], 0, d, facet, order)
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


@numba.njit(cache=True, nogil=True)
def _nearest(x, i, z, wanted, best_d, best_j):
    """Brute force over the bank: the `wanted` (at most k) smallest D of row `i` of `x` into
    ``best_d[:wanted]`` in increasing order and their motifs into `best_j` (the lowest index first among
    equals); returns how many were found (``min(wanted, k)``)."""
    count = 0
    for j in range(z.shape[0]):
        dj = _distance(x, i, z, j)
        if count == wanted and not dj < best_d[wanted - 1]:
            continue
        t = min(count, wanted - 1)
        while t > 0 and best_d[t - 1] > dj:
            best_d[t], best_j[t] = best_d[t - 1], best_j[t - 1]
            t -= 1
        best_d[t], best_j[t] = dj, j
        count = min(count + 1, wanted)
    return count


@numba.njit(cache=True, nogil=True)
def _near(z, center, neighbors, reach, built, best_d, best_j):
    """Motif `center`'s list of its ``L`` nearest motifs (itself included; the lowest index first among
    equals) and its reach, a lower bound on the distance of every other motif; built on first use."""
    if built[center]:
        return
    width = neighbors.shape[1]
    _nearest(z, center, z, width + 1, best_d, best_j)
    for j in range(width):
        neighbors[center, j] = best_j[j]
    reach[center] = math.sqrt(best_d[width]) if z.shape[0] > width else math.inf
    built[center] = True


@numba.njit(cache=True, nogil=True)
def _search_near(i, x, r, center, z, neighbors, reach, built, point, owner, partner, slack, pair_slack, anchor,
                 candidates, bound, d, facet, order, best_d, best_j):
    """Search block `i` (row `r` of `x`) among the neighbour list of motif `center`; True where that proves
    its nearest motif (and records the search)."""
    _near(z, center, neighbors, reach, built, best_d, best_j)
    distance = math.sqrt(_distance(x, r, z, center))
    rest = reach[center] * (1 - _REACH_ROUNDING) - distance * (1 + _REACH_ROUNDING)
    return _searched(i, x, r, neighbors[center], rest, z, point, owner, partner, slack, pair_slack, anchor,
                     candidates, bound, d, facet, order)


@numba.njit(cache=True, nogil=True)
def start(x, z, guess, neighbors, reach, built, point, owner, partner, slack, pair_slack, anchor, candidates,
          bound, mosaic, ties):
    """Search every block of `x` ``(m, s)`` among the neighbours of its `guess` motif and record it; writes
    into `ties` the blocks that does not prove and returns how many."""
    width = neighbors.shape[1]
    d, facet, order = np.empty(width), np.empty(width), np.empty(width, dtype=np.int64)
    best_d, best_j = np.empty(width + 1), np.empty(width + 1, dtype=np.int64)
    num_ties = 0
    for i in range(x.shape[0]):
        if _search_near(i, x, i, guess[i], z, neighbors, reach, built, point, owner, partner, slack, pair_slack,
                        anchor, candidates, bound, d, facet, order, best_d, best_j):
            mosaic[i] = owner[i]
        else:
            ties[num_ties] = i
            num_ties += 1
    return num_ties


@numba.njit(cache=True, nogil=True)
def adopt(rows, x, lists, rest, z, point, owner, partner, slack, pair_slack, anchor, candidates, bound, mosaic,
          ties):
    """Record the searches of the blocks `rows`, at the rows of `x` ``(c, s)``: their nearest motifs `lists`
    ``(c, L)`` and lower bounds `rest` on the distance of every other motif. Writes into `ties` the rows
    (of `rows`) whose nearest that does not prove; returns how many."""
    width = lists.shape[1]
    d, facet, order = np.empty(width), np.empty(width), np.empty(width, dtype=np.int64)
    num_ties = 0
    for r in range(rows.shape[0]):
        i = rows[r]
        if _searched(i, x, r, lists[r], rest[r], z, point, owner, partner, slack, pair_slack, anchor, candidates,
                     bound, d, facet, order):
            mosaic[i] = owner[i]
        else:
            ties[num_ties] = r
            num_ties += 1
    return num_ties


@numba.njit(cache=True, nogil=True)
def _search_all(i, x, z, searched, point, owner, partner, slack, pair_slack, anchor, candidates, bound, d, facet,
                order, best_d, best_j):
    """Search block `i` of `x` among its `searched` nearest motifs, found by brute force over the bank; True
    where that proves its nearest motif."""
    count = _nearest(x, i, z, searched, best_d, best_j)
    rest = math.sqrt(best_d[count - 1]) if count < z.shape[0] else math.inf
    return _searched(i, x, i, best_j[:count], rest, z, point, owner, partner, slack, pair_slack, anchor, candidates,
                     bound, d, facet, order)


@numba.njit(cache=True, nogil=True)
def step(x, z, neighbors, reach, built, point, owner, partner, slack, pair_slack, anchor, candidates, bound,
         mosaic, lost, searched):
    """`MosaicTracker.mosaic` on an established state, in one pass over the blocks `x` ``(m, s)``.

    Writes each block's nearest motif (over the float64 bank `z`) into `mosaic` and updates the state of
    the blocks it looked at again. A block that left the bound of its last search is searched among the
    neighbours of its nearest candidate and, where that proves nothing and `searched` > 0, among its
    `searched` nearest motifs found by brute force. A block still unproven is written into `lost`, its mosaic
    entry left to the caller. Returns (blocks that moved past their slack, blocks searched, blocks lost).
    """
    width = candidates.shape[1]
    # The candidate check needs only the two nearest facets: keeping few lets `_settle_row` skip the others.
    listed = np.empty((1, 2), dtype=candidates.dtype)
    scratch = max(width, neighbors.shape[1] + 1, searched)
    d, facet, order = np.empty(scratch), np.empty(scratch), np.empty(scratch, dtype=np.int64)
    best_d, best_j = np.empty(scratch), np.empty(scratch, dtype=np.int64)
    rechecked = 0
    found = 0
    num_lost = 0
    for i in range(x.shape[0]):
        a = owner[i]
        mosaic[i] = a
        drift = 0.0
        for c in range(x.shape[1]):
            diff = float(x[i, c]) - float(point[i, c])
            drift += diff * diff
        if drift < slack[i]:
            continue
        rechecked += 1
        if drift < pair_slack[i]:  # only the owner and its partner can be nearest: two distances decide
            b = partner[i]
            d_a, d_b = _distance(x, i, z, a), _distance(x, i, z, b)
            if d_b < d_a or (d_b == d_a and b < a):
                mosaic[i] = b
            continue
        moved = 0.0
        for c in range(x.shape[1]):
            diff = float(x[i, c]) - float(anchor[i, c])
            moved += diff * diff
        left = bound[i] - math.sqrt(moved)  # how far the block still is inside its last search's bound
        nearest, d1, d2, first, second, _ = _settle_row(x, i, candidates[i], z, listed, 0, d, facet, order)
        margin = MARGIN * (d1 + d2)
        if left > margin:  # the nearest is a candidate: settled, with radii capped by the bound
            _evaluated(i, x, i, point, owner, partner, slack, pair_slack, nearest, listed[0, 0],
                       min(first, left) - margin, min(second, left) - margin)
            mosaic[i] = nearest
            continue
        found += 1
        if _search_near(i, x, i, nearest, z, neighbors, reach, built, point, owner, partner, slack, pair_slack,
                        anchor, candidates, bound, d, facet, order, best_d, best_j) \
                or (searched > 0 and _search_all(i, x, z, searched, point, owner, partner, slack, pair_slack, anchor,
                                                 candidates, bound, d, facet, order, best_d, best_j)):
            mosaic[i] = owner[i]
        else:
            lost[num_lost] = i
            num_lost += 1
    return rechecked, found, num_lost
