"""Strict JSON for the command line's --json output and the demo's summary.json (no torch: `momos inspect`
of an ONNX file runs on the base install)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["to_json", "write_json"]


def to_json(data: dict[str, Any]) -> str:
    """`data` as indented, strict JSON (NaN and infinities written as null)."""
    return json.dumps(_finite(data), indent=2, allow_nan=False)


def write_json(data: dict[str, Any], path: str | os.PathLike) -> None:
    """`to_json(data)` into the file at `path`."""
    Path(path).write_text(to_json(data) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
