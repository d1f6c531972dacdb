"""Running an exported momos ONNX file in onnxruntime, with the weights either folded at load or kept compact.

- ``weights="folded"``: onnxruntime's ConstantFolding runs the gather decoders once at load, so the
  session holds dense weights and runs at dense speed; the file on disk stays small.
- ``weights="compact"``: ConstantFolding is disabled, so only the motifs and mosaics are resident and every
  run decodes each tensor right before its consumer (the exporter places the decoders there, so at most a
  few decoded tensors are alive at once).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from momos.errors import MoMosFormatError

WEIGHTS = ("folded", "compact")


class Session:
    """An onnxruntime session over a momos ONNX file; `run` maps input names to arrays and returns named outputs."""

    def __init__(self, path: str | os.PathLike, weights: str = "folded", *, threads: int | None = None) -> None:
        if weights not in WEIGHTS:
            raise MoMosFormatError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        disabled = ["ConstantFolding"] if weights == "compact" else []
        try:
            self._session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=disabled)
        except Exception as e:  # onnxruntime's exception types differ between bindings
            raise MoMosFormatError(f"onnxruntime cannot load {os.fspath(path)!r}: {e}") from e
        self.path = os.fspath(path)
        self.weights = weights
        self.input_names: list[str] = [i.name for i in self._session.get_inputs()]
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]
        self._input_types = {i.name: i.type for i in self._session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run once on `feeds` (every input by name); returns ``{output name: array}`` for `outputs` (default all)."""
        if set(feeds) != set(self.input_names):
            raise MoMosFormatError(f"feeds name inputs {sorted(feeds)}, the model takes {self.input_names}")
        wanted = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in wanted if n not in self.output_names]
        if unknown:
            raise MoMosFormatError(f"unknown output(s) {unknown}; the model has {self.output_names}")
        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        try:
            results = self._session.run(wanted, arrays)
        except Exception as e:  # wrong dtype/shape: name what was fed against what the model takes
            fed = {n: f"{a.dtype}{list(a.shape)}" for n, a in arrays.items()}
            raise MoMosFormatError(f"onnxruntime rejected the feeds {fed} (model takes {self._input_types}): "
                                   f"{e}") from e
        return dict(zip(wanted, results, strict=True))

    def __repr__(self) -> str:
        return f"Session({self.path!r}, weights={self.weights!r}, inputs={self.input_names}, " \
               f"outputs={self.output_names})"


def load(path: str | os.PathLike, weights: str = "folded", *, threads: int | None = None) -> Session:
    """Open the momos ONNX file at `path` with weight policy `weights` ("folded" or "compact")."""
    return Session(path, weights, threads=threads)
