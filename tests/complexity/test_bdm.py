"""The fast BDM equals pybdm (the oracle) on any input, and reads models by the paper's protocol."""

from __future__ import annotations

import builtins
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import momos
from momos import complexity
from momos.complexity.bdm import _pybdm, ctm_table

pybdm = pytest.importorskip("pybdm")

REL = 1e-9


def oracle(ndim: int = 1, symbols: int = 2) -> pybdm.BDM:
    return pybdm.BDM(ndim=ndim, nsymbols=symbols, warn_if_missing_ctm=False)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


bits_1d = st.one_of(
    arrays(np.int64, st.integers(12, 700), elements=st.integers(0, 1)),
    st.integers(12, 700).map(lambda n: np.zeros(n, np.int64)),
    st.integers(12, 700).map(lambda n: np.ones(n, np.int64)),
    # long runs with a few flips: few distinct blocks, high counts
    st.tuples(st.integers(12, 5000), st.lists(st.integers(0, 4999), max_size=5)).map(
        lambda t: np.isin(np.arange(t[0]), t[1]).astype(np.int64)),
)


@settings(max_examples=150, deadline=None)
@given(bits_1d)
def test_1d_binary_equals_pybdm(x: np.ndarray) -> None:
    ref = oracle()
    assert close(complexity.bdm(x), ref.bdm(x))
    assert close(complexity.bdm(x, normalized=True), ref.nbdm(x))
    assert close(complexity.block_entropy(x), ref.ent(x))
    if len(x) >= 24:  # with one block pybdm's normalization is 0/0
        assert close(complexity.block_entropy(x, normalized=True), ref.nent(x))


@settings(max_examples=60, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(4, 30), st.integers(4, 30)), elements=st.integers(0, 1)))
def test_2d_binary_equals_pybdm(x: np.ndarray) -> None:
    ref = oracle(ndim=2)
    assert close(complexity.bdm(x, ndim=2), ref.bdm(x))
    assert close(complexity.bdm(x, ndim=2, normalized=True), ref.nbdm(x))
    assert close(complexity.block_entropy(x, ndim=2), ref.ent(x))


@pytest.mark.parametrize("fill", [0, 1])
@pytest.mark.parametrize("shape", [(7, 9), (16, 16), (4, 13)])
def test_2d_constant_equals_pybdm(fill: int, shape: tuple[int, int]) -> None:
    x = np.full(shape, fill, np.int64)
    assert close(complexity.bdm(x, ndim=2), oracle(ndim=2).bdm(x))
    assert close(complexity.bdm(x, ndim=2, normalized=True), oracle(ndim=2).nbdm(x))


@settings(max_examples=40, deadline=None)
@given(arrays(np.int64, st.integers(12, 400), elements=st.integers(0, 3)))
def test_1d_four_symbols_equals_pybdm(x: np.ndarray) -> None:
    """More symbols: keys are relabelled by first occurrence, and blocks missing from the table count as
    max + 1 (pybdm's B4 table lacks some normalized keys)."""
    ref = oracle(symbols=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert close(complexity.bdm(x, symbols=4), ref.bdm(x))
        assert close(complexity.bdm(x, symbols=4, normalized=True), ref.nbdm(x))


def test_missing_ctm_block_is_warned_and_counted_as_max_plus_one() -> None:
    table = ctm_table(1, 4)
    present = set(table.codes.tolist())
    # a normalized 4-symbol key absent from pybdm's table
    rng = np.random.default_rng(0)
    for _ in range(10_000):
        block = rng.integers(0, 4, 12)
        first = {int(v): i for i, v in reversed(list(enumerate(block)))}
        relabel = {v: r for r, v in enumerate(sorted(first, key=first.get))}
        code = int(sum(relabel[int(v)] * 4 ** (11 - i) for i, v in enumerate(block)))
        if code not in present:
            break
    else:
        pytest.fail("no missing key found")
    with pytest.warns(RuntimeWarning, match="not in pybdm"):
        value = complexity.bdm(block.astype(np.int64), symbols=4)
    assert value == table.missing == table.values.max() + 1
    assert close(value, oracle(symbols=4).bdm(block.astype(np.int64)))


@settings(max_examples=30, deadline=None)
@given(arrays(np.int64, st.integers(1, 300), elements=st.integers(0, 1)))
def test_recursive_partition_is_pybdm_and_adds_the_leftover(x: np.ndarray) -> None:
    """The fallback runs pybdm's PartitionRecursive: never below the 'ignore' value, and equal to it exactly
    when the leftover is shorter than PartitionRecursive's min_length of 2 (so it is dropped too)."""
    ref = pybdm.BDM(ndim=1, partition=pybdm.PartitionRecursive)
    if len(x) < 2:
        with pytest.raises(momos.MoMosValueError):
            complexity.bdm(x, partition="recursive")
        return
    value = complexity.bdm(x, partition="recursive")
    assert value == ref.bdm(x)
    if len(x) >= 12:
        assert value >= complexity.bdm(x) - 1e-9
        assert (value == pytest.approx(complexity.bdm(x), rel=REL)) == (len(x) % 12 < 2)


def test_float_tensors_are_binarized_by_sign_and_integers_taken_as_symbols() -> None:
    w = torch.randn(1000)
    bits = (w > 0).long().numpy()
    assert complexity.bdm(w) == complexity.bdm(bits)
    assert complexity.bdm(torch.zeros(48)) == complexity.bdm(np.zeros(48, np.int64))  # 0 is not > 0
    with pytest.raises(momos.MoMosValueError, match="0..1"):
        complexity.bdm(np.array([0, 2] * 12))
    with pytest.raises(momos.MoMosValueError, match="NaN"):
        complexity.bdm(torch.full((24,), math.nan))


@pytest.mark.filterwarnings("ignore:.*not in pybdm:RuntimeWarning")
def test_more_symbols_bin_floats_at_their_quantiles() -> None:
    w = torch.randn(1200, generator=torch.Generator().manual_seed(0))
    edges = np.quantile(w.numpy(), [0.25, 0.5, 0.75])
    symbols = np.searchsorted(edges, w.numpy(), side="right")
    assert np.bincount(symbols).tolist() == [300, 300, 300, 300]
    assert close(complexity.bdm(w, symbols=4), oracle(symbols=4).bdm(symbols.astype(np.int64)))


def test_model_is_the_concatenated_sign_bits_of_its_trainable_tensors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5))
    model[2].bias.requires_grad_(False)  # frozen: not part of the payload
    payload = torch.cat([model[0].weight.reshape(-1), model[0].bias, model[2].weight.reshape(-1)]) > 0
    assert complexity.bdm(model) == pytest.approx(oracle().bdm(payload.long().numpy()), rel=REL)


