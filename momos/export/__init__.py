"""Export packed MoMos models to deployment formats: `to_onnx` writes an ONNX file that keeps the weights compressed."""

from momos.errors import dependency_error

try:
    from momos.export.onnx import to_onnx
except ModuleNotFoundError as e:  # the base install runs exported models only: name the extra that exports them
    missing = dependency_error(e, "momos.export")
    if missing is None:
        raise
    raise missing from e

__all__ = ["to_onnx"]
