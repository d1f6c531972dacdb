"""Choosing a motif bank from blocks, and assigning blocks to it.

`sample_motifs` is the paper's choice: motif 0 is the all-zero block when forced, the other motifs are
blocks drawn uniformly without replacement. `kmeans_motifs` refines that draw with Lloyd iterations
(the forced zero motif stays fixed). Assigning blocks to a bank is `momos.assign.nearest`.
"""

from __future__ import annotations

import torch

from momos.assign import nearest


def sample_motifs(blocks: torch.Tensor, num_motifs: int, *, force_zero: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """A ``(num_motifs, s)`` bank: zero first when `force_zero`, then blocks drawn without replacement."""
    m, s = blocks.shape
    drawn = num_motifs - 1 if force_zero else num_motifs
    drawn = min(drawn, m)
    rows = torch.randperm(m, generator=generator)[:drawn]
    motifs = blocks.new_zeros(num_motifs, s)
    motifs[num_motifs - drawn:] = blocks[rows]
    return motifs


def kmeans_motifs(blocks: torch.Tensor, motifs: torch.Tensor, *, iterations: int,
                  force_zero: bool) -> torch.Tensor:
    """Lloyd iterations from `motifs`; an emptied cluster keeps its motif, a forced zero motif stays zero."""
    motifs = motifs.clone()
    data = blocks.to(torch.float64)
    for _ in range(iterations):
        labels = nearest(blocks, motifs)
        counts = torch.bincount(labels, minlength=motifs.shape[0]).to(torch.float64)
        sums = torch.zeros(motifs.shape, dtype=torch.float64).index_add_(0, labels, data)
        filled = counts > 0
        if force_zero:
            filled[0] = False
        updated = motifs.clone()
        updated[filled] = (sums[filled] / counts[filled].unsqueeze(1)).to(motifs.dtype)
        if torch.equal(updated, motifs):
            break
        motifs = updated
    return motifs

