"""Running an exported momos ONNX file in onnxruntime, with the weights either folded at load or kept compact.

- ``weights="folded"``: onnxruntime's ConstantFolding runs the gather decoders once at load, so the
  session holds dense weights and runs at dense speed; the file on disk stays small.
- ``weights="compact"``: ConstantFolding is disabled, so only the motifs and mosaics are resident and every
  run decodes each tensor right before its consumer (the exporter places the decoders there, so at most a
  few decoded tensors are alive at once).

onnxruntime's CPU memory arena stays on by default for both policies. ``arena=False`` trades latency for
memory in compact sessions: the decoded tensors are then allocated afresh at each run, which costs page
faults and system time at every run but keeps less resident.

Loading a session frees its scratch: folding decodes every weight through int32 indices and gathered
blocks, and glibc keeps those freed pages in the heap; the session returns them to the system after
load (``malloc_trim``), so a folded session stays about as resident as a dense one. The figures of both:
docs/benchmarks.md (ONNX file overhead and sessions).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from momos.errors import MoMosFormatError

__all__ = ["WEIGHTS", "Session", "load", "open_onnx", "release_free_memory"]

WEIGHTS = ("folded", "compact")
# onnxruntime's input type -> the numpy dtype a feed must have
_FEED_DTYPES = {f"tensor({onnx_name})": np.dtype(name) for onnx_name, name in (
    ("float", "float32"), ("double", "float64"), ("float16", "float16"), ("int64", "int64"), ("int32", "int32"),
    ("int16", "int16"), ("int8", "int8"), ("uint64", "uint64"), ("uint32", "uint32"), ("uint16", "uint16"),
    ("uint8", "uint8"), ("bool", "bool"))}


class Session:
    """An onnxruntime session over a momos ONNX file; `run` maps input names to arrays and returns named outputs."""

    def __init__(self, path: str | os.PathLike, weights: str = "folded", *, threads: int | None = None,
                 arena: bool = True) -> None:
        """Load `path` with weight policy `weights`; `threads` intra-op threads (None: onnxruntime's default,
        one per physical core); `arena` onnxruntime's CPU memory arena (off: less memory, slower compact runs).
        Raises `MoMosFormatError` for an unknown policy or a file onnxruntime cannot load.
        """
        if weights not in WEIGHTS:
            raise MoMosFormatError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.enable_cpu_mem_arena = arena
        disabled = ["ConstantFolding"] if weights == "compact" else []
        self._session = open_onnx(path, options, disabled, refusal=f"onnxruntime cannot load {os.fspath(path)!r}")
        release_free_memory()
        self.path = os.fspath(path)
        self.weights = weights
        inputs = self._session.get_inputs()
        self.input_names: list[str] = [i.name for i in inputs]
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]
        # The declared shape of each input: sizes, dynamic dims by name, None where onnxruntime knows neither.
        self.input_shapes: dict[str, list[int | str | None]] = {i.name: list(i.shape) for i in inputs}
        self._input_types = {i.name: i.type for i in inputs}
        self._signature = [(i.name, list(i.shape), _FEED_DTYPES.get(i.type)) for i in inputs]
        self._shape_texts = {name: f"[{', '.join('?' if d is None else str(d) for d in shape)}]"
                             for name, shape in self.input_shapes.items()}
        self._input_set = frozenset(self.input_names)
        self._output_set = frozenset(self.output_names)

    @property
    def options(self) -> ort.SessionOptions:
        """The onnxruntime session options this session was loaded with (threads, arena, ...)."""
        return self._session.get_session_options()

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            feeds: an array for every input, by name.
            outputs: the outputs wanted (default all).

        Returns:
            ``{output name: array}`` for the outputs wanted.

        Raises:
            MoMosFormatError: a feed that does not fit the model's inputs (the message names the input, the
                shape the model takes, with its dynamic dims by name, and the shape given), or onnxruntime
                refused the call (the message names the input, output or shape at fault).
        """
        self._check_feeds(feeds)
        wanted = self.output_names if outputs is None else list(outputs)
        try:
            results = self._session.run(wanted, feeds)
        except Exception as e:  # onnxruntime's exception types differ between bindings
            raise self._refusal(feeds, wanted, e) from e
        return {wanted[0]: results[0]} if len(wanted) == 1 else dict(zip(wanted, results, strict=True))

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise `MoMosFormatError` unless every input is fed once, with the declared dtype and a shape that
        fits the declared one; a dynamic dim takes one size across all inputs (onnxruntime's own message
        names one dimension, not the shape the model takes)."""
        if feeds.keys() != self._input_set:
            raise MoMosFormatError(f"feeds name inputs {sorted(feeds)}, the model takes {self.input_names}")
        sizes: dict[str, tuple[int, str]] = {}  # dynamic dim -> (its size, the input that set it)
        for name, declared, dtype in self._signature:
            array = feeds[name]
            given = np.shape(array)
            takes = self._shape_texts[name]
            if dtype is not None and getattr(array, "dtype", dtype) != dtype:
                raise _feed_error(name, f"has dtype {array.dtype}, the model takes {dtype} (shape {takes})")
            if len(given) != len(declared):
                raise _feed_error(name, f"has shape {list(given)}, the model takes {takes}")
            for dim, size in zip(declared, given, strict=True):
                if type(dim) is int and dim != size:
                    raise _feed_error(name, f"has shape {list(given)}, the model takes {takes}")
                if type(dim) is str and sizes.setdefault(dim, (size, name))[0] != size:
                    first, where = sizes[dim]
                    raise _feed_error(name, f"has shape {list(given)}, the model takes {takes} with {dim} = "
                                            f"{first} (from input {where!r})")

    def _refusal(self, feeds: Mapping[str, np.ndarray], wanted: list[str], error: Exception) -> MoMosFormatError:
        """The error naming what in a `run` call that passed `_check_feeds` onnxruntime refused."""
        unknown = [n for n in wanted if n not in self._output_set]
        if unknown:
            return MoMosFormatError(f"unknown output(s) {unknown}; the model has {self.output_names}")
        fed = {n: f"{np.asarray(a).dtype}{list(np.shape(a))}" for n, a in feeds.items()}
        return MoMosFormatError(f"onnxruntime rejected the feeds {fed} (model takes {self._input_types}): {error}")

    def __repr__(self) -> str:
        return f"Session({self.path!r}, weights={self.weights!r}, inputs={self.input_names}, " \
               f"outputs={self.output_names})"


def _feed_error(name: str, problem: str) -> MoMosFormatError:
    return MoMosFormatError(f"rejected the feeds: input {name!r} {problem}")


def load(path: str | os.PathLike, weights: str = "folded", *, threads: int | None = None,
         arena: bool = True) -> Session:
    """Open the momos ONNX file at `path` with weight policy `weights` ("folded" or "compact"); see `Session`.

    Raises:
        MoMosFormatError: an unknown policy, or a file onnxruntime cannot load.
    """
    return Session(path, weights, threads=threads, arena=arena)


def open_onnx(path: str | os.PathLike, options: ort.SessionOptions, disabled_optimizers: Sequence[str] = (), *,
              refusal: str) -> ort.InferenceSession:
    """An onnxruntime session over `path` on the CPU provider, with onnxruntime's fallback off: on a file it
    cannot load, that fallback prints an "EP Error ... retrying" banner to stdout (breaking ``--json`` output)
    and retries on the CPU provider this asked for already.

    Raises:
        MoMosFormatError: onnxruntime cannot load the file: `refusal` (which names the file), then onnxruntime's
            reason.
    """
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers), enable_fallback=0)
    except Exception as e:  # onnxruntime's exception types differ between bindings
        raise MoMosFormatError(f"{refusal}: {e}") from e


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return False
    trim(0)
    return True
