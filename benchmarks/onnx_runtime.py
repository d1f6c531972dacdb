"""ONNX export and momos.runtime against a dense float32 ONNX baseline measured in the same run.

    .venv/bin/python benchmarks/onnx_runtime.py [--runs 50]

For the digits MLP (64 -> 256 x4 -> 10) and a ~10M-parameter MLP, both at s=4, c=0.05 with one global
bank (weights as initialised: sizes and speed do not depend on training), prints:

- file bytes of the dense and the momos ONNX, their ratio, and the goal c + ceil(log2 k)/(s*32);
- median latency at batch 1 and 32 of dense, momos "folded" and momos "compact" (packed and native
  mosaic layouts, each with the "gather" and the "planes" motif lookup), as ratios to dense; every
  session is loaded in one process and the runs are interleaved in random order, so machine noise and
  cold caches hit all alike;
- resident memory each session adds to a fresh process (RSS after load and one run, minus RSS before);
- what a plain numpy lookup of every motif row (``np.take(motifs, indices, axis=0)``) costs: the floor
  of any gather decode on this machine.

The sessions run in subprocesses that import only numpy, onnxruntime and momos.runtime, so resident
memory is comparable and torch's own footprint stays out of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

BATCHES = (1, 32)
MIN_SECONDS = 4.0  # of interleaved rounds per batch size: batch-1 runs of ~30 us need thousands for a stable median


Row = tuple[str, str, str]  # (label, weights policy or "dense", ONNX path)


def _open(path: str, weights: str) -> Callable[[np.ndarray], object]:
    """A callable running one session on an input batch."""
    import onnxruntime as ort

    from momos import runtime

    if weights == "dense":
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        # Output names given, as momos.runtime does: run(None, ...) costs ~0.4 us more at batch 1 (~1%).
        return lambda x: session.run(["output"], {"input": x})
    momos_session = runtime.load(path, weights)
    return lambda x: momos_session.run({"input": x})


def rss_worker(path: str, weights: str, width: int) -> dict[str, float]:
    """Resident memory one session adds to this (fresh) process: RSS after load and one run, minus before."""
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    run = _open(path, weights)
    run(np.zeros((1, width), np.float32))
    return {"rss_mib": (process.memory_info().rss - before) / 2**20}


def latency_worker(rows: list[Row], width: int, runs: int) -> dict[str, dict[str, float]]:
    """Median latency (ms) per row and batch size, the rows' runs interleaved in one process.

    Each round runs every session once in a fresh random order: a session that runs right after a compact
    one finds the caches cold, and a fixed or alternating order hands that to the same sessions every
    time (it made folded look 1.11x dense on the digits MLP at batch 1, against 1.00 in pairs). Rounds go
    on until there are `runs` of them and MIN_SECONDS have passed: small models get thousands.
    """
    sessions = [(label, _open(path, weights)) for label, weights, path in rows]
    figures: dict[str, dict[str, float]] = {label: {} for label, _ in sessions}
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        x = rng.standard_normal((batch, width)).astype(np.float32)
        times: dict[str, list[float]] = {label: [] for label, _ in sessions}
        for _, run in sessions:
            for _ in range(3):
                run(x)
        begin = time.perf_counter()
        while len(times[sessions[0][0]]) < runs or time.perf_counter() - begin < MIN_SECONDS:
            for i in rng.permutation(len(sessions)):
                label, run = sessions[i]
                start = time.perf_counter()
                run(x)
                times[label].append(time.perf_counter() - start)
        for label, samples in times.items():
            figures[label][f"ms_b{batch}"] = 1e3 * float(np.median(samples))
    return figures


def _subprocess(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def numpy_take_ms(motifs: np.ndarray, indices: np.ndarray, runs: int) -> float:
    """Median ms of ``np.take(motifs, indices, axis=0)``: every motif row of the model, looked up by numpy."""
    times = []
    for _ in range(max(5, runs // 5)):
        start = time.perf_counter()
        np.take(motifs, indices, axis=0)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def bench(name: str, width: int, hidden: int, classes: int, runs: int, workdir: str) -> None:
    import onnx
    import torch

    import momos
    from momos.apps.models import mlp
    from momos.config import index_bits
    from momos.nn.packed import packed_tensors

    torch.manual_seed(0)
    model = mlp((width,), classes, hidden=hidden).eval()
    params = sum(p.numel() for p in model.parameters())
    config = momos.MoMosConfig.paper(block_size=4, capacity=0.05)
    prepared = momos.prepare(model, config)
    momos.refresh(prepared)
    packed = momos.convert(prepared).eval()
    k = next(p.table.num_motifs for _, p in packed_tensors(packed))
    bits = index_bits(k)
    x = torch.randn(2, width)

    dense_path = os.path.join(workdir, f"{name}-dense.onnx")
    program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["output"],
                                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
    proto = program.model_proto
    proto.ir_version = 10  # onnx writes a newer IR than onnxruntime reads
    onnx.save(proto, dense_path)
    paths = {"dense": dense_path}
    for layout in ("packed", "native"):
        for lookup in ("gather", "planes"):
            key = layout if lookup == "gather" else f"{layout} planes"
            paths[key] = os.path.join(workdir, f"{name}-{layout}-{lookup}.onnx")
            momos.export.to_onnx(packed, x, paths[key], mosaic_layout=layout, motif_lookup=lookup)

    dense_bytes = os.path.getsize(dense_path)
    goal = config.capacity + bits / (config.block_size * 32)
    print(f"\n== {name}: {params:,} parameters, s={config.block_size}, c={config.capacity}, k={k}, "
          f"ceil(log2 k)={bits}")
    print(f"file bytes: dense {dense_bytes:,}")
    for layout in ("packed", "native"):
        size = os.path.getsize(paths[layout])
        ratio = size / dense_bytes
        print(f"file bytes: momos {layout:6s} {size:,}  ratio {ratio:.4f}  goal c+bits/(s*32) = {goal:.4f}  "
              f"off by {100 * (ratio - goal) / goal:+.1f}%")

    rows: list[Row] = [("dense", "dense", paths["dense"]), ("folded", "folded", paths["packed"]),
                       ("compact packed", "compact", paths["packed"]),
                       ("compact native", "compact", paths["native"]),
                       ("compact packed planes", "compact", paths["packed planes"]),
                       ("compact native planes", "compact", paths["native planes"])]
    results = _subprocess("--latency", json.dumps(rows), str(width), str(runs))
    for label, weights, path in rows:
        results[label].update(_subprocess("--rss", path, weights, str(width)))
    base = results["dense"]
    print(f"{'session':22s} {'ms b=1':>8s} {'x dense':>8s} {'ms b=32':>8s} {'x dense':>8s} {'RSS MiB':>8s} "
          f"{'x dense':>8s}")
    for label, _, _ in rows:
        r = results[label]
        print(f"{label:22s} {r['ms_b1']:8.3f} {r['ms_b1'] / base['ms_b1']:8.2f} {r['ms_b32']:8.3f} "
              f"{r['ms_b32'] / base['ms_b32']:8.2f} {r['rss_mib']:8.1f} "
              f"{r['rss_mib'] / base['rss_mib']:8.2f}")
    tables = {id(p.table): p.table.motifs.detach().float().numpy() for _, p in packed_tensors(packed)}
    (motifs,) = tables.values()
    indices = np.concatenate([p.mosaic.detach().numpy().astype(np.int32) for _, p in packed_tensors(packed)])
    take = numpy_take_ms(motifs, indices, runs)
    print(f"numpy np.take of all {indices.size:,} motif rows: {take:.3f} ms = {take / base['ms_b1']:.2f}x dense b=1, "
          f"{take / base['ms_b32']:.2f}x dense b=32 (the floor of a gather decode here)")
    print("goals: folded/dense latency <= 1.05; compact/dense latency <= 5")
    print(f"dense float32 weights: {params * 4 / 2**20:.1f} MiB; compressed payload: "
          f"{(k * config.block_size * 4 + math.ceil(params / 4) * bits / 8) / 2**20:.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50,
                        help=f"least timed runs per batch size (more until {MIN_SECONDS:g} s have passed; median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        bench("digits MLP", 64, 256, 10, args.runs, workdir)
        bench("10M MLP", 1024, 1664, 10, args.runs, workdir)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss":
        print(json.dumps(rss_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--latency":
        print(json.dumps(latency_worker([tuple(r) for r in json.loads(sys.argv[2])], int(sys.argv[3]),
                                        int(sys.argv[4]))))
    else:
        main()
