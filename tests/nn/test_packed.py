"""The converted form read and trained from outside: `packed_tensors`, `dense_copy`, `train_motifs`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_MODELS
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import momos
from momos import MoMosConfig, MoMosStateError, runtime
from momos.blocks import reconstruct
from momos.export import to_onnx
from momos.nn.packed import dense_copy, motif_tables, packed_tensors, train_motifs


def _packed(name: str = "mlp", **config) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, make_input = SMALL_MODELS[name]
    config = MoMosConfig(**{"block_size": 4, "num_motifs": 24, **config})
    model = momos.prepare(factory().eval(), config)
    momos.refresh(model)
    return momos.convert(model), make_input(8)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), scope=st.sampled_from(["global", "tensor"]), zero=st.booleans())
def test_a_motifs_gradient_is_the_sum_of_its_uses_gradients(seed, scope, zero):
    """Autograd through the packed forward equals autograd through a dense reconstruction of every tensor."""
    packed, x = _packed(scope=scope, force_zero=zero, seed=seed)
    tables = motif_tables(packed)
    train_motifs(packed)
    packed(x).square().sum().backward()
    # The same loss through dense weights: each tensor's gradient gathered back onto its motifs by its mosaic.
    twin = dense_copy(packed)
    for p in twin.parameters():
        p.requires_grad_(True)
    twin(x).square().sum().backward()
    for table in tables:
        want = torch.zeros_like(table.motifs, dtype=torch.float64)
        for name, p in packed_tensors(packed):
            if p.table is table:
                grad = twin.get_parameter(name).grad.reshape(-1).double()
                blocks = torch.nn.functional.pad(grad, (0, p.num_blocks * table.block_size - grad.numel()))
                want.index_add_(0, p.mosaic.long(), blocks.view(-1, table.block_size))
        if zero:
            want[0] = 0  # the forced zero motif gets no gradient
        torch.testing.assert_close(table.motifs.grad.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "adam", "sgd"])
def test_training_moves_motifs_keeps_mosaics_and_the_zero_motif(make_opt):
    packed, x = _packed()
    (table,) = motif_tables(packed)
    before = table.motifs.clone()
    mosaics = {name: p.mosaic.clone() for name, p in packed_tensors(packed)}
    opt = make_opt(train_motifs(packed))
    assert not any(p.requires_grad for p in packed.parameters() if p is not table.motifs)
    target = torch.randn(8, 10)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(packed(x), target).backward()
        opt.step()
    assert torch.equal(table.motifs[0], torch.zeros(4))
    assert not torch.equal(table.motifs[1:], before[1:])
    assert all(torch.equal(p.mosaic, mosaics[name]) for name, p in packed_tensors(packed))
    # Every packed tensor decodes from the trained table, rounded as it is stored (float16, the default).
    stored = table.motifs.detach().to(table.stored_dtype)
    for _, p in packed_tensors(packed):
        assert torch.equal(p(), reconstruct(stored, p.mosaic, p.shape, dtype=p.dtype))


def test_dense_parameters_train_only_when_asked():
    packed, _ = _packed()
    params = train_motifs(packed, dense=True)
    (table,) = motif_tables(packed)
    biases = [p for n, p in packed.named_parameters() if n.endswith("bias")]
    assert params[0] is table.motifs and all(any(b is p for p in params) for b in biases)
    assert all(b.requires_grad for b in biases)
    assert [d.name for d in momos.report(packed).dense] == [n for n, _ in packed.named_parameters() if "bias" in n]
    momos.freeze_motifs(packed)
    assert not table.trainable and "motifs" in dict(table.named_buffers())


def test_a_trained_model_saves_loads_exports_and_runs_in_onnxruntime(tmp_path: Path):
    packed, x = _packed("cnn")
    opt = torch.optim.Adam(train_motifs(packed, dense=True), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        packed(x).square().mean().backward()
        opt.step()
    packed.eval()
    with torch.no_grad():
        want = packed(x)
    momos.save(packed, tmp_path / "m.momos")
    loaded = momos.load(tmp_path / "m.momos", SMALL_MODELS["cnn"][0]()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    to_onnx(packed, (x,), tmp_path / "m.onnx")
    got = runtime.load(tmp_path / "m.onnx").run({"input": x.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), want.numpy(), rtol=1e-5, atol=1e-5)


def test_train_motifs_needs_a_packed_model():
    with pytest.raises(MoMosStateError, match="convert"):
        train_motifs(nn.Linear(4, 4))
