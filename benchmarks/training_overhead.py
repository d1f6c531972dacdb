"""Training time per epoch of a prepared model against the same model dense, measured in one run.

    .venv/bin/python benchmarks/training_overhead.py [--samples 50000] [--repeats 2]

MLP (64 -> 256 x4 -> 10, AdamW, batch 64), s=4, c=0.05. Synthetic data with `--samples` samples per
epoch (the issue's targets: hard with a refresh per epoch <= 1.10x, ste <= 2x), then digits (an epoch
of 23 steps, where one refresh dominates: reported, not judged). Repetitions are interleaved, and the
median per method is compared, so a busy machine slows every method alike.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import momos
from momos.data import Dataset, digits
from momos.models import mlp
from momos.train import fit

TARGETS = {"hard": 1.10, "ste": 2.0}


def synthetic(samples: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 64, generator=g)
    y = (x[:, :10].argmax(1) + (x[:, 10] > 1).long()) % 10  # learnable labels
    return Dataset(x, y, x[:1000], y[:1000], 10)


def measure(data: Dataset, repeats: int) -> dict[str, float]:
    """Median seconds of one epoch (refresh at its end included) per method."""
    torch.manual_seed(0)
    initial = mlp(data.input_shape, data.num_classes)
    seconds: dict[str, list[float]] = {"dense": [], "hard": [], "ste": []}
    for _ in range(repeats):
        for method in seconds:
            if method == "dense":
                model, refresh = mlp(data.input_shape, data.num_classes), None
                model.load_state_dict(initial.state_dict())
            else:
                model = momos.prepare(initial, momos.MoMosConfig(block_size=4, capacity=0.05, mode=method))
                momos.refresh(model)  # STE needs a bank to train against; hard starts from a mosaic too
                refresh = "epoch"
            seconds[method].append(fit(model, data, epochs=1, refresh=refresh).epochs[0].seconds)
    return {method: statistics.median(times) for method, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, data in ((f"synthetic, {args.samples} samples", synthetic(args.samples)), ("digits", digits())):
        times = measure(data, args.repeats)
        print(f"{name}: dense {times['dense']:.2f}s per epoch")
        for method in ("hard", "ste"):
            ratio = times[method] / times["dense"]
            verdict = "" if name == "digits" else f" (target <= {TARGETS[method]:.2f}x: " \
                f"{'met' if ratio <= TARGETS[method] else 'NOT met'})"
            print(f"  {method}: {times[method]:.2f}s per epoch = {ratio:.2f}x dense{verdict}")


if __name__ == "__main__":
    main()
