"""The .momos header: its records (`FileInfo`, `BankInfo`, `TensorInfo`, `DenseInfo`), their JSON form and its
validation, and `inspect`, which reads a file's header with the standard library alone (no torch), so that a
base install (`pip install momos`) can inspect .momos files. The format: docs/format.md and `momos.io.format`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import Any

from momos.config import MOTIF_DTYPES, MoMosConfig, index_bits
from momos.errors import MoMosConfigError, MoMosFormatError

__all__ = ["CODINGS", "DTYPE_CODES", "FORMAT_MAGIC", "FORMAT_VERSION", "MAX_INDEX_BITS", "METADATA_KEY",
           "PACKED_DTYPES", "READ_VERSIONS", "BankInfo", "DenseInfo", "FileInfo", "TensorInfo", "check_entries",
           "header_json", "inspect", "parse_header"]

FORMAT_MAGIC = "momos"
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)  # version 2: no "header_crc32" field; version 1: no "tied" field either
METADATA_KEY = "momos"
CODINGS = ("packed", "zstd")
MAX_INDEX_BITS = 32
_MAX_DIMS = 32
_MAX_NUMEL = 2**48  # entries of one tensor: far beyond any model, far below overflow

# dtype name -> (safetensors code, bytes per value): what a .momos file may store
DTYPE_CODES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1), "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
PACKED_DTYPES = ("float64", "float32", "float16", "bfloat16")  # dtypes a MoMos tensor may decode to
# safetensors puts an 8-byte little-endian length before its JSON header; momos headers stay far below this.
_MAX_CONTAINER_HEADER = 100 << 20


def _ceil_div(a: int, b: int) -> int:
    """ceil(a / b) in exact integer arithmetic (header values may exceed float precision)."""
    return -(-a // b)



# ---------------------------------------------------------------------------------------------
# The header, as records.

@dataclass(frozen=True)
class BankInfo:
    """One motif table: ``motifs/<index>`` holds its ``(num_motifs, block_size)`` values."""

    index: int
    name: str
    config: MoMosConfig
    num_motifs: int
    block_size: int
    motif_dtype: str
    crc32: int

    @property
    def nbytes(self) -> int:
        """Bytes of the motif table in the file."""
        return self.num_motifs * self.block_size * MOTIF_DTYPES[self.motif_dtype] // 8


@dataclass(frozen=True)
class TensorInfo:
    """One MoMos tensor: its mosaic over bank `bank`, coded as `coding` in `nbytes` bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bank: int
    block_size: int
    num_motifs: int
    index_bits: int
    num_blocks: int
    padding: int
    coding: str
    nbytes: int
    crc32: int
    rmse: float


@dataclass(frozen=True)
class DenseInfo:
    """A tensor stored as it is (``dense/<name>``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    crc32: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in the file."""
        return math.prod(self.shape) * DTYPE_CODES[self.dtype][1]


