"""Export packed MoMos models to deployment formats: `to_onnx` writes an ONNX file that keeps the weights compressed."""

from momos.export.onnx import to_onnx

__all__ = ["to_onnx"]
