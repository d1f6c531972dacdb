"""The .momos file: a safetensors container holding motif tables, coded mosaics and every other tensor.

    momos.save(packed_model, "model.momos")                 # atomic: temp file, fsync, rename
    model = momos.load("model.momos", make_model())          # into a fresh model of the same architecture
    print(momos.inspect("model.momos"))                      # the header only; no weight is read

Layout. Nothing in the file is pickled. The safetensors entries are

    motifs/<i>        the (k, s) table of bank i, in the bank's motif dtype (a global bank is stored once)
    mosaic/<name>     uint8 payload: the tensor's mosaic, coded as its header record says
    dense/<key>       every other state_dict entry (buffers, parameters left out of MoMos), as it is

and safetensors' ``__metadata__["momos"]`` is a JSON header (`FORMAT_VERSION`):

    {"magic": "momos", "version": 3,
     "banks":   [{"name", "config": MoMosConfig.to_dict(), "num_motifs", "block_size", "motif_dtype", "crc32"}],
     "tensors": [{"name", "shape", "dtype", "bank" (index into banks), "block_size", "num_motifs",
                  "index_bits", "num_blocks", "padding", "coding", "nbytes", "crc32", "rmse" (number or null)}],
     "dense":   [{"name", "shape", "dtype", "crc32"}],
     "tied":    [{"name", "source" (a name in tensors or dense)}],
     "header_crc32": the CRC-32 of the header's UTF-8 text without this field}

``header_crc32`` is the last field, written exactly as ``,"header_crc32":<decimal>}``: the header without it
is the text before that suffix, closed by ``}``.

A tie (one tensor read under several state_dict keys, such as an output head sharing the embedding's
weight) is stored once, under its first name; each further name is a ``tied`` record and has no entry.
`load` attaches a tied MoMos tensor's one `PackedTensor` to every name, so the tie holds. Version 2 is
version 3 without ``header_crc32``, version 1 is version 2 without ``tied`` (and without ties); `load` reads
all three.

Codings of a mosaic of m indices of b = ceil(log2 k) bits each:

- ``"packed"``: index i occupies bits ``[i*b, (i+1)*b)`` of the payload, least significant bit first;
  ``ceil(m*b/8)`` bytes, unused high bits of the last byte zero. k = 1 needs 0 bits and 0 bytes.
- ``"zstd"``: zstd (level 19, content size in the frame) over the byte planes of the indices (all
  lowest bytes, then all next bytes, ...; ``ceil(b/8)`` planes), which codes smaller than zstd over the
  packed bits or over interleaved little-endian indices (docs/benchmarks.md, file size).

``save(coding="auto")`` bit-packs a mosaic unless zstd at level 1 (fast) already codes it `AUTO_MARGIN`
smaller; only then it runs level 19, and keeps whichever of that and the packed payload is smaller. Every
entry carries the CRC-32 of its bytes and the header its own, so any flipped byte is caught on load. `load`
checks the container, the header's checksum, every header field's type and range, the header against the
entries and against the target model, every motif for a finite value and every decoded index against k
before it changes the model; any violation raises `MoMosFormatError` naming tensor and field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import zstandard
from torch import nn

from momos.config import MOTIF_DTYPES, MoMosConfig
from momos.errors import MoMosConfigError, MoMosFormatError, MoMosStateError, MoMosValueError
from momos.nn.packed import (
    MotifTable,
    PackedTensor,
    attach,
    follow_dtype,
    index_bits,
    is_packed,
    mosaic_dtype,
    packed_tensors,
    tied_tensors,
    unpacked_state,
)

__all__ = ["AUTO_MARGIN", "CODINGS", "FORMAT_MAGIC", "FORMAT_VERSION", "MAX_INDEX_BITS",
           "METADATA_KEY", "READ_VERSIONS", "ZSTD_LEVEL", "BankInfo",
           "DenseInfo", "FileInfo", "TensorInfo", "decode_mosaic", "encode_mosaic", "inspect", "load", "pack_bits",
           "save", "unpack_bits"]

FORMAT_MAGIC = "momos"
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)  # version 2: no "header_crc32" field; version 1: no "tied" field either
METADATA_KEY = "momos"
CODINGS = ("packed", "zstd")
ZSTD_LEVEL = 19
AUTO_MARGIN = 0.02  # coding="auto" runs zstd only where its fast probe codes this much below bit-packing
_PROBE_LEVEL = 1
_TEMP_SUFFIX = ".momos-tmp"
_STARTED = time.time()  # when this process loaded momos: a temp file older than that is no save of this process
MAX_INDEX_BITS = 32
_MAX_DIMS = 32
_MAX_NUMEL = 2**48  # entries of one tensor: far beyond any model, far below overflow
_CHUNK = 1 << 20  # indices per packer step (a multiple of 8, so every chunk but the last is byte-aligned)

# dtype name -> (torch dtype, safetensors code)
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "F64"), "float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"), "int64": (torch.int64, "I64"), "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"), "int8": (torch.int8, "I8"), "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
_PACKED_DTYPES = ("float64", "float32", "float16", "bfloat16")  # dtypes a MoMos tensor may decode to
_NUMPY_INDEX = {torch.uint8: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32}


# ---------------------------------------------------------------------------------------------
# Mosaic codings: pure functions on numpy arrays.

def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """`values` (1-D, each < 2**bits) at exactly `bits` bits each, LSB first; ``ceil(len*bits/8)`` bytes.

    Raises:
        ValueError: `bits` outside ``0..MAX_INDEX_BITS``, or `values` not 1-D or out of range.
    """
    if not 0 <= bits <= MAX_INDEX_BITS:
        raise ValueError(f"bits must be in 0..{MAX_INDEX_BITS}, got {bits}")
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if values.size and (values.min() < 0 or int(values.max()) >> bits):
        raise ValueError(f"values must lie in [0, 2**{bits}), got [{values.min()}, {values.max()}]")
    if bits == 0:
        return b""
    chunks = []
    for start in range(0, len(values), _CHUNK):
        words = values[start:start + _CHUNK].astype("<u4").view(np.uint8).reshape(-1, 4)
        bit_matrix = np.unpackbits(words, axis=1, bitorder="little")[:, :bits]
        chunks.append(np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes())
    return b"".join(chunks)


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` uint32 values; `data` must have exactly the packed length and
    zero unused bits (``ValueError`` otherwise)."""
    if not 0 <= bits <= MAX_INDEX_BITS:
        raise ValueError(f"bits must be in 0..{MAX_INDEX_BITS}, got {bits}")
    expected = _ceil_div(count * bits, 8)
    if len(data) != expected:
        raise ValueError(f"{count} values of {bits} bits need {expected} bytes, got {len(data)}")
    out = np.zeros(count, np.uint32)
    if bits == 0:
        return out
    raw = np.frombuffer(data, np.uint8)
    spare = -(count * bits) % 8
    if spare and raw[-1] >> (8 - spare):
        raise ValueError("the unused high bits of the last byte are not zero")
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        bit_matrix = np.unpackbits(raw[first:first + _ceil_div(n * bits, 8)], bitorder="little",
                                   count=n * bits).reshape(n, bits)
        words = np.zeros((n, 32), np.uint8)
        words[:, :bits] = bit_matrix
        out[start:start + n] = np.packbits(words, axis=1, bitorder="little").view("<u4").reshape(-1)
    return out


