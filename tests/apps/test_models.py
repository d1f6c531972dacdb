import pytest
import torch

from momos import MoMosConfigError
from momos.apps.models import build


@pytest.mark.parametrize("name, params", [("mlp", 216_586), ("cnn", 272_186), ("vit", 69_194)])
def test_reference_models_on_digits_shapes(name, params):
    model = build(name, (1, 8, 8), 10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_paper_mlp_on_cifar_shape_has_about_a_million_parameters():
    model = build("mlp", (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 3072 * 256 + 256 + 3 * (256 * 256 + 256) + 2570


def test_build_errors():
    with pytest.raises(MoMosConfigError, match="resnet"):
        build("resnet", (1, 8, 8), 10)
    with pytest.raises(MoMosConfigError, match="image"):
        build("cnn", (64,), 10)
    with pytest.raises(MoMosConfigError, match="patch"):
        build("vit", (1, 7, 7), 10)
