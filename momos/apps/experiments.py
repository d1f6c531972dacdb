"""The experiments behind `momos demo` and `momos sweep`: train with `momos.apps.train.fit`, compress, measure.

    result = demo("momos-demo", epochs=50)  # digits, paper MLP, dense vs MoMos, .momos + .onnx + plots + JSON
    print(result)                           # the demo's table
    runs = sweep("mlp", digits(), block_sizes=[2, 4], capacities=[0.01, 0.05], seeds=2, epochs=10)

Everything is seeded: the same arguments give the same weights, files and accuracies.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from momos import complexity, runtime
from momos.api import compress, convert, prepare
from momos.apps import plots
from momos.apps.data import Dataset, digits
from momos.apps.jsonio import write_json
from momos.apps.models import MODELS, build
from momos.apps.train import History, evaluate, fit, held_out_batches
from momos.config import MoMosConfig
from momos.errors import MoMosConfigError, MoMosError
from momos.export import to_onnx
from momos.io.format import load, save
from momos.nn.calibrate import calibrate
from momos.nn.finetune import finetune
from momos.nn.packed import packed_tensors
from momos.reporting import report

__all__ = ["ONNX_TOLERANCE", "OPTIMIZERS", "SWEEP_FIELDS", "DemoModels", "DemoResult", "Log", "demo", "sweep",
           "train_demo_models", "write_csv"]

# The reference code's optimizer per model: AdamW for the MLP and the ViT, SGD for the ResNet.
OPTIMIZERS = {"mlp": "adamw", "cnn": "sgd", "vit": "adamw"}
# onnxruntime and torch must agree on every test logit to this absolute tolerance.
ONNX_TOLERANCE = 1e-4
# The recommended path's motif fine-tuning in the demo: epochs over the training set, AdamW's learning rate
# (the better of 1e-3 and 3e-4 over seeds 0-2; docs/benchmarks.md, the demo).
FINETUNE_EPOCHS = 10
FINETUNE_LR = 3e-4

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    """A `Log` that drops every message."""


@dataclass
class DemoResult:
    """Every figure of one `demo` run; ``str()`` is the demo's table, `to_dict` the JSON summary."""

    settings: dict[str, Any]  # model, data, epochs, seed, block_size, capacity, sizes of the split
    accuracy: dict[str, float]  # dense, momos_paper, momos_one_shot, momos_torch, momos_onnxruntime, momos_reloaded
    agreement: dict[str, float]  # predictions_agree, test_samples, max_abs_logit_diff
    files: dict[str, dict[str, Any]]  # checkpoint / momos / onnx -> {"path", "bytes"}
    compression: dict[str, float]  # numel, parameters, num_blocks, num_motifs, bits_per_weight, ...
    bdm: dict[str, float]  # trained_over_initial, momos_over_dense
    refresh: dict[str, float]  # count, seconds, training_seconds
    history: dict[str, Any]  # accuracy per epoch (dense, paper, recommended), distortion per refresh
    motif_usage: list[int]  # blocks per motif of the converted model, motif order
    plots: dict[str, str] = field(default_factory=dict)  # name -> path
    seconds: float = math.nan  # wall time of the whole demo

    @property
    def least_used_half_share(self) -> float:
        """The fraction of all blocks assigned to the least-used half of the motifs."""
        return plots.least_used_half_share(self.motif_usage)

    def to_dict(self) -> dict[str, Any]:
        """Every field, and `least_used_half_share`, as plain data (the demo's ``summary.json``)."""
        return asdict(self) | {"least_used_half_share": self.least_used_half_share}

    def __str__(self) -> str:
        s, f, a, c = self.settings, self.files, self.accuracy, self.compression
        base = f["checkpoint"]["bytes"]

        def size(key: str) -> str:
            ratio = "" if key == "checkpoint" else f"  ({base / f[key]['bytes']:.1f}x smaller)"
            return f"{f[key]['bytes']:,} bytes{ratio}"

        rows = [
            ("test accuracy, dense (torch)", f"{a['dense']:.2%}"),
            (f"test accuracy, MoMos paper's recipe (c={s['capacity']})",
             f"{a['momos_paper']:.2%}  ({c['paper_bits_per_weight']:.3f} bits per weight, trained with MoMos)"),
            (f"test accuracy, MoMos recommended ({s['bits_per_weight']:g} bits)",
             f"{a['momos_torch']:.2%}  (calibrated projection of the dense MLP: {a['momos_one_shot']:.2%}; motif "
             f"fine-tuning kept epoch {s['finetune_kept_epoch']} of {s['finetune_epochs']} by validation loss)"),
            ("test accuracy, MoMos recommended (onnxruntime)",
             f"{a['momos_onnxruntime']:.2%}  ({self.agreement['predictions_agree']}/"
             f"{self.agreement['test_samples']} predictions agree, max |logit diff| "
             f"{self.agreement['max_abs_logit_diff']:.1e})"),
            (f"float32 checkpoint ({Path(f['checkpoint']['path']).name})", size("checkpoint")),
            (f".momos file ({Path(f['momos']['path']).name})", size("momos")),
            (f".onnx file ({Path(f['onnx']['path']).name})", size("onnx")),
            ("bits per compressed weight (bank + mosaic)",
             f"{c['bits_per_weight']:.3f}  (.momos on disk, biases included: {c['bits_per_parameter_on_disk']:.3f} "
             f"per parameter; float32: 32)"),
            ("motifs k / blocks m / weights n",
             f"{c['num_motifs']:,} / {c['num_blocks']:,} / {c['numel']:,} of {c['parameters']:,} parameters  "
             f"(least-used half of motifs: {self.least_used_half_share:.1%} of blocks)"),
            ("BDM ratio trained / initial (dense)", f"{self.bdm['trained_over_initial']:.4f}"),
            ("BDM ratio MoMos / dense", f"{self.bdm['momos_over_dense']:.4f}"),
            ("refresh time, paper's recipe", f"{self.refresh['seconds']:.2f} s for {self.refresh['count']} refresh"
                                             f"{'es' * (self.refresh['count'] != 1)} "
                                             f"({self.refresh['seconds'] / self.refresh['training_seconds']:.0%} of "
                                             f"MoMos training)"),
        ]
        width = max(len(label) for label, _ in rows)
        title = (f"momos demo: {s['model']} on {s['data']} ({s['train_samples']} train / {s['test_samples']} test), "
                 f"s={s['block_size']}, {s['epochs']} epoch{'s' * (s['epochs'] != 1)}, seed {s['seed']}")
        return "\n".join([title, "", *(f"{label.ljust(width)}  {value}" for label, value in rows)])