def _ceil_div(a: int, b: int) -> int:
    """ceil(a / b) in exact integer arithmetic (header values may exceed float precision)."""
    return -(-a // b)


def _byte_width(bits: int) -> int:
    return _ceil_div(bits, 8)


def _to_planes(values: np.ndarray, bits: int) -> bytes:
    """The byte planes of `values`: all lowest bytes, then all second bytes, ... (`_byte_width` planes)."""
    words = values.astype("<u4").view(np.uint8).reshape(-1, 4)
    return np.ascontiguousarray(words[:, :_byte_width(bits)].T).tobytes()


def _from_planes(data: bytes, count: int, bits: int) -> np.ndarray:
    width = _byte_width(bits)
    words = np.zeros((count, 4), np.uint8)
    words[:, :width] = np.frombuffer(data, np.uint8).reshape(width, count).T
    return words.view("<u4").reshape(-1).astype(np.uint32)


def encode_mosaic(indices: np.ndarray, bits: int, coding: str) -> bytes:
    """The payload of a mosaic of `bits`-bit `indices` under `coding` (one of `CODINGS`).

    Raises:
        MoMosConfigError: an unknown `coding`.
    """
    if coding == "packed":
        return pack_bits(indices, bits)
    if coding == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(
            _to_planes(indices, bits))
    raise MoMosConfigError(f"coding must be one of {[*CODINGS, 'auto']}, got {coding!r}")


def _encode_chosen(indices: np.ndarray, bits: int, coding: str) -> tuple[bytes, str]:
    """``(payload, coding)`` of a mosaic under `coding`, or under ``"auto"``: the packed payload unless zstd at
    `_PROBE_LEVEL` (hundreds of MB/s) codes the byte planes at least `AUTO_MARGIN` smaller, and only then the
    smaller of the packed and the `ZSTD_LEVEL` payload (level 19 runs at a few MB/s). Deterministic: the
    choice depends on the indices alone."""
    if coding != "auto":
        return encode_mosaic(indices, bits, coding), coding
    packed = pack_bits(indices, bits)
    probe = zstandard.ZstdCompressor(level=_PROBE_LEVEL).compress(_to_planes(indices, bits))
    if len(probe) >= len(packed) * (1 - AUTO_MARGIN):
        return packed, "packed"
    coded = encode_mosaic(indices, bits, "zstd")
    return (coded, "zstd") if len(coded) < len(packed) else (packed, "packed")


def decode_mosaic(payload: bytes, count: int, bits: int, coding: str) -> np.ndarray:
    """Inverse of `encode_mosaic`: `count` uint32 indices. Raises ``ValueError`` on a malformed payload;
    zstd output is bounded by the expected size, whatever the frame declares."""
    if coding == "packed":
        return unpack_bits(payload, count, bits)
    expected = count * _byte_width(bits)
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
        if declared != expected:
            raise ValueError(f"zstd frame declares {declared} bytes, expected {expected}")
        window = 1 << min(27, max(10, expected.bit_length()))
        raw = zstandard.ZstdDecompressor(max_window_size=window).decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd: {e}") from None
    if len(raw) != expected:
        raise ValueError(f"zstd payload decodes to {len(raw)} bytes, expected {expected}")
    return _from_planes(raw, count, bits)


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
        return math.prod(self.shape) * _DTYPES[self.dtype][0].itemsize


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


def _header_json(info: FileInfo) -> str:
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


def _parse_header(text: str, path: str, file_bytes: int) -> FileInfo:
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
        t = TensorInfo(name, f.shape("shape"), f.string("dtype", _PACKED_DTYPES), bank_index,
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
        dense.append(DenseInfo(name, f.shape("shape"), f.string("dtype", tuple(_DTYPES)),
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
    out = {f"motifs/{b.index}": (_DTYPES[b.motif_dtype][1], (b.num_motifs, b.block_size)) for b in info.banks}
    out.update({f"mosaic/{t.name}": ("U8", (t.nbytes,)) for t in info.tensors})
    out.update({f"dense/{d.name}": (_DTYPES[d.dtype][1], d.shape) for d in info.dense})
    return out


@contextmanager
def _open(path: str | os.PathLike) -> Iterator[tuple[FileInfo, Callable[[str], torch.Tensor]]]:
    """The validated header of `path` and a reader of its entries; container errors become MoMosFormatError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MoMosFormatError(f"{path}: is a directory, not a .momos file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        handle = safetensors.safe_open(path, framework="pt")
    except Exception as e:  # the container parser's own errors, whatever their class
        raise MoMosFormatError(f"{path}: not a valid safetensors container: {e}") from None
    with handle as f:
        try:
            metadata = f.metadata() or {}
            keys = f.keys()
            found = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys}
        except Exception as e:
            raise MoMosFormatError(f"{path}: unreadable safetensors header: {e}") from None
        if METADATA_KEY not in metadata:
            raise MoMosFormatError(f"{path}: header: no {METADATA_KEY!r} metadata: not a .momos file")
        info = _parse_header(metadata[METADATA_KEY], path, os.path.getsize(path))
        expected = _entries(info)
        problems = [f"{k}: missing" for k in expected if k not in found]
        problems += [f"{k}: not in the header" for k in found if k not in expected]
        problems += [f"{k}: is {found[k][0]} {list(found[k][1])}, the header says {v[0]} {list(v[1])}"
                     for k, v in expected.items() if k in found and found[k] != v]
        if problems:
            raise MoMosFormatError(f"{path}: entries do not match the header: {'; '.join(problems)}")

        def read(key: str) -> torch.Tensor:
            try:
                return f.get_tensor(key)
            except Exception as e:
                raise MoMosFormatError(f"{path}: entry {key!r}: unreadable: {e}") from None

        yield info, read


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(_raw_bytes(tensor))


def inspect(path: str | os.PathLike) -> FileInfo:
    """The validated header of a .momos file (config, banks, tensors, k, bits, codings, sizes); reads no weights.

    Raises:
        MoMosFormatError: `path` is not a valid .momos file; the message names the field at fault.
    """
    with _open(path) as (info, _):
        return info


# ---------------------------------------------------------------------------------------------
# save

def save(model: nn.Module, path: str | os.PathLike, *, coding: str = "auto") -> FileInfo:
    """Write the converted `model` to `path` atomically (temp file in the same folder, fsync, rename).

    `coding` is ``"packed"`` (bit-packed mosaics), ``"zstd"``, or ``"auto"`` (zstd per tensor where a fast probe
    promises `AUTO_MARGIN` and it comes out smaller, else packed). A tied tensor (one packed tensor or one dense
    tensor under several names) is stored once, under its first name. Returns the header written. A failure
    leaves any previous file at `path` as it was, and a save removes the temp files that killed saves of
    `path` left behind.

    The motif tables are stored in their dtype, whatever the config they were prepared with said (a model cast
    with ``.half()`` or ``.double()`` after prepare or convert stores float16 or float64 motifs, and its header
    says so), and each tensor in the dtype its module now has.

    Raises:
        FileNotFoundError: the folder of `path` does not exist.
        MoMosFormatError: `path` is a directory.
        MoMosConfigError: an unknown `coding`.
        MoMosStateError: `model` is not (wholly) converted, or holds a state_dict entry, a motif table or a
            tensor dtype a file cannot store.
        MoMosValueError: a motif table holds NaN or Inf values.
    """
    if coding not in (*CODINGS, "auto"):
        raise MoMosConfigError(f"coding must be one of {[*CODINGS, 'auto']}, got {coding!r}")
    if os.path.isdir(path):
        raise MoMosFormatError(f"{os.fspath(path)}: is a directory: save to a file in it, such as "
                               f"{os.path.join(path, 'model.momos')!r}")
    if not Path(path).parent.is_dir():
        raise FileNotFoundError(f"no such folder: {os.fspath(Path(path).parent)!r} (the folder of {os.fspath(path)!r})")
    packed = list(packed_tensors(model))
    if not packed:
        raise MoMosStateError("model has no packed MoMos tensor: call momos.convert(model) before momos.save")
    _check_storable(packed)
    entries: dict[str, torch.Tensor] = {}
    banks: dict[int, BankInfo] = {}
    tensors = []
    for name, p in packed:
        table = p.table
        if id(table) not in banks:
            motifs = table.motifs.detach().cpu().contiguous().clone()  # a file's tensors are CPU tensors
            config = follow_dtype(table.config, motifs)
            index = len(banks)
            entries[f"motifs/{index}"] = motifs
            banks[id(table)] = BankInfo(index, table.name, config, table.num_motifs, table.block_size,
                                        config.motif_dtype, _crc(motifs))
        bank = banks[id(table)]
        indices = p.mosaic.detach().cpu().to(torch.int64).numpy()
        if indices.size and int(indices.max()) >= bank.num_motifs:
            raise MoMosStateError(f"tensor {name!r}: mosaic index {int(indices.max())} >= k={bank.num_motifs}")
        bits = index_bits(bank.num_motifs)
        payload, chosen = _encode_chosen(indices, bits, coding)
        entries[f"mosaic/{name}"] = torch.from_numpy(np.frombuffer(payload, np.uint8).copy())
        dtype = str(p.dtype).removeprefix("torch.")
        tensors.append(TensorInfo(name, p.shape, dtype, bank.index, bank.block_size, bank.num_motifs, bits,
                                  p.num_blocks, p.num_blocks * bank.block_size - p.numel, chosen, len(payload),
                                  zlib.crc32(payload), float(p.rmse)))
    dense, tied = [], tied_tensors(model)
    first_names: dict[tuple, str] = {}  # a dense tensor's identity -> its first name
    for key, value in unpacked_state(model).items():
        if ".parametrizations." in f".{key}":
            raise MoMosStateError(f"{key!r} is still parametrized: convert the whole model before momos.save")
        if not isinstance(value, torch.Tensor) or str(value.dtype).removeprefix("torch.") not in _DTYPES:
            raise MoMosStateError(f"state_dict entry {key!r} ({type(value).__name__} "
                                  f"{getattr(value, 'dtype', '')}) cannot be stored in a .momos file")
        identity = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and identity in first_names:  # the same tensor under a second name (a tied buffer or
            tied[key] = first_names[identity]           # parameter left dense): equal values, stored once
            continue
        first_names[identity] = key
        value = value.detach().cpu().contiguous().clone()
        entries[f"dense/{key}"] = value
        dense.append(DenseInfo(key, tuple(value.shape), str(value.dtype).removeprefix("torch."), _crc(value)))
    info = FileInfo(os.fspath(path), 0, FORMAT_VERSION, list(banks.values()), tensors, dense, tied)
    _write_atomic(Path(path), entries, {METADATA_KEY: _header_json(info)})
    return FileInfo(info.path, os.path.getsize(path), info.version, info.banks, info.tensors, info.dense, tied)


def _check_storable(packed: list[tuple[str, PackedTensor]]) -> None:
    """Refuse, before any work, a packed tensor or motif table that no .momos file can hold."""
    checked: set[int] = set()
    for name, p in packed:
        dtype = str(p.dtype).removeprefix("torch.")
        if dtype not in _PACKED_DTYPES:
            raise MoMosStateError(f"tensor {name!r} decodes to {dtype}; a .momos file stores MoMos tensors of "
                                  f"{list(_PACKED_DTYPES)}: cast the model (.float(), .half(), ...) before momos.save")
        table = p.table
        if id(table) in checked:
            continue
        checked.add(id(table))
        motif_dtype = str(table.motifs.dtype).removeprefix("torch.")
        if motif_dtype not in MOTIF_DTYPES:
            raise MoMosStateError(f"bank {table.name!r}: motif table of dtype {motif_dtype}; a .momos file stores "
                                  f"motifs of {list(MOTIF_DTYPES)}: cast the model (.float(), .half(), ...) first")
        if not bool(torch.isfinite(table.motifs.detach()).all()):
            raise MoMosValueError(f"bank {table.name!r}: the motif table holds NaN or Inf values; a .momos file "
                                  f"stores finite motifs only")


def _temp_pattern(name: str) -> re.Pattern:
    """The names `_write_atomic` gives its temporary files for a target called `name`."""
    return re.compile(rf"\.{re.escape(name)}\.\d+-[0-9a-f]{{16}}{re.escape(_TEMP_SUFFIX)}")


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files that saves of `path` left behind (a save killed with SIGKILL cannot clean
    up): those last written before this process loaded momos. A live save elsewhere keeps writing its own."""
    pattern = _temp_pattern(path.name)
    try:
        candidates = [entry for entry in os.scandir(path.parent) if pattern.fullmatch(entry.name)]
    except OSError:
        return
    for entry in candidates:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < _STARTED:
                os.unlink(entry.path)
        except OSError:  # gone already, or not ours to remove: the save itself does not depend on it
            pass


def _write_atomic(path: Path, entries: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    folder = path.parent
    _remove_stale_temps(path)
    tmp = folder / f".{path.name}.{os.getpid()}-{secrets.token_hex(8)}{_TEMP_SUFFIX}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        safetensors.torch.save_file(entries, tmp, metadata=metadata)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# load

def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Fill the unprepared `model` (same architecture as the saved one) from `path`; returns it, converted.

    Everything is validated before `model` changes: a malformed file or a model that does not match it
    raises `MoMosFormatError` (naming tensor and field, or listing the missing, unexpected and
    differently shaped tensors) and leaves `model` untouched; a prepared or converted `model` raises
    `MoMosStateError`.
    """
    if is_packed(model) or any(".parametrizations." in f".{key}" for key in model.state_dict()):
        raise MoMosStateError("momos.load needs a fresh, unprepared model of the saved architecture")
    with _open(path) as (info, read):
        _check_model(info, model)
        tables = []
        for b in info.banks:
            motifs = read(f"motifs/{b.index}")
            if _crc(motifs) != b.crc32:
                raise MoMosFormatError(f"{info.path}: bank {b.index} ({b.name!r}): field 'crc32' does not match "
                                       f"the motif table's bytes")
            if not bool(torch.isfinite(motifs).all()):
                raise MoMosFormatError(f"{info.path}: bank {b.index} ({b.name!r}): entry 'motifs/{b.index}' holds "
                                       f"NaN or Inf values")
            tables.append(MotifTable(b.name, b.config, motifs.clone()))
        packed = []
        for t in info.tensors:
            payload = _raw_bytes(read(f"mosaic/{t.name}")).tobytes()
            if zlib.crc32(payload) != t.crc32:
                raise MoMosFormatError(f"{info.path}: tensor {t.name!r}: field 'crc32' does not match the mosaic")
            try:
                indices = decode_mosaic(payload, t.num_blocks, t.index_bits, t.coding)
            except ValueError as e:
                raise MoMosFormatError(f"{info.path}: tensor {t.name!r}: field 'coding' ({t.coding}): {e}") from None
            if indices.size and int(indices.max()) >= t.num_motifs:
                raise MoMosFormatError(f"{info.path}: tensor {t.name!r}: mosaic index {int(indices.max())} "
                                       f">= num_motifs={t.num_motifs}")
            mosaic = torch.from_numpy(indices.astype(_NUMPY_INDEX[mosaic_dtype(t.num_motifs)]))
            packed.append((t, PackedTensor(tables[t.bank], mosaic, t.shape, _DTYPES[t.dtype][0], t.rmse)))
        dense = {}
        for d in info.dense:
            value = read(f"dense/{d.name}")
            if _crc(value) != d.crc32:
                raise MoMosFormatError(f"{info.path}: dense tensor {d.name!r}: field 'crc32' does not match its bytes")
            dense[d.name] = value
    dense.update({name: dense[source] for name, source in info.tied.items() if source in dense})
    with torch.no_grad():
        model.load_state_dict(dense, strict=False)
    names = {t.name: [t.name] for t in info.tensors}
    for name, source in info.tied.items():
        if source in names:
            names[source].append(name)
    for t, p in packed:
        for name in names[t.name]:  # a tied tensor: its one PackedTensor in every place, so the tie holds
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            attach(module, attr, p.to(module._parameters[attr].device))  # where the model keeps what it replaces
    return model


def _check_model(info: FileInfo, model: nn.Module) -> None:
    """Raise one MoMosFormatError listing every difference between the file's tensors and `model`'s."""
    have = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}
    want = {t.name: (t.shape, t.dtype) for t in info.tensors} | {d.name: (d.shape, d.dtype) for d in info.dense}
    want |= {name: want[source] for name, source in info.tied.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    differ = [f"{k}: file {list(want[k][0])} {want[k][1]}, model {list(have[k][0])} {have[k][1]}"
              for k in want if k in have and want[k] != have[k]]
    parameters = dict(model.named_parameters(remove_duplicate=False))
    sources = {t.name for t in info.tensors}
    packed = sources | {name for name, source in info.tied.items() if source in sources}
    not_param = sorted(name for name in packed if name in have and name not in parameters)
    if missing or unexpected or differ or not_param:
        parts = [f"{label}: {items}" for label, items in (
            ("in the file but not in the model", missing), ("in the model but not in the file", unexpected),
            ("shape/dtype differences", differ), ("MoMos tensors that are not parameters of the model", not_param))
            if items]
        hint = ""
        if any(want[k][0] == have[k][0] for k in want if k in have and want[k] != have[k]):
            hint = ": cast the model to the file's dtypes (.half(), .bfloat16(), .double()) before momos.load"
        raise MoMosFormatError(f"{info.path}: the model does not match the file ({'; '.join(parts)}){hint}")
