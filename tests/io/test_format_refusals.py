"""Hostile and unlucky cases of the .momos file, each refused with a MoMosError naming the path and field:
header checksum, out-of-range numbers, non-finite motifs, directories, temp files left by a killed save,
and how coding="auto" chooses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import small_mlp

import momos
from momos.errors import MoMosFormatError, MoMosValueError
from momos.io import format as fmt
from momos.io import header as header_module
from momos.nn.packed import packed_tensors


def _converted(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    prepared = momos.prepare(small_mlp(), momos.MoMosConfig(block_size=4, capacity=0.2))
    momos.refresh(prepared)
    return momos.convert(prepared)


def _saved(path: Path) -> Path:
    momos.save(_converted(), path)
    return path


def _rewrite(path: Path, edit_header=None, edit_tensors=None, *, checksum: bool = True) -> None:
    """Re-write `path` with its header and entries edited, the entries' CRC-32s and (`checksum`) the header's
    own CRC-32 made to match again: what a deliberate forger can do."""
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()[fmt.METADATA_KEY])
    if edit_tensors:
        edit_tensors(tensors)
        for i, bank in enumerate(header["banks"]):
            bank["crc32"] = fmt._crc(tensors[f"motifs/{i}"])
    header.pop("header_crc32", None)
    text = edit_header(header) if edit_header else None
    text = text if isinstance(text, str) else json.dumps(header)
    sealed = header_module._seal(text) if checksum else text
    safetensors.torch.save_file(tensors, path, metadata={fmt.METADATA_KEY: sealed})


# ---------------------------------------------------------------------------------------------
# The header's checksum

def test_a_flipped_byte_in_a_header_field_outside_the_entries_is_caught(tmp_path: Path) -> None:
    path = _saved(tmp_path / "m.momos")
    raw = path.read_bytes()
    for field, offset in ((b'"name":"global"', -3), (b'"rmse":', 2)):  # neither is covered by an entry's CRC-32
        escaped = field.replace(b'"', b'\\"')  # as the container stores the header: a JSON string
        data = bytearray(raw)
        data[raw.index(escaped) + len(escaped) + offset] ^= 0x01  # a byte of the field's value
        path.write_bytes(bytes(data))
        with pytest.raises(MoMosFormatError, match=r"field 'header_crc32' is \d+, but the CRC-32 of the header is"):
            momos.inspect(path)
    path.write_bytes(raw)
    assert momos.inspect(path).version == fmt.FORMAT_VERSION == 3


def test_version_3_needs_the_checksum_and_version_2_may_lack_it(tmp_path: Path) -> None:
    path = _saved(tmp_path / "m.momos")
    x = torch.randn(3, 1, 8, 8)
    body, _, crc = _header_text(path).rpartition(',"header_crc32":')
    assert crc == f"{zlib.crc32(body.encode() + b'}')}}}"  # the last field: the CRC-32 of the header before it
    _rewrite(path, checksum=False)
    with pytest.raises(MoMosFormatError, match=r"missing field\(s\) \['header_crc32'\]"):
        momos.load(path, small_mlp())
    _rewrite(path, lambda h: json.dumps(h | {"header_crc32": 0}, indent=1), checksum=False)  # not where it is read
    with pytest.raises(MoMosFormatError, match=r"field 'header_crc32' must be the last field"):
        momos.load(path, small_mlp())
    _rewrite(path, lambda h: h.update(version=2), checksum=False)  # as the previous release wrote it
    assert torch.equal(momos.load(path, small_mlp())(x), _converted()(x))
    _rewrite(path, lambda h: h.update(version=2))  # flipping the version to 2 does not drop the check
    with pytest.raises(MoMosFormatError, match=r"unknown field\(s\) \['header_crc32'\]"):
        momos.load(path, small_mlp())


def _header_text(path: Path) -> str:
    with safetensors.safe_open(path, framework="pt") as f:
        return f.metadata()[fmt.METADATA_KEY]


# ---------------------------------------------------------------------------------------------
# Numbers a header may not hold

@pytest.mark.parametrize(("field", "value"), [("capacity", 10**400), ("bits_per_weight", 10**400)])
def test_a_config_number_too_large_for_a_float_is_a_format_error(field: str, value: int, tmp_path: Path) -> None:
    path = _saved(tmp_path / "m.momos")

    def edit(header: dict) -> None:
        config = header["banks"][0]["config"]
        config.update(capacity=None, num_motifs=None, bits_per_weight=None)
        config[field] = value

    _rewrite(path, edit)
    with pytest.raises(MoMosFormatError, match=r"bank 0 \('global'\): field 'config' is not a valid MoMosConfig"):
        momos.inspect(path)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_in_the_header_json_are_refused(constant: str, tmp_path: Path) -> None:
    path = _saved(tmp_path / "m.momos")
    _rewrite(path, lambda h: json.dumps(h).replace('"rmse": ', f'"rmse": {constant}, "x": ', 1))
    with pytest.raises(MoMosFormatError, match=rf"not valid JSON \({constant} is not a JSON number"):
        momos.inspect(path)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_motif_table_with_nan_or_inf_is_refused_on_load_even_with_a_matching_crc(value: float,
                                                                                     tmp_path: Path) -> None:
    path = _saved(tmp_path / "m.momos")
    _rewrite(path, edit_tensors=lambda tensors: tensors["motifs/0"].__setitem__((1, 2), value))
    model = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MoMosFormatError, match=r"bank 0 \('global'\): entry 'motifs/0' holds NaN or Inf values"):
        momos.load(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_refuses_a_motif_table_with_nan_before_writing(tmp_path: Path) -> None:
    packed = _converted()
    next(iter(packed_tensors(packed)))[1].table.motifs[1, 0] = math.nan
    with pytest.raises(MoMosValueError, match="bank 'global': the motif table holds NaN or Inf values"):
        momos.save(packed, tmp_path / "m.momos")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Paths

def test_a_directory_is_named_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for call in (lambda: momos.load(".", small_mlp()), lambda: momos.inspect(tmp_path)):
        with pytest.raises(MoMosFormatError, match="is a directory, not a .momos file"):
            call()
    with pytest.raises(MoMosFormatError, match=r"is a directory: save to a file in it, such as '\./model.momos'"):
        momos.save(_converted(), ".")
    with pytest.raises(FileNotFoundError, match="no such folder: 'nope'"):
        momos.save(_converted(), Path("nope") / "m.momos")
    assert list(tmp_path.iterdir()) == []


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    import momos
    from momos.io import format as fmt
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    prepared = momos.prepare(model, momos.MoMosConfig(block_size=4, capacity=0.2))
    momos.refresh(prepared)
    fmt.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
    momos.save(momos.convert(prepared), sys.argv[1])
""")


