"""Choosing a motif bank from the blocks of the tensors it serves.

`sample_motifs` is the paper's choice: motif 0 is the all-zero block when forced, the other motifs are
blocks drawn uniformly without replacement. `kmeans_motifs` refines that draw with Lloyd iterations
(the forced zero motif stays fixed). Assigning blocks to a bank is `momos.search.assign`.

Both read the blocks straight from the tensors, a chunk at a time: memory beyond the bank stays
O(k + chunk), never a copy of all blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from momos.blocks import num_blocks, to_blocks
from momos.errors import MoMosConfigError, MoMosValueError
from momos.search.assign import MotifSearch

__all__ = ["KMEANS_POINTS_PER_MOTIF", "block_chunks", "draw_without_replacement", "gather_blocks", "kmeans_motifs",
           "sample_motifs"]

# Values per chunk of blocks read at once.
_CHUNK = 1 << 18
# k-means runs over at most this many blocks per motif, a uniform sample of a larger bank's blocks.
KMEANS_POINTS_PER_MOTIF = 256


def draw_without_replacement(population: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct integers from ``range(population)``, uniformly, in draw order (int64).

    A full permutation costs 8 bytes per member of the population; when `count` is a small share of it,
    draws with replacement are made instead and only each value's first draw is kept, which is the same
    distribution (sequential sampling without replacement) in O(count) memory.
    """
    if count >= population // 4:
        return torch.randperm(population, generator=generator)[:count]
    kept = torch.empty(0, dtype=torch.int64)
    while kept.numel() < count:
        fresh = torch.randint(population, (2 * (count - kept.numel()) + 16,), generator=generator)
        drawn = torch.cat([kept, fresh])
        values, inverse = torch.unique(drawn, return_inverse=True)
        first = torch.full((values.numel(),), drawn.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(drawn.numel()), "amin")
        kept = drawn[first.sort().values]
    return kept[:count]


def gather_blocks(tensors: Sequence[torch.Tensor], block_size: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the concatenated blocks of `tensors` (as `to_blocks` cuts each), without the concatenation, on
    the CPU whatever the tensors' device."""
    counts = torch.tensor([num_blocks(t.numel(), block_size) for t in tensors])
    starts = torch.cumsum(counts, 0) - counts
    owner = torch.searchsorted(starts, rows, right=True) - 1
    out = torch.zeros(rows.numel(), block_size, dtype=tensors[0].dtype)
    for i, tensor in enumerate(tensors):
        picked = (owner == i).nonzero().squeeze(1)
        if picked.numel():
            local = rows[picked] - starts[i]
            flat = tensor.detach().reshape(-1)
            full = flat.numel() // block_size
            whole = local < full
            out[picked[whole]] = flat[:full * block_size].view(full, block_size)[local[whole]].to(out.device, out.dtype)
            tail = picked[~whole]  # the zero-padded last block
            if tail.numel():
                out[tail, :flat.numel() - full * block_size] = flat[full * block_size:].to(out.device, out.dtype)
    return out


def block_chunks(tensors: Sequence[torch.Tensor], block_size: int) -> Iterator[torch.Tensor]:
    """The blocks of `tensors`, in order, as ``(rows, block_size)`` chunks (views where no padding is needed)."""
    step = max(1, _CHUNK // block_size) * block_size
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), step):
            yield to_blocks(flat[start:start + step], block_size)


def sample_motifs(tensors: Sequence[torch.Tensor], block_size: int, num_motifs: int, *, force_zero: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """A ``(num_motifs, block_size)`` bank on the CPU: zero first when `force_zero`, then blocks drawn without
    replacement from all blocks of `tensors`."""
    m = sum(num_blocks(t.numel(), block_size) for t in tensors)
    drawn = min(num_motifs - 1 if force_zero else num_motifs, m)
    motifs = torch.zeros(num_motifs, block_size, dtype=tensors[0].dtype)
    rows = draw_without_replacement(m, drawn, generator)
    motifs[num_motifs - drawn:] = gather_blocks(tensors, block_size, rows)
    return motifs


def kmeans_motifs(tensors: Sequence[torch.Tensor], block_size: int, motifs: torch.Tensor, *, iterations: int,
                  force_zero: bool, generator: torch.Generator | None = None,
                  points_per_motif: int = KMEANS_POINTS_PER_MOTIF, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd iterations from `motifs`; an emptied cluster keeps its motif, a forced zero motif stays zero. Stops
    early once the motifs stop changing.

    Args:
        tensors: the tensors whose blocks are clustered.
        block_size: s.
        motifs: the ``(k, s)`` start, e.g. `sample_motifs`.
        iterations: the most Lloyd iterations.
        force_zero: keep motif 0 at zero.
        generator: draws the sample below; needed when there are more blocks than ``points_per_motif * k``.
        points_per_motif: where the tensors hold more blocks than this many per motif, the iterations run over
            a uniform sample of that many blocks per motif (drawn without replacement, once), as faiss's k-means
            does: the centroids move as on all blocks up to sampling noise, at a fraction of the searches.
        weights: one finite weight >= 0 per block of the concatenated tensors: a block counts that many times
            in its motif's mean (a cluster of zero weight keeps its motif). None: every block counts once.

    Returns:
        The refined ``(k, s)`` motifs, in the dtype of `motifs`.
    """
    motifs = motifs.clone()
    m = sum(num_blocks(t.numel(), block_size) for t in tensors)
    if weights is not None:
        weights = weights.detach().cpu().to(torch.float64).reshape(-1)
        if weights.numel() != m or not torch.isfinite(weights).all() or bool((weights < 0).any()):
            raise MoMosValueError(f"weights must be {m} finite values >= 0, one per block; got {weights.numel()} "
                                  "values, or a negative or non-finite one")
    sample = points_per_motif * motifs.shape[0]
    if m > sample:
        if generator is None:
            raise MoMosConfigError(f"kmeans_motifs needs a generator to sample {sample} of the {m} blocks")
        rows = draw_without_replacement(m, sample, generator).sort().values
        tensors, m = [gather_blocks(tensors, block_size, rows)], sample
        weights = None if weights is None else weights[rows]
    for _ in range(iterations):
        search = MotifSearch(motifs, num_queries=m)
        counts = torch.zeros(motifs.shape[0], dtype=torch.float64)
        sums = torch.zeros(motifs.shape, dtype=torch.float64)
        seen = 0
        for blocks in block_chunks(tensors, block_size):
            blocks = blocks.cpu()  # the iterations run on the CPU, as the search does, whatever the tensors' device
            labels = search.nearest(blocks)
            if weights is None:
                counts += torch.bincount(labels, minlength=motifs.shape[0])
                sums.index_add_(0, labels, blocks.to(torch.float64))
            else:
                part = weights[seen:seen + blocks.shape[0]]
                counts.index_add_(0, labels, part)
                sums.index_add_(0, labels, blocks.to(torch.float64) * part.unsqueeze(1))
            seen += blocks.shape[0]
        filled = counts > 0
        if force_zero:
            filled[0] = False
        updated = motifs.clone()
        updated[filled] = (sums[filled] / counts[filled].unsqueeze(1)).to(motifs.dtype)
        if torch.equal(updated, motifs):
            break
        motifs = updated
    return motifs
