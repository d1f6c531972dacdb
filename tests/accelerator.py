"""A stand-in accelerator for tests on machines without one: CPU data behind a tensor that says it lives on
another device and refuses to be mixed with CPU tensors the way CUDA refuses.

CI has no GPU, and on a CPU every tensor shares one device, so code that mixes devices (a bank drawn on the
CPU and gathered with a mosaic on the GPU, a mosaic searched on the CPU and written into a GPU buffer) passes
every CPU test and fails on the first GPU. Under `accelerated()`, ``tensor.to(DEVICE)`` and factories given
``device=DEVICE`` make `OnDevice` tensors: each holds a CPU tensor and runs every op on it, after checking the
op's arguments against CUDA's rules (`_check`):

- an op takes tensors of one device, or CPU tensors of no dimension (scalars) besides device tensors;
- copies (``copy_``, ``to``) move data between the CPU and the device;
- an index of a device tensor may be on the CPU (``x[cpu_index]``, ``x[cpu_index] = values``), the values
  written must be on its device;
- ``.numpy()`` of a device tensor fails (it has no CPU storage), and so does a CPU generator drawing onto it.

The device type is torch's "lazy" one: CPU builds register a device guard for it, which autograd's engine needs
to run a backward pass on a device other than the CPU (CUDA's, XPU's and the others fail on a CPU-only build).
It reports itself as ``lazy:0``: code that picks a path by ``device.type == "cpu"`` takes the one it takes on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("lazy", 0)

aten = torch.ops.aten
# Ops that move data between devices.
_COPIES = {aten.copy_.default, aten._to_copy.default, aten.copy.default, aten._copy_from.default,
           aten._copy_from_and_resize.default}
# Ops whose `indices` argument (the second) may be on the CPU when the indexed tensor is on the device.
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default,
             aten._unsafe_index.Tensor, aten._unsafe_index_put.default}


class OnDevice(torch.Tensor):
    """A tensor on `DEVICE` whose data is the CPU tensor `elem` (views of it share its storage)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        tensor = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                     storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                     device=DEVICE, requires_grad=elem.requires_grad)
        tensor.elem = elem
        return tensor

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise RuntimeError(f"{func} on a stand-in device tensor outside `accelerated()`")


def _on_device(value: Any) -> bool:
    return isinstance(value, OnDevice)


def _device_kwarg(kwargs: dict) -> torch.device | None:
    device = kwargs.get("device")
    return None if device is None else torch.device(device)


def _check(func: Any, args: tuple, kwargs: dict) -> None:
    """CUDA's refusal of mixed devices, for the op `func` on `args`."""
    target = _device_kwarg(kwargs)
    if target == DEVICE and isinstance(kwargs.get("generator"), torch.Generator):
        raise RuntimeError(f"{func}: a CPU generator cannot draw onto device {DEVICE}")
    if func in _COPIES or target is not None:  # copies, and factories (whose tensor arguments are templates)
        return
    checked = list(args)
    if func in _INDEXING and len(checked) > 1:
        indices = [t for t in tree_flatten(checked[1])[0] if isinstance(t, torch.Tensor)]
        if not _on_device(checked[0]) and any(_on_device(t) for t in indices):
            raise RuntimeError(f"{func}: indices on {DEVICE} for a CPU tensor")
        checked[1] = None  # on the CPU or on the indexed tensor's device: both allowed
    tensors = [t for t in tree_flatten((checked, kwargs))[0] if isinstance(t, torch.Tensor)]
    if any(_on_device(t) for t in tensors):
        cpu = [t for t in tensors if not _on_device(t) and t.dim() > 0]
        if cpu:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{DEVICE} and cpu! ({func}, a CPU tensor of shape {tuple(cpu[0].shape)})")


class _Accelerated(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        _check(func, args, kwargs)
        inputs_on_device = any(_on_device(t) for t in tree_flatten((args, kwargs))[0])
        target = _device_kwarg(kwargs)
        if target == DEVICE:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(lambda t: t.elem if _on_device(t) else t, args),
                   **tree_map(lambda t: t.elem if _on_device(t) else t, kwargs))
        # In place (or into `out=`): the same tensor object comes back, as from any op that writes its argument.
        schema = func._schema
        written = [r.alias_info is not None and r.alias_info.is_write for r in schema.returns]
        if any(written):
            mutated = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
            given = {a.name: v for a, v in zip(schema.arguments, args, strict=False)} | kwargs
            results = [given.get(a.name) for a in mutated]
            if len(results) == len(schema.returns) == 1:
                return results[0]
            if len(results) == len(schema.returns):
                return tuple(results)
        if target is not None:  # a factory, or `to(device)`
            to_device = target == DEVICE
        elif func is aten.copy.default:  # `self` with the values of `src`: on the device of `self`
            to_device = _on_device(args[0])
        else:
            to_device = inputs_on_device
        if not to_device:
            return out
        return tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) else t, out)


@contextmanager
def accelerated() -> Iterator[None]:
    """Inside: `DEVICE` is a device, and CUDA's rules on mixing it with the CPU hold."""
    with _Accelerated():
        yield
