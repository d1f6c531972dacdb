"""Small reference models of the paper's experiments, sized for digits and for user data.

`mlp` is the paper's MLP (input -> 256 x4 -> classes, ReLU); `resnet` a CIFAR-style ResNet (depth 20 by
default); `vit` a tiny vision transformer. `build(name, input_shape, num_classes)` picks one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from momos.errors import MoMosConfigError

__all__ = ["MODELS", "ResNet", "ViT", "build", "mlp", "resnet", "vit"]


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 256, depth: int = 4) -> nn.Module:
    """Flatten, then `depth` hidden Linear+ReLU layers of width `hidden`, then a Linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages of basic blocks (widths w, 2w, 4w), pooling, a head."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 20, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise MoMosConfigError(f"depth must be 6n+2 (20, 32, 44, ...), got {depth!r}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, channels = [], width
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(_BasicBlock(channels, out, 2 if stage and i == 0 else 1))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def resnet(input_shape: tuple[int, ...], num_classes: int, depth: int = 20, width: int = 16) -> nn.Module:
    """A ResNet-`depth` for images of shape (channels, height, width)."""
    return ResNet(input_shape[0], num_classes, depth, width)


class ViT(nn.Module):
    """A tiny vision transformer: patch embedding, class token, learned positions, pre-norm encoder."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, patch: int = 2, dim: int = 64,
                 depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height % patch or width % patch:
            raise MoMosConfigError(f"patch must divide the image size {height}x{width}, got {patch!r}")
        tokens = (height // patch) * (width // patch)
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


def vit(input_shape: tuple[int, ...], num_classes: int, **kwargs: int) -> nn.Module:
    """A tiny ViT for images of shape (channels, height, width)."""
    return ViT(input_shape, num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": resnet, "vit": vit}


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The reference model `name` ("mlp", "cnn", "vit") for inputs of `input_shape` (no batch dimension).

    Raises:
        MoMosConfigError: an unknown `name`, or a "cnn" or "vit" for inputs that are not images.
    """
    if name not in MODELS:
        raise MoMosConfigError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if name != "mlp" and len(input_shape) != 3:
        raise MoMosConfigError(f"model {name!r} needs image inputs (channels, height, width), got {input_shape}")
    return MODELS[name](tuple(input_shape), num_classes)
