"""Compressor proxies: deterministic, lossless on the payload they claim, and sensitive to structure."""

from __future__ import annotations

import bz2
import gzip
import lzma

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import momos
from momos import complexity
from momos.complexity.compress import payload_bytes

DECOMPRESS = {"gzip": gzip.decompress, "bz2": bz2.decompress, "lzma": lzma.decompress}


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=300),
       codec=st.sampled_from(sorted(DECOMPRESS)))
def test_payloads_are_sign_bits_and_float32_bytes(values: list[float], codec: str) -> None:
    w = torch.tensor(values, dtype=torch.float32)
    signs = payload_bytes(w, "sign")
    assert np.unpackbits(np.frombuffer(signs, np.uint8))[:len(values)].tolist() == (w > 0).int().tolist()
    assert np.frombuffer(payload_bytes(w, "float"), "<f4").tolist() == w.tolist()
    compressed = complexity.compress.CODECS[codec](signs)
    assert DECOMPRESS[codec](compressed) == signs
    assert complexity.compressed_bits(w, codec, "sign") == 8 * len(compressed)


def test_model_payload_and_structure() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    expected = torch.cat([p.reshape(-1) for p in model.parameters()]).detach().numpy().astype("<f4").tobytes()
    assert payload_bytes(model, "float") == expected
    constant = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    with torch.no_grad():
        for p in constant.parameters():
            p.fill_(0.5)
    for codec in DECOMPRESS:
        assert complexity.compressed_bits(constant, codec) < complexity.compressed_bits(model, codec) / 5
        assert complexity.compressed_bits(model, codec) == complexity.compressed_bits(model, codec)


def test_bad_codec_or_payload_names_the_field() -> None:
    with pytest.raises(momos.MoMosConfigError, match="codec"):
        complexity.compressed_bits(torch.ones(8), codec="zstd")
    with pytest.raises(momos.MoMosConfigError, match="payload"):
        complexity.compressed_bits(torch.ones(8), payload="bytes")
