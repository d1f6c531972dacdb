"""What the complexity measures read: a model's trainable tensors, and their symbols.

The paper's protocol flattens every trainable parameter of the model, concatenates them and binarizes the
result by sign (``w > 0`` -> 1, else 0). For a model under MoMos the tensors read are the weights the model
computes: the parametrized value of a prepared tensor, the decoded value of a packed one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from momos.errors import MoMosConfigError, MoMosValueError
from momos.nn.packed import members

__all__ = ["float_bytes", "model_symbols", "sign_bits", "to_symbols", "trainable_tensors"]


def trainable_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(fully-qualified name, tensor)`` for every trainable parameter of `model`, as the model computes it.

    Order: modules in ``named_modules`` order; within a module its MoMos tensors (parametrized or packed)
    in registration order, then its plain trainable parameters in definition order. For the usual
    ``weight, bias`` modules this is ``model.parameters()`` order of the dense model. Tied parameters
    count once, under their first name. Packed tensors count as trainable (they replace parameters).
    """
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()

    def add(key: int, name: str, get: Any) -> None:
        if key not in seen:
            seen.add(key)
            found.append((name, get().detach()))

    for module_name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its `original` is read through the owning module below
        prefix = f"{module_name}." if module_name else ""
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                if any(p.requires_grad for p in plist.parameters()):
                    add(id(plist), prefix + tensor_name, lambda m=module, t=tensor_name: getattr(m, t))
        for tensor_name, packed in members(module).items():
            add(id(packed), prefix + tensor_name, packed)
        for tensor_name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                add(id(param), prefix + tensor_name, lambda p=param: p)
    return found


def as_array(x: Any) -> np.ndarray:
    """A numpy view of a tensor or array-like (CPU; floats of any width kept as floats)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_symbols(x: Any, symbols: int) -> np.ndarray:
    """Integer symbols in ``0..symbols-1`` with the shape of `x`.

    A float array is binarized by sign (``x > 0`` -> 1) for ``symbols=2`` and cut at its quantiles
    ``i/symbols`` (``i = 1..symbols-1``; symbol = number of cut points ``<= x``) for more symbols. A bool
    array is 0/1. An integer array is taken as symbols and must lie in ``0..symbols-1``.

    Raises:
        MoMosValueError: NaN or Inf values, or integer symbols out of range.
        MoMosConfigError: a dtype that is neither float, bool nor integer.
    """
    a = as_array(x)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise MoMosValueError("cannot turn NaN or Inf values into symbols")
        if symbols == 2:
            return (a > 0).astype(np.uint8)
        cuts = np.arange(1, symbols) / symbols
        edges = np.quantile(a.reshape(-1), cuts) if a.size else np.zeros(symbols - 1)
        return np.searchsorted(edges, a, side="right").astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise MoMosConfigError(f"x must hold floats, bools or integer symbols, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= symbols):
        bad = a.min() if a.min() < 0 else a.max()
        raise MoMosValueError(f"integer symbols must lie in 0..{symbols - 1} for symbols={symbols}, "
                              f"found {bad}")
    return a.astype(np.uint8)


def model_symbols(model: nn.Module, symbols: int) -> np.ndarray:
    """The paper's payload: all trainable tensors flattened, concatenated, then turned into symbols.

    Raises:
        MoMosValueError: `model` has no trainable parameter, or one holds NaN or Inf values.
    """
    tensors = trainable_tensors(model)
    if not tensors:
        raise MoMosValueError("model has no trainable parameter to measure")
    if symbols == 2:  # binarize tensor by tensor: no float copy of the whole model
        return np.concatenate([to_symbols(t.reshape(-1), 2) for _, t in tensors])
    return to_symbols(torch.cat([t.reshape(-1).float() for _, t in tensors]), symbols)


def sign_bits(x: Any) -> np.ndarray:
    """The sign-binarized payload (uint8 0/1) of a model, tensor or array, flattened."""
    if isinstance(x, nn.Module):
        return model_symbols(x, 2)
    return to_symbols(x, 2).reshape(-1)


def float_bytes(x: Any) -> bytes:
    """The float32 little-endian bytes of a model's concatenated trainable tensors, or of a tensor/array."""
    if isinstance(x, nn.Module):
        tensors = trainable_tensors(x)
        if not tensors:
            raise MoMosValueError("model has no trainable parameter to measure")
        return b"".join(as_array(t.float()).astype("<f4").tobytes() for _, t in tensors)
    return as_array(x).astype("<f4").tobytes()