def test_prepared_and_packed_models_are_read_as_the_weights_they_compute() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 6))
    for mode in ("hard", "ste"):
        prepared = momos.prepare(dense, momos.MoMosConfig(block_size=2, num_motifs=5, mode=mode))
        momos.refresh(prepared)
        if mode == "ste":  # move the latent weights off the mosaic: only the computed weights count
            with torch.no_grad():
                for p in prepared.parameters():
                    p.add_(0.01)
        computed = torch.cat([prepared[0].weight.reshape(-1), prepared[0].bias, prepared[2].weight.reshape(-1),
                              prepared[2].bias])
        expected = oracle().bdm((computed > 0).long().numpy())
        assert complexity.bdm(prepared) == pytest.approx(expected, rel=REL)
        assert complexity.bdm(momos.convert(prepared)) == pytest.approx(expected, rel=REL)


def test_2d_model_pools_the_blocks_of_each_tensor_view() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(9, 13))
    ref = oracle(ndim=2)
    views = [(model[0].weight.reshape(8, -1) > 0).long().numpy(), (model[2].weight > 0).long().numpy()]
    expected = ref.compute_bdm(*(ref.decompose_and_count(v) for v in views))
    assert complexity.bdm(model, ndim=2) == pytest.approx(expected, rel=REL)


def test_per_tensor_and_ratio() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 3))
    rows = complexity.per_tensor_bdm(model)
    assert list(rows) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert rows["0.weight"] == complexity.bdm(model[0].weight)
    assert rows["1.bias"] == 0.0  # 3 values: no complete block
    simple = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 3))
    with torch.no_grad():
        for p in simple.parameters():
            p.fill_(1.0)
    assert complexity.ratio(simple, model) == complexity.bdm(simple) / complexity.bdm(model) < 0.2


def test_bad_arguments_name_the_field() -> None:
    x = np.zeros(24, np.int64)
    with pytest.raises(momos.MoMosConfigError, match="symbols"):
        complexity.bdm(x, symbols=3)
    with pytest.raises(momos.MoMosConfigError, match="symbols"):
        complexity.bdm(x, symbols=4, ndim=2)
    with pytest.raises(momos.MoMosConfigError, match="ndim"):
        complexity.bdm(x, ndim=3)
    with pytest.raises(momos.MoMosConfigError, match="partition"):
        complexity.bdm(x, partition="correlated")
    with pytest.raises(momos.MoMosValueError, match="no complete 12 block"):
        complexity.bdm(np.zeros(11, np.int64))
    with pytest.raises(momos.MoMosValueError, match="at least 2 complete blocks"):
        complexity.block_entropy(np.zeros(12, np.int64), normalized=True)


@pytest.mark.parametrize(("message", "hint"), [("No module named 'pkg_resources'", "setuptools<81"),
                                               ("No module named 'pybdm'", "pybdm==0.1.0")])
def test_missing_pybdm_fails_loudly_with_the_fix(monkeypatch: pytest.MonkeyPatch, message: str,
                                                 hint: str) -> None:
    real_import = builtins.__import__

    def broken(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("pybdm"):
            raise ImportError(message)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(complexity.MoMosDependencyError, match=hint) as info:
        _pybdm()
    assert isinstance(info.value, momos.MoMosError)


def test_saturation_is_detected() -> None:
    rng = np.random.default_rng(0)
    assert complexity.block_counts(rng.integers(0, 2, 12 * 200_000)).saturated
    assert not complexity.block_counts(rng.integers(0, 2, 12 * 1000)).saturated
