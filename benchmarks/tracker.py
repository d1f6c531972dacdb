"""The STE tracker alone: its restart and its steps replayed against a full exact assignment of each step.

    .venv/bin/python benchmarks/tracker.py [--batch-size 512] [--steps 97] [--repeats 5] [--threads 1] \
        [--device cpu]

Trains the benchmark's MLP (64 -> 256 x4 -> 10, s=4, c=0.05, STE, AdamW with a cosine schedule over a
50k-sample epoch, as `benchmarks/training_overhead.py`) for `--steps` steps and records every targeted
tensor's latent weights before each step. Then replays them through fresh trackers (`MosaicTracker`, as
each STE forward calls it: a restart on the bank, then one call per step and tensor) and through
``assign.nearest`` (what a forward without a tracker computes), checks that both give the same mosaic at
every step, and prints the fastest of `--repeats` replays of each. Without training around it, a replay is
the same work each time: the steadiest measure of the tracker on this noisy machine, where whole training
epochs drift by 20-50% over minutes. `--device` replays on another device (`cuda`: the tracker's torch version,
timed to a synchronize); the recording trains on the CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from training_overhead import synchronize  # a sibling script: benchmarks/ is on sys.path when run

import momos
from momos.apps.models import mlp
from momos.apps.train import make_optimizer, train_step
from momos.blocks import to_blocks
from momos.nn.parametrize import MotifBank, momos_of
from momos.search import assign
from momos.search.incremental import MosaicTracker

BLOCK_SIZE = 4
SAMPLES = 50_000


def record(batch_size: int, steps: int) -> tuple[torch.Tensor, list[torch.Tensor], list[list[torch.Tensor]]]:
    """(the bank, the refresh's mosaic of each tensor, each step's latent weights of each tensor)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 64, generator=g)
    y = (x[:, :10].argmax(1) + (x[:, 10] > 1).long()) % 10
    torch.manual_seed(0)
    model = momos.prepare(mlp((64,), 10), momos.MoMosConfig.paper(block_size=BLOCK_SIZE, capacity=0.05, mode="ste"))
    momos.refresh(model)
    members = [(module, name) for module in model.modules() if hasattr(module, "parametrizations")
               for name in module.parametrizations]
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=SAMPLES // batch_size)
    loss = torch.nn.CrossEntropyLoss()
    order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(1))
    weights = []
    for step in range(steps):
        weights.append([module.parametrizations[name].original.detach().clone() for module, name in members])
        batch = order[step * batch_size:(step + 1) * batch_size]
        train_step(model, optimizer, scheduler, loss, x[batch], y[batch])
    bank = next(m for m in model.modules() if isinstance(m, MotifBank)).motifs.clone()
    return bank, [momos_of(module, name).mosaic.clone() for module, name in members], weights


def replay(bank: torch.Tensor, guesses: list[torch.Tensor], weights: list[list[torch.Tensor]],
           tracked: bool) -> tuple[float, float, list[list[torch.Tensor]], int, int]:
    """(first call's seconds, seconds a step after it, the mosaics, blocks rechecked and searched a step). The
    bank is a fresh copy: its search index (`incremental.motif_index`) is built anew, as after a refresh."""
    bank = bank.clone()
    trackers = [MosaicTracker() for _ in guesses]
    mosaics, rechecked, searched = [], 0, 0
    synchronize(bank.device)
    start = time.perf_counter()
    for t, step in enumerate(weights):
        if t == 1:
            synchronize(bank.device)
            first = time.perf_counter() - start
            start = time.perf_counter()
        row = []
        for tracker, guess, weight in zip(trackers, guesses, step, strict=True):
            blocks = to_blocks(weight, BLOCK_SIZE)
            row.append(tracker.mosaic(blocks, bank, guess).clone() if tracked else assign.nearest(blocks, bank))
            if tracked and t:
                rechecked, searched = rechecked + tracker.rechecked, searched + tracker.searched
        mosaics.append(row)
    synchronize(bank.device)
    steps = len(weights) - 1
    return first, (time.perf_counter() - start) / steps, mosaics, rechecked // steps, searched // steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=97, help="recorded steps (97: an epoch at batch 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the replays run (cpu, cuda)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bank, guesses, weights = record(args.batch_size, args.steps)
    bank, guesses = bank.to(device), [g.to(device) for g in guesses]
    weights = [[w.to(device) for w in step] for step in weights]
    blocks = sum(g.numel() for g in guesses)
    print(f"MLP 64-256x4-10, s={BLOCK_SIZE}, c=0.05: {bank.shape[0]:,} motifs, {blocks:,} blocks in "
          f"{len(guesses)} tensors; {args.steps} steps at batch {args.batch_size}, {args.threads} thread(s), "
          f"on {device}")
    replay(bank, guesses, weights[:2], True)  # numba's compiled loops load once per process
    best: dict[bool, tuple] = {}
    for _ in range(args.repeats):
        for tracked in (True, False):
            result = replay(bank, guesses, weights, tracked)
            if tracked not in best or result[1] < best[tracked][1]:
                best[tracked] = result
    for tracked_row, full_row in zip(best[True][2], best[False][2], strict=True):
        for got, want in zip(tracked_row, full_row, strict=True):
            assert torch.equal(got, want), "the tracker's mosaic differs from the full assignment"
    first, step, _, rechecked, searched = best[True]
    full_first, full_step = best[False][0], best[False][1]
    print(f"tracker: restart {first * 1e3:.1f} ms, a step {step * 1e3:.2f} ms ({rechecked:,} blocks past their "
          f"slack, {searched:,} searched again)")
    print(f"full assignment (assign.nearest): first step {full_first * 1e3:.1f} ms, a step {full_step * 1e3:.2f} ms")
    print(f"a step: {full_step / step:.1f}x faster tracked; equal mosaics at all {len(weights)} steps")
    steps = SAMPLES // args.batch_size
    print(f"an epoch of {steps} steps: tracked {first + step * (steps - 1):.2f} s, "
          f"full {full_first + full_step * (steps - 1):.2f} s")


if __name__ == "__main__":
    main()
