"""`momos.finetune` and `momos.compress`: the motif tables learn, the rest of the packed model stays as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_MODELS, SmallCNN
from torch import nn

import momos
from momos import MoMosConfig, MoMosConfigError
from momos.nn.finetune import recalibrate_batchnorm
from momos.nn.packed import motif_tables, packed_tensors


def _task(n: int = 256, seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A dense MLP fitted to a random labelling, and its data in batches of 32."""
    torch.manual_seed(seed)
    model = SMALL_MODELS["mlp"][0]()
    x = torch.randn(n, 1, 8, 8)
    y = model(x).argmax(1)
    batches = list(zip(x.split(32), y.split(32), strict=True))
    return model.eval(), batches


def _packed(model: nn.Module, num_motifs: int = 16) -> nn.Module:
    config = MoMosConfig(block_size=4, num_motifs=num_motifs, motif_init="kmeans")
    prepared = momos.prepare(model, config, include=["re:.*weight"])
    momos.refresh(prepared)
    return momos.convert(prepared)


def _agreement(model: nn.Module, teacher: nn.Module, batches: list) -> float:
    with torch.no_grad():
        agree = [float((model(x).argmax(1) == teacher(x).argmax(1)).float().mean()) for x, _ in batches]
    return sum(agree) / len(agree)


@pytest.mark.parametrize("mode", ["labels", "mse", "kl"])
def test_finetune_lowers_the_loss_and_keeps_mosaics_and_the_zero_motif(mode):
    dense, batches = _task()
    packed = _packed(dense)
    mosaics = {n: p.mosaic.clone() for n, p in packed_tensors(packed)}
    biases = {n: p.detach().clone() for n, p in packed.named_parameters()}
    def error() -> float:  # what the mode optimizes, over all batches, in eval mode
        with torch.no_grad():
            if mode == "labels":
                return sum(float(nn.functional.cross_entropy(packed(x), y)) for x, y in batches)
            return sum(float(nn.functional.mse_loss(packed(x), dense(x))) for x, _ in batches)

    before = error()
    if mode == "labels":
        stats = momos.finetune(packed, batches, loss=nn.functional.cross_entropy, epochs=8, lr=3e-3, progress=False)
    else:
        inputs = [x for x, _ in batches]
        dense.train()
        stats = momos.finetune(packed, inputs, teacher=dense, distill=mode, epochs=8, lr=3e-3, progress=False)
        assert dense.training  # the teacher ran in eval mode and got its mode back
        dense.eval()
    assert len(stats.epoch_losses) == 8 and stats.steps == 8 * len(batches)
    assert stats.epoch_losses[-1] < 0.85 * stats.epoch_losses[0]
    assert error() < 0.85 * before
    (table,) = motif_tables(packed)
    assert not table.trainable and torch.equal(table.motifs[0], torch.zeros(4))
    assert all(torch.equal(p.mosaic, mosaics[n]) for n, p in packed_tensors(packed))
    # Parameters left dense do not move unless asked, and keep their requires_grad.
    assert all(torch.equal(p, biases[n]) and p.requires_grad for n, p in packed.named_parameters())


def test_finetune_is_deterministic_for_a_seed_and_trains_dense_parameters_when_asked():
    dense, batches = _task()
    runs = []
    for _ in range(2):
        packed = _packed(dense)
        momos.finetune(packed, batches, loss=nn.functional.cross_entropy, epochs=2, dense=True, seed=3,
                       progress=False)
        runs.append(packed.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["1.bias"], dense.state_dict()["1.bias"])


def test_batchnorm_statistics_are_re_estimated_over_the_batches():
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(64, 1, 8, 8)
    packed = _packed(model, num_motifs=8)
    momos.finetune(packed, [x[:32], x[32:]], teacher=model.eval(), epochs=1, progress=False)
    # The plain average of the two batches' statistics, computed from the packed model's own first conv.
    with torch.no_grad():
        a = packed.conv1(x[:32]).mean((0, 2, 3))
        b = packed.conv1(x[32:]).mean((0, 2, 3))
    torch.testing.assert_close(packed.bn1.running_mean, (a + b) / 2, rtol=1e-5, atol=1e-6)
    assert int(packed.bn1.num_batches_tracked) == 2 and packed.bn1.momentum == 0.1
    before = {k: v.clone() for k, v in packed.bn1.state_dict().items()}
    with pytest.raises(MoMosConfigError, match="statistics are kept"):
        recalibrate_batchnorm(packed, [])
    assert all(torch.equal(v, before[k]) for k, v in packed.bn1.state_dict().items())


def test_bad_finetune_arguments_are_refused_by_name():
    dense, batches = _task(64)
    packed = _packed(dense)
    for kwargs, field in [({}, "teacher"), ({"teacher": dense, "loss": nn.functional.mse_loss}, "teacher"),
                          ({"teacher": dense, "distill": "l1"}, "distill"), ({"teacher": dense, "epochs": 0}, "epochs"),
                          ({"teacher": dense, "lr": float("nan")}, "lr")]:
        with pytest.raises(MoMosConfigError, match=field):
            momos.finetune(packed, [x for x, _ in batches], progress=False, **kwargs)
    with pytest.raises(MoMosConfigError, match="empty"):
        momos.finetune(packed, iter([]), teacher=dense, progress=False)
    with pytest.raises(MoMosConfigError, match=r"\(inputs, target\)"):
        momos.finetune(packed, [x for x, _ in batches], loss=nn.functional.cross_entropy, progress=False)


