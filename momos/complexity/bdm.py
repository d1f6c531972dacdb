"""Block decomposition method (BDM), equal to pybdm's value and vectorised for whole models.

BDM as pybdm 0.1.0 defines it with ``PartitionIgnore``: cut the data into non-overlapping blocks of 12
symbols (1-D) or 4x4 symbols (2-D), drop the leftover, and sum over the *distinct* blocks
``CTM(block) + log2(count of that block)``. CTM values come from pybdm's own tables (loaded once per
table); a block is looked up under its normalized key (symbols relabelled in order of first occurrence,
so ``111...1`` reads as ``000...0``), and a block missing from the table counts as the table's maximum
plus one, as in pybdm. Here each block is packed into one integer, the distinct blocks are counted with
``bincount`` (or ``unique`` for large alphabets), and only the distinct blocks are looked up.

Saturation. For 1-D binary data there are only 4096 distinct 12-bit blocks. Sign data of a model that is
not degenerate shows every one of them after a few hundred thousand weights; from then on the CTM half of
BDM is the same constant for every model and only ``sum(log2 count)`` over a full histogram varies, so the
ratio of two models of the same size tends to 1 (a pretrained transformer against its initialization:
docs/benchmarks.md, BDM). `BlockCounts.saturated` says when this happens; per-tensor BDM, block entropy and the
compressor proxies (`momos.complexity.compressed_bits`) keep resolving differences there.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from momos.complexity.payload import model_symbols, to_symbols, trainable_tensors
from momos.errors import MoMosConfigError, MoMosDependencyError, MoMosValueError

__all__ = ["BLOCK_SHAPES", "CTM_DATASETS", "PARTITIONS", "BlockCounts", "CTMTable", "bdm", "block_counts",
           "block_entropy", "count_blocks", "ctm_table", "per_tensor_bdm", "ratio"]

# (ndim, symbols) -> pybdm's CTM dataset; the block shape is in the name.
CTM_DATASETS = {
    (1, 2): "CTM-B2-D12",
    (1, 4): "CTM-B4-D12",
    (1, 5): "CTM-B5-D12",
    (1, 6): "CTM-B6-D12",
    (1, 9): "CTM-B9-D12",
    (2, 2): "CTM-B2-D4x4",
}
BLOCK_SHAPES = {1: (12,), 2: (4, 4)}
PARTITIONS = ("ignore", "recursive")
# Above this many possible blocks, distinct blocks are found by sorting instead of a dense bincount.
_BINCOUNT_LIMIT = 1 << 20


def _pybdm() -> Any:
    """pybdm, imported loudly: the reference code returns None here, we say how to fix the install."""
    try:
        import pybdm
        import pybdm.utils
    except ImportError as e:
        hint = ("pybdm 0.1.0 imports pkg_resources, which setuptools>=81 no longer ships: "
                "pip install 'setuptools<81'") if "pkg_resources" in str(e) else "pip install pybdm==0.1.0"
        raise MoMosDependencyError(f"momos.complexity needs pybdm for its CTM tables ({e}); fix: {hint}") \
            from e
    return pybdm


@dataclass(frozen=True)
class CTMTable:
    """One pybdm CTM dataset for one block shape, as arrays keyed by the integer code of the normalized key.

    `codes` (sorted) and `values` are the table; `missing` is pybdm's value for an absent block (max + 1).
    `ranked_values` / `ranked_multiplicity` list the table by descending CTM, each entry with the number
    of raw blocks that normalize to it, which is what pybdm's normalized BDM enumerates.
    """

    name: str
    symbols: int
    shape: tuple[int, ...]
    codes: np.ndarray
    values: np.ndarray
    missing: float
    ranked_values: np.ndarray
    ranked_multiplicity: np.ndarray

    @property
    def block_length(self) -> int:
        """Symbols in one block (12, or 16 for 4x4)."""
        return math.prod(self.shape)

    @property
    def num_raw_blocks(self) -> int:
        """Raw blocks the table accounts for (pybdm's cycle length for normalized BDM)."""
        return int(self.ranked_multiplicity.sum())

    def lookup(self, raw_codes: np.ndarray) -> tuple[np.ndarray, int]:
        """CTM of each raw block code, and how many of them the table lacks."""
        digits = _digits(raw_codes, self.symbols, self.block_length)
        normalized = _encode(_normalize(digits, self.symbols), self.symbols)
        pos = np.minimum(np.searchsorted(self.codes, normalized), len(self.codes) - 1)
        found = self.codes[pos] == normalized
        return np.where(found, self.values[pos], self.missing), int((~found).sum())


@functools.cache
def ctm_table(ndim: int, symbols: int) -> CTMTable:
    """pybdm's CTM dataset for `ndim` and `symbols`, converted once per process.

    Raises:
        MoMosConfigError: no pybdm table for `ndim` and `symbols` (see `CTM_DATASETS`).
        MoMosDependencyError: pybdm is missing or cannot be imported.
    """
    name = _dataset_name(ndim, symbols)
    shape = BLOCK_SHAPES[ndim]
    ctm, missing = _pybdm().utils.get_ctm_dataset(name)
    table = ctm[shape]
    keys = "".join(table.keys()).encode("ascii")
    digits = (np.frombuffer(keys, dtype=np.uint8) - ord("0")).reshape(len(table), math.prod(shape))
    codes = _encode(digits, symbols)
    values = np.fromiter(table.values(), dtype=np.float64, count=len(table))
    order = np.argsort(codes)
    ranked = np.argsort(-values, kind="stable")
    distinct = digits.max(axis=1).astype(np.int64) + 1  # normalized keys use 0..d-1
    multiplicity = np.array([math.perm(symbols, d) for d in range(symbols + 1)], dtype=np.int64)[distinct]
    return CTMTable(name, symbols, shape, codes[order], values[order], float(missing[shape]),
                    values[ranked], multiplicity[ranked])


def _dataset_name(ndim: int, symbols: int) -> str:
    if ndim not in BLOCK_SHAPES:
        raise MoMosConfigError(f"ndim must be 1 or 2, got {ndim!r}")
    if (ndim, symbols) not in CTM_DATASETS:
        allowed = sorted(s for d, s in CTM_DATASETS if d == ndim)
        raise MoMosConfigError(f"symbols must be one of {allowed} for ndim={ndim} (pybdm's CTM tables), "
                               f"got {symbols!r}")
    return CTM_DATASETS[(ndim, symbols)]


def _digits(codes: np.ndarray, base: int, length: int) -> np.ndarray:
    powers = base ** np.arange(length - 1, -1, -1, dtype=np.int64)
    return (codes[:, None] // powers) % base


def _encode(digits: np.ndarray, base: int) -> np.ndarray:
    """Integer code of each row of symbols, most significant first (pybdm's string order)."""
    code = np.zeros(digits.shape[0], dtype=np.int64)
    for column in range(digits.shape[1]):  # Horner on columns: no int64 copy of the whole payload
        code *= base
        code += digits[:, column]
    return code


def _normalize(digits: np.ndarray, base: int) -> np.ndarray:
    """Relabel each row's symbols 0, 1, 2, ... in order of first occurrence (pybdm's normalize_key)."""
    if base == 2:
        return digits ^ digits[:, :1]
    length = digits.shape[1]
    first = np.full((digits.shape[0], base), length, dtype=np.int64)
    for symbol in range(base):
        hit = digits == symbol
        first[:, symbol] = np.where(hit.any(axis=1), hit.argmax(axis=1), length)
    order = np.argsort(first, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(base), order.shape), axis=1)
    return np.take_along_axis(rank, digits.astype(np.int64), axis=1)


def view_2d(a: np.ndarray) -> np.ndarray:
    """The 2-D view BDM(ndim=2) measures: ``(shape[0], rest)``, and ``(1, n)`` for 0-D and 1-D arrays."""
    return a.reshape(a.shape[0] if a.ndim >= 2 else 1, -1)


def _block_rows(symbols: np.ndarray, ndim: int) -> np.ndarray:
    """The complete blocks of one array as rows, in pybdm's order (row-major over block positions)."""
    if ndim == 1:
        flat = symbols.reshape(-1)
        whole = flat.size - flat.size % 12
        return flat[:whole].reshape(-1, 12)
    grid = view_2d(symbols)
    rows, cols = (grid.shape[0] // 4) * 4, (grid.shape[1] // 4) * 4
    return grid[:rows, :cols].reshape(rows // 4, 4, cols // 4, 4).transpose(0, 2, 1, 3).reshape(-1, 16)


@dataclass(frozen=True)
class BlockCounts:
    """The histogram of complete blocks of some data: each distinct block's code, count and CTM.

    Everything BDM-like derives from it: `bdm`, `entropy`, and their normalized forms as pybdm defines them.
    """

    table: CTMTable
    codes: np.ndarray
    counts: np.ndarray
    ctm: np.ndarray

    @property
    def num_blocks(self) -> int:
        """Complete blocks counted."""
        return int(self.counts.sum())

    @property
    def distinct(self) -> int:
        """Distinct blocks among them."""
        return len(self.codes)

    @property
    def possible(self) -> int:
        """How many distinct blocks exist: symbols ** (block length)."""
        return self.table.symbols ** self.table.block_length

    @property
    def saturated(self) -> bool:
        """Every possible block occurs: the CTM half of BDM is then a constant shared by all such data,
        and BDM only reflects ``sum(log2 count)``; prefer per-tensor BDM, entropy or compressors."""
        return self.distinct == self.possible

    def bdm(self, normalized: bool = False) -> float:
        """``sum(CTM(b) + log2 count(b))`` over distinct blocks b.

        Normalized: ``(bdm - min) / (max - min)`` with pybdm's min (least CTM + log2 of the block count)
        and max (the raw blocks of highest CTM, cycled through when there are more blocks than those)."""
        self._require_blocks()
        value = float(np.sum(self.ctm + np.log2(self.counts)))
        if not normalized:
            return value
        low = float(self.table.ranked_values[-1]) + math.log2(self.num_blocks)
        return (value - low) / (self._max_bdm() - low)

    def entropy(self, normalized: bool = False) -> float:
        """Shannon entropy (bits) of the block histogram; normalized by pybdm's maximum,
        ``log2(min(blocks, raw blocks in the table))`` (its minimum is 0 for one block shape)."""
        self._require_blocks()
        p = self.counts / self.num_blocks
        value = float(-np.sum(p * np.log2(p)))
        if not normalized:
            return value
        top = math.log2(min(self.num_blocks, self.table.num_raw_blocks))
        if top == 0:
            raise MoMosValueError("normalized block entropy needs at least 2 complete blocks, got 1")
        return value / top

    def _max_bdm(self) -> float:
        n, values, mult = self.num_blocks, self.table.ranked_values, self.table.ranked_multiplicity
        total = self.table.num_raw_blocks
        if n > total:  # every raw block at least once: counts q or q+1
            q, r = divmod(n, total)
            return float(values @ mult) + r * math.log2(q + 1) + (total - r) * math.log2(q)
        cumulative = np.cumsum(mult)
        last = int(np.searchsorted(cumulative, n))
        before = int(cumulative[last - 1]) if last else 0
        return float(values[:last] @ mult[:last]) + float(values[last]) * (n - before)

    def _require_blocks(self) -> None:
        if not self.num_blocks:
            shape = "x".join(map(str, self.table.shape))
            raise MoMosValueError(f"no complete {shape} block: BDM needs at least {self.table.block_length} "
                                  f"symbols ({'a 4x4 2-D view' if len(self.table.shape) == 2 else 'in 1-D'})")


def count_blocks(arrays: Sequence[np.ndarray], symbols: int = 2, ndim: int = 1) -> BlockCounts:
    """The pooled block histogram of integer symbol arrays (pybdm's counters of each, added together)."""
    table = ctm_table(ndim, symbols)
    codes = [_encode(_block_rows(a, ndim), symbols) for a in arrays]
    flat = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
    possible = symbols ** table.block_length
    if possible <= _BINCOUNT_LIMIT:
        counts = np.bincount(flat, minlength=possible)
        distinct = np.flatnonzero(counts)
        counts = counts[distinct]
    else:
        distinct, counts = np.unique(flat, return_counts=True)
    ctm, missing = table.lookup(distinct)
    if missing:
        warnings.warn(f"{missing} distinct block(s) are not in pybdm's {table.name} table; they count as its "
                      f"maximum + 1 ({table.missing:.4f}), as pybdm does", RuntimeWarning, stacklevel=2)
    return BlockCounts(table, distinct, counts, ctm)


def _arrays(x: Any, symbols: int, ndim: int) -> list[np.ndarray]:
    """Symbol arrays of a model (1-D: one concatenated payload; 2-D: one view per tensor) or of one array."""
    if isinstance(x, nn.Module):
        if ndim == 1:
            return [model_symbols(x, symbols)]
        return [to_symbols(t, symbols) for _, t in trainable_tensors(x)]
    return [to_symbols(x, symbols)]


def block_counts(x: Any, symbols: int = 2, ndim: int = 1) -> BlockCounts:
    """The block histogram of a model (paper payload), tensor or array; see `bdm` for how x is read."""
    _dataset_name(ndim, symbols)
    return count_blocks(_arrays(x, symbols, ndim), symbols, ndim)


def bdm(x: Any, symbols: int = 2, ndim: int = 1, *, normalized: bool = False,
        partition: str = "ignore") -> float:
    """BDM of a model, tensor or array, equal to pybdm's ``BDM(ndim, symbols).bdm`` on the same symbols.

    A model is read by the paper's protocol: all trainable tensors (as the model computes them) flattened,
    concatenated and turned into symbols; with ``ndim=2`` each tensor is measured on its 2-D view
    ``(shape[0], rest)`` and the block counts of all tensors are pooled (a 1-D tensor has no 4x4 block).
    Floats are sign-binarized for ``symbols=2`` and quantile-binned for more; integers are symbols.
    ``partition="recursive"`` (pybdm's PartitionRecursive, which also measures the leftover) is computed
    by pybdm itself: the fast path covers the paper's ``"ignore"`` partition only.

    Raises:
        MoMosConfigError: an unknown `partition`, or no pybdm table for `ndim` and `symbols`.
        MoMosValueError: no complete block to measure.
        MoMosDependencyError: pybdm is missing or cannot be imported.
    """
    if partition not in PARTITIONS:
        raise MoMosConfigError(f"partition must be one of {list(PARTITIONS)}, got {partition!r}")
    _dataset_name(ndim, symbols)
    if partition == "ignore":
        return count_blocks(_arrays(x, symbols, ndim), symbols, ndim).bdm(normalized)
    return _pybdm_value(_arrays(x, symbols, ndim), symbols, ndim, normalized)


def _pybdm_value(arrays: list[np.ndarray], symbols: int, ndim: int, normalized: bool) -> float:
    """pybdm's own BDM with PartitionRecursive, pooled over the arrays as pybdm's compute_bdm does."""
    pybdm = _pybdm()
    if normalized and len(arrays) > 1:
        raise MoMosConfigError("normalized=True with partition='recursive' needs a single array, "
                               f"got {len(arrays)} tensors (use ndim=1 for a model)")
    measure = pybdm.BDM(ndim=ndim, nsymbols=symbols, partition=pybdm.PartitionRecursive)
    views = [(a.reshape(-1) if ndim == 1 else view_2d(a)).astype(np.int64) for a in arrays]
    if normalized:
        return float(measure.nbdm(views[0]))
    value = float(measure.compute_bdm(*(measure.decompose_and_count(v) for v in views)))
    if value == 0:
        raise MoMosValueError("no block at all under partition='recursive' (data shorter than 2 symbols)")
    return value


def block_entropy(x: Any, symbols: int = 2, ndim: int = 1, *, normalized: bool = False) -> float:
    """pybdm's block entropy (``BDM.ent``) of a model, tensor or array, read as `bdm` reads it."""
    return block_counts(x, symbols, ndim).entropy(normalized)


def per_tensor_bdm(model: nn.Module, symbols: int = 2, ndim: int = 1, *,
                   normalized: bool = False) -> dict[str, float]:
    """BDM of each trainable tensor of `model` on its own; a tensor with no complete block gets 0.0
    (pybdm's value with raise_if_zero off) rather than an error, so small biases do not stop a report."""
    result = {}
    for name, tensor in trainable_tensors(model):
        counts = count_blocks([to_symbols(tensor, symbols)], symbols, ndim)
        result[name] = counts.bdm(normalized) if counts.num_blocks else 0.0
    return result


def ratio(trained: Any, initial: Any, symbols: int = 2, ndim: int = 1, *, normalized: bool = False) -> float:
    """``BDM(trained) / BDM(initial)``: the paper's Figure 2 quantity (below 1: training simplified).

    Uninformative once both payloads are saturated (see `BlockCounts.saturated`): it then tends to 1.
    """
    options = dict(symbols=symbols, ndim=ndim, normalized=normalized)
    return bdm(trained, **options) / bdm(initial, **options)
