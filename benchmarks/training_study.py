"""The training study of issue 8: which refresh schedule, mode and motif init to use, measured on digits.

    .venv/bin/python benchmarks/training_study.py            # 3 seeds x 15 epochs, ~10 min on 2 busy cores
    .venv/bin/python benchmarks/training_study.py --quick    # 1 seed, 3 epochs: a smoke run

For each seed: a dense MLP (8x8 digits -> hidden x4 -> 10, AdamW, cosine, lr 1e-3), then the same initial model
prepared with s=4 and c in {0.01, 0.05}, motifs random or k-means, under three schedules: hard
projection after each epoch (the reference code), hard after every step (the paper), and STE with a
refresh every N steps. Reports test accuracy (mean and std over seeds), the BDM of the final weights
relative to the dense model of the same seed, the distortion of the last refresh, and the training time
per epoch relative to dense (refreshes included). Writes a markdown table and a CSV.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

import torch

import momos
from momos import complexity
from momos.apps.data import digits
from momos.apps.models import mlp
from momos.apps.train import fit


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    data = digits(seed=0)
    schedules = {"hard / epoch": ("hard", "epoch"), "hard / step": ("hard", "step"),
                 f"ste / {args.ste_every} steps": ("ste", args.ste_every)}
    results = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        initial = mlp(data.input_shape, data.num_classes, hidden=args.hidden)
        dense = copy.deepcopy(initial)
        history = fit(dense, data, epochs=args.epochs, lr=args.lr, seed=seed)
        dense_seconds = statistics.mean(e.seconds for e in history.epochs)
        dense_bdm = complexity.bdm(dense)
        results.append(dict(method="dense", capacity="", motifs="", seed=seed, accuracy=history.final_accuracy,
                            bdm_ratio=1.0, distortion=0.0, time_ratio=1.0))
        for capacity in (0.01, 0.05):
            for motifs in ("random", "kmeans"):
                for name, (mode, refresh) in schedules.items():
                    config = momos.MoMosConfig.paper(block_size=4, capacity=capacity, motif_init=motifs, mode=mode,
                                               seed=seed)
                    model = momos.prepare(initial, config)
                    start = time.perf_counter()
                    history = fit(model, data, epochs=args.epochs, refresh=refresh, lr=args.lr, seed=seed)
                    seconds = statistics.mean(e.seconds for e in history.epochs)
                    results.append(dict(method=name, capacity=capacity, motifs=motifs, seed=seed,
                                        accuracy=history.final_accuracy, bdm_ratio=complexity.bdm(model) / dense_bdm,
                                        distortion=history.refreshes[-1][1], time_ratio=seconds / dense_seconds))
                    print(f"seed {seed} c={capacity} {motifs:6} {name:14} acc {history.final_accuracy:.3f} "
                          f"time x{seconds / dense_seconds:.2f} ({time.perf_counter() - start:.1f}s)", flush=True)
    return results


def table(results: list[dict[str, object]]) -> str:
    """Mean (and std over seeds) per method, capacity and motif init, as a markdown table."""
    groups: dict[tuple, list[dict[str, object]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["capacity"], r["motifs"]), []).append(r)

    def stat(rows: list[dict[str, object]], key: str, fmt: str) -> str:
        values = [float(r[key]) for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{fmt}} ± {std:{fmt}}"

    lines = ["| method | c | motifs | test accuracy | BDM / dense | distortion | time per epoch / dense |",
             "|---|---|---|---|---|---|---|"]
    for (method, capacity, motifs), rows in groups.items():
        lines.append(f"| {method} | {capacity} | {motifs} | {stat(rows, 'accuracy', '.4f')} | "
                     f"{stat(rows, 'bdm_ratio', '.3f')} | {stat(rows, 'distortion', '.3g')} | "
                     f"{stat(rows, 'time_ratio', '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--hidden", type=int, default=64, help="MLP width (the paper's 256 makes per-step "
                        "k-means refreshes take hours on CPU)")
    parser.add_argument("--ste-every", type=int, default=10, help="STE refresh period in optimizer steps")
    parser.add_argument("--out", type=Path, default=Path("docs/training_study"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 3
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    text = table(results)
    args.out.with_suffix(".table.md").write_text(text + "\n")
    print(text)
    print(f"{args.seeds} seed(s), {args.epochs} epochs, hidden {args.hidden}: "
          f"{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
