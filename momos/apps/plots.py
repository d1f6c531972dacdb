"""The PNG figures of `momos demo` and `momos sweep`, drawn with matplotlib's object API (no pyplot state).

matplotlib is an optional dependency (``pip install momos[demo]``): it is imported when a figure is drawn,
and a missing install raises `MoMosDependencyError` with the fix.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from momos.complexity import MoMosDependencyError

__all__ = ["accuracy_per_epoch", "accuracy_vs_capacity", "distortion", "least_used_half_share", "motif_usage"]

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# One colour per block size (and per series), in the order they are drawn.
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")


def _figure(width: float = 6.0, height: float = 4.0) -> tuple[Figure, Axes]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MoMosDependencyError("plots need matplotlib: pip install 'momos[demo]'") from None
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.subplots()


def _save(figure: Figure, path: str | os.PathLike) -> None:
    figure.savefig(os.fspath(path), format="png")


def accuracy_per_epoch(series: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
                       title: str = "test accuracy per epoch", starts: Mapping[str, int] | None = None) -> None:
    """One line per named run: test accuracy (fraction) after each epoch; a run listed in `starts` begins at
    that epoch (its first value is plotted there) instead of epoch 1."""
    figure, ax = _figure()
    for (label, values), colour in zip(series.items(), _COLOURS, strict=False):
        first = (starts or {}).get(label, 1)
        ax.plot(range(first, first + len(values)), [100 * v for v in values], marker="o", markersize=3, label=label,
                color=colour)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    _save(figure, path)


def distortion(refreshes: Sequence[tuple[int, float]], path: str | os.PathLike, *,
               title: str = "distortion of each refresh") -> None:
    """Distortion (sum of squared changes) of each refresh against the optimizer step it followed."""
    figure, ax = _figure()
    steps = [step for step, _ in refreshes]
    values = [value for _, value in refreshes]
    ax.plot(steps, values, marker="o", markersize=3, color=_COLOURS[1])
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("distortion  ||W - Ŵ||²")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _save(figure, path)


def least_used_half_share(counts: Sequence[int]) -> float:
    """The fraction of all assignments that go to the least-used half (floor(k/2)) of the motifs."""
    ordered = sorted(counts)
    total = sum(ordered)
    return sum(ordered[:len(ordered) // 2]) / total if total else math.nan


def motif_usage(counts: Sequence[int], path: str | os.PathLike, *, title: str = "motif usage") -> None:
    """Blocks per motif, motifs sorted from most to least used, with the least-used half's share noted."""
    figure, ax = _figure()
    ordered = sorted(counts, reverse=True)
    ax.bar(range(len(ordered)), ordered, width=1.0, color=_COLOURS[0])
    if ordered and ordered[0] > 0:
        ax.set_yscale("log")
    ax.set_xlabel("motif rank (most used first)")
    ax.set_ylabel("blocks assigned")
    share = least_used_half_share(counts)
    ax.set_title(f"{title}: k={len(ordered):,} motifs, m={sum(ordered):,} blocks\n"
                 f"the least-used half of the motifs holds {share:.1%} of the blocks")
    ax.grid(alpha=0.3, axis="y")
    _save(figure, path)


def accuracy_vs_capacity(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                         title: str = "accuracy against capacity") -> None:
    """The paper's Figure 4: mean test accuracy over seeds against capacity (log axis), one line per block
    size with the seeds' min-max as a band, and the dense baseline's mean as a dashed line.

    `runs` are sweep rows: ``method`` ("dense" or "momos"), ``block_size``, ``capacity``, ``test_accuracy``.
    """
    figure, ax = _figure(6.5, 4.2)
    momos_runs = [r for r in runs if r["method"] == "momos"]
    for block_size, colour in zip(sorted({r["block_size"] for r in momos_runs}), _COLOURS * 8, strict=False):
        by_capacity: dict[float, list[float]] = {}
        for r in momos_runs:
            if r["block_size"] == block_size:
                by_capacity.setdefault(r["capacity"], []).append(100 * r["test_accuracy"])
        capacities = sorted(by_capacity)
        means = [statistics.fmean(by_capacity[c]) for c in capacities]
        ax.plot(capacities, means, marker="o", color=colour, label=f"MoMos s={block_size}")
        ax.fill_between(capacities, [min(by_capacity[c]) for c in capacities],
                        [max(by_capacity[c]) for c in capacities], color=colour, alpha=0.15, linewidth=0)
    dense = [100 * r["test_accuracy"] for r in runs if r["method"] == "dense"]
    if dense:
        ax.axhline(statistics.fmean(dense), color="black", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("capacity c (motifs per block)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(figure, path)
