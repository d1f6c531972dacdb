"""Data the demo and experiments run on: scikit-learn's digits (ships offline) or a user's .npz file."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from momos.errors import MoMosConfigError, MoMosFormatError

__all__ = ["Dataset", "digits", "load_inputs", "load_npz", "split"]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of float inputs and integer class labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input sample (no batch dimension)."""
        return tuple(self.x_train.shape[1:])


def split(x: np.ndarray, y: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A seeded, stratification-free random split of (x, y) into train and test."""
    if not 0 < test_fraction < 1:
        raise MoMosConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) - max(1, round(len(x) * test_fraction))
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    train, test = torch.as_tensor(order[:cut]), torch.as_tensor(order[cut:])
    return Dataset(xt[train], yt[train], xt[test], yt[test], int(yt.max()) + 1)


def digits(*, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits as (1, 8, 8) images scaled to [0, 1]; 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return split(bunch.images[:, None].astype(np.float32) / 16.0, bunch.target, seed=seed)


def load_npz(path: str | Path, *, seed: int = 0) -> Dataset:
    """A user's data: an .npz with float array `X` (samples first) and integer labels `y`, split 80/20.

    Raises:
        MoMosConfigError: `path` does not exist.
        MoMosFormatError: the file is not a readable .npz, or its `X` and `y` do not fit that contract.
    """
    path = Path(path)
    if not path.is_file():
        raise MoMosConfigError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"X", "y"} - set(npz.files)
            if missing:
                raise MoMosFormatError(f"data file {str(path)!r} lacks array(s) {sorted(missing)} (needs X and y)")
            x, y = npz["X"], npz["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise MoMosFormatError(f"data file {str(path)!r} is not a readable .npz: {e}") from None
    if x.ndim < 2 or len(x) != len(y) or y.ndim != 1:
        raise MoMosFormatError(f"data file {str(path)!r}: X must be (samples, ...) and y (samples,) of equal "
                               f"length, got X {x.shape} and y {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise MoMosFormatError(f"data file {str(path)!r}: y must hold non-negative integer labels, got {y.dtype}")
    return split(x.astype(np.float32), y, seed=seed)


def load_inputs(path: str | Path) -> torch.Tensor:
    """Unlabelled inputs for calibration: the float array `X` (samples first) of an .npz file.

    Raises:
        MoMosConfigError: `path` does not exist.
        MoMosFormatError: the file is not a readable .npz, or has no array `X` of at least two dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise MoMosConfigError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "X" not in npz.files:
                raise MoMosFormatError(f"data file {str(path)!r} lacks the array 'X' (samples first)")
            x = npz["X"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise MoMosFormatError(f"data file {str(path)!r} is not a readable .npz: {e}") from None
    if x.ndim < 2 or len(x) == 0 or not np.issubdtype(x.dtype, np.number):
        raise MoMosFormatError(f"data file {str(path)!r}: X must be a numeric (samples, ...) array, got {x.dtype} "
                               f"{x.shape}")
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