@dataclass(frozen=True)
class FileInfo:
    """What `inspect` reads: the validated header of a .momos file and its size on disk."""

    path: str
    file_bytes: int
    version: int
    banks: list[BankInfo]
    tensors: list[TensorInfo]
    dense: list[DenseInfo]
    tied: dict[str, str] = dataclasses.field(default_factory=dict)  # further name -> the tensors/dense name it shares

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data, with each bank's and dense tensor's `nbytes` (a non-finite rmse as None)."""
        out = asdict(self)
        for bank, row in zip(self.banks, out["banks"], strict=True):
            row["nbytes"] = bank.nbytes
        for tensor in out["tensors"]:
            tensor["rmse"] = tensor["rmse"] if math.isfinite(tensor["rmse"]) else None
        for dense, row in zip(self.dense, out["dense"], strict=True):
            row["nbytes"] = dense.nbytes
        return out

    def __str__(self) -> str:
        lines = [f"{self.path}: momos format v{self.version}, {self.file_bytes} bytes, {len(self.banks)} bank(s)"]
        configs = {b.config for b in self.banks}
        for config in configs:
            used = [str(b.index) for b in self.banks if b.config == config]
            fields = " ".join(f"{k}={v}" for k, v in config.to_dict().items())
            lines.append(f"config of bank(s) {', '.join(used) if len(configs) > 1 else 'all'}: {fields}")
        head = ("tensor", "shape", "dtype", "bank", "m", "k", "bits", "pad", "coding", "bytes")
        rows = [(f"motifs of bank {b.index} ({b.name})", f"{b.num_motifs}x{b.block_size}", b.motif_dtype,
                 str(b.index), "", str(b.num_motifs), "", "", "table", str(b.nbytes)) for b in self.banks]
        rows += [(t.name, "x".join(map(str, t.shape)), t.dtype, str(t.bank), str(t.num_blocks), str(t.num_motifs),
                  str(t.index_bits), str(t.padding), t.coding, str(t.nbytes)) for t in self.tensors]
        rows += [(d.name, "x".join(map(str, d.shape)), d.dtype, "-", "", "", "", "", "dense", str(d.nbytes))
                 for d in self.dense]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, tuple("-" * w for w in widths), *rows]:
            cells = enumerate(zip(r, widths, strict=True))
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in cells))
        lines += [f"{name} is tied to {source} (stored once)" for name, source in self.tied.items()]
        return "\n".join(lines)


def header_json(info: FileInfo) -> str:
    """The header JSON of `info` (the inverse of `_parse_header`)."""
    banks = [{"name": b.name, "config": b.config.to_dict(), "num_motifs": b.num_motifs,
              "block_size": b.block_size, "motif_dtype": b.motif_dtype, "crc32": b.crc32} for b in info.banks]
    tensors = [asdict(t) | {"shape": list(t.shape), "rmse": t.rmse if math.isfinite(t.rmse) else None}
               for t in info.tensors]
    dense = [asdict(d) | {"shape": list(d.shape)} for d in info.dense]
    header = {"magic": FORMAT_MAGIC, "version": info.version, "banks": banks, "tensors": tensors, "dense": dense}
    if info.version >= 2:
        header["tied"] = [{"name": name, "source": source} for name, source in info.tied.items()]
    text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    return _seal(text) if info.version >= 3 else text


_SEAL = ',"header_crc32":'


def _seal(text: str) -> str:
    """The JSON object `text` with its own CRC-32 appended as its last field, ``header_crc32``."""
    return f"{text[:-1]}{_SEAL}{_text_crc(text)}}}"


def _unseal(text: str) -> tuple[int, str] | None:
    """``(header_crc32, the header without it)`` of a text `_seal` wrote, or None where it ends otherwise."""
    body, found, tail = text.rpartition(_SEAL)
    if not found or re.fullmatch(r"[0-9]{1,10}\}", tail) is None:
        return None
    return int(tail[:-1]), body + "}"


def _text_crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


class _Fields:
    """Typed access to one JSON object of the header; every failure names `where` and the field."""

    def __init__(self, obj: Any, where: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(obj, dict):
            raise MoMosFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in allowed if k not in obj]
        unknown = sorted(set(obj) - set(allowed))
        if missing or unknown:
            raise MoMosFormatError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown}")
        self.obj, self.where = obj, where

    def fail(self, field: str, problem: str) -> MoMosFormatError:
        return MoMosFormatError(f"{self.where}: field {field!r} {problem}")

    def integer(self, field: str, low: int = 0, high: int | None = None) -> int:
        value = self.obj[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None
                                                                                   and value > high):
            raise self.fail(field, f"must be an integer in [{low}, {'inf' if high is None else high}], "
                                   f"got {_short(value)}")
        return value

    def string(self, field: str, choices: tuple[str, ...] | None = None) -> str:
        value = self.obj[field]
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self.fail(field, f"must be {'one of ' + str(list(choices)) if choices else 'a string'}, "
                                   f"got {_short(value)}")
        return value

    def shape(self, field: str) -> tuple[int, ...]:
        value = self.obj[field]
        if (not isinstance(value, list) or len(value) > _MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_NUMEL for d in value)
                or math.prod(value) > _MAX_NUMEL):
            raise self.fail(field, f"must be a list of at most {_MAX_DIMS} non-negative integers with a "
                                   f"product of at most 2**48, got {_short(value)}")
        return tuple(value)

    def array(self, field: str) -> list:
        value = self.obj[field]
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {_short(value)}")
        return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_BANK_FIELDS = ("name", "config", "num_motifs", "block_size", "motif_dtype", "crc32")
_TENSOR_FIELDS = ("name", "shape", "dtype", "bank", "block_size", "num_motifs", "index_bits", "num_blocks",
                  "padding", "coding", "nbytes", "crc32", "rmse")
_DENSE_FIELDS = ("name", "shape", "dtype", "crc32")
_TIED_FIELDS = ("name", "source")
_CRC_MAX = 2**32 - 1


def parse_header(text: str, path: str, file_bytes: int) -> FileInfo:
    """Validate the header JSON against its ``header_crc32`` (from version 3), then field by field and for its
    internal consistency; no tensor data is read."""
    sealed = _unseal(text)
    if sealed is not None and sealed[0] != _text_crc(sealed[1]):
        raise MoMosFormatError(f"{path}: header: field 'header_crc32' is {sealed[0]}, but the CRC-32 of the header "
                               f"is {_text_crc(sealed[1])}: the header is corrupt")
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise MoMosFormatError(f"{path}: header: not valid JSON ({e})") from None
    declared = raw.get("version") if isinstance(raw, dict) else None
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > FORMAT_VERSION:
        raise MoMosFormatError(f"{path}: header: field 'version' is {_short(declared)}; this momos reads versions "
                               f"{list(READ_VERSIONS)}: upgrade momos to read this file")
    top = _Fields(raw, f"{path}: header", ("magic", "version", "banks", "tensors", "dense")
                  + (("tied",) if declared != 1 else ()) + (("header_crc32",) if declared not in (1, 2) else ()))
    if sealed is None and declared not in (1, 2):
        raise top.fail("header_crc32", 'must be the last field, written as ,"header_crc32":<CRC-32 of the header '
                                       'without it>}')
    if raw["magic"] != FORMAT_MAGIC:
        raise top.fail("magic", f"must be {FORMAT_MAGIC!r}, got {_short(raw['magic'])}")
    version = top.integer("version", 1)
    if version not in READ_VERSIONS:
        raise top.fail("version", f"is {version}; this momos reads versions {list(READ_VERSIONS)}")

    banks = []
    for i, obj in enumerate(top.array("banks")):
        f = _Fields(obj, f"bank {i}", _BANK_FIELDS)
        name = f.string("name")
        f.where = f"bank {i} ({name!r})"
        if not isinstance(obj["config"], dict):
            raise f.fail("config", f"must be a JSON object, got {_short(obj['config'])}")
        try:
            config = MoMosConfig.from_dict(obj["config"])
        except (MoMosConfigError, TypeError, ValueError, OverflowError) as e:
            raise f.fail("config", f"is not a valid MoMosConfig: {e}") from None
        bank = BankInfo(i, name, config, f.integer("num_motifs", 1, 2**MAX_INDEX_BITS), f.integer("block_size", 1),
                        f.string("motif_dtype", tuple(MOTIF_DTYPES)), f.integer("crc32", 0, _CRC_MAX))
        if bank.block_size != config.block_size:
            raise f.fail("block_size", f"is {bank.block_size} but the config says {config.block_size}")
        if bank.motif_dtype != config.motif_dtype:
            raise f.fail("motif_dtype", f"is {bank.motif_dtype!r} but the config says {config.motif_dtype!r}")
        banks.append(bank)

    tensors, served = [], [0] * len(banks)
    for i, obj in enumerate(top.array("tensors")):
        f = _Fields(obj, f"tensor {i}", _TENSOR_FIELDS)
        name = f.string("name")
        f.where = f"tensor {name!r}"
        bank_index = f.integer("bank", 0, len(banks) - 1)
        bank = banks[bank_index]
        rmse = obj["rmse"]
        if rmse is not None and (isinstance(rmse, bool) or not isinstance(rmse, (int, float))):
            raise f.fail("rmse", f"must be a number or null, got {_short(rmse)}")
        if rmse is not None and abs(rmse) > 1e300:
            raise f.fail("rmse", f"is out of range: {_short(rmse)}")
        t = TensorInfo(name, f.shape("shape"), f.string("dtype", PACKED_DTYPES), bank_index,
                       f.integer("block_size", 1), f.integer("num_motifs", 1),
                       f.integer("index_bits", 0, MAX_INDEX_BITS), f.integer("num_blocks"), f.integer("padding"),
                       f.string("coding", CODINGS), f.integer("nbytes"),
                       f.integer("crc32", 0, _CRC_MAX), math.nan if rmse is None else float(rmse))
        for field, value, expected in (
                ("block_size", t.block_size, bank.block_size), ("num_motifs", t.num_motifs, bank.num_motifs),
                ("index_bits", t.index_bits, index_bits(bank.num_motifs)),
                ("num_blocks", t.num_blocks, _ceil_div(math.prod(t.shape), bank.block_size)),
                ("padding", t.padding, t.num_blocks * t.block_size - math.prod(t.shape))):
            if value != expected:
                raise f.fail(field, f"is {value}, expected {expected}")
        if t.coding == "packed" and t.nbytes != _ceil_div(t.num_blocks * t.index_bits, 8):
            raise f.fail("nbytes", f"is {t.nbytes}, expected {_ceil_div(t.num_blocks * t.index_bits, 8)} "
                                   f"for {t.num_blocks} packed indices of {t.index_bits} bits")
        served[bank_index] += t.num_blocks
        tensors.append(t)
    for bank, blocks in zip(banks, served, strict=True):
        if not blocks:
            raise MoMosFormatError(f"bank {bank.index} ({bank.name!r}): serves no tensor")
        if bank.num_motifs > blocks:
            raise MoMosFormatError(f"bank {bank.index} ({bank.name!r}): field 'num_motifs' is {bank.num_motifs}, "
                                   f"more than the {blocks} blocks of the tensors it serves")

    dense = []
    for i, obj in enumerate(top.array("dense")):
        f = _Fields(obj, f"dense tensor {i}", _DENSE_FIELDS)
        name = f.string("name")
        f.where = f"dense tensor {name!r}"
        dense.append(DenseInfo(name, f.shape("shape"), f.string("dtype", tuple(DTYPE_CODES)),
                               f.integer("crc32", 0, _CRC_MAX)))

    names = [t.name for t in tensors] + [d.name for d in dense]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise MoMosFormatError(f"{path}: header: tensor name(s) {duplicates} appear more than once")
    tied: dict[str, str] = {}
    for i, obj in enumerate(top.array("tied") if version >= 2 else []):
        f = _Fields(obj, f"tied tensor {i}", _TIED_FIELDS)
        name = f.string("name")
        f.where = f"tied tensor {name!r}"
        source = f.string("source")
        if name in tied or name in names:
            raise MoMosFormatError(f"{path}: header: tensor name {name!r} appears more than once")
        if source not in names:  # a tie points at a stored tensor, never at another tie
            raise f.fail("source", f"must name a tensor stored in the file, got {_short(source)}")
        tied[name] = source
    return FileInfo(path, file_bytes, version, banks, tensors, dense, tied)


# ---------------------------------------------------------------------------------------------
# The container.

def _entries(info: FileInfo) -> dict[str, tuple[str, tuple[int, ...]]]:
    """safetensors entry name -> (dtype code, shape) that the header promises."""
    out = {f"motifs/{b.index}": (DTYPE_CODES[b.motif_dtype][0], (b.num_motifs, b.block_size)) for b in info.banks}
    out.update({f"mosaic/{t.name}": ("U8", (t.nbytes,)) for t in info.tensors})
    out.update({f"dense/{d.name}": (DTYPE_CODES[d.dtype][0], d.shape) for d in info.dense})
    return out


def _container_header(path: str) -> tuple[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """The momos metadata text and the entries (name -> (dtype code, shape)) of the safetensors file at `path`."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise MoMosFormatError(f"{path}: not a valid safetensors container: {size} bytes, too short")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_CONTAINER_HEADER):
            raise MoMosFormatError(f"{path}: not a valid safetensors container: a header of {length} bytes in a "
                                   f"file of {size}")
        raw = f.read(length)
    try:
        container = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MoMosFormatError(f"{path}: unreadable safetensors header: {e}") from None
    if not isinstance(container, dict):
        raise MoMosFormatError(f"{path}: unreadable safetensors header: not a JSON object")
    metadata = container.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata or not isinstance(metadata[METADATA_KEY], str):
        raise MoMosFormatError(f"{path}: header: no {METADATA_KEY!r} metadata: not a .momos file")
    found = {}
    for key, entry in container.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape) or not isinstance(entry.get("dtype"), str):
            raise MoMosFormatError(f"{path}: unreadable safetensors header: entry {_short(key)}")
        found[key] = (entry["dtype"], tuple(shape))
    return metadata[METADATA_KEY], found


def check_entries(path: str, info: FileInfo, found: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Raise `MoMosFormatError` listing every entry of the container that the header does not promise as it is."""
    expected = _entries(info)
    problems = [f"{k}: missing" for k in expected if k not in found]
    problems += [f"{k}: not in the header" for k in found if k not in expected]
    problems += [f"{k}: is {found[k][0]} {list(found[k][1])}, the header says {v[0]} {list(v[1])}"
                 for k, v in expected.items() if k in found and found[k] != v]
    if problems:
        raise MoMosFormatError(f"{path}: entries do not match the header: {'; '.join(problems)}")


def inspect(path: str | os.PathLike) -> FileInfo:
    """The validated header of a .momos file (config, banks, tensors, k, bits, codings, sizes); reads no weights.

    Raises:
        MoMosFormatError: `path` is not a valid .momos file; the message names the field at fault.
        FileNotFoundError: there is no file at `path`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MoMosFormatError(f"{path}: is a directory, not a .momos file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    text, found = _container_header(path)
    info = parse_header(text, path, os.path.getsize(path))
    check_entries(path, info, found)
    return info
