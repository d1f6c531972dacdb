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
        MoMosFormatError: `path` is not an ONNX file, or one not written by momos, or its metadata is malformed.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's exception types differ between bindings
        raise MoMosFormatError(f"{os.fspath(path)!r} is not an ONNX model onnxruntime can read: {e}") from e
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in KEYS if k not in meta]
    if missing:
        raise MoMosFormatError(f"{os.fspath(path)!r} lacks the momos metadata field(s) {missing}: "
                               "it was not written by momos.export.to_onnx")
    try:
        configs, banks, tensors = (json.loads(meta[k]) for k in (CONFIGS, BANKS, TENSORS))
        opset = int(meta[OPSET])
        tensors = {name: dict(zip(TENSOR_FIELDS, fields, strict=True)) for name, fields in tensors.items()}
        tied = json.loads(meta.get(TIED, "{}"))
        if not isinstance(tied, dict) or not all(isinstance(s, str) and s in tensors for s in tied.values()):
            raise ValueError(f"{TIED} must map names to tensors of {TENSORS}, got {meta[TIED]!r}")
        for tensor in tensors.values():  # the file stores k and bits once per bank
            bank = banks[tensor["bank"]]
            tensor.update(num_motifs=bank["num_motifs"], index_bits=bank["index_bits"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MoMosFormatError(f"{os.fspath(path)!r} has malformed momos metadata: {e!r}") from e
    return ModelInfo(
        path=os.fspath(path), file_bytes=os.path.getsize(path), momos_version=meta[VERSION],
        mosaic_layout=meta[LAYOUT], opset=opset,
        inputs={i.name: list(i.shape) for i in session.get_inputs()},
        outputs={o.name: list(o.shape) for o in session.get_outputs()},
        configs=configs, banks=banks, tensors=tensors, tied=tied,
    )
