"""momos.export.to_onnx: agreement with the packed torch model, file size (no folding), layouts, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import momos
from momos import runtime
from momos.apps.models import mlp
from momos.config import index_bits
from momos.errors import MoMosExportError
from momos.export.onnx import pack_indices, require_runtime, unpack_indices
from momos.nn.packed import packed_tensors


def _packed(model: nn.Module, config: momos.MoMosConfig) -> nn.Module:
    prepared = momos.prepare(model, config)
    momos.refresh(prepared)
    return momos.convert(prepared).eval()


def _payload_bytes(model: nn.Module) -> int:
    """The bit-packed .momos payload: each motif table once, plus ceil(m * ceil(log2 k) / 8) bytes per tensor."""
    tables = {id(p.table): p.table.motifs.numel() * p.table.motifs.element_size() for _, p in packed_tensors(model)}
    mosaics = sum(math.ceil(p.num_blocks * index_bits(p.table.num_motifs) / 8) for _, p in packed_tensors(model))
    return sum(tables.values()) + mosaics


def _size_bound(model: nn.Module) -> float:
    return 1.05 * _payload_bytes(model) + 16 * 1024


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_onnxruntime_agrees_with_packed_model(small_model: tuple[str, nn.Module, Callable[[int], torch.Tensor]],
                                              scope: str, tmp_path: Path) -> None:
    name, model, make_input = small_model
    packed = _packed(model, momos.MoMosConfig(block_size=4, capacity=0.3, scope=scope))
    path = tmp_path / f"{name}.onnx"
    proto = momos.export.to_onnx(packed, make_input(2), path)
    onnx.checker.check_model(str(path), full_check=True)
    assert proto.ir_version <= 10
    assert path.stat().st_size <= _size_bound(packed)  # the gathers were not folded into dense weights

    graph = proto.graph
    motif_tables = [i for i in graph.initializer if i.name.startswith("momos.motifs.")]
    banks = {id(p.table) for _, p in packed_tensors(packed)}
    assert len(motif_tables) == len(banks) == (1 if scope == "global" else len(list(packed_tensors(packed))))
    initializer_names = {i.name for i in graph.initializer}
    for fqn, _ in packed_tensors(packed):
        assert fqn not in initializer_names and f"{fqn}.mosaic" in initializer_names
    tables = {i.name for i in motif_tables}
    tables |= {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in tables}  # float16 tables
    assert sum(n.op_type == "Gather" and n.input[0] in tables for n in graph.node) == len(list(packed_tensors(packed)))

    for weights in runtime.WEIGHTS:
        session = runtime.load(path, weights)
        assert session.input_names == ["input"] and session.output_names == ["output"]
        for batch in (1, 7):
            x = make_input(batch)
            with torch.no_grad():
                expected = packed(x).numpy()
            got = session.run({"input": x.numpy()})["output"]
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() <= 1e-5, (weights, batch)


def _wide_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8))


@pytest.fixture(scope="module")
def wide_index_model() -> nn.Module:
    """An MLP whose global bank needs 11-bit indices: uint16 mosaics would waste 5 of every 16 bits."""
    packed = _packed(_wide_mlp(), momos.MoMosConfig(block_size=4, num_motifs=1500))
    assert {index_bits(p.table.num_motifs) for _, p in packed_tensors(packed)} == {11}
    return packed


def test_bit_packed_mosaic_keeps_the_file_within_the_momos_payload(wide_index_model: nn.Module,
                                                                    tmp_path: Path) -> None:
    x = torch.randn(3, 512)
    sizes = {}
    for layout in ("packed", "native"):
        path = tmp_path / f"{layout}.onnx"
        momos.export.to_onnx(wide_index_model, x, path, mosaic_layout=layout)
        sizes[layout] = path.stat().st_size
        for weights in runtime.WEIGHTS:
            got = runtime.load(path, weights).run({"input": x.numpy()})["output"]
            assert np.abs(got - wide_index_model(x).detach().numpy()).max() <= 1e-5
    assert sizes["packed"] <= _size_bound(wide_index_model)
    assert sizes["native"] > _size_bound(wide_index_model)  # uint16 indices break the bound, as the issue says
    info = runtime.inspect(tmp_path / "packed.onnx")
    assert info.tensors["0.weight"]["storage"] == "uint32x11"


def test_planes_lookup_reads_bit_packed_mosaics(wide_index_model: nn.Module, tmp_path: Path) -> None:
    x = torch.randn(3, 512)
    momos.export.to_onnx(wide_index_model, x, tmp_path / "m.onnx", motif_lookup="planes")
    for weights in runtime.WEIGHTS:
        got = runtime.load(tmp_path / "m.onnx", weights).run({"input": x.numpy()})["output"]
        assert np.abs(got - wide_index_model(x).detach().numpy()).max() <= 1e-5


def test_digits_mlp_file_meets_the_size_goal(tmp_path: Path) -> None:
    """The benchmark's goal on its digits MLP (10 small tensors, so the graph's own bytes weigh in):
    momos/dense ONNX file bytes within 3% of c + ceil(log2 k)/(s*32)."""
    torch.manual_seed(0)
    model = mlp((64,), 10, hidden=256).eval()
    config = momos.MoMosConfig.paper(block_size=4, capacity=0.05)  # every parameter, as the goal counts them
    packed = _packed(model, config)
    x = torch.randn(2, 64)
    program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["output"],
                                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
    program.save(str(tmp_path / "dense.onnx"))
    momos.export.to_onnx(packed, x, tmp_path / "momos.onnx")
    bits = index_bits(next(p.table.num_motifs for _, p in packed_tensors(packed)))
    goal = config.capacity + bits / (config.block_size * 32)
    ratio = (tmp_path / "momos.onnx").stat().st_size / (tmp_path / "dense.onnx").stat().st_size
    assert ratio <= 1.03 * goal, (ratio, goal)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 31), data=st.data())
def test_pack_indices_roundtrip(bits: int, data: st.DataObject) -> None:
    values = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=200)), dtype=np.int64)
    words = pack_indices(values, bits)
    assert words.dtype == np.uint32
    assert words.size * 32 < (values.size + 32) * bits + 32 * 32  # at most one partial group of padding
    np.testing.assert_array_equal(unpack_indices(words, bits, values.size), values)


def test_pack_indices_is_a_little_endian_bit_stream() -> None:
    # fields 5 (101), 3 (011), 6 (110) at 3 bits: bits 0-8 = 1,0,1, 1,1,0, 0,1,1 -> 0b110_011_101
    assert pack_indices(np.array([5, 3, 6]), 3)[0] == 0b110011101


def test_native_layout_uses_uint4_for_small_banks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    packed = _packed(nn.Sequential(nn.Linear(16, 16)), momos.MoMosConfig(block_size=4, num_motifs=10))
    x = torch.randn(2, 16)
    proto = momos.export.to_onnx(packed, x, tmp_path / "m.onnx", mosaic_layout="native")
    mosaic = next(i for i in proto.graph.initializer if i.name == "0.weight.mosaic")
    assert mosaic.data_type == onnx.TensorProto.UINT4
    got = runtime.load(tmp_path / "m.onnx", "compact").run({"input": x.numpy()})["output"]
    assert np.abs(got - packed(x).detach().numpy()).max() <= 1e-5


@pytest.mark.parametrize("layout", ["packed", "native"])
def test_planes_lookup_agrees_and_keeps_the_size(small_model: tuple[str, nn.Module, Callable[[int], torch.Tensor]],
                                                 layout: str, tmp_path: Path) -> None:
    name, model, make_input = small_model
    packed = _packed(model, momos.MoMosConfig(block_size=4, capacity=0.3))
    sizes = {}
    for lookup in ("gather", "planes"):
        path = tmp_path / f"{name}-{lookup}.onnx"
        proto = momos.export.to_onnx(packed, make_input(2), path, mosaic_layout=layout, motif_lookup=lookup)
        sizes[lookup] = path.stat().st_size
        ops = {n.op_type for n in proto.graph.node}
        assert ("ArrayFeatureExtractor" in ops) is (lookup == "planes")
        for weights in runtime.WEIGHTS:
            session = runtime.load(path, weights)
            for batch in (1, 7):
                x = make_input(batch)
                with torch.no_grad():
                    expected = packed(x).numpy()
                assert np.abs(session.run({"input": x.numpy()})["output"] - expected).max() <= 1e-5, (lookup, weights)
    assert sizes["planes"] <= _size_bound(packed)  # same payload; a few more nodes (activation permutes)


def test_names_and_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    packed = _packed(nn.Sequential(nn.Linear(8, 4)), momos.MoMosConfig(block_size=2, capacity=0.5))
    proto = momos.export.to_onnx(packed, torch.randn(1, 8), tmp_path / "m.onnx", input_names=["features"],
                                 output_names=["logits"])
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("features", "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch" == out.type.tensor_type.shape.dim[0].dim_param
    got = runtime.load(tmp_path / "m.onnx").run({"features": np.ones((5, 8), np.float32)})["logits"]
    assert got.shape == (5, 4)


def test_refuses_models_that_are_not_converted(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(MoMosExportError, match="no MoMos tensors"):
        momos.export.to_onnx(model, torch.randn(2, 8), tmp_path / "m.onnx")
    prepared = momos.prepare(model, momos.MoMosConfig(block_size=2, capacity=0.5))
    with pytest.raises(MoMosExportError, match="prepared but not converted"):
        momos.export.to_onnx(prepared, torch.randn(2, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("inputs", "kwargs", "match"), [
    (lambda: torch.randn(2, 9), {}, "do not fit the forward"),
    (lambda: (torch.randn(2, 8), torch.randn(2, 8)), {}, "do not fit the forward"),
    (lambda: [3.0], {}, "sequence of tensors"),
    (lambda: torch.randn(2, 8), {"input_names": ["a", "b"]}, "input_names must be 1 distinct"),
    (lambda: torch.randn(2, 8), {"output_names": ["a", "b"]}, "output_names has 2 names"),
    (lambda: torch.randn(2, 8), {"mosaic_layout": "dense"}, "mosaic_layout"),
    (lambda: torch.randn(2, 8), {"opset": 17}, "opset must be an integer >= 18"),
    (lambda: torch.randn(2, 8), {"motif_lookup": "rows"}, "motif_lookup must be one of"),
])
def test_refuses_bad_arguments(inputs: Callable[[], object], kwargs: dict, match: str, tmp_path: Path) -> None:
    packed = _packed(nn.Sequential(nn.Linear(8, 4)), momos.MoMosConfig(block_size=2, capacity=0.5))
    with pytest.raises(MoMosExportError, match=match):
        momos.export.to_onnx(packed, inputs(), tmp_path / "m.onnx", **kwargs)


def test_require_runtime_names_versions_onnxruntime_cannot_read() -> None:
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])],
                                   [value("y", onnx.TensorProto.FLOAT, [1])])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    proto.ir_version = 10
    require_runtime(proto)
    proto.ir_version = 99
    with pytest.raises(MoMosExportError, match=r"cannot load the exported model \(ir_version=99"):
        require_runtime(proto)
