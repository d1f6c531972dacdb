"""`momos.calibrate`: each block's motif chosen by the output error it causes, never making the model worse."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_MODELS, SmallTransformer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import momos
from momos import MoMosConfig, MoMosConfigError, MoMosStateError
from momos.nn.calibrate import (
    TOKEN_FLOOR,
    _batch_statistics,
    calibrated_mosaic,
    calibrated_table,
    input_hessians,
    lookup_counts,
    lookup_error,
    output_error,
    patches,
)
from momos.nn.packed import packed_tensors
from momos.search import nearest


def _correlated_inputs(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Inputs whose features are strongly correlated (a random mixing of a few latent factors plus noise)."""
    factors = torch.randn(n, max(2, dim // 4), generator=generator, dtype=torch.float64)
    mixing = torch.randn(factors.shape[1], dim, generator=generator, dtype=torch.float64)
    return factors @ mixing + 0.1 * torch.randn(n, dim, generator=generator, dtype=torch.float64)


def _reference_mosaic(weight: torch.Tensor, motifs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The sequential rule written out directly, without Cholesky factors or lazy batches.

    Going left to right, with the errors E of the blocks already chosen fixed, the columns R not yet chosen
    would best move to ``W_R + E H_(done,R) H_RR^-1`` (the error-minimising continuous update); block j then
    takes the motif nearest that target in the metric ``((H_RR^-1)_jj)^-1``, the loss it adds once the
    columns after it follow optimally.
    """
    out_features, in_features = weight.shape
    s = motifs.shape[1]
    mosaic = torch.empty(out_features, in_features // s, dtype=torch.int64)
    errors = torch.zeros(out_features, 0, dtype=torch.float64)
    for j in range(0, in_features, s):
        rest = slice(j, in_features)
        h_rr = h[rest, rest]
        target = weight[:, rest] + errors @ h[:j, rest] @ torch.linalg.inv(h_rr)
        metric = torch.linalg.inv(torch.linalg.inv(h_rr)[:s, :s])
        diff = target[:, None, :s] - motifs[None]  # (out, k, s)
        cost = torch.einsum("oki,ij,okj->ok", diff, metric, diff)
        mosaic[:, j // s] = cost.argmin(1)
        errors = torch.cat([errors, weight[:, j:j + s] - motifs[mosaic[:, j // s]]], dim=1)
    return mosaic.reshape(-1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), out_features=st.integers(1, 6), blocks=st.integers(1, 6),
       s=st.sampled_from([1, 2, 4]), k=st.integers(1, 9))
def test_calibrated_mosaic_is_the_sequential_rule(seed, out_features, blocks, s, k):
    g = torch.Generator().manual_seed(seed)
    in_features = blocks * s
    weight = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    motifs = torch.randn(k, s, generator=g, dtype=torch.float64)
    x = _correlated_inputs(4 * in_features, in_features, g)
    h = x.T @ x / x.shape[0]
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(in_features, dtype=torch.float64)
    got = calibrated_mosaic(weight, motifs, h, damping=0.01)
    assert torch.equal(got, _reference_mosaic(weight, motifs, damped))


def test_lazy_batches_match_the_rule_across_their_borders():
    """More columns than one lazy batch (128): the deferred updates reach every later column."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 264, generator=g, dtype=torch.float64)
    motifs = torch.randn(16, 4, generator=g, dtype=torch.float64)
    x = _correlated_inputs(600, 264, g)
    h = x.T @ x / x.shape[0]
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(264, dtype=torch.float64)
    assert torch.equal(calibrated_mosaic(weight, motifs, h), _reference_mosaic(weight, motifs, damped))


def test_uncorrelated_inputs_of_equal_scale_give_nearest_motifs():
    """H a multiple of the identity: no block's error can be made up by another, so each takes its nearest motif."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 16, generator=g)
    motifs = torch.randn(8, 4, generator=g)
    got = calibrated_mosaic(weight, motifs, 3.0 * torch.eye(16, dtype=torch.float64))
    assert torch.equal(got, nearest(weight.reshape(-1, 4), motifs))


@pytest.mark.parametrize("seed", range(4))
def test_calibrated_assignment_lowers_the_output_error(seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(32, 64, generator=g, dtype=torch.float64)
    motifs = torch.randn(32, 4, generator=g, dtype=torch.float64)
    x = _correlated_inputs(512, 64, g)
    h = x.T @ x / x.shape[0]
    calibrated = motifs[calibrated_mosaic(weight, motifs, h)].reshape(weight.shape)
    closest = motifs[nearest(weight.reshape(-1, 4), motifs)].reshape(weight.shape)
    assert output_error(weight, calibrated, h) < 0.8 * output_error(weight, closest, h)
    # the error is the one the inputs see
    direct = ((x @ (weight - calibrated).T) ** 2).sum() / ((x @ weight.T) ** 2).sum()
    assert output_error(weight, calibrated, h) == pytest.approx(float(direct), rel=1e-9)


def test_blocks_must_lie_along_rows():
    with pytest.raises(MoMosStateError, match="in_features=6"):
        calibrated_mosaic(torch.randn(2, 6), torch.randn(3, 4), torch.eye(6, dtype=torch.float64))


def test_input_hessians_average_over_every_leading_dimension():
    layer = nn.Linear(3, 2)
    model = nn.Sequential(layer)
    x = torch.randn(2, 5, 3)
    h = input_hessians(model, [x[:1], x[1:]], {"0": layer})["0"]
    flat = x.reshape(-1, 3).double()
    torch.testing.assert_close(h, flat.T @ flat / 10)


def _task(name: str, n: int = 96):
    torch.manual_seed(0)
    factory, make_input = SMALL_MODELS[name]
    dense = factory().eval()
    inputs = [make_input(32) for _ in range(n // 32)]
    return dense, inputs


def _model_error(packed: nn.Module, dense: nn.Module, inputs: list) -> float:
    """The guard's measure: eval mode, BatchNorm by batch statistics (the packed model's running ones are stale)."""
    with torch.no_grad(), _batch_statistics(packed), _batch_statistics(dense):
        return sum(float(nn.functional.mse_loss(packed(x), dense(x))) for x in inputs) / len(inputs)


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_calibrate_never_raises_the_model_error_and_says_what_it_left(name):
    dense, inputs = _task(name)
    packed = momos.compress(dense, MoMosConfig(block_size=4, num_motifs=16))
    before = _model_error(packed, dense, inputs[:4])
    mosaics = {n: t.mosaic.clone() for n, t in packed_tensors(packed)}
    buffers = {k: v.clone() for k, v in packed.named_buffers() if "momos_packed" not in k}
    stats = momos.calibrate(packed, dense, inputs)
    assert _model_error(packed, dense, inputs[:4]) <= before
    # nothing but mosaics changes: BatchNorm running statistics and the model's mode are as they were
    assert all(torch.equal(v, buffers[k]) for k, v in packed.named_buffers() if "momos_packed" not in k)
    assert not packed.training and not any(m.training for m in packed.modules())
    names = dict(packed_tensors(packed))
    assert set(stats.before) | set(stats.skipped) == set(names)
    for n, t in names.items():
        changed = not torch.equal(t.mosaic, mosaics[n])
        assert changed == (n in stats.before and n not in stats.skipped)
        if changed:
            assert stats.after[n] < stats.before[n]
    if name == "cnn":
        assert "not a multiple of the block size" in stats.skipped["conv1.weight"]  # 1 channel x 3 x 3 = 9 values
        assert "conv2.weight" in stats.before  # 8 x 3 x 3 = 72
    if name == "transformer":
        assert stats.skipped["embedding.weight"].startswith("an embedding whose motif table serves other tensors")
        # nn.MultiheadAttention reads out_proj.weight itself: that Linear's forward never runs
        assert "never ran" in stats.skipped["encoder.self_attn.out_proj.weight"]


def test_calibrate_lowers_the_mlp_error_and_the_result_saves_and_exports(tmp_path):
    dense, inputs = _task("mlp", 256)
    packed = momos.compress(dense, MoMosConfig(block_size=4, num_motifs=8))
    before = _model_error(packed, dense, inputs)
    stats = momos.calibrate(packed, dense, inputs)
    assert not {n for n, why in stats.skipped.items() if "Linear" not in why}
    assert _model_error(packed, dense, inputs) < 0.8 * before
    momos.save(packed, tmp_path / "m.momos")
    loaded = momos.load(tmp_path / "m.momos", SMALL_MODELS["mlp"][0]())
    x = inputs[0]
    torch.testing.assert_close(loaded(x), packed(x), rtol=0, atol=0)


def test_compress_with_data_calibrates_then_finetunes():
    dense, inputs = _task("mlp")
    config = MoMosConfig(block_size=4, num_motifs=16)
    got = momos.compress(dense, config, inputs, epochs=1, progress=False)
    want = momos.compress(dense, config)
    momos.calibrate(want, dense, inputs)
    momos.finetune(want, inputs, teacher=dense, epochs=1, progress=False)
    for (name, a), (_, b) in zip(packed_tensors(got), packed_tensors(want), strict=True):
        assert torch.equal(a.mosaic, b.mosaic), name
        assert torch.equal(a.table.motifs, b.table.motifs), name
    plain = momos.compress(dense, config, inputs, epochs=1, progress=False, calibrate=False)
    assert any(not torch.equal(a.mosaic, b.mosaic) for (_, a), (_, b) in
               zip(packed_tensors(got), packed_tensors(plain), strict=True))


def test_calibrate_refuses_bad_arguments():
    dense, inputs = _task("mlp")
    packed = momos.compress(dense, MoMosConfig(block_size=4, num_motifs=16))
    with pytest.raises(MoMosConfigError, match="damping"):
        momos.calibrate(packed, dense, inputs, damping=-1.0)
    with pytest.raises(MoMosConfigError, match="check_batches"):
        momos.calibrate(packed, dense, inputs, check_batches=0)
    with pytest.raises(MoMosConfigError, match="no calibration batch"):
        momos.calibrate(packed, dense, [])
    with pytest.raises(MoMosStateError, match="no packed"):
        momos.calibrate(dense, dense, inputs)


def test_excluded_tensors_keep_their_mosaic():
    dense, inputs = _task("mlp")
    packed = momos.compress(dense, MoMosConfig(block_size=4, num_motifs=16))
    first = dict(packed_tensors(packed))["1.weight"].mosaic.clone()
    stats = momos.calibrate(packed, dense, inputs, exclude=["1.weight"])
    assert stats.skipped["1.weight"] == "excluded"
    assert torch.equal(dict(packed_tensors(packed))["1.weight"].mosaic, first)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), conv=st.sampled_from(["1d", "2d"]), kernel=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2), batched=st.booleans())
def test_a_convolution_is_its_flattened_weight_times_its_input_patches(seed, conv, kernel, stride, padding, dilation,
                                                                      batched):
    torch.manual_seed(seed)
    cls, size = (nn.Conv1d, (9,)) if conv == "1d" else (nn.Conv2d, (7, 8))
    layer = cls(3, 5, kernel, stride=stride, padding=padding, dilation=dilation, bias=False).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    x = x if batched else x[0]
    want = layer(x)
    rows = patches(layer, x)
    got = rows @ layer.weight.flatten(1).T  # (positions, out)
    torch.testing.assert_close(got, want.reshape(*([2] if batched else []), 5, -1).transpose(-1, -2).reshape(-1, 5))


def test_calibrate_lowers_a_convolution_s_output_error():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2),
                          nn.Flatten(), nn.LazyLinear(10))
    inputs = [torch.randn(16, 4, 9, 9) + torch.randn(1, 4, 1, 1) for _ in range(4)]
    dense(inputs[0])
    dense.eval()
    packed = momos.compress(dense, MoMosConfig(block_size=4, num_motifs=16))
    before = _model_error(packed, dense, inputs)
    stats = momos.calibrate(packed, dense, inputs)
    assert {"0.weight", "2.weight"} <= set(stats.before)
    assert any(stats.after[n] < stats.before[n] for n in ("0.weight", "2.weight"))
    assert _model_error(packed, dense, inputs) < before
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten()).eval()
    stats = momos.calibrate(momos.compress(grouped, MoMosConfig(block_size=2, num_motifs=8)), grouped, inputs)
    assert stats.skipped["0.weight"] == "a grouped convolution (groups=2)"


def test_lookup_counts_count_every_row_read():
    torch.manual_seed(0)
    dense = SMALL_MODELS["transformer"][0]().eval()
    inputs = [torch.randint(0, 40, (3, 6)), torch.randint(0, 20, (2, 4))]
    counts = lookup_counts(dense, inputs, {"embedding": dense.embedding})["embedding"]
    want = torch.bincount(torch.cat([x.reshape(-1) for x in inputs]), minlength=40).double()
    assert torch.equal(counts, want)
    assert lookup_counts(dense, inputs, {"head": nn.Embedding(3, 2)}) == {}  # a forward that never ran


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(2, 30), k=st.integers(1, 12), zero=st.booleans())
def test_a_calibrated_table_never_has_a_larger_weighted_error_than_nearest_motifs(seed, rows, k, zero):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, 8, generator=g, dtype=torch.float64)
    motifs = torch.randn(k, 4, generator=g, dtype=torch.float64)
    if zero:
        motifs[0] = 0
    row_weights = torch.randint(0, 50, (rows,), generator=g).double() + 0.5
    fitted, mosaic = calibrated_table(weight, motifs, row_weights, force_zero=zero, iterations=5,
                                      generator=torch.Generator().manual_seed(0))
    start = motifs[nearest(weight.reshape(-1, 4), motifs)].reshape(weight.shape)
    got = fitted[mosaic].reshape(weight.shape)
    assert torch.equal(mosaic, nearest(weight.reshape(-1, 4), fitted))  # every block on its nearest motif
    assert lookup_error(weight, got, row_weights) <= lookup_error(weight, start, row_weights) + 1e-12
    if zero:
        assert torch.equal(fitted[0], torch.zeros(4, dtype=torch.float64))


def test_an_embedding_with_a_table_of_its_own_is_fit_to_the_tokens_the_inputs_read(tmp_path):
    torch.manual_seed(0)
    dense = SmallTransformer(vocab=400).eval()
    # text reads the first ten tokens of the 400 often and the rest never
    inputs = [torch.randint(0, 10, (32, 6)) for _ in range(4)]
    config = MoMosConfig(block_size=4, bits_per_weight=4.0)
    packed = momos.compress(dense, config, embedding_bits=2.0)
    before = _model_error(packed, dense, inputs)
    stats = momos.calibrate(packed, dense, inputs)
    assert "embedding.weight" in stats.before and "embedding.weight" not in stats.skipped
    assert stats.after["embedding.weight"] < stats.before["embedding.weight"]
    assert _model_error(packed, dense, inputs) < before
    seen = packed.embedding.weight[:10] - dense.embedding.weight[:10]
    nearest_packed = momos.compress(dense, config, embedding_bits=2.0)
    assert seen.norm() < (nearest_packed.embedding.weight[:10] - dense.embedding.weight[:10]).norm()
    counts = torch.bincount(torch.cat([x.reshape(-1) for x in inputs]), minlength=400).double()
    row_weights = counts + TOKEN_FLOOR * counts.mean()
    assert stats.after["embedding.weight"] == pytest.approx(
        lookup_error(dense.embedding.weight.detach(), packed.embedding.weight.detach(), row_weights))
    momos.save(packed, tmp_path / "t.momos")
    loaded = momos.load(tmp_path / "t.momos", SmallTransformer(vocab=400))
    torch.testing.assert_close(loaded(inputs[0]), packed(inputs[0]), rtol=0, atol=0)
