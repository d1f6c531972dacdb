"""Description lengths of MoMos models and the paper's theory (Prop 3.3 to Cor 3.9) as computations.

Symbols: a bank holds k motifs of s values of q bits each and serves m blocks of n real weights in all;
``b = ceil(log2 k)`` is the width of one mosaic index (0 for k = 1).

- Prop 3.3: a MoMos model is fully described by its banks and mosaics, so its description length is at
  most ``k*s*q + m*b`` per bank plus a header ζ that does not grow with n (`description_length`).
- Cor 3.4: against the dense ``n*q`` the ratio is about ``c + b/(s*q)`` (`approximate_dense_ratio`).
- Lemma 3.5: for a fixed mosaic, ``Z -> Ŵ(Z, M)`` is linear; its matrix is `mosaic_matrix`.
- Prop 3.6: the MoMos weights of one mosaic form a subspace of dimension `subspace_dimension`.
- Prop 3.7 / Def 3.8: two mosaics give the same subspace iff they induce the same partition of the
  blocks (`canonical_mosaic`), so the components are counted by Stirling numbers (`num_components`).
- Cor 3.9: that count at least doubles with each extra block when k >= 2 (exponential growth).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from momos.config import index_bits
from momos.errors import MoMosConfigError, MoMosStateError
from momos.nn.packed import packed_tensors

__all__ = ["BANK_ALIGNMENT_BITS", "BANK_HEADER_FIELDS", "HEADER_FIELD_BITS", "TENSOR_HEADER_FIELDS", "BankDescription",
           "DescriptionLength", "approximate_dense_ratio", "canonical_mosaic", "dense_ratio", "description_bits",
           "description_length", "header_bits", "mosaic_matrix", "num_components", "stirling2", "subspace_dimension"]

# ζ: the decoder reads fixed-width 64-bit header fields (per bank k, s and the motif dtype; per tensor its
# bank, its number of dimensions and each dimension) and each bank's mosaics as one byte-aligned stream
# (up to 8 bits of alignment per bank). It depends on the architecture, never on n.
HEADER_FIELD_BITS = 64
BANK_HEADER_FIELDS = 3
TENSOR_HEADER_FIELDS = 2  # plus one per dimension
BANK_ALIGNMENT_BITS = 8


def description_bits(num_motifs: int, block_size: int, num_blocks: int, motif_bits: int) -> int:
    """``k*s*q + m*ceil(log2 k)``: the bank's table plus its mosaics (Prop 3.3 without the header ζ)."""
    for field, value in (("num_motifs", num_motifs), ("block_size", block_size), ("motif_bits", motif_bits)):
        _check_positive(field, value)
    _check_positive("num_blocks", num_blocks, minimum=0)
    return num_motifs * block_size * motif_bits + num_blocks * index_bits(num_motifs)


def header_bits(num_banks: int, tensor_ndims: list[int]) -> int:
    """ζ for `num_banks` banks serving tensors of the given numbers of dimensions (see HEADER_FIELD_BITS)."""
    fields = BANK_HEADER_FIELDS * num_banks + sum(TENSOR_HEADER_FIELDS + d for d in tensor_ndims)
    return HEADER_FIELD_BITS * fields + BANK_ALIGNMENT_BITS * num_banks


def dense_ratio(num_motifs: int, block_size: int, num_blocks: int, numel: int, motif_bits: int) -> float:
    """The exact ratio ``(k*s*q + m*b) / (n*q)`` of the MoMos description to the dense one."""
    _check_positive("numel", numel)
    return description_bits(num_motifs, block_size, num_blocks, motif_bits) / (numel * motif_bits)


def approximate_dense_ratio(capacity: float, num_motifs: int, block_size: int, motif_bits: int) -> float:
    """Cor 3.4's ``c + ceil(log2 k) / (s*q)``; MoMos is shorter than dense when this is below 1.

    It is `dense_ratio` with k = c*m and n = m*s. With k = floor(c*m) >= 1 and p padded entries it is off
    by less than ``(s + p*(c + b/(s*q))) / n``: the rounding of k and the padding are all that separate them.
    """
    _check_positive("num_motifs", num_motifs)
    return capacity + index_bits(num_motifs) / (block_size * motif_bits)


