"""When to refresh: a hook on the optimizer that refreshes every N steps (N=1 is the paper's schedule).

Per-epoch refreshing (the reference code's schedule) needs no hook: call `momos.refresh(model)` after
each epoch's steps, before evaluating or saving.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from momos.api import refresh
from momos.errors import MoMosConfigError
from momos.nn.parametrize import RefreshStats

__all__ = ["RefreshHook", "refresh_every"]


@dataclass
class RefreshHook:
    """The handle `refresh_every` returns: `last` holds the latest stats, `history` (step, distortion)."""

    every: int
    steps: int = 0
    last: RefreshStats | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    _handle: object = None

    def remove(self) -> None:
        """Stop refreshing on optimizer steps."""
        self._handle.remove()


def refresh_every(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 1) -> RefreshHook:
    """Refresh `model` after every `steps`-th `optimizer.step()`.

    Args:
        model: a prepared model (or its DDP wrapper).
        optimizer: the optimizer whose steps are counted.
        steps: optimizer steps per refresh (1: the paper's schedule).

    Returns:
        The `RefreshHook`: the latest stats, the history, and `remove` to stop.

    Raises:
        MoMosConfigError: `steps` is not an integer >= 1.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MoMosConfigError(f"steps must be an integer >= 1, got {steps!r}")
    hook = RefreshHook(steps)

    def after_step(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        hook.steps += 1
        if hook.steps % hook.every == 0:
            hook.last = refresh(model)
            hook.history.append((hook.steps, hook.last.distortion))

    hook._handle = optimizer.register_step_post_hook(after_step)
    return hook
