"""Hostile .momos files: 1050 generated corruptions of valid files; load must raise only MoMosFormatError.

Truncations, flipped data bytes and flipped bytes of the momos header must always be refused; forged
headers (given a matching header checksum, so that the field checks are what refuses them) are either
refused or (when the forgery happens to describe a valid file) load; files forged with valid checksums
but indices >= k, wrong shapes or huge declared sizes are always refused.
"""

from __future__ import annotations

import functools
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import SMALL_MODELS
from hypothesis import given, settings
from hypothesis import strategies as st

import momos
from momos.errors import MoMosFormatError
from momos.io import format as fmt
from momos.io import header as header_module

FOLDER = Path(tempfile.mkdtemp(prefix="momos-fuzz-"))
CASES = {  # name -> (model, scope, coding)
    "mlp": ("mlp", "global", "packed"),
    "cnn": ("cnn", "tensor", "auto"),
    "transformer": ("transformer", "global", "zstd"),
}


@functools.cache
def valid_file(case: str) -> bytes:
    model_name, scope, coding = CASES[case]
    torch.manual_seed(0)
    prepared = momos.prepare(SMALL_MODELS[model_name][0]().eval(),
                             momos.MoMosConfig(block_size=3, capacity=0.3, scope=scope))
    momos.refresh(prepared)
    path = FOLDER / f"{case}.momos"
    momos.save(momos.convert(prepared), path, coding=coding)
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, dict, bytes]:
    """(safetensors entries, momos header, data section) of a valid file."""
    (length,) = struct.unpack("<Q", data[:8])
    entries = json.loads(data[8:8 + length])
    header = json.loads(entries.pop("__metadata__")[fmt.METADATA_KEY])
    return entries, header, data[8 + length:]


def metadata(header: object) -> dict[str, str]:
    """The safetensors metadata of a momos header (an object's ``header_crc32`` made to match its fields)."""
    if not isinstance(header, dict):
        return {fmt.METADATA_KEY: json.dumps(header)}
    header = {k: v for k, v in header.items() if k != "header_crc32"}
    return {fmt.METADATA_KEY: header_module._seal(json.dumps(header))}


def join(entries: dict, header: dict, body: bytes) -> bytes:
    return join_container({"__metadata__": metadata(header), **entries}, body)


