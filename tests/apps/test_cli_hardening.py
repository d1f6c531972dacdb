"""The `momos` command on inputs that cannot work: each is refused before any work, with exit status 2 for a usage
error, one clean line on stderr naming the option or path, and stdout left to the result (JSON only with --json).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import momos
from momos import runtime
from momos.apps import cli
from momos.errors import MoMosFormatError

MOMOS = [sys.executable, "-m", "momos.apps.cli"]

USER_MODULE = textwrap.dedent('''
    from torch import nn


    def small():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
''')


def _small() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the user's module, its state_dict, the pickled model, a .momos and an .onnx file of it."""
    d = tmp_path_factory.mktemp("cli")
    (d / "usermodel.py").write_text(USER_MODULE)
    torch.manual_seed(0)
    model = _small()
    torch.save(model.state_dict(), d / "weights.pt")
    torch.save(model, d / "pickled.pt")
    packed = momos.compress(model, momos.MoMosConfig(block_size=4, bits_per_weight=3.0, motif_init="kmeans"))
    momos.save(packed, d / "model.momos")
    momos.export.to_onnx(packed.eval(), torch.randn(2, 16), d / "model.onnx")
    (d / "notes.txt").write_text("a file, not a folder")
    return d


@pytest.fixture()
def in_files(files: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`files` as the current directory, for `cli.main` in this process (which imports usermodel from there)."""
    monkeypatch.chdir(files)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield files
    sys.modules.pop("usermodel", None)


def _main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    status = cli.main(args)
    out, err = capsys.readouterr()
    return status, out, err


def _assert_one_clean_line(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in err.rstrip("\n")), repr(err)


COMPRESS = ["compress", "--model", "usermodel:small", "--weights", "weights.pt"]


@pytest.mark.parametrize("args, message", [
    ([*COMPRESS, "--block-size", "10000000", "-o", "c.momos"],
     "argument --block-size: expected an integer from 1 to 4096, got '10000000'"),
    (["demo", "--block-size", "4097"], "argument --block-size: expected an integer from 1 to 4096, got '4097'"),
    (["sweep", "--block-sizes", "4,5000"], "argument --block-sizes: expected an integer from 1 to 4096, got '5000'"),
    ([*COMPRESS, "-o", "nodir/sub/c.momos"], "argument -o/--output: output directory 'nodir/sub' does not exist"),
    ([*COMPRESS, "-o", "."], "argument -o/--output: '.' is a directory, not a file to write"),
    (["export", "model.momos", "--model", "usermodel:small", "--input-shape", "16", "-o", "nodir/m.onnx"],
     "argument -o/--output: output directory 'nodir' does not exist"),
    ([*COMPRESS, "--lr", "nan", "-o", "c.momos"], "argument --lr: expected a finite number > 0, got 'nan'"),
    ([*COMPRESS, "--lr", "inf", "-o", "c.momos"], "argument --lr: expected a finite number > 0, got 'inf'"),
    ([*COMPRESS, "--bits", "nan", "-o", "c.momos"], "argument --bits: expected a finite number > 0, got 'nan'"),
    (["demo", "--out", "notes.txt"], "argument --out: 'notes.txt' is a file, not an output folder"),
    (["demo", "--out", "notes.txt/sub"], "argument --out: 'notes.txt' is a file, not an output folder"),
    (["sweep", "--out", "notes.txt"], "argument --out: 'notes.txt' is a file, not an output folder"),
])
def test_arguments_that_cannot_work_are_usage_errors_before_any_work(
        in_files: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, args: list[str],
        message: str) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the command started working")

    monkeypatch.setattr(cli, "build_user_model", no_work)
    monkeypatch.setattr("momos.apps.experiments.demo", no_work)
    monkeypatch.setattr("momos.apps.experiments.sweep", no_work)
    status, out, err = _main(args, capsys)
    assert status == cli.EXIT_USAGE, err
    assert message in err and out == ""
    assert not (in_files / "nodir").exists() and (in_files / "notes.txt").is_file()


def test_a_block_size_above_the_largest_matrix_is_refused_before_compressing(
        in_files: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the command started compressing")

    monkeypatch.setattr(momos, "compress", no_work)
    status, _, err = _main([*COMPRESS, "--block-size", "513", "-o", "c.momos"], capsys)
    assert status == cli.EXIT_USAGE
    assert ("--block-size 513 exceeds the largest weight matrix of the model ('1.weight', 512 weights): a block "
            "never spans two tensors") in err
    _assert_one_clean_line(err)
    assert not (in_files / "c.momos").exists()


@pytest.mark.parametrize("weights, message", [
    ("pickled.pt", "--weights 'pickled.pt' holds a pickled module (torch.nn.modules.container.Sequential), not a "
                   "state_dict: save model.state_dict() with torch.save"),
    ("model.momos", "--weights 'model.momos' is a .momos file (already compressed): use momos export / momos.load"),
    ("usermodel.py", "--weights 'usermodel.py' is not a state_dict torch.load(weights_only=True) can read: "),
])
def test_weights_that_are_not_a_state_dict_get_one_clean_line(in_files: Path, capsys: pytest.CaptureFixture,
                                                                weights: str, message: str) -> None:
    status, out, err = _main(["compress", "--model", "usermodel:small", "--weights", weights, "-o", "c.momos"], capsys)
    assert status == cli.EXIT_USAGE and out == ""
    assert err.startswith(f"momos compress: error: {message}"), err
    _assert_one_clean_line(err)


def test_library_messages_lose_terminal_escapes_and_line_breaks(in_files: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object) -> None:
        raise MoMosFormatError("torch says \x1b[1mdo this\x1b[0m.\n\t(1) and \x1b]8;;http://x\x07that\x1b]8;;\x07\r\n")

    monkeypatch.setattr(runtime, "inspect", refuse)
    status, _, err = _main(["inspect", "model.onnx"], capsys)
    assert status == cli.EXIT_FAILURE
    assert "error: torch says do this . (1) and that (run with --debug" in err
    _assert_one_clean_line(err)


@pytest.mark.parametrize("name", ["model.onnx", "model.momos"])
def test_inspect_json_is_the_only_thing_on_stdout(in_files: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """What a library prints while the command runs (onnxruntime's "EP Error ... retrying" banner) goes to stderr."""
    import momos.io.header

    for module in (runtime, momos.io.header):
        real = module.inspect

        def chatty(path: object, real: object = real) -> object:
            print("*************** EP Error ***************")
            return real(path)

        monkeypatch.setattr(module, "inspect", chatty)
    status, out, err = _main(["inspect", name, "--json"], capsys)
    assert status == cli.EXIT_OK, err
    assert json.loads(out)["file_bytes"] == (in_files / name).stat().st_size
    assert "EP Error" in err


def test_inspect_json_in_a_subprocess_prints_parseable_json_or_nothing(files: Path) -> None:
    done = subprocess.run([*MOMOS, "inspect", "model.onnx", "--json"], cwd=files, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert set(info["tensors"]) == {"1.weight", "3.weight"} and info["inputs"] == {"input": ["batch", 16]}
    # A node name that is not UTF-8: onnxruntime cannot decode its own message, and its fallback printed a
    # banner to stdout before retrying.
    (files / "latin.onnx").write_bytes((files / "model.onnx").read_bytes().replace(b".mosaic", b".mos\xe1ic", 1))
    done = subprocess.run([*MOMOS, "inspect", "latin.onnx", "--json"], cwd=files, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == cli.EXIT_FAILURE and done.stdout == ""
    assert done.stderr.startswith("momos inspect: error: 'latin.onnx' is not an ONNX model onnxruntime can read")
    _assert_one_clean_line(done.stderr)


def test_compress_json_keeps_library_prints_off_stdout(in_files: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = momos.compress

    def chatty(*args: object, **kwargs: object) -> object:
        print("[torch.onnx] a library's progress line")
        return real(*args, **kwargs)

    monkeypatch.setattr(momos, "compress", chatty)
    status, out, err = _main([*COMPRESS, "--epochs", "1", "-o", "c.momos", "--json", "-q"], capsys)
    assert status == cli.EXIT_OK, err
    assert json.loads(out)["file"]["bytes"] == (in_files / "c.momos").stat().st_size
    assert "a library's progress line" in err
    (in_files / "c.momos").unlink()


def test_block_sizes_up_to_the_bounds_are_accepted(in_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest matrix (512 weights) and `MAX_BLOCK_SIZE` themselves are no usage error."""
    reached = []

    def stop(model: nn.Module, config: momos.MoMosConfig, **kwargs: object) -> None:
        reached.append(config.block_size)
        raise KeyboardInterrupt

    monkeypatch.setattr(momos, "compress", stop)
    assert cli.main([*COMPRESS, "--block-size", "512", "-o", "c.momos"]) == 130
    assert reached == [512]
    assert cli.build_parser().parse_args(["demo", "--block-size", str(cli.MAX_BLOCK_SIZE)]).block_size == 4096
