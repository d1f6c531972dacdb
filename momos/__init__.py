"""momos: Mosaic-of-Motifs compression for PyTorch models.

    model = momos.prepare(model, momos.MoMosConfig(block_size=4, capacity=0.05))
    ...train, calling momos.refresh(model) on your schedule...
    packed = momos.convert(model)
    print(momos.report(packed))

Importing momos does not import torch: the torch-side API loads on first use (PEP 562), so
`momos.runtime` works where only numpy and onnxruntime are installed (``pip install momos``); the rest
needs ``pip install 'momos[torch]'`` and says so when it is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from momos.config import MoMosConfig
from momos.errors import (
    MoMosConfigError,
    MoMosDependencyError,
    MoMosError,
    MoMosExportError,
    MoMosFormatError,
    MoMosSelectionError,
    MoMosStateError,
    MoMosValueError,
    MoMosWarning,
    dependency_error,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "prepare": "momos.api",
    "refresh": "momos.api",
    "convert": "momos.api",
    "compress": "momos.api",
    "calibrate": "momos.nn.calibrate",
    "CalibrationStats": "momos.nn.calibrate",
    "finetune": "momos.nn.finetune",
    "FinetuneStats": "momos.nn.finetune",
    "recalibrate_batchnorm": "momos.nn.finetune",
    "train_motifs": "momos.nn.packed",
    "freeze_motifs": "momos.nn.packed",
    "report": "momos.reporting",
    "save": "momos.io.format",
    "load": "momos.io.format",
    "inspect": "momos.io.header",
    "refresh_every": "momos.nn.schedule",
    "RefreshStats": "momos.nn.parametrize",
}
_SUBMODULES = {"complexity", "export", "runtime"}

__all__ = [
    "MoMosConfig", "MoMosError", "MoMosConfigError", "MoMosSelectionError", "MoMosStateError",
    "MoMosValueError", "MoMosFormatError", "MoMosExportError", "MoMosDependencyError", "MoMosWarning",
    *_LAZY, *sorted(_SUBMODULES),
]

if TYPE_CHECKING:
    from momos import complexity, export, runtime
    from momos.api import compress, convert, prepare, refresh
    from momos.io.format import load, save
    from momos.io.header import inspect
    from momos.nn.calibrate import CalibrationStats, calibrate
    from momos.nn.finetune import FinetuneStats, finetune, recalibrate_batchnorm
    from momos.nn.packed import freeze_motifs, train_motifs
    from momos.nn.parametrize import RefreshStats
    from momos.nn.schedule import refresh_every
    from momos.reporting import report


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(_import(_LAZY[name], name), name)
    elif name in _SUBMODULES:
        value = _import(f"momos.{name}", name)
    else:
        raise AttributeError(f"module 'momos' has no attribute {name!r}")
    globals()[name] = value
    return value


def _import(module: str, name: str) -> Any:
    """Import `module` for the public name `name`; a missing dependency of an extra names the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        error = dependency_error(e, f"momos.{name}")
        if error is None:
            raise
        raise error from e


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
