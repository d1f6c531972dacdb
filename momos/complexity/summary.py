"""`summary`: every complexity measure of a model side by side, with the paper's two ratios.

The two ratios are trained / initial (the paper's Figure 2: below 1 means training simplified the weights)
and MoMos / dense (below 1 means MoMos simplified them further). Read the global BDM with care on large
models: once the sign payload holds every one of the 4096 possible 12-bit blocks (`saturated`; in practice
beyond a few hundred thousand weights) the CTM half of BDM is a constant and its ratios tend to 1. Block
entropy, per-tensor BDM and the compressors keep resolving differences there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from momos.complexity.bdm import block_counts, per_tensor_bdm
from momos.complexity.compress import CODECS, PAYLOADS, compressed_bits
from momos.complexity.payload import trainable_tensors
from momos.errors import MoMosConfigError

__all__ = ["ComplexitySummary", "Measures", "TensorRow", "measures", "summary"]


@dataclass(frozen=True)
class Measures:
    """The complexity measures of one model's payload (paper protocol: 1-D binary, sign bits)."""

    numel: int
    num_blocks: int
    distinct_blocks: int
    saturated: bool  # all 4096 blocks occur: the global BDM no longer tells models of one size apart
    bdm: float
    normalized_bdm: float
    entropy: float
    normalized_entropy: float  # NaN with a single block, where pybdm's normalization is 0/0
    compressed_bits: dict[str, int] = field(default_factory=dict)  # "codec/payload" -> bits

    def values(self) -> dict[str, float]:
        """Every scalar measure by display name, in table order."""
        return {"bdm": self.bdm, "normalized bdm": self.normalized_bdm, "block entropy": self.entropy,
                "normalized block entropy": self.normalized_entropy,
                **{f"{key} bits": float(bits) for key, bits in self.compressed_bits.items()}}


@dataclass(frozen=True)
class TensorRow:
    """Per-tensor BDM of the model, and of the initial and dense models where they have that tensor."""

    name: str
    numel: int
    bdm: float
    initial_bdm: float | None = None
    dense_bdm: float | None = None


@dataclass(frozen=True)
class ComplexitySummary:
    """`model`'s measures, those of `initial` and `dense` when given, their ratios and a per-tensor table."""

    model: Measures
    tensors: tuple[TensorRow, ...]
    initial: Measures | None = None
    dense: Measures | None = None

    @property
    def trained_over_initial(self) -> dict[str, float] | None:
        """measure -> model / initial (the paper's Figure 2 for "bdm"); None without an initial model."""
        return _ratios(self.model, self.initial)

    @property
    def momos_over_dense(self) -> dict[str, float] | None:
        """measure -> model / dense (MoMos simplification for "bdm"); None without a dense model."""
        return _ratios(self.model, self.dense)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable data: every measure, both ratios and the per-tensor rows."""
        return {"model": asdict(self.model), "initial": asdict(self.initial) if self.initial else None,
                "dense": asdict(self.dense) if self.dense else None,
                "trained_over_initial": self.trained_over_initial, "momos_over_dense": self.momos_over_dense,
                "tensors": [asdict(t) for t in self.tensors]}

    def __str__(self) -> str:
        head = ["measure", "model"]
        columns = [self.model.values()]
        for label, measures, ratios in (("initial", self.initial, self.trained_over_initial),
                                        ("dense", self.dense, self.momos_over_dense)):
            if measures is not None:
                head += [label, "model/" + label]
                columns += [measures.values(), ratios]
        rows = [[name, *(_fmt(c[name]) for c in columns)] for name in columns[0]]
        lines = _table(head, rows)
        saturated = [label for label, m in (("model", self.model), ("initial", self.initial),
                                            ("dense", self.dense)) if m is not None and m.saturated]
        note = (f"({self.model.numel} weights, {self.model.num_blocks} blocks, "
                f"{self.model.distinct_blocks}/4096 distinct 12-bit blocks)")
        if saturated:
            note += (f"\nsaturated ({', '.join(saturated)}): every 12-bit block occurs, so the global bdm "
                     "ratios tend to 1; compare entropy, compressors and per-tensor bdm instead")
        tensor_head = ["tensor", "n", "bdm"]
        has_initial = any(t.initial_bdm is not None for t in self.tensors)
        has_dense = any(t.dense_bdm is not None for t in self.tensors)
        tensor_head += ["initial bdm", "model/initial"] * has_initial
        tensor_head += ["dense bdm", "model/dense"] * has_dense
        tensor_rows = []
        for t in self.tensors:
            row = [t.name, str(t.numel), _fmt(t.bdm)]
            for present, other in ((has_initial, t.initial_bdm), (has_dense, t.dense_bdm)):
                if present:
                    row += [_fmt(other), _fmt(t.bdm / other if other else None)]
            tensor_rows.append(row)
        return "\n".join([*lines, note, "", *_table(tensor_head, tensor_rows)])


def measures(model: nn.Module, codecs: Sequence[str] = tuple(CODECS),
             payloads: Sequence[str] = ("sign",)) -> Measures:
    """The measures of `model`'s paper payload; compressors for each codec and payload asked for.

    Raises:
        MoMosConfigError: an unknown codec or payload.
    """
    for codec in codecs:
        if codec not in CODECS:
            raise MoMosConfigError(f"codec must be one of {list(CODECS)}, got {codec!r}")
    for payload in payloads:
        if payload not in PAYLOADS:
            raise MoMosConfigError(f"payload must be one of {list(PAYLOADS)}, got {payload!r}")
    counts = block_counts(model)
    return Measures(
        numel=sum(t.numel() for _, t in trainable_tensors(model)), num_blocks=counts.num_blocks,
        distinct_blocks=counts.distinct, saturated=counts.saturated, bdm=counts.bdm(),
        normalized_bdm=counts.bdm(normalized=True), entropy=counts.entropy(),
        normalized_entropy=counts.entropy(normalized=True) if counts.num_blocks > 1 else math.nan,
        compressed_bits={f"{c}/{p}": compressed_bits(model, c, p) for p in payloads for c in codecs})


def summary(model: nn.Module, initial: nn.Module | None = None, dense: nn.Module | None = None, *,
            codecs: Sequence[str] = tuple(CODECS), payloads: Sequence[str] = ("sign",)) -> ComplexitySummary:
    """Measures of `model` (dense, prepared or packed) beside those of its `initial` weights and of a `dense`
    counterpart, with the ratios model/initial and model/dense and per-tensor BDM.

    Compressors run on the sign bits by default; add ``"float"`` to `payloads` for the float32 bytes
    (slow for lzma on large models). See the module docstring for when the global BDM saturates.

    Raises:
        MoMosConfigError: an unknown codec (see `CODECS`) or payload.
    """
    own = per_tensor_bdm(model)
    initial_rows = per_tensor_bdm(initial) if initial is not None else {}
    dense_rows = per_tensor_bdm(dense) if dense is not None else {}
    sizes = {name: t.numel() for name, t in trainable_tensors(model)}
    rows = tuple(TensorRow(name, sizes[name], value, initial_rows.get(name), dense_rows.get(name))
                 for name, value in own.items())
    return ComplexitySummary(
        model=measures(model, codecs, payloads), tensors=rows,
        initial=measures(initial, codecs, payloads) if initial is not None else None,
        dense=measures(dense, codecs, payloads) if dense is not None else None)


def _ratios(model: Measures, other: Measures | None) -> dict[str, float] | None:
    if other is None:
        return None
    return {name: (value / other.values()[name] if other.values()[name] else math.nan)
            for name, value in model.values().items()}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        cells = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in cells)

    return [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]