@dataclass
class DemoModels:
    """The demo's data and models: the initial weights, the trained dense MLP, the paper's recipe (MoMos during
    training, converted) and the recommended one (the dense MLP compressed, its motifs fine-tuned)."""

    data: Dataset
    initial: nn.Module
    dense: nn.Module
    dense_history: History
    paper: nn.Module
    paper_history: History
    packed: nn.Module
    recommended_accuracy: list[float]  # test accuracy after the projection, then after each fine-tuning epoch
    kept_epoch: int  # the fine-tuning epoch whose motifs were kept (lowest validation loss; 0: the projection)


def train_demo_models(*, epochs: int, seed: int = 0, block_size: int = 4, capacity: float = 0.05,
                      bits_per_weight: float = 3.0, finetune_epochs: int = FINETUNE_EPOCHS, calibrated: bool = True,
                      progress: bool = False, log: Log = _quiet) -> DemoModels:
    """The paper's MLP on digits from one seeded initialization, trained three ways.

    Dense (AdamW 3e-4, wd 1e-2, cosine); the paper's recipe, MoMos during training with a refresh after every
    epoch at `capacity`; and the recommended path, `momos.compress` of the dense MLP at `bits_per_weight` (k-means
    motifs of the weight matrices), `momos.calibrate` on the training inputs (with `calibrated`), and up to
    `finetune_epochs` of motif fine-tuning on 80% of the training labels, keeping the epoch with the lowest loss
    on the other 20% (the test set is never used to choose).
    """
    config = MoMosConfig.paper(block_size=block_size, capacity=capacity, seed=seed)
    recommended = MoMosConfig(block_size=block_size, bits_per_weight=bits_per_weight, seed=seed)
    data = digits(seed=seed)
    torch.manual_seed(seed)
    initial = build("mlp", data.input_shape, data.num_classes)
    log(f"training the dense MLP for {epochs} epochs")
    dense = copy.deepcopy(initial)
    dense_history = fit(dense, data, epochs=epochs, optimizer=OPTIMIZERS["mlp"], seed=seed, progress=progress,
                        desc="dense")
    log(f"the paper's recipe: training with MoMos (s={block_size}, c={capacity}) for {epochs} epochs, "
        f"refreshing after each")
    prepared = prepare(initial, config)
    paper_history = fit(prepared, data, epochs=epochs, refresh="epoch", optimizer=OPTIMIZERS["mlp"], seed=seed,
                        progress=progress, desc="MoMos")
    log(f"the recommended path: compressing the dense MLP to {bits_per_weight} bits per weight, calibrating, then "
        f"up to {finetune_epochs} epochs of motif fine-tuning")
    packed = compress(dense, recommended)
    batches, validation = held_out_batches(data.x_train, data.y_train, seed)
    if calibrated:
        calibrate(packed, dense, [x for x, _ in batches + validation])
    accuracy = [evaluate(packed, data.x_test, data.y_test)]
    stats = finetune(packed, batches, loss=nn.functional.cross_entropy, epochs=finetune_epochs, lr=FINETUNE_LR,
                     seed=seed, progress=progress, validation=validation,
                     on_epoch=lambda *_: accuracy.append(evaluate(packed, data.x_test, data.y_test)))
    return DemoModels(data, initial, dense, dense_history, convert(prepared), paper_history, packed.eval(), accuracy,
                      stats.best_epoch)


