"""The `momos` command: the demo, sweeps, compressing a user's model, and inspecting, exporting, measuring files.

    momos demo [--out DIR] [--epochs N] [--seed S] [--block-size S] [--capacity C] [--bits B]
    momos sweep --model mlp|cnn|vit [--block-sizes 2,4,8] [--capacities 0.005,0.01] [--seeds 3] [--data X.npz]
    momos compress --model pkg.module:factory --weights state_dict.pt [--bits B] [--embedding-bits B] -o model.momos
    momos inspect FILE.momos|FILE.onnx [--json]
    momos export FILE.momos --model pkg.module:factory --input-shape 1,8,8 -o model.onnx
    momos complexity [demo | FILE.momos | FILE.pt | pkg.module:factory] [--model pkg.module:factory]

Exit status: 0 on success, 2 on usage errors (bad arguments, missing or unusable input files, a model
spec that does not import, an output folder that does not exist), 1 on failures. Errors print one line to
stderr, without terminal escapes; ``--debug`` adds the traceback. Progress bars go to stderr and only when
it is a terminal; ``--quiet`` silences them and the status lines. Results go to stdout; with ``--json``
stdout holds the JSON document only (whatever a library prints meanwhile goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import logging
import math
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from momos.config import MOTIF_DTYPES, MoMosConfig
from momos.errors import MoMosConfigError, MoMosError, MoMosSelectionError, dependency_error

__all__ = ["DEMO_EPOCHS", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "MAX_BLOCK_SIZE", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# Epochs of `momos demo`: enough for good accuracy within the demo's time budget (docs/benchmarks.md).
DEMO_EPOCHS = 50
MODEL_NAMES = ("mlp", "cnn", "vit")
# The largest --block-size the command takes: a motif of 4,096 weights already stands for a 64x64 tile, and a
# block size beyond the model's tensors only pads them (compress also refuses one above its largest matrix).
MAX_BLOCK_SIZE = 4096


class UsageError(MoMosError):
    """The command line asks for something that cannot work (exit status 2); the message says what."""


# Errors about what the user asked for, as opposed to failures while doing it.
_USAGE_ERRORS = (UsageError, MoMosConfigError, MoMosSelectionError)


# ---------------------------------------------------------------------------------------------
# Argument types: each raises argparse.ArgumentTypeError, which argparse turns into exit status 2.

def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist")
    return path


def _output_file(text: str) -> Path:
    """A file to write: its folder must exist (checked before any work, not after it)."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file to write")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"output directory {str(folder)!r} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"output directory {str(folder)!r} is not writable")
    return path


def _output_folder(text: str) -> Path:
    """A folder to write into, created with its parents if missing: neither it nor a parent may be a file."""
    path = Path(text)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{str(existing)!r} is a file, not an output folder")
    return path


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    expected = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_block_size = _int_at_least(1, MAX_BLOCK_SIZE)
_seed = _int_at_least(0)


