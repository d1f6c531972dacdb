"""One exception family for everything momos refuses: catch `MoMosError` to catch them all."""

from __future__ import annotations


class MoMosError(Exception):
    """Base class of every error momos raises on purpose."""


class MoMosConfigError(MoMosError, ValueError):
    """A configuration field has a value momos cannot use; the message names the field and the value."""


class MoMosSelectionError(MoMosError, ValueError):
    """Tensor selection went wrong: nothing selected, or a selector the user named matched nothing."""


class MoMosStateError(MoMosError, RuntimeError):
    """The model is in the wrong lifecycle stage for the call (prepare twice, convert unprepared, ...)."""


class MoMosValueError(MoMosError, ValueError):
    """A tensor holds values momos cannot project (NaN or Inf); the message names the tensor."""


class MoMosFormatError(MoMosError, ValueError):
    """A .momos or .onnx file is malformed or does not fit the target model; names the tensor and field."""


class MoMosExportError(MoMosError, RuntimeError):
    """A model cannot be exported as asked (not converted, wrong input signature, runtime too old)."""


class MoMosDependencyError(MoMosError, ImportError):
    """A dependency a feature needs cannot be imported; the message gives the command that fixes it."""


class MoMosWarning(UserWarning):
    """Something momos did differently from what was asked, for a reason the message gives (e.g. a tensor left
    dense because its bank would hold only the zero motif)."""


# The extra of ``pip install 'momos[...]'`` that brings each module the base install (numpy, onnxruntime) leaves out.
EXTRAS = {**dict.fromkeys(("torch", "numba", "faiss", "safetensors", "zstandard", "onnx", "onnxscript", "onnx_ir",
                           "ml_dtypes", "tqdm"), "torch"),
          "pybdm": "complexity", "sklearn": "demo", "matplotlib": "demo"}


def dependency_error(error: ModuleNotFoundError, needed_by: str) -> MoMosDependencyError | None:
    """A `MoMosDependencyError` naming the extra to install when `error` is a module of an extra, else None."""
    extra = EXTRAS.get((error.name or "").split(".")[0])
    if extra is None:
        return None
    return MoMosDependencyError(f"{needed_by} needs {error.name!r}, which this install leaves out: "
                                f"pip install 'momos[{extra}]'")
