"""Dtypes: models cast after prepare or convert save files that load; float64 motif tables are lossless."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_mlp
from torch import nn

import momos
from momos.errors import MoMosExportError, MoMosFormatError
from momos.nn.packed import packed_tensors

CASTS = {"float16": nn.Module.half, "bfloat16": nn.Module.bfloat16, "float64": nn.Module.double}


def _converted(model: nn.Module, **config: object) -> nn.Module:
    prepared = momos.prepare(model, momos.MoMosConfig(**({"block_size": 4, "capacity": 0.2} | config)))
    momos.refresh(prepared)
    return momos.convert(prepared)


def _assert_round_trip(packed: nn.Module, path: Path, dtype: str) -> None:
    """`packed` saves, the header says `dtype` for every table and tensor, and the file loads bit-identically."""
    info = momos.save(packed, path)
    assert {b.motif_dtype for b in info.banks} == {b.config.motif_dtype for b in info.banks} == {dtype}
    assert {t.dtype for t in info.tensors} == {dtype}
    assert momos.inspect(path) == info
    loaded = momos.load(path, CASTS[dtype](small_mlp()))
    x = torch.randn(5, 1, 8, 8, dtype=getattr(torch, dtype))
    assert torch.equal(loaded(x), packed(x))
    for (name, p), (_, q) in zip(packed_tensors(packed), packed_tensors(loaded), strict=True):
        assert q.table.motifs.dtype == p.table.motifs.dtype == getattr(torch, dtype), name
        assert torch.equal(q(), p())


@pytest.mark.parametrize("dtype", sorted(CASTS))
def test_a_model_cast_after_convert_saves_a_file_that_loads(dtype: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    packed = CASTS[dtype](_converted(small_mlp()))
    assert all(p.dtype == getattr(torch, dtype) for _, p in packed_tensors(packed))  # the decoded weights follow
    _assert_round_trip(packed, tmp_path / "m.momos", dtype)


@pytest.mark.parametrize("dtype", sorted(CASTS))
def test_a_model_cast_after_prepare_saves_a_file_that_loads(dtype: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    prepared = momos.prepare(small_mlp(), momos.MoMosConfig(block_size=4, capacity=0.2))
    momos.refresh(prepared)
    prepared = CASTS[dtype](prepared)
    packed = momos.convert(prepared)  # the cast weights are still the cast bank's mosaic: packed as they are
    assert torch.equal(packed[1].weight, prepared[1].weight)
    _assert_round_trip(packed, tmp_path / "m.momos", dtype)
    momos.refresh(prepared)  # a refresh after the cast draws the bank in the new dtype
    _assert_round_trip(momos.convert(prepared), tmp_path / "r.momos", dtype)


def test_a_file_of_another_dtype_names_the_cast_that_loads_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    momos.save(_converted(small_mlp()).half(), tmp_path / "m.momos")
    with pytest.raises(MoMosFormatError, match=r"file \[48, 64\] float16, model \[48, 64\] float32.*\.half\(\)"):
        momos.load(tmp_path / "m.momos", small_mlp())


def test_float64_motifs_count_64_bits_and_take_8_bytes(tmp_path: Path) -> None:
    config = momos.MoMosConfig(block_size=4, capacity=0.2, motif_dtype="float64")
    assert config.motif_bits == 64
    assert momos.MoMosConfig(block_size=4, motif_dtype=torch.float64, capacity=0.2).motif_dtype == "float64"
    # bits_per_weight spends 64 bits per motif value: n = 1000 weights at 2 bits in m = 250 blocks of 4 need
    # 250 * ceil(log2 k) + k * 4 * 64 <= 2000: k = 4 (500 + 1024); 3-bit indices leave room for 4 motifs only
    assert momos.MoMosConfig(block_size=4, bits_per_weight=2.0, motif_dtype="float64").num_motifs_for(250, 1000) == 4
    torch.manual_seed(0)
    packed = _converted(small_mlp().double(), motif_dtype="float64")
    info = momos.save(packed, tmp_path / "m.momos")
    (bank,) = info.banks
    assert bank.motif_dtype == "float64" and bank.nbytes == bank.num_motifs * bank.block_size * 8


def test_a_float64_model_at_capacity_1_without_the_zero_motif_is_lossless(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5)).double()  # 7 * 13: a padded last block
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = momos.prepare(model, momos.MoMosConfig(block_size=4, capacity=1.0, force_zero=False,
                                                      motif_dtype="float64", targets="all"))
    stats = momos.refresh(prepared)
    assert stats.distortion == 0.0 and stats.weights_changed == 0
    assert all(torch.equal(p, weights[k.replace(".parametrizations", "").replace(".original", "")])
               for k, p in prepared.state_dict().items() if k.endswith(".original"))
    packed = momos.convert(prepared)
    for name, p in packed_tensors(packed):
        assert p().dtype == torch.float64 and torch.equal(p(), weights[name]), name
    momos.save(packed, tmp_path / "m.momos")
    loaded = momos.load(tmp_path / "m.momos", nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5)).double())
    assert all(torch.equal(v, weights[k]) for k, v in [(n, p()) for n, p in packed_tensors(loaded)])
    assert sorted(n for n, _ in packed_tensors(loaded)) == sorted(weights)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("lookup", ["gather", "planes"])
def test_onnx_export_of_float64_and_float16_models(dtype: str, lookup: str, tmp_path: Path) -> None:
    from momos import runtime

    torch.manual_seed(0)
    config = {"motif_dtype": "float64"} if dtype == "float64" else {}
    packed = CASTS[dtype](_converted(small_mlp().double() if dtype == "float64" else small_mlp(), **config))
    x = torch.randn(3, 1, 8, 8, dtype=getattr(torch, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        momos.export.to_onnx(packed, (x,), tmp_path / "m.onnx", motif_lookup=lookup)
    (out,) = runtime.load(tmp_path / "m.onnx", weights="compact").run({"input": x.numpy()}).values()
    expected = packed(x).detach().numpy()
    assert out.dtype == expected.dtype
    # equal decoded weights; onnxruntime's matmuls sum in another order than torch's
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12 if dtype == "float64" else 2e-3)


def test_onnx_export_of_a_bfloat16_model_works_or_names_what_refuses_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    packed = _converted(small_mlp()).bfloat16()
    x = torch.randn(3, 1, 8, 8, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            momos.export.to_onnx(packed, (x,), tmp_path / "m.onnx")
        except MoMosExportError as e:  # onnxruntime's CPU kernels lack bfloat16 Gemm: the error says so
            assert "Could not find an implementation for Gemm" in str(e)
            assert "export a float32 or float16 copy" in str(e) and "lower opset" not in str(e)
            assert not (tmp_path / "m.onnx").exists()
