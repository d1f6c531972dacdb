"""Training time per epoch of a prepared model against the same model dense, measured in one run.

    .venv/bin/python benchmarks/training_overhead.py [--samples 50000] [--repeats 4] [--batch-sizes 64,512] \
        [--threads 1]

MLP (64 -> 256 x4 -> 10, AdamW), s=4, c=0.05, at each batch size (STE's assignment costs the same per
step whatever the batch, so its ratio to dense falls as the batch grows). Synthetic data with `--samples` samples per
epoch (the issue's targets: hard with a refresh per epoch <= 1.10x, ste <= 2x), then digits (an epoch
of 23 steps, where one refresh dominates: reported, not judged). Each method is interleaved with its own
dense runs (ABBA), a ratio is taken within each pair of adjacent runs, and the median ratio is reported
with the range, so a busy machine slows both sides of a ratio alike. `--threads` sets torch's thread count,
which dense training and MoMos's compiled loops both use (one by default: the steadiest figures).
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


def epoch_seconds(initial: torch.nn.Module, data: Dataset, method: str, batch_size: int) -> tuple[float, float]:
    """Seconds of one training epoch of `initial` trained dense or prepared in `method`, and of those the
    seconds of its refresh (an STE epoch also pays, in its first forward, the tracker's restart on the bank
    drawn before it, as every STE epoch after a refresh does)."""
    if method == "dense":
        model, refresh = mlp(data.input_shape, data.num_classes), None
        model.load_state_dict(initial.state_dict())
    else:
        model = momos.prepare(initial, momos.MoMosConfig(block_size=4, capacity=0.05, mode=method))
        momos.refresh(model)  # STE needs a bank to train against; hard starts from a mosaic too
        refresh = "epoch"
    epoch = fit(model, data, epochs=1, refresh=refresh, batch_size=batch_size).epochs[0]
    return epoch.seconds, epoch.refresh_seconds


def measure(data: Dataset, repeats: int, batch_size: int) -> dict[str, list[tuple[float, float, float]]]:
    """Per method: (epoch seconds, its refresh seconds, seconds of the dense epoch run next to it) per repeat.

    Each method is paired with its own dense runs in ABBA order and each ratio is taken within a pair of
    adjacent runs, so drifts of a shared machine's speed hit both sides of a ratio alike.
    """
    torch.manual_seed(0)
    initial = mlp(data.input_shape, data.num_classes)
    out = {}
    for method in ("hard", "ste"):
        pairs = []
        for i in range(repeats):
            runs = {m: epoch_seconds(initial, data, m, batch_size)
                    for m in (("dense", method) if i % 2 == 0 else (method, "dense"))}
            pairs.append((*runs[method], runs["dense"][0]))
        out[method] = pairs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch-sizes", default="64,512", help="comma-separated; STE's cost is per step")
    parser.add_argument("--threads", type=int, default=1, help="torch's (and so MoMos's) thread count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for batch_size in map(int, args.batch_sizes.split(",")):
        for name, data in ((f"synthetic, {args.samples} samples", synthetic(args.samples)), ("digits", digits())):
            print(f"{name}, batch {batch_size}:")
            for method, pairs in measure(data, args.repeats, batch_size).items():
                ratios = sorted(seconds / dense for seconds, _, dense in pairs)
                ratio = statistics.median(ratios)
                seconds = statistics.median(p[0] for p in pairs)
                share = statistics.median(p[1] / p[0] for p in pairs)
                dense = statistics.median(p[2] for p in pairs)
                verdict = "" if name == "digits" else f" (target <= {TARGETS[method]:.2f}x: " \
                    f"{'met' if ratio <= TARGETS[method] else 'NOT met'})"
                print(f"  {method}: {seconds:.2f}s per epoch ({share:.0%} refreshing) vs dense {dense:.2f}s: "
                      f"{ratio:.2f}x, pairs {ratios[0]:.2f}-{ratios[-1]:.2f}x{verdict}")


if __name__ == "__main__":
    main()