def test_the_next_save_removes_the_temp_file_of_a_save_killed_with_sigkill(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.momos"
    momos.save(_converted(), path)
    old = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    (left,) = [p for p in tmp_path.iterdir() if p != path]
    assert fmt._temp_pattern(path.name).fullmatch(left.name) and left.stat().st_size >= len(old) - 64
    assert path.read_bytes() == old  # the killed save did not touch the file
    # the files of another target, and one that a save in progress elsewhere is writing now, stay
    other = tmp_path / f".m.momos.x.{os.getpid()}-{'0' * 16}{fmt._TEMP_SUFFIX}"
    live = tmp_path / f".m.momos.{os.getpid() + 1}-{'1' * 16}{fmt._TEMP_SUFFIX}"
    for kept in (other, live):
        kept.write_bytes(b"x")
    os.utime(other, (0, 0))
    stamp = time.time()
    os.utime(left, (stamp - 60, stamp - 60))
    monkeypatch.setattr(fmt, "_STARTED", stamp - 30)  # as a process started after the killed one
    momos.save(_converted(1), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name, live.name])
    assert momos.load(path, small_mlp()) is not None


# ---------------------------------------------------------------------------------------------
# coding="auto"

def _zstd_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of indices of every level-19 zstd encoding from now on."""
    calls: list[int] = []
    encode = fmt.encode_mosaic

    def counting(indices: np.ndarray, bits: int, coding: str) -> bytes:
        if coding == "zstd":
            calls.append(len(indices))
        return encode(indices, bits, coding)

    monkeypatch.setattr(fmt, "encode_mosaic", counting)
    return calls


def test_auto_packs_near_uniform_indices_without_running_level_19(monkeypatch: pytest.MonkeyPatch) -> None:
    indices = np.random.default_rng(0).integers(0, 2000, 50_000)  # 11-bit fields, about 10.97 bits of entropy
    calls = _zstd_calls(monkeypatch)
    payload, coding = fmt._encode_chosen(indices, 11, "auto")
    assert (payload, coding) == (fmt.pack_bits(indices, 11), "packed") and calls == []


def test_auto_codes_skewed_indices_with_zstd_when_it_is_smaller(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    indices = np.where(rng.random(50_000) < 0.9, 0, rng.integers(0, 2000, 50_000))  # mostly the zero motif
    calls = _zstd_calls(monkeypatch)
    payload, coding = fmt._encode_chosen(indices, 11, "auto")
    assert coding == "zstd" and calls == [50_000]
    assert payload == fmt.encode_mosaic(indices, 11, "zstd") and len(payload) < len(fmt.pack_bits(indices, 11)) / 3
    assert fmt._encode_chosen(indices, 11, "auto") == (payload, coding)  # deterministic


def test_auto_never_stores_more_than_packed_and_saves_identical_bytes(tmp_path: Path) -> None:
    packed = _converted()
    first = momos.save(packed, tmp_path / "a.momos")
    momos.save(packed, tmp_path / "b.momos")
    assert (tmp_path / "a.momos").read_bytes() == (tmp_path / "b.momos").read_bytes()
    mosaics = dict(packed_tensors(packed))
    for t in first.tensors:
        assert t.nbytes <= len(fmt.pack_bits(mosaics[t.name].mosaic.long().numpy(), t.index_bits))
