"""The momos metadata of an exported ONNX file: the keys the exporter writes and `inspect`, which reads them.

Reading goes through onnxruntime with every graph optimization off, so nothing is folded or decoded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import onnxruntime as ort

from momos.errors import MoMosFormatError

__all__ = ["BANKS", "CONFIGS", "KEYS", "LAYOUT", "OPSET", "TENSORS", "TENSOR_FIELDS", "TIED", "VERSION", "ModelInfo",
           "inspect"]

VERSION = "momos.version"
LAYOUT = "momos.mosaic_layout"
OPSET = "momos.opset"
CONFIGS = "momos.configs"
BANKS = "momos.banks"
TENSORS = "momos.tensors"
KEYS = (VERSION, LAYOUT, OPSET, CONFIGS, BANKS, TENSORS)
TIED = "momos.tied"  # optional: {further name: first name} of tensors stored and decoded once
TENSOR_FIELDS = ("bank", "shape", "storage")  # each tensor is stored as a list of these, to keep small files small


@dataclass(frozen=True)
class ModelInfo:
    """What an exported momos ONNX file holds: its signature, banks (k, s, config) and per-tensor k and bits."""

    path: str
    file_bytes: int
    momos_version: str
    mosaic_layout: str
    opset: int
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    configs: list[dict[str, Any]]
    banks: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, Any]] = field(repr=False)
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """Entries of all MoMos tensors (the dense parameter count they stand for)."""
        return sum(math.prod(t["shape"]) for t in self.tensors.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (for ``momos inspect --json``)."""
        return {**asdict(self), "num_parameters": self.num_parameters}

    def __str__(self) -> str:
        dense_mib = self.num_parameters * 4 / 2**20
        lines = [
            f"{self.path}: {self.file_bytes:,} bytes (float32 dense weights would take {dense_mib:.2f} MiB)",
            f"  momos {self.momos_version}, opset {self.opset}, mosaic layout {self.mosaic_layout}",
            "  inputs:  " + ", ".join(f"{n} {s}" for n, s in self.inputs.items()),
            "  outputs: " + ", ".join(f"{n} {s}" for n, s in self.outputs.items()),
            f"  {len(self.banks)} bank(s), {len(self.tensors)} tensor(s), {self.num_parameters:,} parameters",
        ]
        for name, bank in self.banks.items():
            cfg = self.configs[bank["config"]]
            lines.append(f"  bank {name}: k={bank['num_motifs']} s={bank['block_size']} "
                         f"bits={bank['index_bits']} motif_dtype={cfg['motif_dtype']} scope={cfg['scope']}")
        for name, t in self.tensors.items():
            lines.append(f"    {name} {tuple(t['shape'])}: bank {t['bank']}, k={t['num_motifs']}, "
                         f"bits={t['index_bits']}, stored as {t['storage']}")
        lines += [f"    {name}: tied to {source} (stored once)" for name, source in self.tied.items()]
        return "\n".join(lines)


