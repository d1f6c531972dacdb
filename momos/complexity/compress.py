"""Lossless compressors as cheap upper-bound proxies of algorithmic complexity.

The compressed length of a payload bounds its Kolmogorov complexity from above (up to the decompressor's
constant). Unlike 1-D binary BDM, these proxies do not saturate on large models.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Callable
from typing import Any

import numpy as np

from momos.complexity.payload import float_bytes, sign_bits
from momos.errors import MoMosConfigError

__all__ = ["CODECS", "PAYLOADS", "compressed_bits", "payload_bytes"]

# Fixed settings so figures are comparable between runs; mtime=0 keeps gzip's output deterministic.
CODECS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "bz2": lambda data: bz2.compress(data, compresslevel=9),
    "lzma": lambda data: lzma.compress(data, preset=6),
}
PAYLOADS = ("sign", "float")


def payload_bytes(x: Any, payload: str = "sign") -> bytes:
    """The bytes a proxy compresses: ``"sign"``, the sign bits packed 8 per byte (``np.packbits``), or
    ``"float"``, the float32 values; of a model (trainable tensors, concatenated), a tensor or an array.

    Raises:
        MoMosConfigError: an unknown `payload` (see `PAYLOADS`).
    """
    if payload == "sign":
        return np.packbits(sign_bits(x)).tobytes()
    if payload == "float":
        return float_bytes(x)
    raise MoMosConfigError(f"payload must be one of {list(PAYLOADS)}, got {payload!r}")


def compressed_bits(x: Any, codec: str = "lzma", payload: str = "sign") -> int:
    """8 * the length of `codec`'s output on `payload_bytes(x, payload)`: an upper-bound complexity proxy.

    Raises:
        MoMosConfigError: an unknown `codec` (see `CODECS`) or `payload`.
    """
    if codec not in CODECS:
        raise MoMosConfigError(f"codec must be one of {list(CODECS)}, got {codec!r}")
    return 8 * len(CODECS[codec](payload_bytes(x, payload)))
