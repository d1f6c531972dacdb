"""A model on an accelerator goes through the whole lifecycle there: prepare, refresh, train (hard and STE),
convert, save, load, export. CI has no GPU: `tests/accelerator.py` stands in for one, refusing to mix devices
the way CUDA does; where torch sees a real CUDA device the same checks run on it too."""

from __future__ import annotations

import copy
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerator import DEVICE, OnDevice, accelerated
from torch import nn

import momos
from momos import complexity
from momos.blocks import reconstruct, to_blocks
from momos.nn.parametrize import MotifBank, prepared_tensors
from momos.runtime import Session
from momos.search import assign

STEPS = 5
REFRESH_EVERY = 2


def _devices() -> list:
    cuda = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
    return [pytest.param("stand-in"), cuda]


def _on(where: str) -> tuple[torch.device, AbstractContextManager]:
    """The device and the context its tensors are used in."""
    if where == "stand-in":
        return DEVICE, accelerated()
    return torch.device("cuda", 0), nullcontext()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def _config(mode: str, **fields: str | int | float) -> momos.MoMosConfig:
    return momos.MoMosConfig(**{"block_size": 2, "capacity": 0.25, "mode": mode, **fields})


def _batches(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g).to(device), torch.randint(0, 3, (8,), generator=g).to(device))
            for _ in range(STEPS)]


def _assert_exact(model: nn.Module, refreshed: bool) -> None:
    """In STE mode, each prepared tensor's MoMos weight is its latent blocks' nearest motifs, as the CPU assigns
    them; in hard mode, right after a refresh, its weights are what its mosaic reconstructs."""
    for _, param, latent in prepared_tensors(model):
        latent = latent.detach()
        motifs = param.bank.motifs.cpu().to(latent.dtype)
        nearest = assign.nearest(to_blocks(latent.cpu(), motifs.shape[1]), motifs)
        expected = reconstruct(motifs, nearest, latent.shape)
        if param.bank.config.mode == "ste":
            with torch.no_grad():
                assert torch.equal(param(latent).cpu(), expected)
        elif refreshed:  # the projection written into the weights (not the nearest of them: padding is reset)
            assert torch.equal(latent.cpu(), reconstruct(motifs, param.mosaic.cpu(), latent.shape))


def _trained(config: momos.MoMosConfig, device: torch.device, prepare_first: bool) -> nn.Module:
    """The model prepared (before or after it moves to `device`), then `_train`ed."""
    model = momos.prepare(_model(), config).to(device) if prepare_first else momos.prepare(_model().to(device), config)
    return _train(model, device)


def _train(model: nn.Module, device: torch.device) -> nn.Module:
    """The prepared `model` refreshed, trained `STEPS` AdamW steps with a refresh every `REFRESH_EVERY`, each
    checked by `_assert_exact`."""
    assert all(t.device == device for t in [*model.parameters(), *model.buffers()])
    momos.refresh(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, foreach=False)  # the same kernels on either side
    momos.refresh_every(model, optimizer, REFRESH_EVERY)
    for step, (x, y) in enumerate(_batches(device), 1):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _assert_exact(model, refreshed=step % REFRESH_EVERY == 0)
    return model


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every entry equal bit for bit (NaN where NaN)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


# A global bank of 48 motifs (every motif on each one's list), one of 97 (the lists' reach bounds a search),
# k-means banks per tensor.
BANKS = {"random-global": {}, "larger-bank": {"capacity": 0.5},
         "kmeans-per-tensor": {"motif_init": "kmeans", "scope": "tensor", "block_size": 3}}


@pytest.mark.parametrize("prepare_first", [True, False], ids=["prepared-then-moved", "moved-then-prepared"])
@pytest.mark.parametrize("fields", BANKS.values(), ids=BANKS.keys())
@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_training_on_the_stand_in_equals_training_on_the_cpu(mode: str, fields: dict, prepare_first: bool) -> None:
    """The stand-in runs every op on CPU data, so the run must be the CPU run bit for bit, in every weight, bank
    and mosaic: moving to a device changes where tensors live, never what MoMos computes."""
    config = _config(mode, **fields)
    expected = _cpu_state(_trained(config, torch.device("cpu"), prepare_first))
    with accelerated():
        model = _trained(config, DEVICE, prepare_first)
        assert isinstance(next(model.parameters()), OnDevice)
        got = _cpu_state(model)
        packed = momos.convert(model)
        assert all(t.device == DEVICE for t in [*packed.parameters(), *packed.buffers()])
    _assert_same(got, expected)


