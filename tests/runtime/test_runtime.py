"""momos.runtime: running and inspecting exported files with numpy + onnxruntime, never torch."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import momos
from momos import runtime
from momos.config import index_bits
from momos.errors import MoMosFormatError
from momos.nn.packed import packed_tensors


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, np.ndarray]:
    """(ONNX path, packed model, an input batch) of a small MLP with a global bank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
    prepared = momos.prepare(model, momos.MoMosConfig(block_size=4, capacity=0.2, targets="all"))
    momos.refresh(prepared)
    packed = momos.convert(prepared).eval()
    path = tmp_path_factory.mktemp("runtime") / "mlp.onnx"
    momos.export.to_onnx(packed, torch.randn(2, 12), path)
    return path, packed, np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)


def _run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing torch raises ImportError."""
    blocker = textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None
        sys.meta_path.insert(0, _NoTorch())
    """)
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_import_momos_does_not_import_torch(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, momos; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_runtime_works_with_torch_unimportable(exported: tuple[Path, nn.Module, np.ndarray],
                                               tmp_path: Path) -> None:
    path, packed, x = exported
    np.save(tmp_path / "x.npy", x)
    done = _run_without_torch(f"""
        import numpy as np
        from momos import runtime
        x = np.load("x.npy")
        outs = [runtime.load({str(path)!r}, w).run({{"input": x}})["output"] for w in runtime.WEIGHTS]
        np.save("out.npy", np.stack(outs))
        print(runtime.inspect({str(path)!r}).to_dict()["num_parameters"])
        try:
            import torch
        except ImportError:
            print("blocked")
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(sum(p.numel for _, p in packed_tensors(packed))), "blocked"]
    expected = packed(torch.from_numpy(x)).detach().numpy()
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= 1e-5


def test_inspect_reports_banks_and_per_tensor_bits(exported: tuple[Path, nn.Module, np.ndarray]) -> None:
    path, packed, _ = exported
    info = runtime.inspect(path)
    assert info.momos_version == momos.__version__ and info.mosaic_layout == "packed" and info.opset == 21
    assert info.inputs == {"input": ["batch", 12]} and info.outputs == {"output": ["batch", 3]}
    assert info.file_bytes == path.stat().st_size
    tensors = dict(packed_tensors(packed))
    assert set(info.tensors) == set(tensors)
    for name, t in tensors.items():
        k = t.table.num_motifs
        assert info.tensors[name]["num_motifs"] == k and info.tensors[name]["index_bits"] == index_bits(k)
        assert info.tensors[name]["shape"] == list(t.shape) and info.tensors[name]["bank"] == "global"
    (bank,) = info.banks.values()
    assert info.configs[bank["config"]] == next(iter(tensors.values())).table.config.to_dict()
    assert json.loads(json.dumps(info.to_dict()))["num_parameters"] == info.num_parameters == 12 * 32 + 32 + 32 * 3 + 3
    text = str(info)
    assert "bank global: k=" in text and "0.weight (32, 12)" in text and "mosaic layout packed" in text


def test_session_checks_feeds_and_outputs(exported: tuple[Path, nn.Module, np.ndarray]) -> None:
    path, _, x = exported
    session = runtime.load(path, "compact")
    assert (session.input_names, session.output_names, session.weights) == (["input"], ["output"], "compact")
    with pytest.raises(MoMosFormatError, match=r"feeds name inputs \['x'\]"):
        session.run({"x": x})
    with pytest.raises(MoMosFormatError, match="unknown output"):
        session.run({"input": x}, outputs=["logits"])
    with pytest.raises(MoMosFormatError, match="rejected the feeds"):
        session.run({"input": x[:, :5]})
    with pytest.raises(MoMosFormatError, match="weights must be one of"):
        runtime.load(path, "dense")


@pytest.mark.parametrize("weights", ["folded", "compact"])
@pytest.mark.parametrize("arena", [None, True, False])
def test_memory_arena_option(exported: tuple[Path, nn.Module, np.ndarray], weights: str, arena: bool | None) -> None:
    path, packed, x = exported
    kwargs = {} if arena is None else {"arena": arena}
    session = runtime.load(path, weights, threads=1, **kwargs)
    assert session.options.enable_cpu_mem_arena is (arena is not False)  # on unless turned off
    assert session.options.intra_op_num_threads == 1
    expected_out = packed(torch.from_numpy(x)).detach().numpy()
    for _ in range(2):  # a second run reuses (arena) or reallocates (no arena) the decoded weights
        assert np.abs(session.run({"input": x})["output"] - expected_out).max() <= 1e-5


@pytest.mark.parametrize("weights", ["folded", "compact"])
def test_the_graph_onnxruntime_runs_holds_dense_weights_only_when_folded(
        exported: tuple[Path, nn.Module, np.ndarray], weights: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # onnxruntime writes the graph it runs, after its load-time optimizations, to a file its options name.
    path, packed, x = exported
    optimized = tmp_path / "optimized.onnx"
    open_session = ort.InferenceSession

    def writing_the_optimized_graph(model_path: str, options: ort.SessionOptions,
                                    **kwargs: object) -> ort.InferenceSession:
        options.optimized_model_filepath = str(optimized)
        return open_session(model_path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", writing_the_optimized_graph)
    session = runtime.load(path, weights)
    ran, exported_graph = onnx.load(optimized).graph, onnx.load(path).graph
    shapes = sorted(tuple(t.shape) for _, t in packed_tensors(packed))
    held = sorted((i.name, tuple(i.dims)) for i in ran.initializer)
    decoders = [n.op_type for n in ran.node].count("Gather")
    if weights == "compact":  # the file's motifs, mosaics and shape constants only: each run decodes the weights
        assert held == sorted((i.name, tuple(i.dims)) for i in exported_graph.initializer)
        assert decoders == [n.op_type for n in exported_graph.node].count("Gather") == len(shapes)
    else:  # decoded once at load: a dense initializer per weight, no decoder left
        assert sorted(dims for _, dims in held) == shapes
        assert decoders == 0
    expected = packed(torch.from_numpy(x)).detach().numpy()
    assert np.abs(session.run({"input": x})["output"] - expected).max() <= 1e-5


def test_release_free_memory_trims_the_glibc_heap() -> None:
    from momos.runtime.session import release_free_memory

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert release_free_memory() is glibc


def test_inspect_refuses_files_momos_did_not_write(tmp_path: Path) -> None:
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    proto.ir_version = 10
    onnx.save(proto, tmp_path / "plain.onnx")
    with pytest.raises(MoMosFormatError, match="lacks the momos metadata"):
        runtime.inspect(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(MoMosFormatError, match="not an ONNX model"):
        runtime.inspect(tmp_path / "junk.onnx")