def demo(out: str | os.PathLike, *, epochs: int, seed: int = 0, block_size: int = 4,
         capacity: float = 0.05, bits_per_weight: float = 3.0, progress: bool = False, log: Log = _quiet) -> DemoResult:
    """The README's first command: the paper's MLP on digits, dense, with the paper's recipe and the recommended one.

    Saves the recommended MoMos model as ``mlp.momos`` (and the dense ``dense.pt`` checkpoint), exports
    ``mlp.onnx``, runs it in onnxruntime and checks it against torch (`MoMosError` if a logit differs by
    more than `ONNX_TOLERANCE` or the reloaded .momos differs at all), measures BDM, and writes the plots
    and ``summary.json`` into `out`. Sizes are read from the files on disk.
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trained = train_demo_models(epochs=epochs, seed=seed, block_size=block_size, capacity=capacity,
                                bits_per_weight=bits_per_weight, progress=progress, log=log)
    data, initial, dense, packed = trained.data, trained.initial, trained.dense, trained.packed
    dense_history, momos_history = trained.dense_history, trained.paper_history
    checkpoint = out / "dense.pt"
    torch.save(dense.state_dict(), checkpoint)
    momos_file = out / "mlp.momos"
    save(packed, momos_file)
    reloaded = load(momos_file, build("mlp", data.input_shape, data.num_classes))

    log("exporting to ONNX and running it in onnxruntime")
    onnx_file = out / "mlp.onnx"
    to_onnx(packed, data.x_test[:1], onnx_file)
    with torch.no_grad():
        packed.eval()
        torch_logits = packed(data.x_test).numpy()
        reloaded_logits = reloaded.eval()(data.x_test).numpy()
    if not np.array_equal(torch_logits, reloaded_logits):
        raise MoMosError(f"{momos_file} reloads to a model whose outputs differ from the saved one")
    session = runtime.load(onnx_file, weights="compact")
    onnx_logits = session.run({session.input_names[0]: data.x_test.numpy()})[session.output_names[0]]
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    if not max_diff <= ONNX_TOLERANCE:
        raise MoMosError(f"onnxruntime disagrees with torch on {onnx_file}: max |logit diff| {max_diff:.3g} "
                         f"> {ONNX_TOLERANCE}")
    labels = data.y_test.numpy()

    log("measuring complexity (BDM) and drawing plots")
    rep = report(packed)
    parameters = sum(p.numel() for p in dense.parameters())
    usage = _motif_usage(packed)
    files = {key: {"path": str(path), "bytes": path.stat().st_size}
             for key, path in (("checkpoint", checkpoint), ("momos", momos_file), ("onnx", onnx_file))}
    result = DemoResult(
        settings={"model": "mlp", "data": "digits", "epochs": epochs, "seed": seed, "block_size": block_size,
                  "capacity": capacity, "bits_per_weight": bits_per_weight, "finetune_epochs": FINETUNE_EPOCHS,
                  "finetune_kept_epoch": trained.kept_epoch,
                  "train_samples": len(data.x_train), "test_samples": len(data.x_test)},
        accuracy={"dense": dense_history.final_accuracy, "momos_paper": momos_history.final_accuracy,
                  "momos_one_shot": trained.recommended_accuracy[0],
                  "momos_torch": evaluate(packed, data.x_test, data.y_test),
                  "momos_onnxruntime": float((onnx_logits.argmax(1) == labels).mean()),
                  "momos_reloaded": float((reloaded_logits.argmax(1) == labels).mean())},
        agreement={"predictions_agree": int((onnx_logits.argmax(1) == torch_logits.argmax(1)).sum()),
                   "test_samples": len(labels), "max_abs_logit_diff": max_diff},
        files=files,
        compression={"numel": rep.numel, "parameters": parameters, "num_blocks": rep.num_blocks,
                     "num_motifs": len(usage), "bits_per_weight": rep.bits_per_weight,
                     "paper_bits_per_weight": report(trained.paper).bits_per_weight,
                     "bits_per_parameter_on_disk": 8 * files["momos"]["bytes"] / parameters},
        bdm={"trained_over_initial": complexity.ratio(dense, initial),
             "momos_over_dense": complexity.ratio(packed, dense)},
        refresh={"count": len(momos_history.refreshes),
                 "seconds": sum(e.refresh_seconds for e in momos_history.epochs),
                 "training_seconds": sum(e.seconds for e in momos_history.epochs)},
        history={"dense_accuracy": _accuracies(dense_history), "momos_accuracy": _accuracies(momos_history),
                 "recommended_accuracy": trained.recommended_accuracy,
                 "distortion": [list(r) for r in momos_history.refreshes]},
        motif_usage=usage,
    )
    result.plots = {
        "accuracy": str(out / "accuracy.png"), "distortion": str(out / "distortion.png"),
        "motif_usage": str(out / "motif_usage.png"),
    }
    recommended = f"MoMos recommended ({bits_per_weight:g} bits): calibrated projection, motif fine-tuning"
    plots.accuracy_per_epoch({"dense": result.history["dense_accuracy"],
                              f"MoMos, paper's recipe (c={capacity})": result.history["momos_accuracy"],
                              recommended: trained.recommended_accuracy},
                             result.plots["accuracy"], title="paper MLP on digits: test accuracy per epoch",
                             starts={recommended: epochs})
    plots.distortion(momos_history.refreshes, result.plots["distortion"],
                     title="distortion of each refresh (one per epoch)")
    plots.motif_usage(usage, result.plots["motif_usage"], title="motif usage")
    result.seconds = time.perf_counter() - started
    write_json(result.to_dict(), out / "summary.json")
    return result


def _accuracies(history: History) -> list[float]:
    return [e.test_accuracy for e in history.epochs]


def _motif_usage(packed: nn.Module) -> list[int]:
    """Blocks per motif over every packed tensor of the (single-bank) model."""
    counts: torch.Tensor | None = None
    for _, tensor in packed_tensors(packed):
        c = torch.bincount(tensor.mosaic.long(), minlength=tensor.table.num_motifs)
        counts = c if counts is None else counts + c
    return [] if counts is None else counts.tolist()


# ---------------------------------------------------------------------------------------------
# sweep

SWEEP_FIELDS = ("method", "model", "data", "seed", "epochs", "block_size", "capacity", "num_motifs",
                "bits_per_weight", "test_accuracy", "seconds")


def sweep(model: str, data: Dataset, *, block_sizes: Sequence[int], capacities: Sequence[float], seeds: int,
          epochs: int, data_name: str = "digits", progress: bool = False, log: Log = _quiet) -> list[dict[str, Any]]:
    """Train `model` dense and with MoMos at every (block size, capacity), for seeds ``0..seeds-1``.

    Per seed every run starts from the same initial weights. Returns one row per run (`SWEEP_FIELDS`;
    ``block_size``, ``capacity`` and ``num_motifs`` are None for the dense runs). All configs are checked
    before the first run trains.
    """
    if model not in MODELS:
        raise MoMosConfigError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise MoMosConfigError(f"seeds must be an integer >= 1, got {seeds!r}")
    if not block_sizes or not capacities:
        raise MoMosConfigError("give at least one block size and one capacity")
    configs = [(s, c, MoMosConfig.paper(block_size=s, capacity=c)) for s in block_sizes for c in capacities]
    build(model, data.input_shape, data.num_classes)  # fail on a model/data mismatch before training
    rows: list[dict[str, Any]] = []
    total = seeds * (1 + len(configs))
    for seed in range(seeds):
        torch.manual_seed(seed)
        initial = build(model, data.input_shape, data.num_classes)
        for block_size, capacity, config in [(None, None, None), *configs]:
            label = "dense" if config is None else f"s={block_size} c={capacity}"
            log(f"run {len(rows) + 1}/{total}: {model} {label}, seed {seed}")
            start = time.perf_counter()
            net = copy.deepcopy(initial) if config is None else prepare(initial, config.replace(seed=seed))
            history = fit(net, data, epochs=epochs, refresh=None if config is None else "epoch",
                          optimizer=OPTIMIZERS[model], seed=seed, progress=progress, desc=label)
            rep = None if config is None else report(net)
            rows.append({"method": "dense" if config is None else "momos", "model": model, "data": data_name,
                         "seed": seed, "epochs": epochs, "block_size": block_size, "capacity": capacity,
                         "num_motifs": None if rep is None else rep.tensors[0].num_motifs,
                         "bits_per_weight": 32.0 if rep is None else rep.bits_per_weight,
                         "test_accuracy": history.final_accuracy, "seconds": time.perf_counter() - start})
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Sweep rows as CSV with a header line (`SWEEP_FIELDS`); None is written as an empty cell."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SWEEP_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
