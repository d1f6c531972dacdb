"""Shared fixtures: the small models every stage of the lifecycle is tested on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

# The tests run small tensors: one intra-op thread is as fast as two there, and it keeps OpenMP from
# spin-waiting (100x slowdowns seen) when the machine is busy with other work.
torch.set_num_threads(1)


class SmallCNN(nn.Module):
    """Conv + BatchNorm + pooling + Linear: exercises 4-D weights, norm parameters and running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class SmallTransformer(nn.Module):
    """Embedding + one encoder layer (attention, LayerNorm) + head, on integer token inputs."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embedding(tokens))).mean(1))


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


# name -> (factory, example input for a batch of `b`)
SMALL_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "mlp": (small_mlp, lambda b: torch.randn(b, 1, 8, 8)),
    "cnn": (SmallCNN, lambda b: torch.randn(b, 1, 8, 8)),
    "transformer": (SmallTransformer, lambda b: torch.randint(0, 40, (b, 6))),
}


@pytest.fixture(params=sorted(SMALL_MODELS))
def small_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Callable[[int], torch.Tensor]]:
    """``(name, model in eval mode with non-trivial BatchNorm statistics, input maker)`` for each small model."""
    torch.manual_seed(0)
    factory, make_input = SMALL_MODELS[request.param]
    model = factory()
    if request.param == "cnn":  # give BatchNorm running statistics that are not the defaults
        model.train()
        with torch.no_grad():
            model(make_input(16))
    return request.param, model.eval(), make_input
