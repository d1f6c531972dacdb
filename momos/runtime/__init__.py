"""Run exported momos models with numpy and onnxruntime only: this package never imports torch.

    from momos import runtime
    session = runtime.load("model.onnx", weights="compact")   # or "folded"
    outputs = session.run({"input": x})
    print(runtime.inspect("model.onnx"))
"""

from momos.runtime.metadata import ModelInfo, inspect
from momos.runtime.session import WEIGHTS, Session, load

__all__ = ["WEIGHTS", "ModelInfo", "Session", "inspect", "load"]
