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

import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import zstandard
from torch import nn

from momos.config import MOTIF_DTYPES, index_bits
from momos.errors import MoMosConfigError, MoMosFormatError, MoMosStateError, MoMosValueError
from momos.io.header import (
    CODINGS,
    DTYPE_CODES,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    MAX_INDEX_BITS,
    METADATA_KEY,
    PACKED_DTYPES,
    READ_VERSIONS,
    BankInfo,
    DenseInfo,
    FileInfo,
    TensorInfo,
    _ceil_div,
    check_entries,
    header_json,
    inspect,
    parse_header,
)
from momos.nn.packed import (
    MotifTable,
    PackedTensor,
    attach,
    follow_dtype,
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

ZSTD_LEVEL = 19
AUTO_MARGIN = 0.02  # coding="auto" runs zstd only where its fast probe codes this much below bit-packing
_PROBE_LEVEL = 1
_TEMP_SUFFIX = ".momos-tmp"
_STARTED = time.time()  # when this process loaded momos: a temp file older than that is no save of this process
_CHUNK = 1 << 20  # indices per packer step (a multiple of 8, so every chunk but the last is byte-aligned)

_DTYPES: dict[str, tuple[torch.dtype, str]] = {name: (getattr(torch, name), code) for name, code in DTYPE_CODES.items()}
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
        info = parse_header(metadata[METADATA_KEY], path, os.path.getsize(path))
        check_entries(path, info, found)

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
            motifs = table.stored_motifs().cpu().contiguous().clone()  # a file's tensors are CPU tensors
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
    _write_atomic(Path(path), entries, {METADATA_KEY: header_json(info)})
    return FileInfo(info.path, os.path.getsize(path), info.version, info.banks, info.tensors, info.dense, tied)


def _check_storable(packed: list[tuple[str, PackedTensor]]) -> None:
    """Refuse, before any work, a packed tensor or motif table that no .momos file can hold."""
    checked: set[int] = set()
    for name, p in packed:
        dtype = str(p.dtype).removeprefix("torch.")
        if dtype not in PACKED_DTYPES:
            raise MoMosStateError(f"tensor {name!r} decodes to {dtype}; a .momos file stores MoMos tensors of "
                                  f"{list(PACKED_DTYPES)}: cast the model (.float(), .half(), ...) before momos.save")
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
