"""The `momos` command end to end: every subcommand in a subprocess on tiny settings, with real files.

Figures printed by the commands are checked against the files they wrote (sizes against the bytes on
disk, accuracies against re-running the saved .momos and .onnx files), and usage errors against their
exit status and the absence of a traceback.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import momos
from momos import runtime
from momos.apps import cli
from momos.apps.data import digits
from momos.apps.models import build
from momos.apps.train import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MOMOS = [sys.executable, "-m", "momos.apps.cli"]

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    def small():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


    def tokens():
        return nn.Sequential(nn.Embedding(5000, 16), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))


    def not_a_model():
        return 42
''')


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`momos ARGS` in a subprocess (stderr is a pipe, so no progress bars), output captured as text."""
    return subprocess.run([*MOMOS, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


def assert_clean_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo")
    return run("demo", "--epochs", "1", "--seed", "3", "--out", str(out), "--quiet"), out


def test_demo_writes_every_file_and_its_table_matches_them(demo_run: tuple) -> None:
    result, out = demo_run
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet and not a terminal: no bars, no status lines, no library warnings
    for name in ("accuracy.png", "distortion.png", "motif_usage.png"):
        assert_png(out / name)
    summary = json.loads((out / "summary.json").read_text())
    table = result.stdout
    checkpoint = (out / "dense.pt").stat().st_size
    for key, name in (("checkpoint", "dense.pt"), ("momos", "mlp.momos"), ("onnx", "mlp.onnx")):
        size = (out / name).stat().st_size
        assert summary["files"][key]["bytes"] == size
        row = re.search(rf"\({re.escape(name)}\)\s+([\d,]+) bytes(?:\s+\(([\d.]+)x smaller\))?", table)
        assert row is not None, f"no table row for {name}:\n{table}"
        assert int(row.group(1).replace(",", "")) == size
        if key != "checkpoint":
            assert float(row.group(2)) == pytest.approx(checkpoint / size, abs=0.05)
    mlp = build("mlp", (1, 8, 8), 10)
    numel = sum(p.numel() for p in mlp.parameters())
    assert summary["compression"]["parameters"] == numel
    assert summary["compression"]["numel"] == sum(p.numel() for n, p in mlp.named_parameters() if n.endswith("weight"))
    assert summary["compression"]["bits_per_parameter_on_disk"] == pytest.approx(
        8 * (out / "mlp.momos").stat().st_size / numel)
    assert f"{summary['compression']['bits_per_weight']:.3f}" in table
    assert summary["compression"]["bits_per_weight"] <= 3.0  # the recommended path's default size
    accuracy = summary["accuracy"]
    for key in ("dense", "momos_paper", "momos_one_shot", "momos_torch"):
        assert f"{accuracy[key]:.2%}" in table
    assert len(summary["history"]["recommended_accuracy"]) == 1 + summary["settings"]["finetune_epochs"]
    kept = summary["settings"]["finetune_kept_epoch"]
    assert summary["history"]["recommended_accuracy"][kept] == accuracy["momos_torch"]
    assert (summary["settings"]["epochs"], summary["settings"]["seed"]) == (1, 3)
    assert summary["refresh"]["count"] == 1 and len(summary["history"]["distortion"]) == 1
    assert sum(summary["motif_usage"]) == summary["compression"]["num_blocks"]
    for key in ("trained_over_initial", "momos_over_dense"):
        assert 0.5 < summary["bdm"][key] < 1.5
        assert f"{summary['bdm'][key]:.4f}" in table


def test_demo_files_reproduce_its_accuracies(demo_run: tuple) -> None:
    _, out = demo_run
    summary = json.loads((out / "summary.json").read_text())
    data = digits(seed=3)
    loaded = momos.load(out / "mlp.momos", build("mlp", data.input_shape, data.num_classes))
    assert evaluate(loaded, data.x_test, data.y_test) == summary["accuracy"]["momos_torch"]
    session = runtime.load(out / "mlp.onnx")
    logits = session.run({"input": data.x_test.numpy()})["output"]
    assert float((logits.argmax(1) == data.y_test.numpy()).mean()) == summary["accuracy"]["momos_onnxruntime"]
    dense = build("mlp", data.input_shape, data.num_classes)
    dense.load_state_dict(torch.load(out / "dense.pt", weights_only=True))
    assert evaluate(dense, data.x_test, data.y_test) == summary["accuracy"]["dense"]


def test_demo_training_is_repeatable() -> None:
    from momos.apps.experiments import train_demo_models

    first, second = (train_demo_models(epochs=1, seed=5) for _ in range(2))
    for a, b in ((first.dense, second.dense), (first.paper, second.paper), (first.packed, second.packed)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert first.paper_history.final_accuracy == second.paper_history.final_accuracy
    assert first.recommended_accuracy == second.recommended_accuracy


@pytest.fixture()
def user_files(tmp_path: Path) -> Path:
    """A user's module with a factory, its trained-ish state_dict, and an .npz dataset, in `tmp_path`."""
    (tmp_path / "usermodel.py").write_text(USER_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import usermodel

        torch.manual_seed(0)
        model = usermodel.small()
        torch.save(usermodel.tokens().state_dict(), tmp_path / "tokens.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("usermodel", None)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", X=x, y=(x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1))
    return tmp_path


def _small() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def test_compress_export_inspect_complexity_on_a_user_model(user_files: Path) -> None:
    d = user_files
    result = run("compress", "--model", "usermodel:small", "--weights", "weights.pt", "--block-size", "2",
                 "--capacity", "0.1", "--finetune", "data.npz", "--epochs", "1", "-o", "model.momos", "--json",
                 cwd=d)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["file"]["bytes"] == (d / "model.momos").stat().st_size
    weights = [p for n, p in _small().named_parameters() if n.endswith("weight")]
    assert out["report"]["total"]["numel"] == sum(p.numel() for p in weights)  # biases stay dense
    assert [d["name"] for d in out["report"]["dense"]] == ["1.bias", "3.bias"]
    assert set(out["accuracy"]) == {"dense", "momos_before_finetune", "momos"}
    assert out["accuracy"]["momos"] >= out["accuracy"]["momos_before_finetune"] - 0.05
    packed = momos.load(d / "model.momos", _small())
    assert momos.report(packed).to_dict()["total"] == pytest.approx(out["report"]["total"])
    assert {t["num_motifs"] for t in out["report"]["tensors"]} == {int(0.1 * out["report"]["total"]["num_blocks"])}

    text = run("compress", "--model", "usermodel:small", "--weights", "weights.pt", "-o", "plain.momos", cwd=d)
    assert text.returncode == 0, text.stderr
    assert "total" in text.stdout and f"{(d / 'plain.momos').stat().st_size:,} bytes" in text.stdout
    assert momos.report(momos.load(d / "plain.momos", _small())).bits_per_weight <= 3.0  # the default size
    calibrated = run("compress", "--model", "usermodel:small", "--weights", "weights.pt", "--bits", "2",
                     "--calibrate", "data.npz", "--epochs", "2", "-o", "calibrated.momos", "--json", cwd=d)
    assert calibrated.returncode == 0, calibrated.stderr
    out = json.loads(calibrated.stdout)
    assert out["accuracy"] is None and out["report"]["total"]["bits_per_weight"] <= 2.0

    result = run("export", "model.momos", "--model", "usermodel:small", "--input-shape", "16", "-o", "model.onnx",
                 cwd=d)
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    got = runtime.load(d / "model.onnx").run({"input": x})["output"]
    with torch.no_grad():
        np.testing.assert_allclose(got, packed(torch.from_numpy(x)).numpy(), atol=1e-5)

    inspected = run("inspect", "model.momos", "--json", cwd=d)
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["file_bytes"] == (d / "model.momos").stat().st_size
    assert {t["name"] for t in info["tensors"]} == {"1.weight", "3.weight"}
    assert {t["name"] for t in info["dense"]} == {"1.bias", "3.bias"}
    inspected = run("inspect", "model.onnx", cwd=d)
    assert inspected.returncode == 0, inspected.stderr
    assert f"{(d / 'model.onnx').stat().st_size:,} bytes" in inspected.stdout

    result = run("complexity", "model.momos", "--model", "usermodel:small", "--dense", "weights.pt", "--json",
                 cwd=d)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["momos_over_dense"]["bdm"] == pytest.approx(
        momos.complexity.ratio(packed, _loaded_small(d / "weights.pt")))
    assert measured["model"]["numel"] == sum(p.numel() for p in _small().parameters())


def _loaded_small(path: Path) -> torch.nn.Module:
    model = _small()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def test_complexity_of_the_demo_prints_both_ratios() -> None:
    result = run("complexity", "--epochs", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    ratios = dict(re.findall(r"BDM ratio (trained / initial|MoMos / dense)[^:]*:\s+([\d.]+)", result.stdout))
    assert set(ratios) == {"trained / initial", "MoMos / dense"}
    assert all(0.5 < float(v) < 1.5 for v in ratios.values())


def test_sweep_on_user_data_writes_a_row_per_run_and_a_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "images.npz", X=x, y=(x.mean(axis=(1, 2, 3)) > 0).astype(np.int64))
    result = run("sweep", "--model", "cnn", "--data", str(tmp_path / "images.npz"), "--block-sizes", "4,8",
                 "--capacities", "0.005,0.01", "--seeds", "2", "--epochs", "1", "--out", str(tmp_path / "out"),
                 "--quiet")
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "out" / "sweep_cnn.png")
    with open(tmp_path / "out" / "sweep_cnn.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (1 + 2 * 2)
    assert {(r["method"], r["block_size"], r["capacity"]) for r in rows} == {
        ("dense", "", ""), *{("momos", s, c) for s in ("4", "8") for c in ("0.005", "0.01")}}
    assert {r["seed"] for r in rows} == {"0", "1"}
    assert all(r["data"] == "images.npz" and 0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    for r in rows:
        if r["method"] == "momos":
            assert float(r["bits_per_weight"]) < 32 and int(r["num_motifs"]) >= 1


@pytest.mark.parametrize("args, needles", [
    (["sweep", "--model", "resnet50"], ["invalid choice: 'resnet50'"]),
    (["demo", "--capacity", "1.5"], ["capacity must be a number in (0, 1]"]),
    (["sweep", "--capacities", "0.05,zero"], ["capacity must be a number in (0, 1]"]),
    (["inspect", "missing.momos"], ["file 'missing.momos' does not exist"]),
    (["compress", "--model", "usermodel:small", "--weights", "missing.pt", "-o", "x.momos"], ["does not exist"]),
    (["demo", "--epochs", "0"], ["expected an integer >= 1"]),
    ([], ["required: COMMAND"]),
])
def test_usage_errors_exit_2_without_traceback(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    assert_clean_usage_error(run(*args, cwd=tmp_path), *needles)


def test_npz_without_x_and_y_is_a_usage_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", features=np.zeros((10, 4)), labels=np.zeros(10, dtype=np.int64))
    result = run("sweep", "--data", str(tmp_path / "bad.npz"), "--epochs", "1", "--out", str(tmp_path))
    assert_clean_usage_error(result, "lacks array(s) ['X', 'y']")


def test_errors_in_process(user_files: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Usage errors found after parsing exit 2, failures 1; --debug adds the traceback."""
    monkeypatch.chdir(user_files)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI makes the current directory importable
    cases = [
        (["compress", "--model", "usermodel", "--weights", "weights.pt", "-o", "x.momos"], 2,
         "must look like 'pkg.module:factory'"),
        (["compress", "--model", "nosuchmodule:f", "--weights", "weights.pt", "-o", "x.momos"], 2,
         "cannot import module 'nosuchmodule'"),
        (["compress", "--model", "usermodel:not_a_model", "--weights", "weights.pt", "-o", "x.momos"], 2,
         "returned int, not a torch.nn.Module"),
        (["compress", "--model", "usermodel:small", "--weights", "data.npz", "-o", "x.momos"], 2,
         "is not a state_dict"),
        (["inspect", "data.npz"], 2, "expected a .momos or .onnx file"),
        (["complexity", "weights.pt"], 2, "needs --model"),
    ]
    (user_files / "broken.momos").write_bytes(b"not a momos file at all")
    cases.append((["inspect", "broken.momos"], 1, "broken.momos"))
    try:
        for args, status, needle in cases:
            assert cli.main(args) == status, args
            err = capsys.readouterr().err
            assert needle in err and "Traceback" not in err, err
    finally:
        sys.modules.pop("usermodel", None)
    assert cli.main(["inspect", "broken.momos", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_help_everywhere(capsys: pytest.CaptureFixture) -> None:
    for command in ([], ["demo"], ["sweep"], ["compress"], ["inspect"], ["export"], ["complexity"]):
        assert cli.main([*command, "--help"]) == 0
        assert "usage: momos" in capsys.readouterr().out


def test_compress_embedding_bits_splits_the_bits_budget(user_files: Path) -> None:
    d = user_files
    result = run("compress", "--model", "usermodel:tokens", "--weights", "tokens.pt", "--bits", "3",
                 "--embedding-bits", "2.5", "--motif-dtype", "float32", "-o", "tokens.momos", "--json", cwd=d)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    banks = {t["name"]: (t["bank"], t["num_motifs"]) for t in report["tensors"]}
    assert banks["0.weight"] == ("0.weight", 256)  # 8-bit indices (2 bits per weight) and a 32,768-bit table
    assert banks["1.weight"][0] == banks["3.weight"][0] == "global" and banks["1.weight"][1] > 256
    assert report["total"]["bits_per_weight"] <= 3.0
    refused = run("compress", "--model", "usermodel:tokens", "--weights", "tokens.pt", "--capacity", "0.1",
                  "--embedding-bits", "2", "-o", "no.momos", cwd=d)
    assert refused.returncode == 2 and "--embedding-bits" in refused.stderr
    longer = run("compress", "--model", "usermodel:tokens", "--weights", "tokens.pt", "--bits", "3",
                 "--embedding-bits", "2", "--embedding-block-size", "8", "--motif-dtype", "float16",
                 "-o", "longer.momos", "--json", cwd=d)
    assert longer.returncode == 0, longer.stderr
    report = json.loads(longer.stdout)["report"]
    tensors = {t["name"]: t for t in report["tensors"]}
    assert tensors["0.weight"]["block_size"] == 8 and tensors["1.weight"]["block_size"] == 4
    assert report["total"]["bits_per_weight"] <= 3.0
    assert {b.motif_dtype for b in momos.inspect(d / "longer.momos").banks} == {"float16"}
    alone = run("compress", "--model", "usermodel:tokens", "--weights", "tokens.pt", "--embedding-bits", "none",
                "--embedding-block-size", "8", "-o", "no.momos", cwd=d)
    assert alone.returncode == 2 and "--embedding-bits" in alone.stderr
    auto = run("compress", "--model", "usermodel:tokens", "--weights", "tokens.pt", "-o", "auto.momos", "--json",
               cwd=d)  # --embedding-bits auto, the default: the embedding gets a bank of its own
    assert auto.returncode == 0, auto.stderr
    assert {t["name"]: t["bank"] for t in json.loads(auto.stdout)["report"]["tensors"]}["0.weight"] == "0.weight"
    one = run("compress", "--model", "usermodel:tokens", "--weights", "tokens.pt", "--embedding-bits", "none",
              "-o", "one.momos", "--json", cwd=d)
    assert one.returncode == 0, one.stderr
    assert {t["bank"] for t in json.loads(one.stdout)["report"]["tensors"]} == {"global"}
    bad = run("compress", "--model", "usermodel:tokens", "--weights", "tokens.pt", "--embedding-bits", "half",
              "-o", "no.momos", cwd=d)
    assert bad.returncode == 2 and "auto or none, got 'half'" in bad.stderr
    no_embedding = run("compress", "--model", "usermodel:small", "--weights", "weights.pt", "--embedding-bits", "2",
                       "-o", "no.momos", cwd=d)
    assert no_embedding.returncode == 2 and "no untied nn.Embedding" in no_embedding.stderr
    assert not (d / "no.momos").exists()
