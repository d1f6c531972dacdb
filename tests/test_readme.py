"""The README's Python blocks run as written, in order, in one namespace (as a reader pastes them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_blocks_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the blocks write model.momos and model.onnx where they run
    torch.manual_seed(0)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "model.momos").is_file() and (tmp_path / "model.onnx").is_file()
    with torch.no_grad():
        want = namespace["packed"](namespace["x"]).numpy()
    assert abs(namespace["out"]["output"] - want).max() < 1e-5