def test_compress_selects_weight_matrices_meets_the_size_and_distills_by_default():
    dense, batches = _task()
    inputs = [x for x, _ in batches]
    one_shot = momos.compress(dense, MoMosConfig(block_size=4, bits_per_weight=2.5, motif_init="kmeans"))
    tuned = momos.compress(dense, MoMosConfig(block_size=4, bits_per_weight=2.5, motif_init="kmeans"), inputs,
                           epochs=6, lr=3e-3, progress=False)
    report = momos.report(tuned)
    assert [t.name for t in report.tensors] == ["1.weight", "3.weight", "5.weight"]
    assert [d.name for d in report.dense] == ["1.bias", "3.bias", "5.bias"]
    assert report.bits_per_weight <= 2.5
    assert not any(".parametrizations." in k for k in dense.state_dict())  # the dense model is left as it was
    assert _agreement(tuned, dense, batches) > _agreement(one_shot, dense, batches)
    # Exclusions and overrides go through prepare's rules; a tied weight is compressed once.
    partial = momos.compress(dense, exclude=["5"], overrides={"3.weight": MoMosConfig(block_size=2, num_motifs=8,
                                                                                    scope="tensor")})
    assert {t.name: t.block_size for t in momos.report(partial).tensors} == {"1.weight": 4, "3.weight": 2}
    with pytest.raises(momos.MoMosSelectionError, match="include="):
        momos.compress(nn.Sequential(nn.LayerNorm(8)))
    tied = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 40, bias=False))
    tied[1].weight = tied[0].weight
    assert [t.name for t in momos.report(momos.compress(tied)).tensors] == ["0.weight"]


class _ReadsAParameterInTrain(nn.Sequential):
    """Like transformers' models, whose train() reads a parameter's device (and fails on a model without one)."""

    def train(self, mode: bool = True) -> nn.Module:
        next(self.parameters())
        return super().train(mode)


def test_finetune_of_a_model_packed_whole_restores_its_mode_while_it_still_has_parameters():
    torch.manual_seed(0)
    dense = _ReadsAParameterInTrain(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    packed = momos.compress(dense, MoMosConfig(block_size=4, num_motifs=8, targets="all"))
    assert not list(packed.parameters())
    stats = momos.finetune(packed, [torch.randn(16, 8) for _ in range(2)], teacher=dense, progress=False)
    assert stats.steps == 2 and not packed.training and not list(packed.parameters())


def test_validation_keeps_the_epoch_with_the_lowest_held_out_loss():
    model, batches = _task()
    train, held_out = batches[:6], batches[6:]
    packed = _packed(model)
    twin = _packed(model)
    # A learning rate so high that training ruins the model: epoch 0 (as converted) must be what is kept.
    stats = momos.finetune(packed, train, loss=nn.functional.cross_entropy, epochs=3, lr=10.0, progress=False,
                           validation=held_out)
    assert len(stats.validation_losses) == 4 and stats.best_epoch == 0
    for (_, a), (_, b) in zip(packed_tensors(packed), packed_tensors(twin), strict=True):
        assert torch.equal(a.table.motifs, b.table.motifs)
    # A sane one improves on the held-out loss, and the epoch kept is the one with the lowest.
    stats = momos.finetune(twin, train, loss=nn.functional.cross_entropy, epochs=3, lr=1e-2, progress=False,
                           validation=held_out)
    assert stats.best_epoch == min(range(4), key=stats.validation_losses.__getitem__) > 0
    with torch.no_grad():
        kept = sum(float(nn.functional.cross_entropy(twin.eval()(x), y)) for x, y in held_out) / len(held_out)
    assert kept == pytest.approx(stats.validation_losses[stats.best_epoch], rel=1e-6)
    with pytest.raises(MoMosConfigError, match="validation is empty"):
        momos.finetune(twin, train, loss=nn.functional.cross_entropy, progress=False, validation=[])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_low_precision_table_trains_in_float32_and_is_stored_rounded(dtype, tmp_path):
    """AdamW on a float16 parameter divides by an epsilon that float16 rounds to zero: the table must train as a
    float32 copy, and what is kept, decoded and saved afterwards is that copy rounded to the table's dtype."""
    dense, batches = _task()
    config = MoMosConfig(block_size=4, num_motifs=16, motif_init="kmeans", motif_dtype=dtype)
    packed = momos.compress(dense, config)
    before = {id(t): t.motifs.clone() for t in motif_tables(packed)}
    stats = momos.finetune(packed, [x for x, _ in batches], teacher=dense, epochs=2, lr=1e-2, progress=False)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in stats.epoch_losses)
    for table in motif_tables(packed):
        assert table.motifs.dtype == getattr(torch, dtype) and not table.trainable
        assert table.config.motif_dtype == dtype
        assert not torch.equal(table.motifs, before[id(table)])  # the updates were not lost to rounding
    trained = momos.nn.packed.train_motifs(packed)
    assert all(p.dtype == torch.float32 for p in trained)
    packed.to("cpu")  # a move is not a cast: the table keeps its stored dtype
    assert all(t.config.motif_dtype == dtype for t in motif_tables(packed))
    momos.save(packed, tmp_path / "t.momos")  # saved mid-training: the rounded table
    momos.nn.packed.freeze_motifs(packed)
    loaded = momos.load(tmp_path / "t.momos", SMALL_MODELS["mlp"][0]())
    x = batches[0][0]
    torch.testing.assert_close(loaded(x), packed(x), rtol=0, atol=0)
