"""Calibrated assignment: choose each block's motif by the error it causes in the layer's outputs, not in its weights.

For a Linear layer ``y = x W^T`` (and a convolution, with x its input patches and W its weight flattened per
output channel), the output error of a decoded weight Ŵ over calibration inputs X is
``||X (W - Ŵ)^T||^2 = tr((W - Ŵ) H (W - Ŵ)^T)`` with ``H = X^T X``. As GPTQ does for rounding (and GPTVQ for
vectors), the blocks are assigned a column block at a time, left to right; after each choice the weights not
yet assigned absorb its error in the way that minimises that output error (an update through the Cholesky
factor of ``H^-1``), and each choice itself minimises the error it adds in the metric ``H^-1`` induces on the
block. The motif tables of these layers stay as they are: only their mosaics change.

An embedding's rows are read one token at a time, so its output error over the calibration inputs is its weight
error with each row counted as often as its token occurs. Where an embedding has a motif table of its own
(`momos.compress(..., embedding_bits=...)`), the table is fit again by Lloyd iterations in that weighting and
the blocks take their nearest motifs, so the motifs follow the tokens text uses rather than the whole vocabulary.
Either way a calibrated model packs, saves and exports like any other.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from momos.bank import kmeans_motifs
from momos.blocks import to_blocks
from momos.errors import MoMosConfigError, MoMosStateError
from momos.nn.finetune import _call, _output
from momos.nn.packed import PackedTensor, members, packed_tensors, tied_tensors
from momos.search import nearest

__all__ = ["TOKEN_FLOOR", "CalibrationStats", "calibrate", "calibrated_mosaic", "calibrated_table", "input_hessians",
           "lookup_counts", "lookup_error", "output_error", "patches"]

# Column blocks whose error updates are collected before they are applied to the rest of the matrix.
_LAZY_COLUMNS = 128
# Entries of one (rows, k) distance matrix: small enough to stay in cache.
_DISTANCES = 1 << 18
# A token the calibration inputs never show still occurs in use: each embedding row's count is raised by this
# many times the mean count before it weights the row.
TOKEN_FLOOR = 10.0


@dataclass(frozen=True)
class CalibrationStats:
    """What `calibrate` did: per tensor, the output error ``tr(E H E^T) / tr(W H W^T)`` of nearest-motif and of
    calibrated assignment (E = W - Ŵ) over the calibration inputs, and the tensors it left as they were, with why."""

    before: dict[str, float]
    after: dict[str, float]
    skipped: dict[str, str]


Layer = nn.Linear | nn.Conv1d | nn.Conv2d


def input_hessians(model: nn.Module, inputs: Iterable[Any], layers: dict[str, Layer]) -> dict[str, torch.Tensor]:
    """``H = X^T X / n`` (float64) of the inputs X each layer in `layers` sees while `model` runs on `inputs`.

    A Linear layer's rows of X are its inputs over every leading dimension (batch, tokens, ...); a convolution's
    are its input patches (`patches`), one per output position. A layer whose forward never ran (a module whose
    weight its parent reads directly, as `nn.MultiheadAttention` does with ``out_proj``) is left out of the result.
    """
    sums = {name: torch.zeros(_row_length(layer), _row_length(layer), dtype=torch.float64)
            for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = patches(module, x).to(torch.float64)
        sums[name] = sums[name].to(x.device).addmm_(x.T, x)
        counts[name] += x.shape[0]

    _watch_inputs(model, inputs, layers, record)
    return {name: sums[name] / counts[name] for name in layers if counts[name]}


def _watch_inputs(model: nn.Module, inputs: Iterable[Any], modules: Mapping[str, nn.Module],
                  record: Callable[[str, nn.Module, torch.Tensor], None]) -> None:
    """Run `model` (eval mode, no grad) on every batch of `inputs`, calling ``record(name, module, x)`` with the
    first input x of each call of each module in `modules`."""
    def hook(name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            record(name, module, args[0].detach())
        return pre_hook

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    seen = 0
    try:
        with torch.no_grad(), _eval(model):
            for batch in inputs:
                _call(model, batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise MoMosConfigError("no calibration batch: give at least one batch of inputs")


def lookup_counts(model: nn.Module, inputs: Iterable[Any], lookups: dict[str, nn.Embedding]) -> dict[str, torch.Tensor]:
    """How often each row of each embedding in `lookups` is read while `model` runs on `inputs` (float64, one count
    per row; padding rows count too). An embedding whose forward never ran is left out of the result."""
    counts = {name: torch.zeros(lookup.num_embeddings, dtype=torch.float64) for name, lookup in lookups.items()}
    ran: set[str] = set()

    def record(name: str, module: nn.Module, rows: torch.Tensor) -> None:
        counts[name] += torch.bincount(rows.reshape(-1).cpu(), minlength=counts[name].numel()).to(torch.float64)
        ran.add(name)

    _watch_inputs(model, inputs, lookups, record)
    return {name: counts[name] for name in lookups if name in ran}


def calibrated_table(weight: torch.Tensor, motifs: torch.Tensor, row_weights: torch.Tensor, *, force_zero: bool,
                     iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Motifs and mosaic for an embedding weight ``(rows, dim)`` whose rows count as `row_weights`.

    Lloyd iterations from `motifs` (`momos.bank.kmeans_motifs`, each block weighted as its row), then every block
    takes its nearest motif: this lowers ``sum_r w_r ||W_r - Ŵ_r||^2``, the output error of a lookup whose row r
    is read w_r times. Blocks must lie along the rows (``dim % s == 0``).

    Returns:
        The ``(k, s)`` motifs, in the dtype of `motifs`, and the int64 mosaic of ``weight.reshape(-1)``.
    """
    rows, dim = weight.shape
    s = motifs.shape[1]
    if dim % s:
        raise MoMosStateError(f"calibrated tables need blocks along rows: embedding_dim={dim} is not a multiple of "
                              f"block_size={s}")
    weight = weight.detach().cpu()
    start = motifs.detach().cpu().to(weight.dtype)
    fitted = kmeans_motifs([weight], s, start, iterations=iterations, force_zero=force_zero, generator=generator,
                           weights=row_weights.repeat_interleave(dim // s))
    fitted = fitted.to(motifs.dtype)
    return fitted, nearest(to_blocks(weight, s), fitted.to(weight.dtype))


def patches(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies its flattened weight ``(out, -1)`` with: a Linear's inputs, a convolution's
    input patches (channel, then kernel positions, as the weight is laid out), one row per output position."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):  # as a 2-D convolution of height 1
        x, kernel = x.unsqueeze(-2), (1, *layer.kernel_size)
        extra = {"dilation": (1, *layer.dilation), "padding": (0, *layer.padding), "stride": (1, *layer.stride)}
    else:
        kernel = layer.kernel_size
        extra = {"dilation": layer.dilation, "padding": layer.padding, "stride": layer.stride}
    if x.dim() == 3:  # an unbatched input
        x = x.unsqueeze(0)
    columns = nn.functional.unfold(x, kernel, **extra)  # (N, C * kernel, positions)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def _row_length(layer: Layer) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.weight[0].numel()


def _unsupported(layer: nn.Module) -> str | None:
    """Why `calibrate` cannot re-assign `layer`'s weight, or None."""
    if isinstance(layer, nn.Linear):
        return None
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return "not a Linear, Conv1d / Conv2d or Embedding weight of the dense model"
    if layer.groups != 1:
        return f"a grouped convolution (groups={layer.groups})"
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return f"a convolution with padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
    return None


def calibrated_mosaic(weight: torch.Tensor, motifs: torch.Tensor, hessian: torch.Tensor, *,
                      damping: float = 0.01) -> torch.Tensor:
    """The mosaic of a weight ``(out, in)`` under `motifs` ``(k, s)`` that keeps ``tr(E H E^T)`` small (a
    convolution's weight flattened per output channel, ``in`` its patch length).

    Blocks must lie along the rows (``in % s == 0``). `damping` adds that fraction of the mean diagonal of H to
    its diagonal (inputs never seen get 1), as GPTQ does, so that H is invertible and no direction is trusted
    beyond what the data shows. Every motif may be chosen, a forced zero motif too.

    Args:
        weight: the dense weight ``(out, in)``.
        motifs: the bank ``(k, s)``, ``in % s == 0``.
        hessian: H ``(in, in)`` of the layer's inputs (`input_hessians`).
        damping: the fraction of H's mean diagonal added to its diagonal.

    Returns:
        The int64 mosaic of ``weight.reshape(-1)`` cut into blocks of s.

    Raises:
        MoMosStateError: rows that are not whole blocks.
    """
    out_features, in_features = weight.shape
    s = motifs.shape[1]
    if in_features % s:
        raise MoMosStateError(f"calibrated assignment needs blocks along rows: in_features={in_features} is not a "
                              f"multiple of block_size={s}")
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * float(torch.diagonal(h).mean()))
    # U: upper Cholesky factor of H^-1. Row i of U, from column i on, carries column i's error to the columns
    # after it; its diagonal blocks give the metric in which a block's own error counts.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # Distances in the weight's own precision (float32 for most models: the search is the costly part); the
    # factorisation and the error updates in float64.
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    work = weight.detach().to(torch.float64).clone()
    table = motifs.detach().to(torch.float64)
    mosaic = torch.empty(out_features, in_features // s, dtype=torch.int64)
    for start in range(0, in_features, _LAZY_COLUMNS):
        stop = min(start + _LAZY_COLUMNS, in_features)
        errors = torch.empty(out_features, stop - start, dtype=torch.float64)
        for j in range(start, stop, s):
            inverse = torch.linalg.inv(u[j:j + s, j:j + s])
            blocks = work[:, j:j + s]
            mosaic[:, j // s] = _nearest_in_metric(blocks @ inverse, table @ inverse, dtype)
            error = (blocks - table[mosaic[:, j // s]]) @ inverse
            errors[:, j - start:j - start + s] = error
            work[:, j + s:stop] -= error @ u[j:j + s, j + s:stop]
        work[:, stop:] -= errors @ u[start:stop, stop:]
    return mosaic.reshape(-1)


def _nearest_in_metric(blocks: torch.Tensor, motifs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Index of the nearest row of `motifs` for each row of `blocks` (squared distance via matmuls in `dtype`, over
    row chunks whose distance matrix stays near `_DISTANCES` entries)."""
    blocks, motifs = blocks.to(dtype), motifs.to(dtype)
    norms = (motifs * motifs).sum(1)
    rows = max(1, _DISTANCES // motifs.shape[0])
    return torch.cat([torch.addmm(norms, chunk, motifs.T, alpha=-2).argmin(1) for chunk in blocks.split(rows)])


def output_error(weight: torch.Tensor, decoded: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)``: the output error of `decoded` over the calibration inputs, relative."""
    w, e = weight.to(torch.float64), (weight - decoded).to(torch.float64)
    return float(((e @ hessian) * e).sum() / ((w @ hessian) * w).sum().clamp_min(1e-300))


def lookup_error(weight: torch.Tensor, decoded: torch.Tensor, row_weights: torch.Tensor) -> float:
    """``sum_r w_r ||E_r||^2 / sum_r w_r ||W_r||^2``: `output_error` of an embedding whose row r is read w_r times."""
    w, e = weight.to(torch.float64).cpu(), (weight - decoded).to(torch.float64).cpu()
    return float((row_weights * (e * e).sum(1)).sum() / (row_weights * (w * w).sum(1)).sum().clamp_min(1e-300))


def calibrate(packed: nn.Module, dense: nn.Module, inputs: Iterable[Any], *, damping: float = 0.01,
              check_batches: int | None = 4, exclude: Iterable[str] = ()) -> CalibrationStats:
    """Re-assign the mosaics of the packed Linear and Conv weights of `packed`, in place, by output error on `inputs`;
    fit the tables of embeddings that have one of their own to the tokens `inputs` read.

    Each embedding weight with a motif table of its own comes first: its table is offered the motifs
    `calibrated_table` fits with each row weighted by how often `inputs` read it (raised by `TOKEN_FLOOR` times
    the mean count, so unread tokens still count), and its blocks their nearest motifs under them.
    Then each Linear, Conv1d and Conv2d weight of `packed` (packed from the same-named parameter of `dense`) is offered
    the mosaic that `calibrated_mosaic` picks for `dense`'s weight under the same motif table, with H from the
    inputs the layer sees in `dense` (a convolution's: its input patches). The offer is taken, layer by layer in
    module order, only where it lowers the layer's output error on those inputs and, with `check_batches`, also
    the mean squared distance of the whole model's output to `dense`'s on the first `check_batches` batches.
    The second test matters: a layer's output error counts every token alike, and in a transformer a few tokens
    with very large activations can dominate H while the LayerNorm after the layer makes their errors matter
    little (BERT's feed-forward output layers are such).
    Every offer, an embedding's too, is taken only under both tests. A tensor is left as it is when it is not
    such a weight (or a grouped convolution, or one padded other than with zeros by number; or an embedding that
    shares its table), is tied to another name, or has rows not cut into whole blocks.

    Args:
        packed: a converted model (`momos.convert`, `momos.compress`).
        dense: the model it was converted from, with its dense weights.
        inputs: a re-iterable collection of model inputs (a tensor, tuple or mapping per batch), as
            `momos.finetune` takes them.
        damping: fraction of H's mean diagonal added to its diagonal (see `calibrated_mosaic`).
        check_batches: how many batches the whole-model test runs on (None: no whole-model test).
        exclude: tensor names to leave with their nearest-motif mosaic (and table).

    Returns:
        `CalibrationStats`.

    Raises:
        MoMosConfigError: no input batch, a bad `damping` or `check_batches`.
        MoMosStateError: `packed` holds no packed tensor.
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf"):
        raise MoMosConfigError(f"damping must be a finite number >= 0, got {damping!r}")
    if check_batches is not None and (isinstance(check_batches, bool) or not isinstance(check_batches, int)
                                      or check_batches < 1):
        raise MoMosConfigError(f"check_batches must be an integer >= 1 or None, got {check_batches!r}")
    layers, lookups, skipped = _eligible(packed, dense, set(exclude))
    hessians = input_hessians(dense, inputs, {name: owner for name, (owner, _) in layers.items()}) if layers else {}
    counts = lookup_counts(dense, inputs, {name: owner for name, (owner, _) in lookups.items()}) if lookups else {}
    model_error = None
    if check_batches is not None:
        model_error = _ModelError(packed, dense, list(itertools.islice(inputs, check_batches)))
    before: dict[str, float] = {}
    after: dict[str, float] = {}

    def offer(name: str, tensor: PackedTensor, motifs: torch.Tensor | None, mosaic: torch.Tensor,
              error: Callable[[torch.Tensor], float], what: str, of: str) -> None:
        """Give `tensor` the mosaic (and, unless None, the motif table) offered, if that lowers `error` of its
        decoded weight and the model's output error; else leave it and say why in `skipped`."""
        table = tensor.table
        decoded = nn.functional.embedding(mosaic, (table.motifs if motifs is None else motifs).detach().to(
            tensor.dtype)).reshape(tensor.shape)
        before[name] = after[name] = error(tensor().detach())
        if error(decoded) >= before[name]:
            skipped[name] = f"{what} did not lower the {of}'s output error"
            return
        old = table.motifs.detach().clone() if motifs is not None else None, tensor.mosaic.clone()
        with torch.no_grad():
            if motifs is not None:
                table.motifs.copy_(motifs.to(table.motifs.device))
            tensor.mosaic.copy_(mosaic.to(tensor.mosaic.device, tensor.mosaic.dtype))
            if model_error is not None and not model_error.improved():
                if old[0] is not None:
                    table.motifs.copy_(old[0])
                tensor.mosaic.copy_(old[1])
                skipped[name] = f"{what} did not lower the model's output error"
                return
        after[name] = error(decoded)

    for name, (owner, tensor) in lookups.items():
        if name not in counts:
            skipped[name] = "its embedding's forward never ran on the calibration inputs"
            continue
        weight, config = owner.weight.detach(), tensor.table.config
        row_weights = counts[name] + TOKEN_FLOOR * float(counts[name].mean())
        motifs, mosaic = calibrated_table(weight, tensor.table.motifs, row_weights, force_zero=config.force_zero,
                                          iterations=max(1, config.kmeans_iters),
                                          generator=torch.Generator().manual_seed(config.seed))
        offer(name, tensor, motifs, mosaic, lambda decoded, w=weight, r=row_weights: lookup_error(w, decoded, r),
              "a table fit to its token counts", "embedding")
    for name, (owner, tensor) in layers.items():
        if name not in hessians:
            skipped[name] = "its layer's forward never ran on the calibration inputs"
            continue
        weight, h = owner.weight.detach().flatten(1), hessians[name].to(owner.weight.device)
        mosaic = calibrated_mosaic(weight.cpu(), tensor.table.motifs.detach().cpu(), h.cpu(), damping=damping)
        offer(name, tensor, None, mosaic.to(tensor.mosaic.device),
              lambda decoded, w=weight, h=h: output_error(w, decoded.flatten(1), h),
              "calibrated assignment", "layer")
    return CalibrationStats(before, after, skipped)


class _ModelError:
    """The mean squared distance of `packed`'s outputs to `dense`'s on fixed batches; whether a change lowered it.

    Both models run in eval mode, except that their BatchNorm layers normalise by each batch's own statistics
    (their running statistics are left as they were): the packed model's running statistics describe the
    dense weights, and comparing through them would judge a re-assignment by how stale they are.
    """

    def __init__(self, packed: nn.Module, dense: nn.Module, batches: list[Any]) -> None:
        if not batches:
            raise MoMosConfigError("no calibration batch: give at least one batch of inputs")
        self.packed, self.batches = packed, batches
        with torch.no_grad(), _eval(dense), _batch_statistics(dense):
            self.targets = [_output(_call(dense, batch)).detach() for batch in batches]
        self.best = self.measure()

    def measure(self) -> float:
        with torch.no_grad(), _eval(self.packed), _batch_statistics(self.packed):
            return sum(float(nn.functional.mse_loss(_output(_call(self.packed, batch)), target))
                       for batch, target in zip(self.batches, self.targets, strict=True)) / len(self.batches)

    def improved(self) -> bool:
        value = self.measure()
        if value < self.best:
            self.best = value
            return True
        return False


@contextlib.contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `model` (in eval mode) normalise by batch statistics; their buffers are restored after."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    for m in norms:
        m.train()
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved, strict=True):
            m.eval()
            for k, v in buffers.items():
                getattr(m, k).copy_(v)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _eligible(packed: nn.Module, dense: nn.Module, excluded: set[str]) \
        -> tuple[dict[str, tuple[Layer, PackedTensor]], dict[str, tuple[nn.Embedding, PackedTensor]], dict[str, str]]:
    """The packed weights `calibrate` can re-assign, each with its dense layer; the embeddings whose tables it can
    fit again, each with its dense embedding; and the rest, with why."""
    tied = tied_tensors(packed)
    tied_names = set(tied) | set(tied.values())
    dense_modules = dict(dense.named_modules())
    served: dict[int, int] = {}
    for _, tensor in packed_tensors(packed):
        served[id(tensor.table)] = served.get(id(tensor.table), 0) + 1
    layers: dict[str, tuple[Layer, PackedTensor]] = {}
    lookups: dict[str, tuple[nn.Embedding, PackedTensor]] = {}
    skipped: dict[str, str] = {}
    for module_name, module in packed.named_modules():
        for tensor_name, tensor in members(module).items():
            name = f"{module_name}.{tensor_name}" if module_name else tensor_name
            owner = dense_modules.get(module_name)
            if name in tied_names:
                skipped[name] = "tied to another name"
            elif name in excluded:
                skipped[name] = "excluded"
            elif tensor_name != "weight" or owner is None or type(owner) is not module.__class__.__bases__[0] \
                    or getattr(owner, "weight", None) is None or owner.weight.shape != tensor.shape:
                skipped[name] = "not the weight of the same layer in the dense model"
            elif isinstance(owner, nn.Embedding):
                if served[id(tensor.table)] > 1:
                    skipped[name] = ("an embedding whose motif table serves other tensors too (give it a bank of its "
                                     "own, e.g. compress(..., embedding_bits=...))")
                elif owner.embedding_dim % tensor.table.block_size:
                    skipped[name] = (f"its rows ({owner.embedding_dim} values) are not a multiple of the block size")
                else:
                    lookups[name] = (owner, tensor)
            elif _unsupported(owner) is not None:
                skipped[name] = _unsupported(owner)
            elif _row_length(owner) % tensor.table.block_size:
                skipped[name] = (f"its rows ({_row_length(owner)} values: in_features, or channels x kernel) are not "
                                 f"a multiple of the block size")
            else:
                layers[name] = (owner, tensor)
    if not layers and not lookups and not skipped:
        raise MoMosStateError("model has no packed MoMos tensor: calibrate a converted model")
    return layers, lookups, skipped
