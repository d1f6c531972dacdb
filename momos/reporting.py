"""`report(model)`: what MoMos costs and loses, per tensor and in total, for prepared or packed models."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import nn

from momos.config import index_bits
from momos.errors import MoMosStateError
from momos.nn.packed import motif_tables, packed_tensors
from momos.nn.parametrize import prepared_tensors


@dataclass(frozen=True)
class TensorReport:
    """One row: `bits_per_weight` counts the tensor's share of its bank's motif table plus its mosaic."""

    name: str
    bank: str
    shape: tuple[int, ...]
    numel: int
    num_blocks: int
    num_motifs: int
    block_size: int
    motif_bits: int
    table_bits: float  # this tensor's share of its bank's table: k*s*q * (its blocks / the bank's blocks)
    mosaic_bits: int  # m * ceil(log2 k)
    rmse: float

    @property
    def bits_per_weight(self) -> float:
        return (self.table_bits + self.mosaic_bits) / self.numel

    @property
    def ratio_to_float32(self) -> float:
        return self.bits_per_weight / 32


@dataclass(frozen=True)
class DenseReport:
    """A parameter MoMos does not compress (not selected, or left dense): its values cost their dtype's bits."""

    name: str
    shape: tuple[int, ...]
    numel: int
    bits_per_weight: int


@dataclass(frozen=True)
class Report:
    """Per-tensor rows, the parameters left dense, and the totals; ``str(report)`` is a table.

    `bits_per_weight` counts the MoMos tensors (what a config's size target bounds); `model_bits_per_weight`
    counts every parameter of the model, the dense ones at their dtype's width.
    """

    tensors: list[TensorReport]
    dense: list[DenseReport] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def num_blocks(self) -> int:
        return sum(t.num_blocks for t in self.tensors)

    @property
    def bits(self) -> float:
        return sum(t.table_bits + t.mosaic_bits for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.numel

    @property
    def ratio_to_float32(self) -> float:
        return self.bits_per_weight / 32

    @property
    def model_bits_per_weight(self) -> float:
        numel = self.numel + sum(d.numel for d in self.dense)
        return (self.bits + sum(d.numel * d.bits_per_weight for d in self.dense)) / numel

    @property
    def rmse(self) -> float:
        return math.sqrt(sum(t.rmse**2 * t.numel for t in self.tensors) / self.numel)

    def to_dict(self) -> dict:
        rows = [asdict(t) | {"bits_per_weight": t.bits_per_weight, "ratio_to_float32": t.ratio_to_float32}
                for t in self.tensors]
        return {"tensors": rows, "total": {"numel": self.numel, "num_blocks": self.num_blocks, "bits": self.bits,
                                           "bits_per_weight": self.bits_per_weight,
                                           "ratio_to_float32": self.ratio_to_float32, "rmse": self.rmse},
                "dense": [asdict(d) for d in self.dense], "model_bits_per_weight": self.model_bits_per_weight}

    def __str__(self) -> str:
        head = ("tensor", "shape", "n", "m", "k", "bits/weight", "vs float32", "rmse")
        rows = [(t.name, "x".join(map(str, t.shape)), str(t.numel), str(t.num_blocks), str(t.num_motifs),
                 f"{t.bits_per_weight:.3f}", f"{t.ratio_to_float32:.2%}", f"{t.rmse:.4g}") for t in self.tensors]
        banks = {t.bank: t.num_motifs for t in self.tensors}
        dense = [(d.name, "x".join(map(str, d.shape)), str(d.numel), "", "dense", f"{d.bits_per_weight:.3f}",
                  f"{d.bits_per_weight / 32:.2%}", "0") for d in self.dense]
        total = ("total", "", str(self.numel), str(self.num_blocks), str(sum(banks.values())),
                 f"{self.bits_per_weight:.3f}", f"{self.ratio_to_float32:.2%}", f"{self.rmse:.4g}")
        whole = ("all parameters", "", str(self.numel + sum(d.numel for d in self.dense)), "", "",
                 f"{self.model_bits_per_weight:.3f}", f"{self.model_bits_per_weight / 32:.2%}", "")
        footer = [total, whole] if dense else [total]
        widths = [max(len(r[i]) for r in [head, *rows, *dense, *footer]) for i in range(len(head))]
        line = "  ".join("-" * w for w in widths)

        def fmt(row: tuple[str, ...]) -> str:  # names and shapes left-aligned, figures right-aligned
            cells = zip(row, widths, strict=True)
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells))

        return "\n".join([fmt(head), line, *map(fmt, rows + dense), line, *map(fmt, footer)])


def report(model: nn.Module) -> Report:
    """The per-tensor cost and error of a prepared or converted model, and the parameters left dense.

    Args:
        model: a prepared or converted model.

    Returns:
        A `Report`: ``str(report)`` is a table, `Report.to_dict` its JSON form.

    Raises:
        MoMosStateError: `model` holds no MoMos tensor.
    """
    rows: list[tuple] = []  # name, bank key, bank name, shape, n, m, k, s, q, rmse
    packed = list(packed_tensors(model))
    if packed:
        for name, p in packed:
            t = p.table
            rows.append((name, id(t), t.name, p.shape, p.numel, p.num_blocks, t.num_motifs, t.block_size,
                         t.config.motif_bits, p.rmse))
    else:
        try:
            prepared = list(prepared_tensors(model))
        except MoMosStateError:
            prepared = []
        for name, p, _ in prepared:
            b = p.bank
            rmse = math.sqrt(float(p.distortion) / p.numel)
            rows.append((name, id(b), b.name, p.shape, p.numel, p.num_blocks, b.num_motifs, b.block_size,
                         b.config.motif_bits, rmse))
    if not rows:
        raise MoMosStateError("model has no MoMos tensor: call momos.prepare (and convert) first")
    bank_blocks: dict[int, int] = {}
    for r in rows:
        bank_blocks[r[1]] = bank_blocks.get(r[1], 0) + r[5]
    tensors = [TensorReport(name, bank, shape, n, m, k, s, q, k * s * q * m / bank_blocks[key],
                            m * index_bits(k), rmse)
               for name, key, bank, shape, n, m, k, s, q, rmse in rows]
    return Report(tensors, _dense_parameters(model))


def _dense_parameters(model: nn.Module) -> list[DenseReport]:
    """Every floating-point parameter of `model` that is not a MoMos tensor (prepared or packed), once each."""
    tables = {id(table.motifs) for table in motif_tables(model)}  # trainable during motif fine-tuning
    found = []
    for name, param in model.named_parameters():
        if param.is_floating_point() and ".parametrizations." not in f".{name}" and id(param) not in tables:
            found.append(DenseReport(name, tuple(param.shape), param.numel(), param.element_size() * 8))
    return found
