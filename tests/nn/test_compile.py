"""Prepared models under torch.compile: same forward and gradients as eager, one graph, no recompile
when the bank is refreshed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import momos


def _pair(mode: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = momos.prepare(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)),
                          momos.MoMosConfig(block_size=2, capacity=0.25, mode=mode, targets="all"))
    return model, momos.prepare(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)),
                                momos.MoMosConfig(block_size=2, capacity=0.25, mode=mode, targets="all"))


def _forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_compiled_matches_eager_before_and_after_refreshes(mode: str) -> None:
    torch._dynamo.reset()
    eager, twin = _pair(mode)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 10)
    with torch.no_grad():  # move the latent weights off their mosaic, so STE differs from identity
        for p in [*eager.parameters(), *twin.parameters()]:
            p.add_(0.01)
    for _ in range(3):  # before the first refresh, then after two different banks
        want, want_grads = _forward_backward(eager, x)
        got, got_grads = _forward_backward(compiled, x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
        momos.refresh(eager)
        momos.refresh(twin)
        with torch.no_grad():
            for p in [*eager.parameters(), *twin.parameters()]:
                p.add_(0.003)
    assert torch.equal(eager(x), compiled(x))
    if mode == "ste":  # the compiled forward really is a mosaic, not the latent weights
        assert not torch.equal(compiled(x), nn.functional.linear(nn.functional.relu(
            nn.functional.linear(x, eager[0].parametrizations.weight.original, eager[0].parametrizations.bias
                                 .original)), eager[2].parametrizations.weight.original,
            eager[2].parametrizations.bias.original))


@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_refresh_does_not_recompile(mode: str) -> None:
    torch._dynamo.reset()
    model, _ = _pair(mode)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 10)
    compiled(x)
    for _ in range(3):
        momos.refresh(model)
        compiled(x)
    assert counter.frame_count == 1
