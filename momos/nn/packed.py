"""The converted form: a motif table per bank plus a compact unsigned mosaic per tensor.

`PackedTensor` decodes to the dense tensor on access (``motifs[mosaic]``, padding dropped). `attach`
puts one in place of a module's parameter, for any module type: like torch's parametrize, the module's
class is swapped for a per-instance subclass whose property for that name returns the decoded tensor,
so the module's own forward runs unchanged.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from momos.blocks import num_blocks, reconstruct, to_blocks
from momos.config import MOTIF_DTYPES, MoMosConfig
from momos.errors import MoMosStateError

__all__ = ["MotifTable", "PackedTensor", "dense_copy", "follow_dtype", "freeze_motifs", "is_packed",
           "members", "mosaic_dtype", "motif_tables", "packed_tensors", "tied_tensors", "train_motifs",
           "unpacked_state"]

PACKED_ATTR = "momos_packed"

# A packed tensor's use matrix while its motifs train (`PackedTensor._uses`): kept beside the module, not in it,
# so that copies and state dicts never carry it.
_USES: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()

_UINT_DTYPES = ((8, torch.uint8), (16, torch.uint16), (32, torch.uint32))


def mosaic_dtype(num_motifs: int) -> torch.dtype:
    """The smallest unsigned dtype that holds every index below `num_motifs`."""
    for bits, dtype in _UINT_DTYPES:
        if num_motifs - 1 < 2**bits:
            return dtype
    raise MoMosStateError(f"num_motifs={num_motifs} needs more than 32-bit indices")


def follow_dtype(config: MoMosConfig, motifs: torch.Tensor) -> MoMosConfig:
    """`config` with the dtype of `motifs` as its motif dtype, where that is one of `MOTIF_DTYPES` (motifs cast
    with their model: ``.half()``, ``.double()``); else `config` as it is (a dtype no file stores, which
    `momos.save` refuses by name)."""
    dtype = str(motifs.dtype).removeprefix("torch.")
    if dtype == config.motif_dtype or dtype not in MOTIF_DTYPES:
        return config
    return config.replace(motif_dtype=dtype)


class MotifTable(nn.Module):
    """The ``(k, s)`` motifs of one bank, shared by reference by every `PackedTensor` it serves."""

    def __init__(self, name: str, config: MoMosConfig, motifs: torch.Tensor) -> None:
        super().__init__()
        self.name = name
        self.config = follow_dtype(config, motifs)
        self.register_buffer("motifs", motifs)

    @property
    def num_motifs(self) -> int:
        return self.motifs.shape[0]

    @property
    def block_size(self) -> int:
        return self.motifs.shape[1]

    @property
    def trainable(self) -> bool:
        """Whether the motifs are a parameter (see `train_motifs`) rather than a buffer."""
        return isinstance(self.motifs, nn.Parameter)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the table is stored in (its config's `motif_dtype`), whatever precision it trains in."""
        return getattr(torch, self.config.motif_dtype)

    def stored_motifs(self) -> torch.Tensor:
        """The motifs as a file or an exported graph holds them: detached, in the stored dtype (a table training as
        a float32 copy, rounded)."""
        return self.motifs.detach().to(self.stored_dtype)

    def set_trainable(self, trainable: bool) -> None:
        """Make the motifs a trainable parameter, or a buffer again; their state-dict key stays.

        A float16 or bfloat16 table trains as a float32 copy and is rounded back to its dtype when it becomes a
        buffer again: optimizers step low-precision parameters badly (AdamW's epsilon of 1e-8 is zero in float16,
        and an update smaller than the spacing of float16 values is lost), so fine-tuned tables would turn NaN or
        stay put. Other tables keep their values and dtype.
        """
        if trainable == self.trainable:
            return
        motifs = self.stored_motifs()
        delattr(self, "motifs")
        if trainable:
            self.motifs = nn.Parameter(motifs.float() if motifs.dtype in (torch.float16, torch.bfloat16) else motifs)
        else:
            self.register_buffer("motifs", motifs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MotifTable:
        """Moves and casts of the model; a cast (``.half()``, ``.double()``) casts the motifs, and the config's
        motif dtype follows them, so a file saved afterwards describes what it stores."""
        before = self.motifs.dtype
        super()._apply(fn, recurse)
        if self.motifs.dtype != before:  # a cast, not a move (a training float16 table is float32 until frozen)
            self.config = follow_dtype(self.config, self.motifs)
        return self

    def decoding_table(self) -> torch.Tensor:
        """The motifs a `PackedTensor` decodes with. While they train, a forced zero motif is held out of autograd:
        its gradient is then exactly zero, so no optimizer that steps on gradients moves it. A low-precision table
        training as a float32 copy decodes with the copy rounded to its stored dtype, the gradient passing straight
        through, so the model computes what `momos.save` would store at every step."""
        motifs = self.motifs
        if motifs.dtype != self.stored_dtype:
            motifs = motifs + (motifs.to(self.stored_dtype).to(motifs.dtype) - motifs).detach()
        if motifs.requires_grad and self.config.force_zero:
            return torch.cat([motifs[:1].detach(), motifs[1:]])
        return motifs

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_motifs={self.num_motifs}, block_size={self.block_size}, " \
               f"motif_dtype={self.config.motif_dtype}, trainable={self.trainable}"


class PackedTensor(nn.Module):
    """One MoMos tensor: a mosaic (smallest unsigned dtype holding k-1) over a shared `MotifTable`."""

    def __init__(self, table: MotifTable, mosaic: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 rmse: float = math.nan) -> None:
        super().__init__()
        self.table = table
        self.shape = tuple(shape)
        self.dtype = dtype
        self.rmse = rmse
        expected = num_blocks(math.prod(self.shape), table.block_size)
        if mosaic.shape != (expected,):
            raise MoMosStateError(f"mosaic has shape {tuple(mosaic.shape)}, expected ({expected},) for {self.shape}")
        self.register_buffer("mosaic", mosaic.to(mosaic_dtype(table.num_motifs)))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PackedTensor:
        """Moves and casts of the model; a cast (``.half()``, ``.double()``) changes the decoded dtype as it
        would have changed the parameter this tensor replaces (an empty tensor of that dtype shows how)."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.mosaic.device)).dtype
        return super()._apply(fn, recurse)

    @property
    def num_blocks(self) -> int:
        return self.mosaic.shape[0]

    def forward(self) -> torch.Tensor:
        motifs = self.table.decoding_table()
        if motifs.requires_grad and torch.is_grad_enabled():
            index, uses = self._uses()
            return _Decode.apply(motifs.to(self.dtype), index, uses, self.shape)
        return reconstruct(motifs, self.mosaic, self.shape, dtype=self.dtype)

    def _uses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int64 mosaic and the sparse ``(k, m)`` matrix of which block uses which motif, for training the
        motifs; built once and again only when the mosaic changes."""
        key = (self.mosaic.data_ptr(), self.mosaic._version, self.table.num_motifs)
        cached = _USES.get(self)
        if cached is None or cached[0] != key:
            index = self.mosaic.long()
            counts = torch.bincount(index, minlength=self.table.num_motifs)
            rows = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch calls sparse CSR support beta
                uses = torch.sparse_csr_tensor(rows, torch.argsort(index, stable=True),
                                               torch.ones(index.numel(), device=index.device),
                                               size=(self.table.num_motifs, index.numel()))
            _USES[self] = cached = (key, index, uses)
        return cached[1], cached[2]

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, mosaic_dtype={self.mosaic.dtype}"


class _Decode(torch.autograd.Function):
    """`reconstruct` of trainable motifs. Its backward sums each block's gradient into the block's motif as one
    sparse product with the tensor's ``(k, m)`` use matrix: a scatter-add, which autograd's indexing does,
    contends on the few motifs that most blocks share."""

    @staticmethod
    def forward(ctx: Any, motifs: torch.Tensor, index: torch.Tensor, uses: torch.Tensor,
                shape: tuple[int, ...]) -> torch.Tensor:
        ctx.uses, ctx.block_size = uses, motifs.shape[1]
        return reconstruct(motifs, index, shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        blocks = to_blocks(grad, ctx.block_size)
        uses = ctx.uses if ctx.uses.dtype == blocks.dtype else ctx.uses.to(blocks.dtype)
        return uses @ blocks, None, None, None


def own_class(module: nn.Module) -> None:
    """Give `module` a private copy of its per-instance class.

    Per-instance classes (torch's parametrize, `attach`) are shared by reference after a deepcopy, so
    editing the copy's class (adding or removing a property) would also change the original.
    """
    cls = module.__class__
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _deepcopy(self: nn.Module, memo: dict) -> nn.Module:
    replica = self.__new__(self.__class__)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    own_class(replica)
    return replica


def _refuse_pickle(self: nn.Module) -> None:
    raise MoMosStateError("a model with packed MoMos tensors cannot be pickled: use momos.save / momos.load "
                          "or its state_dict()")


def _packed_property(name: str) -> property:
    def get(self: nn.Module) -> torch.Tensor:
        return getattr(self, PACKED_ATTR)[name]()

    return property(get, doc=f"{name}, decoded from its MoMos packed form")


def attach(module: nn.Module, name: str, packed: PackedTensor) -> None:
    """Replace parameter `name` of `module` (which must not be parametrized) by `packed`."""
    if name in module._parameters:
        del module._parameters[name]
    if not getattr(module.__class__, "__momos_packed_class__", False):
        cls = module.__class__
        module.__class__ = type(f"Packed{cls.__name__}", (cls,), {
            "__momos_packed_class__": True, "__deepcopy__": _deepcopy, "__getstate__": _refuse_pickle,
        })
        module.add_module(PACKED_ATTR, nn.ModuleDict())
    getattr(module, PACKED_ATTR)[name] = packed
    setattr(module.__class__, name, _packed_property(name))


def members(module: nn.Module) -> dict[str, PackedTensor]:
    """The packed tensors of `module` itself (not its children), by parameter name; empty if it has none."""
    if not getattr(module.__class__, "__momos_packed_class__", False):
        return {}
    return dict(getattr(module, PACKED_ATTR).items())


def _attached(model: nn.Module) -> Iterator[tuple[str, PackedTensor]]:
    """``(fully-qualified name, PackedTensor)`` for every place `model` reads a packed tensor, tied ones included."""
    for module_name, module in model.named_modules():
        for name, packed in members(module).items():
            yield (f"{module_name}.{name}" if module_name else name), packed


def packed_tensors(model: nn.Module) -> Iterator[tuple[str, PackedTensor]]:
    """``(fully-qualified tensor name, PackedTensor)`` for every packed tensor of `model`, in module order.

    A tied tensor (one PackedTensor read under several names, as `momos.convert` leaves a tied parameter)
    comes once, under its first name; `tied_tensors` lists its other names.
    """
    seen: set[int] = set()
    for name, packed in _attached(model):
        if id(packed) not in seen:
            seen.add(id(packed))
            yield name, packed


def tied_tensors(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every further name under which `model` reads a packed tensor (its ties)."""
    first: dict[int, str] = {}
    tied = {}
    for name, packed in _attached(model):
        if id(packed) in first:
            tied[name] = first[id(packed)]
        else:
            first[id(packed)] = name
    return tied


def is_packed(model: nn.Module) -> bool:
    """Whether `model` holds at least one packed MoMos tensor."""
    return any(True for _ in packed_tensors(model))


def motif_tables(model: nn.Module) -> list[MotifTable]:
    """Every motif table of `model`'s packed tensors, once each, in module order."""
    tables: dict[int, MotifTable] = {}
    for _, packed in packed_tensors(model):
        tables.setdefault(id(packed.table), packed.table)
    return list(tables.values())


def train_motifs(model: nn.Module, *, dense: bool = False) -> list[nn.Parameter]:
    """Make the motif tables of the packed `model` trainable, in place, for fine-tuning with any optimizer.

    The mosaics stay fixed, so the model stays a packed model that saves, loads and exports unchanged; a motif's
    gradient is the sum of the gradients of the blocks that use it, and a forced zero motif stays exactly zero.
    Every other parameter of `model` gets ``requires_grad=dense``. `freeze_motifs` undoes the change of the tables.
    A float16 or bfloat16 table trains as a float32 copy and is rounded back when frozen (`MotifTable.set_trainable`).

    Args:
        model: a converted model (`momos.convert` or `momos.load`).
        dense: also train the parameters MoMos left dense (biases, norms, ...).

    Returns:
        The parameters to optimize: the motif tables, then (with `dense`) the other parameters.

    Raises:
        MoMosStateError: `model` holds no packed tensor.
    """
    tables = motif_tables(model)
    if not tables:
        raise MoMosStateError("model has no packed MoMos tensor: call momos.convert(model) before train_motifs")
    for table in tables:
        table.set_trainable(True)
    motif_ids = {id(table.motifs) for table in tables}
    others = [p for p in model.parameters() if id(p) not in motif_ids]
    for param in others:
        param.requires_grad_(dense and param.is_floating_point())
    return [table.motifs for table in tables] + [p for p in others if p.requires_grad]


def freeze_motifs(model: nn.Module) -> None:
    """Turn every trainable motif table of `model` back into a buffer (the state after `momos.convert`)."""
    for table in motif_tables(model):
        table.set_trainable(False)
    for _, packed in packed_tensors(model):
        _USES.pop(packed, None)


def unpacked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict without the packed tensors' own entries (their mosaics and motif tables)."""
    return {key: value for key, value in model.state_dict().items() if PACKED_ATTR not in key.split(".")}


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every packed tensor is a plain, frozen parameter holding its decoded values.

    Each keeps its fully-qualified name, and the modules their own class again; a tied tensor becomes one
    parameter registered under each of its names, as the tie was before `momos.convert`.
    """
    twin = copy.deepcopy(model)
    decoded: dict[int, nn.Parameter] = {}
    for module in twin.modules():
        tensors = members(module)
        if not tensors:
            continue
        for packed in tensors.values():
            if id(packed) not in decoded:
                decoded[id(packed)] = nn.Parameter(packed().detach(), requires_grad=False)
        module.__class__ = module.__class__.__bases__[0]
        del module._modules[PACKED_ATTR]
        for name, packed in tensors.items():
            module.register_parameter(name, decoded[id(packed)])
    return twin
