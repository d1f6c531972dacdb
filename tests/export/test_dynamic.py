"""Export of real models: dynamic axes, output names from the model's outputs, tied weights, and the
runtime's feed checks (expected and given shapes by name), on a small transformer language model."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import momos
from momos import runtime
from momos.errors import MoMosExportError, MoMosFormatError
from momos.nn.packed import packed_tensors

VOCAB, DIM, MAX_LEN = 64, 16, 40
SIZES = [(1, 1), (1, 3), (2, 7), (5, 18), (3, 32)]  # (batch, sequence length)


class TinyLM(nn.Module):
    """Token and position embeddings, one encoder layer (self-attention with a padding mask), a head whose
    weight is the token embedding's (unless `tie` is False); a dict of outputs."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.position = nn.Embedding(MAX_LEN, DIM)
        self.encoder = nn.TransformerEncoderLayer(DIM, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.head.weight = self.embedding.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.encoder(self.embedding(input_ids) + self.position(positions),
                                   src_key_padding_mask=attention_mask == 0))
        return {"logits": self.head(x), "pooled": (x * attention_mask.unsqueeze(-1)).sum(1)}


def _packed(model: nn.Module, block_size: int = 4) -> nn.Module:
    torch.manual_seed(0)
    prepared = momos.prepare(model, momos.MoMosConfig(block_size=block_size, capacity=0.2))
    momos.refresh(prepared)
    return momos.convert(prepared).eval()


def _batch(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length // 2 + 1:] = 0  # padding in the first sequence
    return ids, mask


NAMES = ["input_ids", "attention_mask"]


@pytest.fixture(scope="module")
def tied_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, onnx.ModelProto]:
    """(ONNX path, packed model, proto) of the tied TinyLM exported with every axis dynamic."""
    torch.manual_seed(0)
    packed = _packed(TinyLM())
    path = tmp_path_factory.mktemp("dynamic") / "lm.onnx"
    proto = momos.export.to_onnx(packed, _batch(2, 9), path, input_names=NAMES, dynamic_shapes="all")
    return path, packed, proto


def _dims(values) -> dict[str, list[int | str]]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def test_tied_transformer_agrees_with_torch_at_every_batch_and_length(
        tied_lm: tuple[Path, nn.Module, onnx.ModelProto]) -> None:
    path, packed, proto = tied_lm
    assert _dims(proto.graph.input) == {"input_ids": ["batch", "input_ids_dim1"],
                                        "attention_mask": ["batch", "input_ids_dim1"]}
    assert _dims(proto.graph.output) == {"logits": ["batch", "input_ids_dim1", VOCAB], "pooled": ["batch", DIM]}
    torch.manual_seed(1)
    for weights in runtime.WEIGHTS:
        session = runtime.load(path, weights)
        assert session.output_names == ["logits", "pooled"]
        for batch, length in SIZES:
            ids, mask = _batch(batch, length)
            with torch.no_grad():
                expected = packed(ids, mask)
            got = session.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            for name in ("logits", "pooled"):
                assert got[name].shape == tuple(expected[name].shape)
                assert np.abs(got[name] - expected[name].numpy()).max() <= 1e-5, (weights, batch, length, name)


def test_a_tied_weight_is_stored_and_decoded_once(tied_lm: tuple[Path, nn.Module, onnx.ModelProto],
                                                   tmp_path: Path) -> None:
    path, packed, proto = tied_lm
    initializers = {i.name for i in proto.graph.initializer}
    assert "embedding.weight.mosaic" in initializers and not any(n.startswith("head.") for n in initializers)
    casts = {n.output[0] for n in proto.graph.node if n.op_type == "Cast" and n.input[0].startswith("momos.motifs.")}
    motif_gathers = [n for n in proto.graph.node if n.op_type == "Gather"
                     and (n.input[0].startswith("momos.motifs.") or n.input[0] in casts)]  # float16 tables: a Cast
    assert len(motif_gathers) == len(list(packed_tensors(packed)))  # one decoder per tensor, the tied one included
    info = runtime.inspect(path)
    assert info.tied == {"head.weight": "embedding.weight"} and "head.weight" not in info.tensors

    untied = _packed(TinyLM(tie=False))
    momos.export.to_onnx(untied, _batch(2, 9), tmp_path / "untied.onnx", input_names=NAMES, dynamic_shapes="all")
    assert runtime.inspect(tmp_path / "untied.onnx").tied == {}
    mosaic_bytes = VOCAB * DIM // 4  # the head's mosaic: one uint8 index per block of 4
    assert path.stat().st_size + mosaic_bytes <= (tmp_path / "untied.onnx").stat().st_size


