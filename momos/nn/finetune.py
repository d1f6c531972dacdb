"""Fine-tuning a packed model's motif tables: the mosaic stays, the motifs move to lower a loss.

Two losses: a task loss on labelled batches ``(inputs, target)``, or distillation from a teacher (the dense
model) on unlabelled inputs, matching its outputs by mean squared error or by KL divergence of their softmax.
Inputs are a tensor (``model(x)``), a tuple (``model(*x)``) or a mapping (``model(**x)``, as tokenizers
return); an output is a tensor, the first element of a tuple, or the first value of a mapping (a
transformers ``ModelOutput``: ``last_hidden_state`` or ``logits``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from momos.errors import MoMosConfigError
from momos.nn.packed import freeze_motifs, train_motifs

__all__ = ["DISTILL_LOSSES", "FinetuneStats", "finetune", "recalibrate_batchnorm"]

DISTILL_LOSSES = ("mse", "kl")


@dataclass(frozen=True)
class FinetuneStats:
    """What one `finetune` run did: the mean loss of each epoch, the steps and the wall time; with validation
    batches, the validation loss before training and after each epoch, and the epoch whose weights were kept."""

    epoch_losses: list[float]
    steps: int
    seconds: float
    trained_values: int
    validation_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


def finetune(model: nn.Module, batches: Iterable[Any], *, teacher: nn.Module | None = None,
             loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, distill: str = "mse",
             epochs: int = 1, lr: float = 1e-3, weight_decay: float = 0.0,
             optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None, dense: bool = False,
             recalibrate: bool = True, seed: int = 0, progress: bool = True,
             on_epoch: Callable[[int, float], None] | None = None,
             validation: Iterable[Any] | None = None) -> FinetuneStats:
    """Train the motif tables of the packed `model` in place (mosaics fixed), then re-estimate BatchNorm statistics.

    Args:
        model: a converted model (`momos.convert` or `momos.load`).
        batches: a re-iterable collection of batches (a list, a DataLoader): ``(inputs, target)`` with `loss`,
            or inputs alone with `teacher`.
        teacher: the model to distill from (run in eval mode, never trained, its mode restored); excludes `loss`.
        loss: ``loss(output, target)`` for labelled batches; excludes `teacher`.
        distill: ``"mse"`` (outputs) or ``"kl"`` (softmax over the last dimension), with `teacher`.
        epochs: passes over `batches`.
        lr: AdamW's learning rate (without `optimizer`).
        weight_decay: AdamW's decoupled weight decay (without `optimizer`).
        optimizer: a factory ``optimizer(params)`` to use instead of AdamW.
        dense: also train the parameters MoMos left dense (biases, norms, ...).
        recalibrate: re-estimate BatchNorm running statistics over `batches` after training.
        seed: seeds torch's random stream for the run (dropout), so equal inputs give equal results.
        progress: show a progress bar.
        on_epoch: called as ``on_epoch(epoch, mean_loss)`` after each epoch (from 1), e.g. to evaluate.
        validation: held-out batches, of the same kind as `batches`: the loss on them is computed (in eval mode)
            before training and after each epoch, and the model keeps the weights of the epoch where it was
            lowest (0: as it came, if no epoch improved on it).

    Returns:
        `FinetuneStats`. The motif tables are buffers again afterwards, and every other parameter keeps its
        ``requires_grad``.

    Raises:
        MoMosConfigError: neither or both of `teacher` and `loss`, an unknown `distill`, a bad count or rate.
        MoMosStateError: `model` holds no packed tensor.
    """
    if (teacher is None) == (loss is None):
        raise MoMosConfigError("give exactly one of teacher (distillation) or loss (labelled batches)")
    if distill not in DISTILL_LOSSES:
        raise MoMosConfigError(f"distill must be one of {list(DISTILL_LOSSES)}, got {distill!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise MoMosConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise MoMosConfigError(f"{name} must be a finite number >= 0, got {value!r}")

    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    teacher_training = teacher is not None and teacher.training
    params = train_motifs(model, dense=dense)
    if teacher is not None:
        teacher.eval()
    opt = optimizer(params) if optimizer is not None else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    objective = _distillation(teacher, distill) if teacher is not None else _labelled(loss)
    total = _length(batches)
    bar = tqdm(total=None if total is None else epochs * total, desc="momos finetune", disable=not progress,
               leave=False, unit="step")
    start, steps, epoch_losses = time.perf_counter(), 0, []
    validation_losses: list[float] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if validation is not None:
                validation_losses.append(_validation_loss(model, objective, validation))
                best = (validation_losses[-1], 0, [p.detach().clone() for p in params])
            model.train()
            for _ in range(epochs):
                summed, count = 0.0, 0
                for batch in batches:
                    value = objective(model, batch)
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    opt.step()
                    value = float(value.detach())
                    summed, count, steps = summed + value, count + 1, steps + 1
                    bar.update()
                    bar.set_postfix(loss=f"{value:.4g}")
                if count == 0:
                    raise MoMosConfigError("batches is empty (or an iterator already used up): give a list or "
                                           "a DataLoader, which can be iterated once per epoch")
                epoch_losses.append(summed / count)
                if best is not None:
                    validation_losses.append(_validation_loss(model, objective, validation))
                    if validation_losses[-1] < best[0]:
                        best = (validation_losses[-1], len(epoch_losses), [p.detach().clone() for p in params])
                    model.train()
                if on_epoch is not None:
                    on_epoch(len(epoch_losses), epoch_losses[-1])
            if best is not None:
                with torch.no_grad():
                    for param, kept in zip(params, best[2], strict=True):
                        param.copy_(kept)
            if recalibrate:
                recalibrate_batchnorm(model, (inputs_of(b, labelled=loss is not None) for b in batches))
    finally:
        bar.close()
        # The mode first: some models (transformers') read a parameter's device in train(), and a model whose every
        # parameter is packed has none once its motif tables are buffers again.
        model.train(was_training)
        freeze_motifs(model)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        if teacher is not None:
            teacher.train(teacher_training)
    trained = sum(p.numel() for p in params)
    return FinetuneStats(epoch_losses, steps, time.perf_counter() - start, trained, validation_losses,
                         None if best is None else best[1])


def _validation_loss(model: nn.Module, objective: Callable[[nn.Module, Any], torch.Tensor],
                     batches: Iterable[Any]) -> float:
    """The mean of `objective` over `batches`, in eval mode and without gradients."""
    model.eval()
    with torch.no_grad():
        values = [float(objective(model, batch)) for batch in batches]
    if not values:
        raise MoMosConfigError("validation is empty (or an iterator already used up): give a list or a DataLoader")
    return sum(values) / len(values)


def recalibrate_batchnorm(model: nn.Module, inputs: Iterable[Any]) -> bool:
    """Re-estimate the running statistics of every BatchNorm of `model` as the plain average over `inputs`.

    Args:
        model: any model; its mode is restored afterwards.
        inputs: model inputs (see the module docstring), one batch each.

    Returns:
        Whether `model` has a BatchNorm with running statistics (False: nothing was run).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    seen = 0
    try:
        model.train()
        with torch.no_grad():
            for x in inputs:
                _call(model, x)
                seen += 1
    finally:
        for m, momentum, state in zip(norms, momenta, saved, strict=True):
            m.momentum = momentum
            if seen == 0:
                m.load_state_dict(state)
        model.train(was_training)
    if seen == 0:
        raise MoMosConfigError("no input batch to re-estimate BatchNorm statistics from (the statistics are kept)")
    return True


