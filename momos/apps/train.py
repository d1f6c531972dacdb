"""A plain supervised training loop with a MoMos refresh schedule, for the demo, sweeps and studies.

    history = fit(model, data, epochs=20, refresh="epoch")

`refresh` is ``None`` (dense training), ``"epoch"`` (after each epoch's steps, as the reference code),
``"step"`` (after every optimizer step, as the paper) or an integer N (every N steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from momos.apps.data import Dataset
from momos.errors import MoMosConfigError

__all__ = ["OPTIMIZERS", "EpochRecord", "History", "evaluate", "fit",
           "make_optimizer", "held_out_batches", "split_batches", "train_step"]

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class EpochRecord:
    """What one epoch of `fit` did: its loss, test accuracy, time and last refresh."""

    epoch: int
    train_loss: float
    test_accuracy: float
    seconds: float  # wall time of the epoch's steps, refreshes included
    refresh_seconds: float  # of which refreshing
    distortion: float  # of the epoch's last refresh (nan if none)


@dataclass
class History:
    """The record of a `fit`: one `EpochRecord` per epoch and every refresh."""

    epochs: list[EpochRecord] = field(default_factory=list)
    refreshes: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, distortion)

    @property
    def final_accuracy(self) -> float:
        """The test accuracy after the last epoch (NaN before any)."""
        return self.epochs[-1].test_accuracy if self.epochs else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` (in eval mode) on (x, y); restores the model's training flag."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)


def split_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`order` cut into batches; a last batch of one sample joins the one before (BatchNorm refuses it)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def held_out_batches(x: torch.Tensor, y: torch.Tensor, seed: int, *, batch_size: int = 64,
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(train, validation)`` labelled batches: a seeded fifth of the samples held out for validation."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held_out = len(order) // 5
    return ([(x[b], y[b]) for b in split_batches(order[held_out:], batch_size)],
            [(x[b], y[b]) for b in split_batches(order[:held_out], batch_size)])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step (and scheduler step) on the batch (x, y); returns its loss."""
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float | None = None,
                   weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The reference code's optimizers: AdamW lr 3e-4 wd 1e-2, or SGD lr 0.1 momentum 0.9 wd 1e-4.

    `lr` and `weight_decay` override the defaults; `MoMosConfigError` for a `name` not in `OPTIMIZERS`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-4 if lr is None else lr,
                                 weight_decay=1e-2 if weight_decay is None else weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1 if lr is None else lr, momentum=0.9,
                               weight_decay=1e-4 if weight_decay is None else weight_decay)
    raise MoMosConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def fit(model: nn.Module, data: Dataset, *, epochs: int, refresh: str | int | None = None,
        optimizer: str = "adamw", lr: float | None = None, weight_decay: float | None = None,
        batch_size: int = 64, seed: int = 0, progress: bool = False, desc: str = "train") -> History:
    """Train `model` on `data` with a cosine schedule and the given refresh schedule; returns the history.

    Args:
        model: a dense or prepared model, trained in place.
        data: the train/test split; test accuracy is measured after each epoch.
        epochs: passes over the training set.
        refresh: ``None``, ``"epoch"``, ``"step"`` or every N steps (see the module doc).
        optimizer: one of `OPTIMIZERS`, with `lr` and `weight_decay` as in `make_optimizer`.
        batch_size: samples per step; `seed` seeds the batch order.
        progress: show a progress bar labelled `desc`.

    Raises:
        MoMosConfigError: `epochs` or `refresh` out of range, or an unknown `optimizer`.
    """
    from momos.api import refresh as do_refresh

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise MoMosConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    every = {"step": 1, "epoch": None, None: None}.get(refresh, refresh)
    if refresh not in ("epoch", "step", None) and (isinstance(every, bool) or not isinstance(every, int)
                                                   or every < 1):
        raise MoMosConfigError(f"refresh must be None, 'epoch', 'step' or an integer >= 1, got {refresh!r}")
    generator = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    steps_per_epoch = len(split_batches(torch.arange(len(data.x_train)), batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    history = History()
    step = 0
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False, unit="step")
    for epoch in range(1, epochs + 1):
        model.train()
        start, refresh_time, total_loss, distortion = time.perf_counter(), 0.0, 0.0, math.nan
        order = torch.randperm(len(data.x_train), generator=generator)
        for batch in split_batches(order, batch_size):
            loss = train_step(model, opt, scheduler, loss_fn, data.x_train[batch], data.y_train[batch])
            step += 1
            total_loss += loss.item() * len(batch)
            if every is not None and step % every == 0:
                t = time.perf_counter()
                distortion = do_refresh(model).distortion
                refresh_time += time.perf_counter() - t
                history.refreshes.append((step, distortion))
            bar.update()
        if refresh == "epoch":
            t = time.perf_counter()
            distortion = do_refresh(model).distortion
            refresh_time += time.perf_counter() - t
            history.refreshes.append((step, distortion))
        seconds = time.perf_counter() - start
        accuracy = evaluate(model, data.x_test, data.y_test)
        history.epochs.append(EpochRecord(epoch, total_loss / len(order), accuracy, seconds, refresh_time,
                                          distortion))
        bar.set_postfix(acc=f"{accuracy:.3f}")
    bar.close()
    return history