def test_dynamic_shapes_in_torch_export_format_name_the_dims(tmp_path: Path) -> None:
    packed = _packed(TinyLM())
    axes = {0: "batch", 1: "sequence"}
    proto = momos.export.to_onnx(packed, _batch(2, 9), tmp_path / "m.onnx", input_names=NAMES,
                                 output_names=["scores", "summary"], dynamic_shapes=(axes, axes))
    assert _dims(proto.graph.input) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert _dims(proto.graph.output) == {"scores": ["batch", "sequence", VOCAB], "summary": ["batch", DIM]}
    ids, mask = _batch(3, 11)
    got = runtime.load(tmp_path / "m.onnx").run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert np.abs(got["scores"] - packed(ids, mask)["logits"].detach().numpy()).max() <= 1e-5


def test_session_names_the_expected_and_the_given_shape(tied_lm: tuple[Path, nn.Module, onnx.ModelProto],
                                                        tmp_path: Path) -> None:
    path, packed, _ = tied_lm
    session = runtime.load(path, "compact")
    assert session.input_shapes == {"input_ids": ["batch", "input_ids_dim1"],
                                    "attention_mask": ["batch", "input_ids_dim1"]}
    ids, mask = _batch(2, 18)
    with pytest.raises(MoMosFormatError, match=r"input 'attention_mask' has shape \[2, 7\], the model takes "
                                               r"\[batch, input_ids_dim1\] with input_ids_dim1 = 18 "
                                               r"\(from input 'input_ids'\)"):
        session.run({"input_ids": ids.numpy(), "attention_mask": mask[:, :7].numpy()})
    with pytest.raises(MoMosFormatError, match=r"input 'input_ids' has dtype int32, the model takes int64 "
                                               r"\(shape \[batch, input_ids_dim1\]\)"):
        session.run({"input_ids": ids.int().numpy(), "attention_mask": mask.numpy()})
    with pytest.raises(MoMosFormatError, match=r"input 'input_ids' has shape \[18\], the model takes "
                                               r"\[batch, input_ids_dim1\]"):
        session.run({"input_ids": ids[0].numpy(), "attention_mask": mask.numpy()})

    # the default: only the batch axis is dynamic, so a sequence of 18 does not fit a model traced at 32
    momos.export.to_onnx(packed, _batch(2, 32), tmp_path / "static.onnx", input_names=NAMES)
    static = runtime.load(tmp_path / "static.onnx")
    assert static.input_shapes["input_ids"] == ["batch", 32]
    with pytest.raises(MoMosFormatError, match=r"input 'input_ids' has shape \[2, 18\], the model takes \[batch, 32\]"):
        static.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})


class Pair(NamedTuple):
    scores: torch.Tensor
    extra: dict[str, torch.Tensor]


class Heads(nn.Module):
    """A linear layer whose forward returns what `kind` asks for, to name the outputs after."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> object:
        y = self.linear(x)
        if self.kind == "namedtuple":
            return Pair(y, {"mean": y.mean(-1), "max": y.amax(-1)})
        if self.kind == "tuple":
            return y, y.sum(-1)
        return y


@pytest.mark.parametrize(("kind", "names"), [
    ("namedtuple", ["scores", "extra.mean", "extra.max"]),
    ("tuple", ["output_0", "output_1"]),
    ("tensor", ["output"]),
])
def test_output_names_come_from_the_model_outputs(kind: str, names: list[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    packed = _packed(Heads(kind), block_size=2)
    x = torch.randn(3, 8)
    momos.export.to_onnx(packed, x, tmp_path / "m.onnx", dynamic_shapes="all")
    session = runtime.load(tmp_path / "m.onnx")
    assert session.output_names == names
    assert session.input_shapes == {"input": ["batch", 8]}  # "all": the feature axis stays fixed by the Linear
    got = session.run({"input": np.ones((5, 8), np.float32)})
    expected = pytree_leaves(packed(torch.ones(5, 8)))
    for name, value in zip(names, expected, strict=True):
        assert np.abs(got[name] - value.detach().numpy()).max() <= 1e-5


def pytree_leaves(output: object) -> list[torch.Tensor]:
    return torch.utils._pytree.tree_leaves(output)


def test_refuses_an_unknown_dynamic_shapes_string(tmp_path: Path) -> None:
    packed = _packed(Heads("tensor"), block_size=2)
    with pytest.raises(MoMosExportError, match="dynamic_shapes must be None, 'all'"):
        momos.export.to_onnx(packed, torch.randn(2, 8), tmp_path / "m.onnx", dynamic_shapes="batch")