@pytest.mark.parametrize("where", _devices())
@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_a_model_trained_on_a_device_saves_loads_and_exports_there(where: str, mode: str, tmp_path: Path) -> None:
    """Its complexity and report are those of a CPU copy; loaded onto the device it gives the same outputs; the
    exported file gives them in onnxruntime."""
    device, context = _on(where)
    with context:
        model = _trained(_config(mode), device, prepare_first=False)
        banks = [m for m in model.modules() if isinstance(m, MotifBank)]
        assert banks and all(b.motifs.device == device and int(b.refreshes) == 1 + STEPS // REFRESH_EVERY
                             for b in banks)
        packed = momos.convert(model)
        x = _batches(device)[0][0]
        with torch.no_grad():
            want = packed(x)
        on_cpu = copy.deepcopy(packed).cpu()
        assert complexity.summary(packed) == complexity.summary(on_cpu)
        assert str(momos.report(packed)) == str(momos.report(on_cpu))
        assert momos.save(packed, tmp_path / "model.momos").file_bytes > 0
        loaded = momos.load(tmp_path / "model.momos", _model().to(device))
        assert all(t.device == device for t in [*loaded.parameters(), *loaded.buffers()])
        with torch.no_grad():
            assert torch.equal(loaded(x).cpu(), want.cpu())
        momos.export.to_onnx(packed, x, tmp_path / "model.onnx")
        feeds, want = {"input": x.cpu().numpy()}, want.cpu().numpy()
    got = Session(tmp_path / "model.onnx").run(feeds)["output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_a_model_prepared_on_the_meta_device_trains_once_materialized_whatever_its_buffers_hold(mode: str) -> None:
    """The large-model way (FSDP2's): build and prepare on the meta device, `to_empty`, initialize the weights
    module by module (parents first). `to_empty` resets the MoMos buffers of a bank never refreshed; written over
    anyway with values that would pass for a bank refreshed 7 times, they still do not count. Training must
    equal the model built and prepared on the CPU."""
    expected = _cpu_state(_trained(_config(mode), torch.device("cpu"), prepare_first=True))
    with torch.device("meta"):
        model = momos.prepare(nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3)), _config(mode))
    model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():  # reset by the move, whatever memory held
        assert buffer.isnan().all() if name.endswith("distortion") else not buffer.any(), name
    for buffer in model.buffers():  # and had they not been, the flag would still not trust them
        buffer.fill_(7 if buffer.dtype == torch.int64 else math.nan)
    torch.manual_seed(0)  # as `_model` builds it
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    _assert_same(_cpu_state(_train(model, torch.device("cpu"))), expected)


class _Split(nn.Module):
    """A model across two devices: its first layer on the CPU, its second on the stand-in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(12, 24), nn.Linear(24, 3).to(DEVICE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)).to(DEVICE))


@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_a_model_across_devices_takes_a_bank_per_tensor_not_one_global_bank(mode: str) -> None:
    with accelerated():
        with pytest.raises(momos.MoMosConfigError, match="one device.*scope='tensor'"):
            momos.prepare(_Split(), _config(mode))
        model = momos.prepare(_Split(), _config(mode, scope="tensor"))
        momos.refresh(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        for x, y in _batches(torch.device("cpu")):
            loss = nn.functional.cross_entropy(model(x), y.to(DEVICE))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _assert_exact(model, refreshed=False)
        momos.refresh(model)
        _assert_exact(model, refreshed=True)
        packed = momos.convert(model)
        for module, device in ((packed.first, torch.device("cpu")), (packed.second, DEVICE)):
            assert all(t.device == device for t in [*module.parameters(), *module.buffers()])
        assert packed(x).device == DEVICE


# The stand-in must refuse what CUDA refuses, or the tests above would pass code that fails on a GPU.

def test_the_stand_in_refuses_to_mix_devices_as_cuda_does() -> None:
    with accelerated():
        on_device = torch.arange(6.0).to(DEVICE)
        assert on_device.device == DEVICE and on_device.device.type != "cpu"
        with pytest.raises(RuntimeError, match="same device"):
            _ = on_device + torch.ones(6)
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(6).index_put_((torch.tensor([0]),), on_device[:1])
        with pytest.raises(RuntimeError, match="same device"):
            torch.index_select(on_device, 0, torch.tensor([1, 2]))
        with pytest.raises(RuntimeError):
            on_device.numpy()
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(3, device=DEVICE, generator=torch.Generator())


def test_the_stand_in_allows_what_cuda_allows() -> None:
    with accelerated():
        on_device = torch.arange(6.0).to(DEVICE)
        assert torch.equal((on_device * torch.tensor(2.0)).cpu(), torch.arange(6.0) * 2)  # a CPU scalar
        assert torch.equal(on_device[torch.tensor([4, 1])].cpu(), torch.tensor([4.0, 1.0]))  # a CPU index
        on_device[torch.tensor([0])] = torch.tensor(9.0)
        cpu = torch.zeros(6)
        cpu.copy_(on_device)
        assert cpu.tolist() == [9.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        grad = torch.ones(3).to(DEVICE).requires_grad_()
        (grad * 3).sum().backward()
        assert isinstance(grad.grad, OnDevice) and grad.grad.cpu().tolist() == [3.0, 3.0, 3.0]