def join_container(container_header: object, body: bytes) -> bytes:
    text = json.dumps(container_header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def try_load(case: str, data: bytes) -> bool:
    """True if `data` loads; False if it is refused with MoMosFormatError; anything else fails the test."""
    path = FOLDER / f"fuzz-{case}.momos"
    path.write_bytes(data)
    try:
        momos.load(path, SMALL_MODELS[CASES[case][0]][0]())
    except MoMosFormatError:
        return False
    return True


CASE = st.sampled_from(sorted(CASES))


def test_the_unmodified_files_load() -> None:
    for case in CASES:
        assert try_load(case, valid_file(case))
        assert try_load(case, join(*split(valid_file(case))))  # the test's re-assembly is faithful


@settings(max_examples=200, deadline=None)
@given(case=CASE, cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_refused(case: str, cut: float) -> None:
    data = valid_file(case)
    assert not try_load(case, data[:int(cut * len(data))])


@settings(max_examples=300, deadline=None)
@given(case=CASE, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                 min_size=1, max_size=4))
def test_flipped_bytes_are_refused_or_harmless(case: str, flips: list[tuple[float, int]]) -> None:
    data = bytearray(valid_file(case))
    body_start = len(data) - len(split(bytes(data))[2])
    positions = [int(where * len(data)) for where, _ in flips]
    for position, (_, mask) in zip(positions, flips, strict=True):
        data[position] ^= mask
    loaded = try_load(case, bytes(data))
    if any(p >= body_start for p in positions) and bytes(data)[body_start:] != valid_file(case)[body_start:]:
        assert not loaded  # every entry carries a CRC-32
    start, end = header_span(valid_file(case))
    if any(start <= p < end for p in positions) and bytes(data)[start:end] != valid_file(case)[start:end]:
        assert not loaded  # and so does the header


def header_span(data: bytes) -> tuple[int, int]:
    """Where the momos header's JSON string (with its quotes, as the container escapes it) lies in `data`."""
    (length,) = struct.unpack("<Q", data[:8])
    text = json.loads(data[8:8 + length])["__metadata__"][fmt.METADATA_KEY]
    start = data.index(json.dumps(text).encode(), 8)
    return start, start + len(json.dumps(text))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every path (a tuple of keys and indices) into a JSON value, the value itself included."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _replace(node: object, path: tuple, value: object) -> object:
    if not path:
        return value
    node[path[0]] = _replace(node[path[0]], path[1:], value)
    return node


@settings(max_examples=300, deadline=None)
@given(case=CASE, data=st.data(), in_momos_header=st.booleans())
def test_forged_headers_are_refused_or_valid(case: str, data: st.DataObject, in_momos_header: bool) -> None:
    entries, header, body = split(valid_file(case))
    container = {"__metadata__": {fmt.METADATA_KEY: header}, **entries}  # the momos header still as JSON
    target = header if in_momos_header else container
    forged = _replace(target, data.draw(st.sampled_from(_paths(target))), data.draw(JSON_VALUES))
    if in_momos_header:
        try_load(case, join(entries, forged, body))
    else:
        found = forged.get("__metadata__") if isinstance(forged, dict) else None
        if isinstance(found, dict) and isinstance(found.get(fmt.METADATA_KEY), dict):
            found.update(metadata(found[fmt.METADATA_KEY]))
        try_load(case, join_container(forged, body))


def _rebuild(case: str, edit) -> bytes:
    """A file forged with every checksum and the container consistent: `edit(header, tensors)` mutates both."""
    entries, header, _ = split(valid_file(case))
    path = FOLDER / f"{case}.momos"
    path.write_bytes(valid_file(case))
    tensors = safetensors.torch.load_file(path)
    edit(header, tensors)
    for i, bank in enumerate(header["banks"]):
        bank["crc32"] = fmt._crc(tensors[f"motifs/{i}"])
    for t in header["tensors"]:
        t["crc32"] = fmt._crc(tensors[f"mosaic/{t['name']}"])
    return safetensors.torch.save(tensors, metadata=metadata(header))


@settings(max_examples=50, deadline=None)
@given(case=CASE, data=st.data())
def test_indices_at_or_above_k_are_refused(case: str, data: st.DataObject) -> None:
    def edit(header: dict, tensors: dict) -> None:
        candidates = [t for t in header["tensors"] if t["num_motifs"] < 2 ** t["index_bits"]]
        t = data.draw(st.sampled_from(candidates))
        indices = np.zeros(t["num_blocks"], np.uint64)
        indices[data.draw(st.integers(0, t["num_blocks"] - 1))] = data.draw(
            st.integers(t["num_motifs"], 2 ** t["index_bits"] - 1))
        payload = fmt.encode_mosaic(indices, t["index_bits"], t["coding"])
        tensors[f"mosaic/{t['name']}"] = torch.from_numpy(np.frombuffer(payload, np.uint8).copy())
        t["nbytes"] = len(payload)

    forged = _rebuild(case, edit)
    path = FOLDER / "index.momos"
    path.write_bytes(forged)
    with pytest.raises(MoMosFormatError, match=r"mosaic index \d+ >= num_motifs"):
        momos.load(path, SMALL_MODELS[CASES[case][0]][0]())


@settings(max_examples=200, deadline=None)
@given(case=CASE, data=st.data(), huge=st.booleans())
def test_wrong_shapes_and_huge_declared_sizes_are_refused(case: str, data: st.DataObject, huge: bool) -> None:
    def edit(header: dict, tensors: dict) -> None:
        t = data.draw(st.sampled_from(header["tensors"]))
        size = data.draw(st.integers(2**40, 2**80) if huge else st.integers(1, 300))
        field = data.draw(st.sampled_from(["shape", "num_blocks", "num_motifs", "nbytes", "padding"]))
        if field == "shape":
            if t["shape"] and t["shape"][-1] == size:
                size += 1
            t["shape"] = [*t["shape"][:-1], size] if t["shape"] else [size]
            if not huge:  # keep the header self-consistent: only the target model can tell
                blocks = -(-int(np.prod(t["shape"])) // t["block_size"])
                t["num_blocks"], t["padding"] = blocks, blocks * t["block_size"] - int(np.prod(t["shape"]))
                payload = fmt.encode_mosaic(np.zeros(blocks, np.uint64), t["index_bits"], t["coding"])
                tensors[f"mosaic/{t['name']}"] = torch.from_numpy(np.frombuffer(payload, np.uint8).copy())
                t["nbytes"] = len(payload)
        elif t[field] != size:
            t[field] = size
        else:
            t[field] = size + 1

    assert not try_load(case, _rebuild(case, edit))
