"""Tied weights: compressed once, stored once, tied again on load; version 1 files still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import momos
from momos.errors import MoMosFormatError
from momos.io import format as fmt
from momos.io import header as header_module
from momos.nn.packed import dense_copy, packed_tensors, tied_tensors, train_motifs


class TiedLM(nn.Module):
    """A token embedding whose output head reads the same weight (unless `tie` is False)."""

    def __init__(self, vocab: int = 2000, dim: int = 64, tie: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embedding(tokens)))


CONFIG = momos.MoMosConfig(block_size=4, capacity=0.02)


def _packed(tie: bool) -> nn.Module:
    torch.manual_seed(0)
    prepared = momos.prepare(TiedLM(tie=tie), CONFIG, exclude=["norm.weight", "norm.bias"])
    momos.refresh(prepared)
    return momos.convert(prepared).eval()


def test_convert_packs_a_tied_weight_once_and_both_owners_read_it() -> None:
    packed = _packed(tie=True)
    assert [name for name, _ in packed_tensors(packed)] == ["embedding.weight"]
    assert tied_tensors(packed) == {"head.weight": "embedding.weight"}
    assert packed.head.momos_packed["weight"] is packed.embedding.momos_packed["weight"]
    assert torch.equal(packed.head.weight, packed.embedding.weight)
    twin = dense_copy(packed)  # what the ONNX export traces: still one parameter
    assert twin.head.weight is twin.embedding.weight


def test_tied_file_is_smaller_than_untied_and_the_tie_holds_after_load(tmp_path: Path) -> None:
    sizes = {}
    for tie in (True, False):
        packed = _packed(tie)
        info = momos.save(packed, tmp_path / f"{tie}.momos")
        sizes[tie] = info.file_bytes
        loaded = momos.load(tmp_path / f"{tie}.momos", TiedLM(tie=tie)).eval()
        tokens = torch.randint(0, 2000, (3, 7))
        with torch.no_grad():
            assert torch.equal(loaded(tokens), packed(tokens))
    info = momos.inspect(tmp_path / "True.momos")
    assert [t.name for t in info.tensors] == ["embedding.weight"] and not any("head" in d.name for d in info.dense)
    assert info.tied == {"head.weight": "embedding.weight"} and "head.weight is tied to embedding.weight" in str(info)
    dense_bytes = 2000 * 64 * 4
    # the tied file holds one mosaic where the untied file holds two, and no dense copy of the weight
    assert sizes[True] < 0.6 * sizes[False] < 0.6 * dense_bytes, sizes

    loaded = momos.load(tmp_path / "True.momos", TiedLM(tie=True))
    assert loaded.head.momos_packed["weight"] is loaded.embedding.momos_packed["weight"]
    before = loaded.embedding.weight.detach().clone()
    optimizer = torch.optim.SGD(train_motifs(loaded), lr=0.1)
    loaded(torch.randint(0, 2000, (4, 5))).square().mean().backward()
    optimizer.step()
    assert not torch.equal(loaded.embedding.weight, before)  # training after load moved the shared motifs...
    assert torch.equal(loaded.head.weight, loaded.embedding.weight)  # ...and both owners read them


def test_a_tied_file_ties_an_untied_model_and_a_tied_model_reads_an_untied_file(tmp_path: Path) -> None:
    momos.save(_packed(tie=True), tmp_path / "tied.momos")
    loaded = momos.load(tmp_path / "tied.momos", TiedLM(tie=False))  # the file says the two are one tensor
    assert loaded.head.momos_packed["weight"] is loaded.embedding.momos_packed["weight"]
    momos.save(_packed(tie=False), tmp_path / "untied.momos")
    loaded = momos.load(tmp_path / "untied.momos", TiedLM(tie=True))
    assert loaded.head.momos_packed["weight"] is not loaded.embedding.momos_packed["weight"]


def test_a_tied_parameter_left_dense_is_stored_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM(vocab=50, dim=8)
    prepared = momos.prepare(model, momos.MoMosConfig(block_size=4, num_motifs=2), include=["norm.weight"])
    momos.refresh(prepared)
    packed = momos.convert(prepared)
    info = momos.save(packed, tmp_path / "m.momos")
    assert [d.name for d in info.dense] == ["embedding.weight", "norm.bias"]
    assert info.tied == {"head.weight": "embedding.weight"}
    loaded = momos.load(tmp_path / "m.momos", TiedLM(vocab=50, dim=8))
    assert torch.equal(loaded.head.weight, model.embedding.weight)
    assert loaded.head.weight is loaded.embedding.weight


def _rewrite_header(path: Path, edit) -> None:
    """Re-write the file at `path` with its momos header changed by `edit` (entries and checksums kept, and
    the header's own checksum made to match it)."""
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()[fmt.METADATA_KEY])
    header.pop("header_crc32", None)
    edit(header)
    text = json.dumps(header)
    sealed = header_module._seal(text) if header["version"] >= 3 else text  # a version 3 header ends with its CRC-32
    safetensors.torch.save_file(tensors, path, metadata={fmt.METADATA_KEY: sealed})


def test_version_1_files_load_and_forged_ties_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.momos"
    packed = _packed(tie=False)
    assert momos.save(packed, path).version == fmt.FORMAT_VERSION == 3

    def as_version_1(header: dict) -> None:
        header["version"] = 1
        header.pop("tied", None)

    _rewrite_header(path, as_version_1)
    assert momos.inspect(path).version == 1
    loaded = momos.load(path, TiedLM(tie=False))
    assert torch.equal(loaded.head.weight, packed.head.weight)

    cases = [
        (lambda h: h.update(version=1, tied=[]), r"unknown field\(s\) \['tied'\]"),  # version 1 has no ties
        (lambda h: h.update(version=2), r"missing field\(s\) \['tied'\]"),
        (lambda h: h.update(version=2, tied=[{"name": "x", "source": "nope"}]), "field 'source' must name"),
        (lambda h: h.update(version=2, tied=[{"name": "head.weight", "source": "embedding.weight"}]),
         "appears more than once"),
        (lambda h: h.update(version=2, tied=[{"name": "a", "source": "head.weight"},
                                             {"name": "a", "source": "head.weight"}]), "appears more than once"),
        (lambda h: h.update(version=2, tied=[{"name": "a"}]), r"missing field\(s\) \['source'\]"),
        (lambda h: h.update(version=3), r"missing field\(s\) \['tied'\]"),
        (lambda h: h.update(version=4), "reads versions"),
    ]
    for edit, match in cases:
        _rewrite_header(path, as_version_1)  # a clean version 1 header to edit
        _rewrite_header(path, edit)
        with pytest.raises(MoMosFormatError, match=match):
            momos.load(path, TiedLM(tie=False))


def test_a_tie_to_a_name_the_model_lacks_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.momos"
    momos.save(_packed(tie=True), path)
    _rewrite_header(path, lambda h: h["tied"].append({"name": "extra.weight", "source": "embedding.weight"}))
    with pytest.raises(MoMosFormatError, match=r"in the file but not in the model: \['extra.weight'\]"):
        momos.load(path, TiedLM(tie=True))