def inspect(path: str | os.PathLike) -> ModelInfo:
    """Read the momos metadata of the ONNX file at `path`; no weight is decoded.

    Returns:
        The file's `ModelInfo`.

    Raises:
        MoMosFormatError: `path` is not an ONNX file, or one not written by momos, or a metadata field is
            malformed (the message names the field, as ``momos.banks['global']['num_motifs']``).
    """
    from momos.runtime.session import open_onnx

    where = os.fspath(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # the exception reports a malformed file: no log lines about it on stderr
    session = open_onnx(where, options, refusal=f"{where!r} is not an ONNX model onnxruntime can read")
    try:
        meta = session.get_modelmeta().custom_metadata_map
    except Exception as e:  # metadata that is not UTF-8
        raise MoMosFormatError(f"{where!r} has unreadable metadata: {e}") from e
    missing = [k for k in KEYS if k not in meta]
    if missing:
        raise MoMosFormatError(f"{where!r} lacks the momos metadata field(s) {missing}: "
                               "it was not written by momos.export.to_onnx")
    try:
        configs, banks, tensors, tied, opset = _parse(meta)
    except _Malformed as e:
        raise MoMosFormatError(f"{where!r} has malformed momos metadata: {e}") from None
    return ModelInfo(
        path=where, file_bytes=os.path.getsize(where), momos_version=meta[VERSION], mosaic_layout=meta[LAYOUT],
        opset=opset, inputs={i.name: list(i.shape) for i in session.get_inputs()},
        outputs={o.name: list(o.shape) for o in session.get_outputs()},
        configs=configs, banks=banks, tensors=tensors, tied=tied,
    )


class _Malformed(Exception):
    """A metadata field does not have the documented form; the message names the field and the value."""


# ONNX dims are int64: larger sizes are forged (and a parameter count beyond float range breaks the MiB shown).
_INT64_MAX = 2**63 - 1


def _parse(meta: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]],
                                          dict[str, dict[str, Any]], dict[str, str], int]:
    """``(configs, banks, tensors, tied, opset)`` of the metadata map, every field checked to be of the form the
    exporter writes (each tensor with its bank's k and bits); raises `_Malformed` naming the first bad one."""
    _text(VERSION, meta[VERSION])
    _text(LAYOUT, meta[LAYOUT])
    opset = _integer(OPSET, _json(meta, OPSET), minimum=1)
    configs = _json(meta, CONFIGS)
    if not isinstance(configs, list):
        raise _Malformed(f"{CONFIGS} must be a list of configs, got {_short(configs)}")
    for i, config in enumerate(configs):
        field = f"{CONFIGS}[{i}]"
        _mapping(field, config)
        for key in ("motif_dtype", "scope"):  # what `ModelInfo` prints of a config
            _text(f"{field}[{key!r}]", config.get(key))
    banks = _mapping(BANKS, _json(meta, BANKS))
    for name, bank in banks.items():
        field = f"{BANKS}[{name!r}]"
        _text(f"{BANKS} name", name)
        _mapping(field, bank)
        config = _integer(f"{field}['config']", bank.get("config"), minimum=0)
        if config >= len(configs):
            raise _Malformed(f"{field}['config'] must index {CONFIGS} (of {len(configs)}), got {config}")
        _integer(f"{field}['num_motifs']", bank.get("num_motifs"), minimum=1)
        _integer(f"{field}['block_size']", bank.get("block_size"), minimum=1)
        _integer(f"{field}['index_bits']", bank.get("index_bits"), minimum=0)
    tensors = {}
    for name, fields in _mapping(TENSORS, _json(meta, TENSORS)).items():
        field = f"{TENSORS}[{name!r}]"
        _text(f"{TENSORS} name", name)
        if not isinstance(fields, list) or len(fields) != len(TENSOR_FIELDS):
            raise _Malformed(f"{field} must be a list [{', '.join(TENSOR_FIELDS)}], got {_short(fields)}")
        tensor = dict(zip(TENSOR_FIELDS, fields, strict=True))
        if not isinstance(tensor["bank"], str) or tensor["bank"] not in banks:
            raise _Malformed(f"{field} names bank {_short(tensor['bank'])}, which {BANKS} lacks")
        shape = tensor["shape"]
        if not isinstance(shape, list):
            raise _Malformed(f"{field} shape must be a list of sizes, got {_short(shape)}")
        for size in shape:
            _integer(f"{field} shape entry", size, minimum=0)
        if math.prod(shape) > _INT64_MAX:
            raise _Malformed(f"{field} shape {shape} has more than 2**63 - 1 entries")
        _text(f"{field} storage", tensor["storage"])
        bank = banks[tensor["bank"]]  # the file stores k and bits once per bank
        tensors[name] = {**tensor, "num_motifs": bank["num_motifs"], "index_bits": bank["index_bits"]}
    tied = _mapping(TIED, _json(meta, TIED)) if TIED in meta else {}
    for name, source in tied.items():
        _text(f"{TIED} name", name)
        if not isinstance(source, str) or source not in tensors:
            raise _Malformed(f"{TIED}[{name!r}] must name a tensor of {TENSORS}, got {_short(source)}")
    return configs, banks, tensors, tied, opset


def _json(meta: dict[str, str], key: str) -> Any:
    """The JSON value of `key`; NaN and infinities are refused (they are no value the exporter writes)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(meta[key], parse_constant=refuse)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer of too many digits, deep nesting
        raise _Malformed(f"{key} is not valid JSON ({str(e)[:80]}): {_short(meta[key])}") from None


def _mapping(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{field} must be a JSON object, got {_short(value)}")
    return value


def _text(field: str, value: Any) -> str:
    """`value`, checked to be a string that prints as itself (no terminal escapes reach `ModelInfo`'s text)."""
    if not isinstance(value, str) or not value.isprintable():
        raise _Malformed(f"{field} must be a printable string, got {_short(value)}")
    return value


def _integer(field: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Malformed(f"{field} must be an integer >= {minimum}, got {_short(value)}")
    if value > _INT64_MAX:
        raise _Malformed(f"{field} must fit int64 (<= 2**63 - 1), got {_short(value)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    """`value`'s repr (which escapes control characters), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
