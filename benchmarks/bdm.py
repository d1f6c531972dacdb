"""pybdm against momos.complexity's vectorised BDM: times and speed-up on 1M and 10M bits and a ~25M model.

    .venv/bin/python benchmarks/bdm.py [--pybdm-limit BITS]

pybdm is measured on the whole input up to --pybdm-limit bits (default 2M). Beyond that it is measured on a
prefix of that many bits and its time is extrapolated linearly in the number of 12-bit blocks (pybdm does
constant work per block: slice, string key, dict lookup, Counter update); such rows say "extrapolated".
The values agree to 1e-9 relative wherever pybdm ran on the whole input.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch import nn

from momos import complexity
from momos.complexity.bdm import ctm_table
from momos.complexity.payload import sign_bits


def timed(fn):  # noqa: ANN001, ANN201 - a tiny timing helper for this script only
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def compare(label: str, bits: np.ndarray, limit: int, fast_seconds: float | None = None) -> None:
    import pybdm

    oracle = pybdm.BDM(ndim=1)
    fast, fast_time = timed(lambda: complexity.bdm(bits))
    if fast_seconds is not None:
        fast_time = fast_seconds
    prefix = bits[:limit].astype(np.int64)
    ref, ref_time = timed(lambda: oracle.bdm(prefix))
    if len(bits) <= limit:
        assert abs(ref - fast) <= 1e-9 * abs(ref), (ref, fast)
        how = "measured"
    else:
        prefix_fast = complexity.bdm(prefix)
        assert abs(ref - prefix_fast) <= 1e-9 * abs(ref), (ref, prefix_fast)
        ref_time *= (len(bits) // 12) / (len(prefix) // 12)
        how = f"extrapolated from {len(prefix):,} bits"
    print(f"{label:<28} {len(bits):>12,}  pybdm {ref_time:9.2f} s ({how})  fast {fast_time:7.3f} s  "
          f"speed-up {ref_time / fast_time:8.0f}x")


def model_25m() -> nn.Module:
    """A ~25M-parameter MLP (4096-wide) at its random initialization."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pybdm-limit", type=int, default=2_000_000, help="most bits pybdm measures whole")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="pkg_resources")
    torch.set_num_threads(1)
    ctm_table(1, 2)  # both sides load their table once, outside the timings
    import pybdm

    pybdm.BDM(ndim=1)
    rng = np.random.default_rng(0)
    for n in (1_000_000, 10_000_000):
        compare("random bits", rng.integers(0, 2, n, dtype=np.uint8), args.pybdm_limit)
    model = model_25m()
    numel = sum(p.numel() for p in model.parameters())
    bits, read_time = timed(lambda: sign_bits(model))
    _, fast_time = timed(lambda: complexity.bdm(model))
    print(f"(model: {numel:,} parameters; reading + binarizing them takes {read_time:.2f} s of the fast time)")
    compare("25M MLP, paper protocol", bits, args.pybdm_limit, fast_seconds=fast_time)


if __name__ == "__main__":
    main()
