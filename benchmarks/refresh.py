"""How fast and how lean is one `momos.refresh`?

1. The paper's MLP 3072-256-256-256-256-10 (about 0.99M parameters), global random bank, at several
   (block size, capacity): a whole refresh against a plain chunked exact assignment in torch
   (``torch.cdist(...).argmin``) of the same blocks to the same bank, timed in the same run; the two
   assignments must agree except at ties (checked in float64).
2. Growth with model size (wider MLPs of about 1M, 5M and 25M parameters, s=4, c=0.05): refresh time and
   peak extra memory, each size in a fresh subprocess, against the bytes of the targeted tensors plus the
   bank. Peak memory is the process's VmHWM after resetting it (``/proc/self/clear_refs``) just before
   the refresh, minus the resident size at that moment.

Run: ``python benchmarks/refresh.py`` (a few minutes on 2 cores) or ``--quick`` (s=4, c=0.05 and 1M, 5M);
``--threads 1`` measures both sides on one thread (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

import momos
from momos.apps.models import mlp
from momos.blocks import to_blocks
from momos.nn.parametrize import prepared_tensors

SETTINGS = ((4, 0.05), (4, 0.01), (2, 0.05), (8, 0.1))
SIZES = (1_000_000, 5_000_000, 25_000_000)
INPUT, CLASSES, DEPTH = 3072, 10, 4
# Rows x motifs per cdist call of the baseline.
BASELINE_CHUNK_ELEMENTS = 1 << 24


def hidden_for(params: int) -> int:
    """Width h of the MLP 3072-h-h-h-h-10 with about `params` parameters (3h^2 + 3086h + 10 = params)."""
    a, b = DEPTH - 1, INPUT + DEPTH + CLASSES
    return max(1, round((-b + math.sqrt(b * b + 4 * a * (params - CLASSES))) / (2 * a)))


def baseline_assign(blocks: torch.Tensor, motifs: torch.Tensor) -> torch.Tensor:
    """The plain exact assignment: chunked ``cdist(blocks, motifs).argmin(1)``."""
    chunk = max(1, BASELINE_CHUNK_ELEMENTS // motifs.shape[0])
    return torch.cat([torch.cdist(blocks[i:i + chunk], motifs).argmin(1) for i in range(0, len(blocks), chunk)])


def disagreements(blocks: torch.Tensor, motifs: torch.Tensor, ours: torch.Tensor,
                  theirs: torch.Tensor) -> tuple[int, int]:
    """(rows whose picks differ, of those the rows whose two picks are not at equal float64 distance)."""
    rows = (ours != theirs).nonzero().squeeze(1)
    x, z = blocks[rows].double(), motifs.double()
    d_ours = ((x - z[ours[rows]]) ** 2).sum(1)
    d_theirs = ((x - z[theirs[rows]]) ** 2).sum(1)
    return rows.numel(), int((d_ours != d_theirs).sum())


def compare(block_size: int, capacity: float) -> None:
    torch.manual_seed(0)
    model = momos.prepare(mlp((INPUT,), CLASSES), momos.MoMosConfig.paper(block_size=block_size, capacity=capacity),
                          inplace=True)
    blocks = torch.cat([to_blocks(w, block_size) for _, _, w in prepared_tensors(model)]).clone()
    start = time.perf_counter()
    stats = momos.refresh(model)
    ours_s = time.perf_counter() - start
    prepared = list(prepared_tensors(model))
    bank = prepared[0][1].bank.motifs
    mosaics = torch.cat([param.mosaic for _, param, _ in prepared])
    start = time.perf_counter()
    theirs = baseline_assign(blocks, bank)
    base_s = time.perf_counter() - start
    differ, unequal = disagreements(blocks, bank, mosaics, theirs)
    params = sum(p.numel() for p in model.parameters())
    print(f"s={block_size} c={capacity:<5} params={params:,} m={stats.num_blocks:,} k={bank.shape[0]:,}: "
          f"refresh {ours_s:.3f} s, cdist baseline {base_s:.2f} s, ratio {base_s / ours_s:.1f}x; "
          f"assignments differ on {differ} rows ({differ - unequal} ties, {unequal} at unequal float64 distance: "
          f"float32 cdist near-ties)", flush=True)


def warm_up() -> None:
    """Two refreshes of a small MLP: the engines' imports, compiled code and thread pools load outside the
    measurements."""
    warm = momos.prepare(mlp((64,), 10, hidden=64), momos.MoMosConfig.paper(block_size=4, capacity=0.05), inplace=True)
    momos.refresh(warm)
    momos.refresh(warm)


def child(params: int) -> None:
    """One refresh of an MLP of about `params` parameters in this fresh process; prints a JSON line."""
    warm_up()
    torch.manual_seed(0)
    config = momos.MoMosConfig.paper(block_size=4, capacity=0.05)
    model = momos.prepare(mlp((INPUT,), CLASSES, hidden=hidden_for(params)), config, inplace=True)
    targeted = sum(w.numel() * w.element_size() for _, _, w in prepared_tensors(model))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    stats = momos.refresh(model)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    k = next(iter(stats.banks.values())).num_motifs
    bank = k * config.block_size * 4
    print(json.dumps(dict(params=sum(p.numel() for p in model.parameters()), m=stats.num_blocks, k=k,
                          seconds=seconds, extra=(peak - before) * 1024, targeted=targeted, bank=bank)))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def growth(sizes: tuple[int, ...]) -> None:
    rows = []
    for params in sizes:
        command = [sys.executable, __file__, "--child", str(params), "--threads", str(torch.get_num_threads())]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        budget = row["targeted"] + row["bank"]
        print(f"{row['params'] / 1e6:6.2f}M params, m={row['m']:,}, k={row['k']:,}: refresh {row['seconds']:.2f} s "
              f"({row['seconds'] / row['params'] * 1e9:.0f} ns/param); peak extra memory "
              f"{row['extra'] / 2**20:.1f} MiB = {row['extra'] / budget:.2f}x the targeted tensors + bank "
              f"({budget / 2**20:.1f} MiB)", flush=True)
    first, last = rows[0], rows[-1]
    size_ratio, time_ratio = last["params"] / first["params"], last["seconds"] / first["seconds"]
    print(f"growth {first['params'] / 1e6:.2f}M -> {last['params'] / 1e6:.2f}M params: {size_ratio:.1f}x params, "
          f"{time_ratio:.1f}x time (exponent {math.log(time_ratio) / math.log(size_ratio):.2f}; 1 = linear)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="s=4, c=0.05 only, and sizes 1M and 5M")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both sides (default: torch's)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child)
        return
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load}")
    warm_up()
    for block_size, capacity in SETTINGS[:1] if args.quick else SETTINGS:
        compare(block_size, capacity)
    growth(SIZES[:2] if args.quick else SIZES)


if __name__ == "__main__":
    main()
