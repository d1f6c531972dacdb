"""`momos.search.kdtree`: the compiled tree answers `momos.search.assign`'s definition exactly, in any query order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momos.errors import MoMosValueError
from momos.search import assign, kdtree
from momos.search.kdtree import MotifTree


def definition(x: np.ndarray, motifs: np.ndarray) -> np.ndarray:
    """The first argmin of D, summed coordinate by coordinate in float64 (assign's torch engine)."""
    return assign.nearest(torch.from_numpy(x), torch.from_numpy(motifs), engine="torch").numpy()


@st.composite
def banks(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Banks of 1-600 motifs (several tree levels at 16 a leaf) with their queries: continuous values, or a
    coarse grid where distances tie exactly, split keys repeat across children and motifs repeat; queries
    drawn from the motifs, near them, or far outside the bank's box."""
    s, k, m = draw(st.integers(1, 8)), draw(st.integers(1, 600)), draw(st.integers(1, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        motifs = rng.integers(-3, 4, (k, s)).astype(np.float64)
        x = rng.integers(-4, 5, (m, s)).astype(np.float64) / 2  # halfway points: exact ties
    else:
        motifs = rng.standard_normal((k, s))
        x = rng.standard_normal((m, s)) * draw(st.sampled_from([0.5, 1.0, 10.0]))
    if draw(st.booleans()):
        motifs[rng.integers(0, k, k // 3)] = motifs[rng.integers(0, k, k // 3)]  # duplicates
    share = min(m, k) // 2
    x[:share] = motifs[:share]  # queries at a motif
    scale = 2.0 ** draw(st.integers(-20, 10))
    return np.ascontiguousarray(x * scale), np.ascontiguousarray(motifs * scale)


@settings(max_examples=80, deadline=None)
@given(banks())
def test_the_tree_answers_the_definition(problem: tuple[np.ndarray, np.ndarray]) -> None:
    x, motifs = problem
    np.testing.assert_array_equal(MotifTree(motifs).nearest(x), definition(x, motifs))


@settings(max_examples=60, deadline=None)
@given(banks(), st.integers(1, 160))
def test_neighbors_are_the_nearest_by_distance_then_index(problem: tuple[np.ndarray, np.ndarray], count: int) -> None:
    x, motifs = problem
    found, d = MotifTree(motifs).neighbors(x, count)
    count = min(count, motifs.shape[0])
    assert found.shape == d.shape == (x.shape[0], count)
    diff = x[:, None, :] - motifs[None, :, :]
    every = np.zeros((x.shape[0], motifs.shape[0]))
    for c in range(x.shape[1]):  # D coordinate by coordinate, as assign defines it
        every += diff[..., c] * diff[..., c]
    for i in range(x.shape[0]):
        ranked = np.lexsort((np.arange(motifs.shape[0]), every[i]))  # by D, then index
        assert set(found[i].tolist()) == set(ranked[:count].tolist())
        assert found[i, 0] == ranked[count - 1]  # the farthest first
        np.testing.assert_array_equal(d[i], every[i, found[i]])


def test_a_tie_on_a_box_face_survives_the_rounding_of_the_box_distance() -> None:
    # Motifs on the grid of three 40-bit fractions an axis (in product order), queries at every midpoint: many
    # motifs tie exactly and lie on a split plane. The tree sums a box's distance in its own axis order, which
    # can round above the D of a tied motif on the box's face: without an allowance for that rounding the
    # tree skips motif 37 for one of these queries and keeps motif 46, at the same D.
    values = np.array([[616106925666, 718968539453, 884214834843], [131870992078, 283380829893, 670433501148],
                       [37284274092, 50951471710, 254825520235], [224409147671, 465841373603, 613178590285]]) / 2**40
    motifs = np.array(list(itertools.product(*values)))
    x = np.array(list(itertools.product(*[np.unique(np.add.outer(v, v)) / 2 for v in values])))
    np.testing.assert_array_equal(MotifTree(motifs).nearest(x), definition(x, motifs))


@settings(max_examples=30, deadline=None)
@given(banks(), st.integers(0, 2**16))
def test_the_answer_does_not_depend_on_the_query_order(problem: tuple[np.ndarray, np.ndarray], seed: int) -> None:
    # Each query starts from the previous query's answer: that may only change how fast it is found.
    x, motifs = problem
    tree = MotifTree(motifs)
    order = np.random.default_rng(seed).permutation(x.shape[0])
    np.testing.assert_array_equal(tree.nearest(x[order]), tree.nearest(x)[order])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 400), s=st.integers(1, 6), grid=st.booleans())
def test_each_split_separates_its_children(seed: int, k: int, s: int, grid: bool) -> None:
    rng = np.random.default_rng(seed)
    z = rng.integers(-2, 3, (k, s)).astype(np.float64) if grid else rng.standard_normal((k, s))
    first, end, axis, split, left, right, order, points, depth, largest = kdtree._build(z, kdtree.LEAF_SIZE)
    assert sorted(order) == list(range(k))
    np.testing.assert_array_equal(points, z[order])
    assert first[0] == 0 and end[0] == k
    for node in range(first.shape[0]):
        members = points[first[node]:end[node]]
        if axis[node] < 0:
            # A leaf holds at most LEAF_SIZE motifs, or only copies of one motif.
            assert members.shape[0] <= kdtree.LEAF_SIZE or (members == members[0]).all()
            assert members.shape[0] <= largest
            continue
        a, b = left[node], right[node]
        assert (first[a], end[a], first[b], end[b]) == (first[node], first[b], end[a], end[node])
        assert (points[first[a]:end[a], axis[node]] <= split[node]).all()
        assert (points[first[b]:end[b], axis[node]] >= split[node]).all()
    assert depth <= 2 + int(np.log2(k))


@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_on_several_threads_agree_with_the_definition(threads: int) -> None:
    rng = np.random.default_rng(threads)
    motifs = rng.standard_normal((2000, 4)) * 0.05
    x = rng.standard_normal((3 * kdtree.QUERY_CHUNK + 17, 4)) * 0.05  # a run per thread, each from a cold start
    previous = torch.get_num_threads()
    try:
        got = MotifTree(motifs).nearest(x, threads)
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_array_equal(got, definition(x, motifs))
    assert torch.get_num_threads() == previous


def test_a_bank_of_one_repeated_motif_sends_every_block_to_index_zero() -> None:
    motifs = np.ones((40, 3))  # one leaf of 40 copies: no axis to split
    np.testing.assert_array_equal(MotifTree(motifs).nearest(np.random.default_rng(0).standard_normal((50, 3))),
                                  np.zeros(50, dtype=np.int64))
    assert MotifTree(motifs).nearest(np.empty((0, 3))).shape == (0,)


def test_bad_banks_and_counts_are_refused_by_name() -> None:
    with pytest.raises(MoMosValueError, match=r"motifs must be a \(k, s\) array with k >= 1, got shape \(0, 4\)"):
        MotifTree(np.empty((0, 4)))
    with pytest.raises(MoMosValueError, match="count must be at least 1, got 0"):
        MotifTree(np.ones((3, 4))).neighbors(np.zeros((2, 4)), 0)
