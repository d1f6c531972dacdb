"""Exact nearest-motif search: the index of the closest motif (squared Euclidean) for every block.

Ties go to the lowest motif index, as in ``argmin``.
"""

from __future__ import annotations

import torch

# Rows of blocks per chunk: bounds the (chunk x k) distance matrix.
_CHUNK_ELEMENTS = 1 << 24


def nearest_torch(blocks: torch.Tensor, motifs: torch.Tensor) -> torch.Tensor:
    """Chunked brute force: ``cdist(blocks, motifs).argmin(1)`` without materialising the m x k matrix.

    Distances are computed exactly as ``sum((x - z)^2)`` through the expansion in float64, which keeps
    the result exact for float32 inputs up to ties.
    """
    m, k = blocks.shape[0], motifs.shape[0]
    out = torch.empty(m, dtype=torch.int64)
    if m == 0:
        return out
    z = motifs.detach().to(torch.float64)
    z_sq = (z * z).sum(1)
    chunk = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, m, chunk):
        x = blocks[start:start + chunk].detach().to(torch.float64)
        d = torch.addmm(z_sq.unsqueeze(0), x, z.T, alpha=-2.0)  # |z|^2 - 2 x.z  (|x|^2 is constant per row)
        out[start:start + chunk] = d.argmin(1)
    return out


def nearest(blocks: torch.Tensor, motifs: torch.Tensor) -> torch.Tensor:
    """Index (int64, shape ``(m,)``) of the nearest motif for each row of `blocks` ``(m, s)``."""
    return nearest_torch(blocks, motifs)