def mosaic_matrix(mosaic: torch.Tensor, num_motifs: int, block_size: int, numel: int) -> torch.Tensor:
    """The ``(n, k*s)`` 0/1 matrix A with ``vec(Ŵ) = A @ vec(Z)`` for a fixed mosaic (Lemma 3.5).

    `Z` is flattened row-major (motif j's value t at column ``j*s + t``); padded entries have no row.
    """
    positions = torch.arange(numel)
    labels = mosaic.long()[positions // block_size]
    matrix = torch.zeros(numel, num_motifs * block_size, dtype=torch.float64)
    matrix[positions, labels * block_size + positions % block_size] = 1.0
    return matrix


def subspace_dimension(mosaic: torch.Tensor, block_size: int, numel: int, force_zero: bool) -> int:
    """dim V_M (Prop 3.6): the number of distinct (motif, offset) pairs that real entries read.

    That is ``s * (distinct labels in M)`` when n is a multiple of s, less the zero motif's share when it is
    forced to zero (its values are not free), less the offsets of a motif used only in the padded last block.
    """
    positions = torch.arange(numel)
    labels = mosaic.long()[positions // block_size]
    if force_zero:
        positions, labels = positions[labels != 0], labels[labels != 0]
    return int(torch.unique(labels * block_size + positions % block_size).numel())


def canonical_mosaic(mosaic: torch.Tensor, force_zero: bool) -> tuple[int, ...]:
    """The partition of block positions that `mosaic` induces, as labels relabelled by first occurrence.

    Two mosaics span the same subspace exactly when their canonical forms are equal (Prop 3.7 / Def 3.8).
    With a forced zero motif, label 0 is not a free group (its blocks are zero), so it keeps its label.
    """
    relabel: dict[int, int] = {0: 0} if force_zero else {}
    return tuple(relabel.setdefault(label, len(relabel)) for label in mosaic.tolist())


def stirling2(n: int, k: int) -> int:
    """S(n, k): the number of partitions of n labelled items into exactly k non-empty groups."""
    _check_positive("n", n, minimum=0)
    _check_positive("k", k, minimum=0)
    row = [1] + [0] * k  # S(0, j)
    for _ in range(n):
        row = [0] + [j * row[j] + row[j - 1] for j in range(1, k + 1)]
    return row[k]


def num_components(num_blocks: int, num_motifs: int, force_zero: bool) -> int:
    """The number of distinct subspaces V_M over all mosaics of m blocks with k motifs (Prop 3.7).

    Without a forced zero: partitions of the m blocks into at most k groups, ``sum_{j=1..k} S(m, j)``.
    With one: the zero blocks form a distinguished, possibly empty, group and the rest is split among the
    k-1 free motifs; marking the zero group with one extra item gives ``sum_{j=1..k} S(m+1, j)``.
    For k >= 2 each count is between 2 and k times the count for one block fewer (Cor 3.9).
    """
    _check_positive("num_blocks", num_blocks)
    _check_positive("num_motifs", num_motifs)
    items = num_blocks + 1 if force_zero else num_blocks
    return sum(stirling2(items, j) for j in range(1, num_motifs + 1))


@dataclass(frozen=True)
class BankDescription:
    """One bank of a packed model: its table and the mosaics of the tensors it serves (Prop 3.3)."""

    name: str
    tensors: tuple[str, ...]
    num_motifs: int
    block_size: int
    motif_bits: int
    num_blocks: int
    numel: int
    table_bits: int  # k*s*q
    mosaic_bits: int  # m*ceil(log2 k)

    @property
    def bits(self) -> int:
        """The bank's description: table plus mosaics."""
        return self.table_bits + self.mosaic_bits

    @property
    def dense_bits(self) -> int:
        """n*q: the same weights stored densely at the motif precision."""
        return self.numel * self.motif_bits

    @property
    def ratio(self) -> float:
        """`bits` / `dense_bits`."""
        return self.bits / self.dense_bits


@dataclass(frozen=True)
class DescriptionLength:
    """Per-bank description lengths of a packed model, the header ζ and the totals."""

    banks: tuple[BankDescription, ...]
    header_bits: int  # ζ, see HEADER_FIELD_BITS

    @property
    def bits(self) -> int:
        """The Prop 3.3 bound: sum over banks of k*s*q + m*ceil(log2 k), plus ζ."""
        return sum(b.bits for b in self.banks) + self.header_bits

    @property
    def dense_bits(self) -> int:
        """The banks' weights stored densely at their motif precision."""
        return sum(b.dense_bits for b in self.banks)

    @property
    def ratio(self) -> float:
        """`bits` / `dense_bits`."""
        return self.bits / self.dense_bits

    def to_dict(self) -> dict:
        """Plain JSON-serialisable data, with each bank's and the totals' bits, dense bits and ratio."""
        banks = [asdict(b) | {"bits": b.bits, "dense_bits": b.dense_bits, "ratio": b.ratio}
                 for b in self.banks]
        return {"banks": banks, "header_bits": self.header_bits, "bits": self.bits,
                "dense_bits": self.dense_bits, "ratio": self.ratio}


def description_length(packed_model: nn.Module) -> DescriptionLength:
    """The description length of a converted model's MoMos tensors, bank by bank (Prop 3.3).

    Each bank counts ``k*s*q + m*ceil(log2 k)`` with q its motif dtype's bits and m the blocks of all its
    tensors; ζ (`header_bits`) is added once. Tensors not under MoMos are not counted.

    Raises:
        MoMosStateError: `packed_model` has no packed MoMos tensor.
    """
    packed = list(packed_tensors(packed_model))
    if not packed:
        raise MoMosStateError("model has no packed MoMos tensor: call momos.convert(model) first")
    groups: dict[int, list] = {}
    for name, tensor in packed:
        groups.setdefault(id(tensor.table), []).append((name, tensor))
    banks = []
    for members in groups.values():
        table = members[0][1].table
        k, s, q = table.num_motifs, table.block_size, table.config.motif_bits
        m = sum(t.num_blocks for _, t in members)
        banks.append(BankDescription(table.name, tuple(n for n, _ in members), k, s, q, m,
                                     sum(t.numel for _, t in members), k * s * q, m * index_bits(k)))
    zeta = header_bits(len(banks), [len(t.shape) for _, t in packed])
    return DescriptionLength(tuple(banks), zeta)


def _check_positive(field: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoMosConfigError(f"{field} must be an integer >= {minimum}, got {value!r}")
