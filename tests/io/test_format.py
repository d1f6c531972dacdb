"""The .momos file: packers, round trips, size bounds, model mismatch, atomic save, inspect."""

from __future__ import annotations

import json
import math
import os
import struct
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import SMALL_MODELS, small_mlp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import momos
from momos.config import index_bits
from momos.errors import MoMosFormatError, MoMosStateError
from momos.io import format as fmt
from momos.nn.packed import packed_tensors


def converted(model: nn.Module, **config: object) -> nn.Module:
    fields = {"block_size": 4, "capacity": 0.2} | config
    prepared = momos.prepare(model, momos.MoMosConfig(**fields))
    momos.refresh(prepared)
    return momos.convert(prepared)


def entry_sizes(path: os.PathLike) -> tuple[int, dict[str, int]]:
    """(bytes of the safetensors header incl. its length prefix, entry name -> data bytes), read independently."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__")
    return 8 + length, {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


# ---------------------------------------------------------------------------------------------
# Packers

@pytest.mark.parametrize("bits", range(33))
def test_pack_bits_round_trips_at_exact_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    top = 2**bits - 1
    for count in (0, 1, 7, 8, 9, 61):
        values = rng.integers(0, top, count, endpoint=True, dtype=np.uint64)
        values[: min(count, 2)] = [0, top][: min(count, 2)]  # the extremes of the width
        data = fmt.pack_bits(values, bits)
        assert len(data) == math.ceil(count * bits / 8)
        assert np.array_equal(fmt.unpack_bits(data, count, bits), values)


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 32), data=st.data())
def test_pack_bits_property_across_chunks(bits: int, data: st.DataObject) -> None:
    values = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70)), dtype=np.uint64)
    saved, fmt._CHUNK = fmt._CHUNK, 16  # tiny chunks, so that short inputs cross chunk boundaries
    try:
        packed = fmt.pack_bits(values, bits)
        unpacked = fmt.unpack_bits(packed, len(values), bits)
    finally:
        fmt._CHUNK = saved
    assert len(packed) == math.ceil(len(values) * bits / 8)
    assert np.array_equal(unpacked, values)
    assert packed == fmt.pack_bits(values, bits)  # chunking does not change the bytes
    # the layout is LSB first: value i owns bits [i*b, (i+1)*b) of the stream
    stream = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little").astype(np.uint64)
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    for i, v in enumerate(values[:5]):
        assert int((stream[i * bits:(i + 1) * bits] * weights).sum()) == v


def test_pack_bits_known_layout_and_rejections() -> None:
    assert fmt.pack_bits(np.array([1, 2]), 2) == bytes([0b1001])
    assert fmt.pack_bits(np.array([5, 5, 5]), 3) == bytes([0b01101101, 0b1])
    with pytest.raises(ValueError, match="values must lie"):
        fmt.pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError, match="need 1 bytes"):
        fmt.unpack_bits(b"\x00\x00", 3, 2)
    with pytest.raises(ValueError, match="unused high bits"):
        fmt.unpack_bits(bytes([0b01000000]), 3, 2)


@pytest.mark.parametrize("bits", [1, 5, 8, 9, 16, 17, 32])
def test_mosaic_codings_round_trip(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 2**bits, 257, dtype=np.uint64)
    for coding in fmt.CODINGS:
        payload = fmt.encode_mosaic(values, bits, coding)
        assert np.array_equal(fmt.decode_mosaic(payload, len(values), bits, coding), values)


def test_zstd_decoding_is_bounded_by_the_expected_size() -> None:
    payload = fmt.encode_mosaic(np.zeros(1000, np.uint64), 8, "zstd")
    with pytest.raises(ValueError, match="declares 1000 bytes, expected 999"):
        fmt.decode_mosaic(payload, 999, 8, "zstd")
    with pytest.raises(ValueError, match="zstd"):
        fmt.decode_mosaic(payload[:-3], 1000, 8, "zstd")


# ---------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("motif_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_round_trip_is_bit_identical(small_model, scope: str, motif_dtype: str, tmp_path) -> None:
    name, model, make_input = small_model
    packed = converted(model, scope=scope, motif_dtype=motif_dtype)
    path = tmp_path / "model.momos"
    info = momos.save(packed, path)
    loaded = momos.load(path, SMALL_MODELS[name][0]().eval())
    x = make_input(8)
    assert torch.equal(loaded(x), packed(x))
    before, after = packed.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    tables = {id(p.table) for _, p in packed_tensors(loaded)}
    assert len(tables) == len(info.banks) == (1 if scope == "global" else len(info.tensors))
    if scope == "global":  # one table, stored once
        assert sum(k.startswith("motifs/") for k in entry_sizes(path)[1]) == 1
    assert all(b.motif_dtype == motif_dtype for b in info.banks)


@pytest.mark.parametrize("coding", ["packed", "zstd", "auto"])
def test_every_coding_round_trips_and_auto_is_never_larger_than_packed(coding: str, tmp_path) -> None:
    torch.manual_seed(1)
    packed = converted(small_mlp(), capacity=0.1)
    info = momos.save(packed, tmp_path / "m.momos", coding=coding)
    loaded = momos.load(tmp_path / "m.momos", small_mlp())
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), packed(x))
    if coding != "auto":
        assert {t.coding for t in info.tensors} == {coding}
    else:
        for t in info.tensors:  # zstd where its probe promised AUTO_MARGIN and it came out smaller
            p = dict(packed_tensors(packed))[t.name]
            sizes = {c: len(fmt.encode_mosaic(p.mosaic.long().numpy(), t.index_bits, c)) for c in fmt.CODINGS}
            assert t.nbytes == sizes[t.coding] <= sizes["packed"]


def test_excluded_parameters_and_buffers_are_stored_as_they_are(tmp_path) -> None:
    name, model, make_input = "cnn", SMALL_MODELS["cnn"][0](), SMALL_MODELS["cnn"][1]
    model.train()
    model(make_input(16))
    model.eval()
    prepared = momos.prepare(model, momos.MoMosConfig(block_size=2, num_motifs=5), exclude=["head"])
    momos.refresh(prepared)
    packed = momos.convert(prepared)
    info = momos.save(packed, tmp_path / "c.momos")
    dense = {d.name for d in info.dense}
    assert {"head.weight", "head.bias", "bn1.running_mean", "bn1.num_batches_tracked"} <= dense
    loaded = momos.load(tmp_path / "c.momos", SMALL_MODELS[name][0]().eval())
    assert torch.equal(loaded.bn1.running_var, packed.bn1.running_var)
    assert torch.equal(loaded.head.weight, packed.head.weight)
    assert int(loaded.bn1.num_batches_tracked) == 1


# ---------------------------------------------------------------------------------------------
# The description-length bound on real files

HEADER_ALLOWANCE = 2048  # bytes, plus PER_ENTRY_ALLOWANCE per safetensors entry and twice each name's length
PER_ENTRY_ALLOWANCE = 512


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(1, 24), min_size=2, max_size=4), block_size=st.integers(1, 9),
       budget=st.one_of(st.floats(0.01, 1.0).map(lambda c: {"capacity": c}),
                        st.integers(1, 300).map(lambda k: {"num_motifs": k})),
       scope=st.sampled_from(["global", "tensor"]), motif_dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       coding=st.sampled_from(["packed", "auto"]), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_description_length_bound_holds_on_real_files(tmp_path, widths, block_size, budget, scope, motif_dtype,
                                                      coding, norm, seed) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers.append(nn.Linear(a, b))
    if norm:  # its running statistics are dense leftovers
        layers.append(nn.BatchNorm1d(widths[-1]))
    config = momos.MoMosConfig(block_size=block_size, scope=scope, motif_dtype=motif_dtype, **budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", momos.MoMosWarning)  # tensors of a zero-only bank stay dense
        try:
            prepared = momos.prepare(nn.Sequential(*layers).eval(), config)
        except momos.MoMosSelectionError:
            assume(False)  # every bank would hold only the zero motif: nothing to store
    momos.refresh(prepared)
    packed = momos.convert(prepared)
    path = tmp_path / "bound.momos"
    info = momos.save(packed, path, coding=coding)
    header_bytes, sizes = entry_sizes(path)
    q = momos.MoMosConfig(block_size=1, capacity=1.0, motif_dtype=motif_dtype).motif_bits
    banks_bytes = 0
    for bank in info.banks:
        served = [t for t in info.tensors if t.bank == bank.index]
        m = sum(t.num_blocks for t in served)
        actual_bits = 8 * (sizes[f"motifs/{bank.index}"] + sum(sizes[f"mosaic/{t.name}"] for t in served))
        k, s = bank.num_motifs, bank.block_size
        assert actual_bits <= k * s * q + m * index_bits(k) + 64 * len(served)
        banks_bytes += sizes[f"motifs/{bank.index}"] + sum(sizes[f"mosaic/{t.name}"] for t in served)
    dense_bytes = sum(sizes[f"dense/{d.name}"] for d in info.dense)
    assert dense_bytes == sum(d.nbytes for d in info.dense)
    allowance = HEADER_ALLOWANCE + sum(PER_ENTRY_ALLOWANCE + 2 * len(name) for name in sizes)
    assert header_bytes <= allowance
    assert os.path.getsize(path) == banks_bytes + dense_bytes + header_bytes  # nothing else in the file


# ---------------------------------------------------------------------------------------------
# Wrong models, wrong states

def test_wrong_architecture_lists_every_difference_and_leaves_the_model_alone(tmp_path) -> None:
    packed = converted(small_mlp())
    momos.save(packed, tmp_path / "m.momos")
    target = SMALL_MODELS["cnn"][0]()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(MoMosFormatError) as caught:
        momos.load(tmp_path / "m.momos", target)
    message = str(caught.value)
    assert "in the file but not in the model: ['1.bias', '1.weight'" in message
    assert "in the model but not in the file: ['bn1.bias'" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    wider = nn.Sequential(nn.Flatten(), nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(MoMosFormatError, match=r"shape/dtype differences: \['1.weight: file \[48, 64\] float32, "
                                               r"model \[50, 64\] float32'"):
        momos.load(tmp_path / "m.momos", wider)
    with pytest.raises(MoMosFormatError, match="float64"):
        momos.load(tmp_path / "m.momos", small_mlp().double())


def test_save_and_load_refuse_models_in_the_wrong_state(tmp_path) -> None:
    with pytest.raises(MoMosStateError, match="convert"):
        momos.save(small_mlp(), tmp_path / "m.momos")
    prepared = momos.prepare(small_mlp(), momos.MoMosConfig(block_size=4, capacity=0.2))
    with pytest.raises(MoMosStateError, match="convert"):
        momos.save(prepared, tmp_path / "m.momos")
    packed = converted(small_mlp())
    momos.save(packed, tmp_path / "m.momos")
    with pytest.raises(MoMosStateError, match="fresh, unprepared"):
        momos.load(tmp_path / "m.momos", prepared)
    with pytest.raises(MoMosStateError, match="fresh, unprepared"):
        momos.load(tmp_path / "m.momos", packed)
    with pytest.raises(momos.MoMosConfigError, match="coding"):
        momos.save(packed, tmp_path / "m.momos", coding="gzip")


# ---------------------------------------------------------------------------------------------
# Atomic save

def _failing_fsync(fd: int) -> None:
    raise OSError("disk full (injected)")


def _half_written(tensors, filename, metadata=None) -> None:
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError("crash mid-write (injected)")


@pytest.mark.parametrize("failure", ["fsync", "write"])
def test_a_failed_save_leaves_the_old_file_intact(failure: str, tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.momos"
    momos.save(converted(small_mlp()), path)
    old = path.read_bytes()
    if failure == "fsync":
        monkeypatch.setattr(fmt.os, "fsync", _failing_fsync)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", _half_written)
    torch.manual_seed(5)
    with pytest.raises(OSError, match="injected"):
        momos.save(converted(small_mlp(), capacity=0.5), path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.momos"]  # no temporary file left behind
    monkeypatch.undo()
    info = momos.save(converted(small_mlp(), capacity=0.5), path)
    assert path.read_bytes() != old and info.file_bytes == len(path.read_bytes())


# ---------------------------------------------------------------------------------------------
# inspect

def test_inspect_reads_the_header_only(tmp_path) -> None:
    path = tmp_path / "t.momos"
    torch.manual_seed(0)
    packed = converted(SMALL_MODELS["transformer"][0](), scope="tensor", motif_dtype="bfloat16")
    saved = momos.save(packed, path)
    info = momos.inspect(path)
    assert info == saved
    as_dict = json.loads(json.dumps(info.to_dict()))
    assert as_dict["version"] == fmt.FORMAT_VERSION
    assert as_dict["banks"][0]["config"]["motif_dtype"] == "bfloat16"
    assert as_dict["tensors"][0]["name"] == "embedding.weight"
    text = str(info)
    assert "embedding.weight" in text and "40x16" in text and "scope=tensor" in text
    # a corrupted weight does not bother inspect (it never reads one) but stops load
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert momos.inspect(path) == saved
    with pytest.raises(MoMosFormatError, match="crc32"):
        momos.load(path, SMALL_MODELS["transformer"][0]())


def test_missing_file_is_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        momos.inspect(tmp_path / "nope.momos")