def _capacity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"capacity must be a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"capacity must be a number in (0, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _embedding_bits(text: str) -> float | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, auto or none, got {text!r}") from None


def _list_of(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values

    return parse


def _shape(text: str) -> tuple[int, ...]:
    return tuple(_list_of(_positive_int)(text))


# ---------------------------------------------------------------------------------------------
# Shared helpers

def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``"pkg.module:factory"`` (a dotted attribute path after the colon is allowed).

    The current directory is importable, as with ``python -m``. Anything that goes wrong is a `UsageError`.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model must look like 'pkg.module:factory', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"--model {spec!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"--model {spec!r}: {attr!r} is not callable")
    return target


def build_user_model(spec: str) -> Any:
    """``factory()`` for the spec, checked to be a torch module."""
    from torch import nn

    model = load_factory(spec)()
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state_dict(path: Path) -> dict[str, Any]:
    """A state_dict saved with torch.save, read with ``weights_only=True`` (no arbitrary code runs)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for unusable files
        raise UsageError(_unreadable_weights(path, e)) from e
    if not isinstance(state, dict):
        raise UsageError(f"--weights {str(path)!r} holds a {type(state).__name__}, not a state_dict")
    return state


def _unreadable_weights(path: Path, error: Exception) -> str:
    """One line on why torch.load(weights_only=True) refused `path`: a .momos file, a pickled model, or torch's
    reason (its message spans paragraphs of advice about trusting the file)."""
    from momos.io.header import inspect

    name = str(path)
    with open(path, "rb") as handle:
        start = handle.read(9)
    try:  # a .momos file is a safetensors file: a little-endian header length, then the JSON header
        momos_file = start[8:] == b"{" and inspect(path) is not None
    except Exception:  # not a .momos file: torch's reason below
        momos_file = False
    if momos_file:
        return f"--weights {name!r} is a .momos file (already compressed): use momos export / momos.load"
    text = _clean(str(error))
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        what = "module" if pickled[1].startswith("torch.nn.") else "object"
        return (f"--weights {name!r} holds a pickled {what} ({pickled[1]}), not a state_dict: "
                "save model.state_dict() with torch.save")
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s*Check the documentation|$)", text)
    reason_text = reason[1] if reason else text or type(error).__name__
    return f"--weights {name!r} is not a state_dict torch.load(weights_only=True) can read: {reason_text[:200]}"


def load_weights(model: Any, path: Path) -> None:
    """Load the state_dict at `path` into `model`, strictly: every key must match."""
    try:
        model.load_state_dict(load_state_dict(path))
    except RuntimeError as e:
        raise UsageError(f"--weights {str(path)!r} does not fit the model: {e}") from e


def load_data(path: Path | None, seed: int) -> tuple[Any, str]:
    """``(Dataset, name)``: digits when `path` is None, else the user's .npz (arrays X and y)."""
    from momos.apps.data import digits, load_npz
    from momos.errors import MoMosFormatError

    if path is None:
        return digits(seed=seed), "digits"
    try:
        return load_npz(path, seed=seed), path.name
    except MoMosFormatError as e:  # the file does not meet the documented contract: a usage error
        raise UsageError(str(e)) from e


# A terminal escape sequence (CSI, OSC or a lone ESC and its next character) or another control character.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?|[\x00-\x1f\x7f-\x9f]")


def _clean(message: str) -> str:
    """`message` on one line, without terminal escapes: libraries' messages hold both (torch bolds its advice)."""
    return " ".join(_ESCAPES.sub(" ", message).split())


class _Console:
    """Where status lines and progress bars go: stderr, silenced by --quiet; bars only on a terminal. JSON results
    go to the stdout the command started with (`main` sends other writes to stdout to stderr under --json)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = not quiet and sys.stderr.isatty()
        self.results = sys.stdout

    def emit_json(self, data: dict[str, Any]) -> None:
        from momos.apps.jsonio import to_json

        print(to_json(data), file=self.results, flush=True)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"momos: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Subcommands: each takes the parsed arguments and a console, prints its result, returns an exit status.

def cmd_demo(args: argparse.Namespace, console: _Console) -> int:
    """`momos demo`: the paper's MLP dense, with the paper's recipe and the recommended one; files, plots, summary."""
    from momos.apps.experiments import demo
    from momos.config import MoMosConfig

    MoMosConfig(block_size=args.block_size, capacity=args.capacity, seed=args.seed)  # fail before training
    MoMosConfig(block_size=args.block_size, bits_per_weight=args.bits, seed=args.seed)
    result = demo(args.out, epochs=args.epochs, seed=args.seed, block_size=args.block_size,
                  capacity=args.capacity, bits_per_weight=args.bits, progress=console.progress, log=console.log)
    if args.json:
        console.emit_json(result.to_dict())
    else:
        print(result)
        print(f"\nwrote {', '.join(sorted(Path(p).name for p in result.plots.values()))}, summary.json, "
              f"dense.pt, mlp.momos and mlp.onnx to {args.out} in {result.seconds:.0f} s")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace, console: _Console) -> int:
    """`momos sweep`: accuracy per (block size, capacity) and seed, as a CSV, a plot and a table."""
    from momos.apps import plots
    from momos.apps.experiments import sweep, write_csv
    from momos.config import MoMosConfig

    for s in args.block_sizes:  # fail before training
        for c in args.capacities:
            MoMosConfig(block_size=s, capacity=c)
    data, data_name = load_data(args.data, args.split_seed)
    rows = sweep(args.model, data, block_sizes=args.block_sizes, capacities=args.capacities, seeds=args.seeds,
                 epochs=args.epochs, data_name=data_name, progress=console.progress, log=console.log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_{args.model}"
    write_csv(rows, out / f"{stem}.csv")
    plots.accuracy_vs_capacity(rows, out / f"{stem}.png",
                               title=f"{args.model} on {data_name}: accuracy against capacity "
                                     f"({args.seeds} seed{'s' * (args.seeds > 1)}, {args.epochs} epochs)")
    print(_sweep_table(rows))
    print(f"\nwrote {stem}.csv ({len(rows)} runs) and {stem}.png to {out}")
    return EXIT_OK


def _sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """Mean test accuracy over seeds per (block size, capacity), dense first."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["block_size"] or 0, r["capacity"] or 0.0), []).append(r)
    lines = [f"{'method':<8} {'s':>3} {'capacity':>9} {'k':>7} {'bits/weight':>11} {'accuracy':>9} {'seeds':>5}"]
    for (s, c), group in sorted(groups.items()):
        first = group[0]
        mean = sum(r["test_accuracy"] for r in group) / len(group)
        lines.append(f"{first['method']:<8} {s or '-':>3} {c or '-':>9} {first['num_motifs'] or '-':>7} "
                     f"{first['bits_per_weight']:>11.3f} {mean:>9.2%} {len(group):>5}")
    return "\n".join(lines)


def cmd_compress(args: argparse.Namespace, console: _Console) -> int:
    """`momos compress`: the recommended path (`momos.compress`): one projection with k-means motifs of the weight
    matrices, convert, then fine-tuning of the motif tables on labelled data or by distillation on inputs."""
    import torch

    import momos
    from momos.apps.data import load_inputs
    from momos.apps.train import evaluate, held_out_batches, split_batches

    size = {"capacity": args.capacity} if args.capacity is not None else {"bits_per_weight": args.bits}
    if isinstance(args.embedding_bits, float) and args.capacity is not None:
        raise UsageError("--embedding-bits splits a --bits budget; it does not go with --capacity")
    if args.embedding_block_size is not None and args.embedding_bits is None:
        raise UsageError("--embedding-block-size sets the block size of the banks --embedding-bits gives the "
                         "embeddings: it does not go with --embedding-bits none")
    config = momos.MoMosConfig(block_size=args.block_size, seed=args.seed, motif_dtype=args.motif_dtype, **size)
    labelled = load_data(args.finetune, args.seed)[0] if args.finetune else None
    if args.calibrate:
        try:
            inputs = load_inputs(args.calibrate)
        except momos.MoMosFormatError as e:
            raise UsageError(str(e)) from e
    model = build_user_model(args.model)
    load_weights(model, args.weights)
    _check_block_size(model, args.block_size)
    model.eval()
    accuracy: dict[str, float] = {}
    if labelled is not None:
        accuracy["dense"] = evaluate(model, labelled.x_test, labelled.y_test)
    console.log("projecting the weight matrices onto a mosaic of motifs")
    packed = momos.compress(model, config, embedding_bits=args.embedding_bits,
                            embedding_block_size=args.embedding_block_size)
    tune = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed, "progress": console.progress}
    if labelled is not None:
        batches, validation = held_out_batches(labelled.x_train, labelled.y_train, args.seed)
        console.log("re-assigning the Linear and Conv weights' blocks by their output error on the training inputs")
        momos.calibrate(packed, model, [x for x, _ in batches + validation])
        accuracy["momos_before_finetune"] = evaluate(packed, labelled.x_test, labelled.y_test)
        console.log(f"fine-tuning the motif tables for up to {args.epochs} epochs on labelled data, keeping the "
                    "epoch with the lowest loss on a fifth of the training data")
        momos.finetune(packed, batches or validation, loss=torch.nn.functional.cross_entropy,
                       validation=validation or None, **tune)
        accuracy["momos"] = evaluate(packed, labelled.x_test, labelled.y_test)
    elif args.calibrate:
        batches = [inputs[b] for b in split_batches(torch.arange(len(inputs)), 64)]
        console.log("re-assigning the Linear and Conv weights' blocks by their output error on the inputs")
        momos.calibrate(packed, model, batches)
        console.log(f"fine-tuning the motif tables for {args.epochs} epochs by distillation from the dense model")
        momos.finetune(packed, batches, teacher=model, **tune)
    momos.save(packed, args.output)
    rep = momos.report(packed)
    file_bytes = Path(args.output).stat().st_size
    if args.json:
        console.emit_json({"report": rep.to_dict(), "file": {"path": str(args.output), "bytes": file_bytes},
                           "accuracy": accuracy or None})
        return EXIT_OK
    print(rep)
    numel = rep.numel + sum(d.numel for d in rep.dense)
    print(f"\n{args.output}: {file_bytes:,} bytes ({8 * file_bytes / numel:.3f} bits per parameter on disk, "
          f"float32: {4 * numel:,} bytes of parameters)")
    if accuracy:
        print("test accuracy: " + ", ".join(f"{k.replace('_', ' ')} {v:.2%}" for k, v in accuracy.items()))
    return EXIT_OK


def _check_block_size(model: Any, block_size: int) -> None:
    """Refuse a block size above the largest weight matrix `momos.compress` would compress: a block never spans
    two tensors, so such a size only pads every tensor into one mostly-zero block."""
    sizes = {name: param.numel() for name, param in model.named_parameters()
             if param.requires_grad and param.is_floating_point() and param.dim() >= 2}
    if sizes and block_size > max(sizes.values()):
        largest = max(sizes, key=sizes.__getitem__)
        raise UsageError(f"--block-size {block_size} exceeds the largest weight matrix of the model "
                         f"({largest!r}, {sizes[largest]:,} weights): a block never spans two tensors")


def cmd_inspect(args: argparse.Namespace, console: _Console) -> int:
    """`momos inspect`: print the header of a .momos file or the metadata of a momos .onnx file."""
    suffix = args.file.suffix.lower()
    if suffix == ".momos":
        from momos.io.header import inspect
    elif suffix == ".onnx":
        from momos.runtime import inspect
    else:
        raise UsageError(f"cannot inspect {str(args.file)!r}: expected a .momos or .onnx file")
    info = inspect(args.file)
    if args.json:
        console.emit_json(info.to_dict())
    else:
        print(info)
    return EXIT_OK


def cmd_export(args: argparse.Namespace, console: _Console) -> int:
    """`momos export`: a .momos file to ONNX, checked against torch in onnxruntime on a random input."""
    import numpy as np
    import torch

    import momos
    from momos import runtime
    from momos.export import to_onnx

    if args.file.suffix.lower() != ".momos":
        raise UsageError(f"export reads a .momos file, got {str(args.file)!r}")
    packed = momos.load(args.file, build_user_model(args.model))
    packed.eval()
    example = torch.randn((2, *args.input_shape), generator=torch.Generator().manual_seed(0))
    console.log(f"exporting {args.file} with input shape {list(args.input_shape)} (batch dimension dynamic)")
    to_onnx(packed, example[:1], args.output)
    session = runtime.load(args.output, weights="compact")
    with torch.no_grad():
        expected = packed(example)
    if not isinstance(expected, torch.Tensor):
        raise MoMosError("export checks models with a single tensor output; this model returns "
                         f"{type(expected).__name__}")
    got = session.run({session.input_names[0]: example.numpy()})[session.output_names[0]]
    diff = float(np.abs(got - expected.numpy()).max())
    print(f"{args.output}: {Path(args.output).stat().st_size:,} bytes (from {args.file}: "
          f"{args.file.stat().st_size:,} bytes); onnxruntime matches torch to {diff:.1e}")
    return EXIT_OK


def cmd_complexity(args: argparse.Namespace, console: _Console) -> int:
    """`momos complexity`: BDM ratios and the complexity summary of the demo, a file or a model factory."""
    from momos import complexity

    target = args.target
    if target == "demo":
        from momos.apps.experiments import train_demo_models

        trained = train_demo_models(epochs=args.epochs, seed=args.seed, progress=console.progress,
                                    log=console.log)
        initial, dense, packed = trained.initial, trained.dense, trained.packed
        momos_summary = complexity.summary(packed, initial=initial, dense=dense)
        dense_summary = complexity.summary(dense, initial=initial)
        ratios = {"trained_over_initial": dense_summary.trained_over_initial["bdm"],
                  "momos_over_dense": momos_summary.momos_over_dense["bdm"]}
        if args.json:
            console.emit_json({"bdm": ratios, "dense": dense_summary.to_dict(), "momos": momos_summary.to_dict()})
            return EXIT_OK
        print(f"BDM ratio trained / initial (dense MLP): {ratios['trained_over_initial']:.4f}")
        print(f"BDM ratio MoMos / dense:                 {ratios['momos_over_dense']:.4f}")
        print(f"\nMoMos MLP (model) against its initial weights and the dense MLP:\n{momos_summary}")
        return EXIT_OK

    if args.model is None:
        raise UsageError(f"complexity of {target!r} needs --model pkg.module:factory (the architecture)")
    path = Path(target)
    if path.suffix.lower() in (".momos", ".pt", ".pth"):
        if not path.is_file():
            raise UsageError(f"file {target!r} does not exist")
    elif ":" not in target:
        raise UsageError(f"expected 'demo', a .momos or .pt file, or pkg.module:factory, got {target!r}")
    import torch

    torch.manual_seed(args.seed)
    initial = _reinitialized(build_user_model(args.model))
    if path.suffix.lower() == ".momos":
        import momos

        model = momos.load(path, build_user_model(args.model))
    elif path.suffix.lower() in (".pt", ".pth"):
        model = build_user_model(args.model)
        load_weights(model, path)
    else:
        model = build_user_model(target)
    dense = None
    if args.dense is not None:
        dense = build_user_model(args.model)
        load_weights(dense, args.dense)
    result = complexity.summary(model, initial=initial, dense=dense)
    if args.json:
        console.emit_json(result.to_dict())
        return EXIT_OK
    print(f"BDM ratio model / initial: {result.trained_over_initial['bdm']:.4f}")
    if dense is not None:
        print(f"BDM ratio model / dense:   {result.momos_over_dense['bdm']:.4f}")
    print(f"\n{result}")
    return EXIT_OK


def _reinitialized(model: Any) -> Any:
    """A copy of `model` with every module that has ``reset_parameters`` freshly initialized."""
    model = copy.deepcopy(model)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


# ---------------------------------------------------------------------------------------------
# The parser

def build_parser() -> argparse.ArgumentParser:
    """The `momos` argument parser (every subcommand has --help, --quiet and --debug)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")
    common.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")

    parser = argparse.ArgumentParser(
        prog="momos",
        description="Mosaic-of-Motifs: compress PyTorch models into a bank of motifs and a mosaic of indices.")
    from momos import __version__

    parser.add_argument("--version", action="version", version=f"momos {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace, _Console], int], help_text: str,
                description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=description)
        p.set_defaults(handler=handler)
        return p

    p = command("demo", cmd_demo, "the paper's MLP on digits: dense, the paper's recipe, the recommended one",
                "Train the paper's MLP (input -> 256 x4 -> 10) on scikit-learn's digits dense and with the paper's "
                "recipe (MoMos during training, a refresh per epoch at --capacity); compress the dense MLP the "
                "recommended way (k-means motifs at --bits, motif fine-tuning); save that as a .momos file, "
                "export ONNX, check onnxruntime against torch, print one table and write plots and summary.json "
                "into --out. Seeded and repeatable.")
    p.add_argument("--out", type=_output_folder, default="momos-demo", help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=DEMO_EPOCHS, help="epochs (default: %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of data split, init and banks (default: 0)")
    p.add_argument("--block-size", type=_block_size, default=4,
                   help=f"block size s, at most {MAX_BLOCK_SIZE} (default: 4)")
    p.add_argument("--capacity", type=_capacity, default=0.05,
                   help="capacity c in (0, 1] of the paper's recipe (default: 0.05)")
    p.add_argument("--bits", type=_positive_float, default=3.0,
                   help="bits per compressed weight of the recommended path (default: 3)")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of the table")

    p = command("sweep", cmd_sweep, "accuracy against capacity per block size (the paper's Figure 4)",
                "Train a reference model dense and with MoMos for every block size and capacity, for several "
                "seeds; write a CSV of every run and a PNG of accuracy against capacity.")
    p.add_argument("--model", choices=MODEL_NAMES, default="mlp", help="reference model (default: mlp)")
    p.add_argument("--block-sizes", type=_list_of(_block_size), default=[2, 4, 8], metavar="S,S,...",
                   help="block sizes (default: 2,4,8)")
    p.add_argument("--capacities", type=_list_of(_capacity), default=[0.005, 0.01, 0.05, 0.1], metavar="C,C,...",
                   help="capacities (default: 0.005,0.01,0.05,0.1)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds, 0..N-1 (default: 3)")
    p.add_argument("--epochs", type=_positive_int, default=10, help="epochs per run (default: 10)")
    p.add_argument("--data", type=_existing_file, metavar="FILE.npz",
                   help="your data: an .npz with arrays X (samples first) and y (integer labels); default digits")
    p.add_argument("--split-seed", type=_seed, default=0, help="seed of the 80/20 train/test split (default: 0)")
    p.add_argument("--out", type=_output_folder, default="momos-sweep", help="output folder (default: %(default)s)")

    p = command("compress", cmd_compress, "compress a trained model of yours into a .momos file",
                "Post-training MoMos compression of your model (momos.compress): build it with FACTORY, load the "
                "state_dict (torch.load weights_only=True), project its weight matrices onto k-means motifs, "
                "fine-tune the motif tables on labelled data (--finetune) or by distillation from the dense model "
                "on unlabelled inputs (--calibrate), save the .momos file and print the report.")
    p.add_argument("--model", required=True, metavar="pkg.module:factory",
                   help="a callable that builds the (untrained) model; the current directory is importable")
    p.add_argument("--weights", required=True, type=_existing_file, metavar="STATE_DICT.pt",
                   help="the trained state_dict (torch.save(model.state_dict(), ...))")
    p.add_argument("--block-size", type=_block_size, default=4,
                   help=f"block size s, at most {MAX_BLOCK_SIZE} (default: 4)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--bits", type=_positive_float, default=3.0,
                      help="bits per compressed weight, motif table included (default: 3)")
    size.add_argument("--capacity", type=_capacity, default=None, help="capacity c in (0, 1] instead of --bits")
    p.add_argument("--embedding-bits", type=_embedding_bits, default="auto", metavar="B|auto|none",
                   help="give each untied nn.Embedding weight a bank of its own within B bits per weight, and the "
                        "other matrices the rest of the --bits budget (a number not with --capacity); auto: about one "
                        "bit per weight below --bits, where the table stays cheap; none: one bank (default: auto)")
    p.add_argument("--embedding-block-size", type=_block_size, default=None, metavar="S",
                   help="the embeddings' block size where they have banks of their own (default: --block-size; with "
                        "--embedding-bits auto, that or a longer one, whichever width comes nearest)")
    p.add_argument("--motif-dtype", choices=tuple(MOTIF_DTYPES), default=MoMosConfig.motif_dtype,
                   help="the motif tables' dtype: float16 takes half the bits of float32, leaving more motifs "
                        f"within --bits (default: {MoMosConfig.motif_dtype})")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--finetune", type=_existing_file, metavar="DATA.npz",
                      help="fine-tune the motifs on this .npz (arrays X and y; 80/20 split), reporting test accuracy")
    data.add_argument("--calibrate", type=_existing_file, metavar="INPUTS.npz",
                      help="fine-tune the motifs by distillation from the dense model on this .npz's array X")
    p.add_argument("--epochs", type=_positive_int, default=5, help="fine-tuning epochs (default: 5)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="fine-tuning AdamW learning rate (default: 1e-3)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the bank draws and the split (default: 0)")
    p.add_argument("-o", "--output", required=True, type=_output_file, metavar="MODEL.momos",
                   help="the file to write (its folder must exist)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command("inspect", cmd_inspect, "show what a .momos or momos .onnx file holds",
                "Print the config, banks, tensors, k, bits and sizes of a .momos file or a momos-exported "
                ".onnx file (headers only: no weight is decoded).")
    p.add_argument("file", type=_existing_file, metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("export", cmd_export, "export a .momos file to ONNX (weights stay compressed)",
                "Load a .momos file into the model FACTORY builds, export it to ONNX with the mosaics and "
                "motifs as initializers, and check onnxruntime against torch on a random input.")
    p.add_argument("file", type=_existing_file, metavar="FILE.momos")
    p.add_argument("--model", required=True, metavar="pkg.module:factory", help="builds the model's architecture")
    p.add_argument("--input-shape", required=True, type=_shape, metavar="D,D,...",
                   help="shape of one input without the batch dimension, e.g. 1,8,8")
    p.add_argument("-o", "--output", required=True, type=_output_file, metavar="MODEL.onnx",
                   help="the file to write (its folder must exist)")

    p = command("complexity", cmd_complexity, "BDM complexity ratios (trained/initial, MoMos/dense)",
                "Measure algorithmic complexity (BDM of the weights' signs, the paper's protocol) of the demo "
                "MLP (no argument or 'demo': trains it), of a .momos or state_dict file, or of the model a "
                "factory returns, against a fresh initialization of the same architecture.")
    p.add_argument("target", nargs="?", default="demo", metavar="FILE_OR_MODEL",
                   help="'demo' (default), FILE.momos, STATE_DICT.pt or pkg.module:factory")
    p.add_argument("--model", metavar="pkg.module:factory", help="architecture of a .momos/.pt file")
    p.add_argument("--dense", type=_existing_file, metavar="STATE_DICT.pt",
                   help="the dense counterpart's weights, for the MoMos / dense ratio")
    p.add_argument("--epochs", type=_positive_int, default=DEMO_EPOCHS,
                   help="training epochs for 'demo' (default: %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of training and of the initial weights")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `momos` command on `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits with 2 on a usage error, 0 after --help/--version
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    console = _Console(args.quiet)
    # With --json, stdout holds the document only: what libraries print meanwhile (onnxruntime's "EP Error ...
    # retrying" banner, the ONNX exporter's progress) goes to stderr.
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else contextlib.nullcontext()
    if not args.debug:  # library chatter (pkg_resources, the ONNX exporter) is not for the command line
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # torch sets its loggers' levels on import; this overrides them all
    try:
        with quiet_stdout:
            return args.handler(args, console)
    except KeyboardInterrupt:
        print("momos: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        missing = dependency_error(e, "this command") if isinstance(e, ModuleNotFoundError) else None
        if missing is not None:  # a base install (`pip install momos`) runs and inspects .onnx files only
            print(f"momos {args.command}: error: {missing}", file=sys.stderr)
            return EXIT_FAILURE
        usage = isinstance(e, _USAGE_ERRORS)
        kind = "" if isinstance(e, MoMosError) else f"{type(e).__name__}: "
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"momos {args.command}: error: {kind}{_clean(str(e))}{hint if not usage else ''}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