def _labelled(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[nn.Module, Any], torch.Tensor]:
    def objective(model: nn.Module, batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise MoMosConfigError(f"with loss=, every batch must be (inputs, target), got {type(batch).__name__}")
        inputs, target = batch
        return loss(_output(_call(model, inputs)), target)

    return objective


def _distillation(teacher: nn.Module, kind: str) -> Callable[[nn.Module, Any], torch.Tensor]:
    def objective(model: nn.Module, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            want = _output(_call(teacher, inputs))
        got = _output(_call(model, inputs))
        if got.shape != want.shape:
            raise MoMosConfigError(f"the model's output has shape {tuple(got.shape)}, the teacher's "
                                   f"{tuple(want.shape)}: distillation needs equal shapes")
        if kind == "mse":
            return nn.functional.mse_loss(got, want)
        return nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean")

    return objective


def inputs_of(batch: Any, *, labelled: bool) -> Any:
    """A batch's model inputs: its first element when it is labelled ``(inputs, target)``, else itself."""
    return batch[0] if labelled else batch


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _output(output: Any) -> torch.Tensor:
    """The tensor a loss compares: the output itself, a tuple's first element, or a mapping's first value."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = next(iter(output.values()))
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise MoMosConfigError(f"cannot find the output tensor in a {type(output).__name__}: return a tensor, a "
                               "tuple or a mapping whose first entry is the tensor to compare")
    return output


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
