"""`refresh_bank` works in chunks to bound its memory: chunked, it must do exactly what one pass would."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import momos
from momos.blocks import reconstruct, to_blocks
from momos.nn import parametrize
from momos.nn.parametrize import prepared_tensors


class Odd(nn.Module):
    """Tensors whose sizes are not multiples of the block size, and a non-contiguous (transposed) weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(37, 11))
        self.b = nn.Parameter(torch.randn(13))
        self.c = nn.Parameter(torch.randn(24, 9).t())  # a (9, 24) view, not contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def one_pass(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, int]]:
    """What the refresh must produce, computed in one pass per tensor from the drawn bank: for each tensor
    (new weight, mosaic, distortion, weights changed)."""
    out = {}
    for name, param, latent in prepared_tensors(model):
        weight = latent.detach()
        motifs = param.bank.motifs.to(weight.dtype)
        mosaic = momos.search.assign.nearest(to_blocks(weight, param.bank.block_size), motifs, engine="torch")
        new = reconstruct(motifs, mosaic, weight.shape)
        diff = (weight - new).double()
        out[name] = (new, mosaic, float((diff * diff).sum()), int((weight != new).sum()))
    return out


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("chunk", [1, 5, 1 << 16])
def test_chunked_refresh_equals_one_pass(block_size, chunk, monkeypatch):
    torch.manual_seed(0)
    config = momos.MoMosConfig(block_size=block_size, capacity=0.2)
    chunked = momos.prepare(Odd(), config)
    whole = copy.deepcopy(chunked)
    monkeypatch.setattr(parametrize, "_REFRESH_CHUNK", chunk)
    stats = momos.refresh(chunked)
    # The same draw on an untouched copy, then the one-pass projection of the original weights.
    before = {name: weight.detach().clone() for name, _, weight in prepared_tensors(whole)}
    momos.refresh(whole)
    for name, _, weight in prepared_tensors(whole):
        weight.data.copy_(before[name])
    expected = one_pass(whole)
    for name, param, weight in prepared_tensors(chunked):
        new, mosaic, distortion, changed = expected[name]
        assert torch.equal(weight, new), name
        assert torch.equal(param.mosaic, mosaic), name
        assert stats.tensors[name].distortion == pytest.approx(distortion, rel=1e-12), name
        assert stats.tensors[name].weights_changed == changed, name
        assert torch.equal(stats.tensors[name].usage, torch.bincount(mosaic, minlength=param.bank.num_motifs))
    assert not chunked.parametrizations["c"].original.is_contiguous()  # written back through the view


def test_one_chunk_per_tensor_gives_the_one_pass_distortion_bit_for_bit():
    torch.manual_seed(0)
    model = momos.prepare(nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 7)), momos.MoMosConfig(block_size=4,
                                                                                                   capacity=0.1))
    before = {name: weight.detach().clone() for name, _, weight in prepared_tensors(model)}
    stats = momos.refresh(model)
    for name, _, weight in prepared_tensors(model):
        diff = (before[name] - weight.detach()).double()
        assert stats.tensors[name].distortion == float((diff * diff).sum())
