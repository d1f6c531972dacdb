"""Tensor <-> blocks: cut a flattened tensor into rows of `block_size` values and put it back together.

The last block is zero-padded; reconstruction drops the padding again, so padding never reaches a real
entry. Blocks never cross tensor boundaries: each tensor is cut on its own.
"""

from __future__ import annotations

import math

import torch

__all__ = ["from_blocks", "num_blocks", "reconstruct", "to_blocks"]


def num_blocks(numel: int, block_size: int) -> int:
    """The number of blocks of a tensor of `numel` values: m = ceil(n / s)."""
    return math.ceil(numel / block_size)


def to_blocks(tensor: torch.Tensor, block_size: int) -> torch.Tensor:
    """The ``(m, block_size)`` view of `tensor` flattened, zero-padded at the end (a copy only when padding)."""
    flat = tensor.detach().reshape(-1)
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def from_blocks(blocks: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_blocks`: drop the padding and reshape to `shape`."""
    numel = math.prod(shape)
    return blocks.reshape(-1)[:numel].view(shape)


# A motif of 8 or 16 bytes (s=2 or 4 in float32) is gathered as one element of that width: a CPU
# A row of s values viewed as one wide element, so that index_select copies one element per block.
_ROW_AS_ONE = {8: torch.int64, 16: torch.complex128}


def reconstruct(motifs: torch.Tensor, mosaic: torch.Tensor, shape: torch.Size | tuple[int, ...],
                dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ: block i is ``motifs[mosaic[i]]``, reshaped to `shape` (and cast to `dtype` if given).

    Args:
        motifs: the ``(k, s)`` bank.
        mosaic: ``(m,)`` motif indices, any integer dtype.
        shape: the tensor's shape; the padding of the last block is dropped.
        dtype: the result's dtype (default the bank's).
        out: a tensor of that shape and dtype to write into.

    Returns:
        `out` if given, else a new tensor.
    """
    table = motifs if dtype is None else motifs.to(dtype)
    index = mosaic.long()
    if out is None:
        return from_blocks(_gather(table, index), shape)
    if not out.is_contiguous():
        return out.copy_(from_blocks(_gather(table, index), shape))
    flat, s = out.view(-1), table.shape[1]
    full = flat.numel() // s  # the blocks that lie whole in `out`; the last may be cut by the padding
    if full * s == flat.numel():  # no padding: no slicing either (a tensor's STE forward, every step)
        _gather(table, index, flat.view(full, s))
        return out
    _gather(table, index[:full], flat[:full * s].view(full, s))
    flat[full * s:] = table[index[full], :flat.numel() - full * s]
    return out


def _gather(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``table[index]`` (into `out`, a contiguous ``(len(index), s)`` tensor, if given)."""
    size = table.shape[1] * table.element_size()
    row = _ROW_AS_ONE.get(size)
    if row is not None and table.is_contiguous() and not table.requires_grad \
            and (out is None or out.storage_offset() * out.element_size() % size == 0):
        rows = torch.index_select(table.view(row).view(-1), 0, index,
                                  out=None if out is None else out.view(row).view(-1))
        return rows.view(table.dtype) if out is None else out
    return torch.index_select(table, 0, index, out=out)
