import math

import pytest
import torch

import momos
from momos import MoMosConfig, MoMosConfigError
from momos.apps.data import split
from momos.apps.models import build
from momos.apps.train import evaluate, fit


@pytest.fixture(scope="module")
def blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 10, generator=g)
    return split(x.numpy(), y.numpy(), seed=0)


@pytest.mark.parametrize("refresh, refreshes", [(None, 0), ("epoch", 2), ("step", 8), (3, 2)])
def test_fit_learns_and_refreshes_on_schedule(blobs, refresh, refreshes):
    torch.manual_seed(0)
    model = build("mlp", blobs.input_shape, blobs.num_classes)
    if refresh is not None:
        model = momos.prepare(model, MoMosConfig(capacity=0.05))
    history = fit(model, blobs, epochs=2, refresh=refresh, lr=3e-3, batch_size=64)
    assert len(history.refreshes) == refreshes
    assert [e.epoch for e in history.epochs] == [1, 2]
    assert history.final_accuracy == evaluate(model, blobs.x_test, blobs.y_test) > 0.6
    last = history.epochs[-1]
    assert math.isnan(last.distortion) == (refresh is None)


def test_fit_is_seeded(blobs):
    def run():
        torch.manual_seed(0)
        model = momos.prepare(build("mlp", blobs.input_shape, blobs.num_classes), MoMosConfig(capacity=0.05))
        return fit(model, blobs, epochs=1, refresh="epoch", seed=5).epochs[0].train_loss

    assert run() == run()


@pytest.mark.parametrize("kwargs, field", [(dict(epochs=0), "epochs"), (dict(epochs=1, refresh="daily"), "refresh"),
                                           (dict(epochs=1, optimizer="lbfgs"), "optimizer")])
def test_fit_rejects_bad_arguments(blobs, kwargs, field):
    with pytest.raises(MoMosConfigError, match=field):
        fit(build("mlp", blobs.input_shape, blobs.num_classes), blobs, **kwargs)


def test_a_last_batch_of_one_sample_joins_the_previous_one():
    from momos.apps.train import split_batches

    assert [len(b) for b in split_batches(torch.arange(129), 64)] == [64, 65]
    assert [len(b) for b in split_batches(torch.arange(130), 64)] == [64, 64, 2]
    assert [len(b) for b in split_batches(torch.arange(1), 64)] == [1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(161, 1, 8, 8, generator=g)  # 80% train = 129 samples: 64 + 64 + 1
    data = split(x.numpy(), (torch.arange(161) % 3).numpy(), seed=0)
    assert len(data.x_train) % 64 == 1
    model = build("cnn", data.input_shape, data.num_classes)  # BatchNorm: a batch of one would fail
    assert len(fit(model, data, epochs=1, optimizer="sgd").epochs) == 1
