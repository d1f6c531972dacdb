"""`pip install momos` with no extra runs an exported model and inspects files: numpy and onnxruntime, never torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from conftest import SMALL_MODELS

import momos
from momos.export import to_onnx
from momos.nn.packed import packed_tensors

ROOT = Path(__file__).resolve().parents[1]

IN_BASE_INSTALL = textwrap.dedent('''
    import json, subprocess, sys
    import numpy as np
    import momos
    from momos import runtime

    session = runtime.load(sys.argv[1])
    np.save(sys.argv[2], session.run({"input": np.load(sys.argv[3])})["output"])
    header = momos.inspect(sys.argv[4])  # a .momos file's header reads without torch too
    try:
        momos.prepare
    except momos.MoMosDependencyError as e:
        refused = str(e)
    try:
        from momos.export import to_onnx  # noqa: F401
    except momos.MoMosDependencyError as e:
        refused += " | " + str(e)
    try:
        import torch  # noqa: F401
        has_torch = True
    except ModuleNotFoundError:
        has_torch = False
    print(json.dumps({"refused": refused, "has_torch": has_torch, "modules": sorted(sys.modules),
                      "tensors": [t.name for t in header.tensors]}))
''')


def test_the_base_install_runs_an_exported_model_without_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, make_input = SMALL_MODELS["cnn"]
    prepared = momos.prepare(factory().eval(), momos.MoMosConfig(block_size=4, num_motifs=16))
    momos.refresh(prepared)
    packed = momos.convert(prepared).eval()
    x = make_input(3)
    to_onnx(packed, (x,), tmp_path / "model.onnx")
    momos.save(packed, tmp_path / "model.momos")
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        want = packed(x).numpy()

    def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)

    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                tmp_path / "wheels", ROOT)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("momos-*.whl")
    env = tmp_path / "env"
    assert run(sys.executable, "-m", "venv", env).returncode == 0
    python = env / "bin" / "python"
    installed = run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)
    assert installed.returncode == 0, installed.stderr
    (tmp_path / "check.py").write_text(IN_BASE_INSTALL)
    checked = run(python, tmp_path / "check.py", tmp_path / "model.onnx", tmp_path / "out.npy", tmp_path / "x.npy",
                  tmp_path / "model.momos", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=1e-5, atol=1e-5)
    assert not report["has_torch"] and not any(m.split(".")[0] in ("torch", "numba", "faiss") for m in
                                               report["modules"])
    assert report["refused"].count("pip install 'momos[torch]'") == 2 and "momos.export" in report["refused"]
    assert report["tensors"] == [name for name, _ in packed_tensors(packed)]
    # The command line inspects the ONNX file, and names the extra where a command needs torch.
    momos_command = env / "bin" / "momos"
    for name in ("model.onnx", "model.momos"):
        inspected = run(momos_command, "inspect", tmp_path / name, "--json")
        assert inspected.returncode == 0, inspected.stderr
        assert json.loads(inspected.stdout)["tensors"]
    demo = run(momos_command, "demo", "--out", tmp_path / "demo", cwd=tmp_path)
    assert demo.returncode == 1 and "pip install 'momos[torch]'" in demo.stderr, demo.stderr
