"""The training-time form of MoMos: a motif bank module and a torch parametrization per targeted tensor.

A `MotifBank` owns the motif table of one bank (shared by every tensor of a global bank, one per tensor
in tensor scope). A `MoMosParametrization` sits on a tensor through `torch.nn.utils.parametrize` and
keeps that tensor's mosaic. `refresh_bank` is the projection: draw a bank from the current blocks,
assign every block, and (hard mode) write the reconstruction back into the weights.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from momos.bank import kmeans_motifs, sample_motifs
from momos.blocks import num_blocks, reconstruct, to_blocks
from momos.config import MoMosConfig
from momos.errors import MoMosValueError
from momos.nn.packed import follow_dtype
from momos.search import assign
from momos.search.incremental import MosaicTracker, nearest_op

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


class MotifBank(nn.Module):
    """The ``(k, s)`` motif table of one bank, in the config's motif dtype, and its refresh counter.

    Whether the bank was ever refreshed is known from this process's refreshes and the state dicts it loaded,
    not from the buffers' values: a model prepared on the meta device and materialized with ``to_empty`` has
    buffers of arbitrary values, which must neither pass for a bank nor seed the next draw.
    """

    def __init__(self, name: str, config: MoMosConfig, num_blocks: int, device: torch.device | None = None,
                 num_weights: int | None = None) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.num_blocks = num_blocks
        k = config.num_motifs_for(num_blocks, num_weights)
        self.register_buffer("motifs", torch.zeros(k, config.block_size, dtype=TORCH_DTYPES[config.motif_dtype],
                                                   device=device))
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.int64, device=device))
        self._refreshed = False

    @property
    def num_motifs(self) -> int:
        return self.motifs.shape[0]

    @property
    def block_size(self) -> int:
        return self.motifs.shape[1]

    @property
    def refreshed(self) -> bool:
        return self._refreshed

    @property
    def refresh_count(self) -> int:
        return int(self.refreshes) if self._refreshed else 0

    def generator(self) -> torch.Generator:
        """The random stream of the next refresh: a function of (seed, bank name, refresh count) only,
        so every process holding the same weights draws the same bank."""
        seed = (self.config.seed * 1_000_003 + zlib.crc32(self.name.encode())) * 1_000_033 + self.refresh_count
        return torch.Generator().manual_seed(seed % (2**63))

    def count_refresh(self) -> None:
        """Record a refresh just written into `motifs`."""
        self.refreshes.fill_(self.refresh_count + 1)
        self._refreshed = True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        loaded = state_dict.get(prefix + "refreshes")
        if loaded is not None:
            self._refreshed = int(loaded) > 0

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MotifBank:
        """Moves and casts (``to``, ``to_empty``, ...) keep a refreshed bank's values and reset the others': after
        ``to_empty`` the buffers hold arbitrary memory, which a compiled forward would read as a refresh count.
        A cast (``.half()``, ``.double()``) casts the motifs, and the config's motif dtype follows them."""
        super()._apply(fn, recurse)
        self.config = follow_dtype(self.config, self.motifs)
        if not self._refreshed:
            with torch.no_grad():
                self.motifs.zero_()
                self.refreshes.zero_()
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_motifs={self.num_motifs}, block_size={self.block_size}, " \
               f"num_blocks={self.num_blocks}, motif_dtype={self.config.motif_dtype}"


class MoMosParametrization(nn.Module):
    """Parametrization of one tensor: its mosaic over `bank`, and the distortion of its last projection.

    Hard mode: the forward is the identity (refresh writes MoMos weights into the tensor; training in
    between is dense). STE mode: the forward assigns the latent weights to the current bank and returns
    that MoMos weight, with the gradient passed straight through to the latent weights. Before the
    first refresh there is no bank yet and both modes are the identity.
    """

    def __init__(self, bank: MotifBank, shape: torch.Size, device: torch.device | None = None) -> None:
        super().__init__()
        self.bank = bank
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.register_buffer("mosaic", torch.zeros(num_blocks(self.numel, bank.block_size), dtype=torch.int64,
                                                   device=device))
        self.register_buffer("distortion", torch.full((), math.nan, dtype=torch.float64, device=device))
        self.tracker = MosaicTracker()  # STE: follows the latent blocks' nearest motifs between calls

    @property
    def num_blocks(self) -> int:
        return self.mosaic.shape[0]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MoMosParametrization:
        """As `MotifBank._apply`: the mosaic of a bank never refreshed is reset by moves (``to_empty``'s memory)."""
        super()._apply(fn, recurse)
        if not self.bank.refreshed:
            with torch.no_grad():
                self.mosaic.zero_()
                self.distortion.fill_(math.nan)
        return self

    def momos_weight(self, latent: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The MoMos weight of `latent` under the current bank (written into `out` if given): each latent
        block replaced by its nearest motif (``assign.nearest``). Eagerly, only blocks that may have changed
        their nearest motif since the previous call are searched again (`momos.search.incremental`); compiled,
        every block is."""
        motifs = self.bank.motifs
        blocks = to_blocks(latent, motifs.shape[1])
        if torch.compiler.is_compiling():
            mosaic = nearest_op(blocks, motifs.to(latent.dtype))
        else:
            mosaic = self.tracker.mosaic(blocks, motifs, self.mosaic)
        return reconstruct(motifs.to(latent.dtype), mosaic, self.shape, out=out)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        if bank.config.mode == "hard":
            return latent
        if torch.compiler.is_compiling():
            # Branch on the refresh count inside the graph: no .item() graph break, no recompile per refresh.
            return torch.where(bank.refreshes > 0, _StraightThrough.apply(latent, self.momos_weight(latent)), latent)
        if not bank.refreshed:
            return latent
        # The MoMos weight written into a clone of the latent: the clone's backward passes the gradient
        # straight through, in C++ (a Python autograd Function costs ~20 us a tensor and step). It is written
        # through a detached alias, which autograd does not see (the clone's backward saves nothing).
        weight = latent.clone(memory_format=torch.contiguous_format)
        self.momos_weight(latent, out=weight.detach())
        return weight

    def extra_repr(self) -> str:
        return f"shape={self.shape}, num_blocks={self.num_blocks}"


class _StraightThrough(torch.autograd.Function):
    """`value` (the MoMos weight, exactly) in the forward; the identity from `latent` in the backward. The compiled
    forward uses it; the eager one writes the MoMos weight into a clone of the latent instead."""

    @staticmethod
    def forward(ctx: object, latent: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # No separate setup_context: with one, every apply binds its arguments with inspect (~30 us).
        return value

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def register(module: nn.Module, tensor_name: str, parametrization: MoMosParametrization) -> None:
    """Put `parametrization` on ``module.<tensor_name>`` with torch's parametrize.

    Torch's parametrized property costs about 15 us per access (a module call for the parametrization list,
    then one for each parametrization): on a small MLP that is 5% of a training step. So while MoMos is the
    tensor's only parametrization, the property is replaced by one that returns the stored tensor directly
    in hard mode (whose forward is the identity) and calls the parametrization on it in STE mode (unless
    torch's ``parametrize.cached()`` is on); it defers to torch's property otherwise.
    """
    parametrize.register_parametrization(module, tensor_name, parametrization)
    hard = parametrization.bank.config.mode == "hard"
    lists = module.__dict__.setdefault("_momos_lists", {})
    lists[tensor_name] = module.parametrizations[tensor_name]
    torch_property = getattr(module.__class__, tensor_name)

    def get(self: nn.Module) -> torch.Tensor:
        plist = self.__dict__["_momos_lists"][tensor_name]
        if len(plist) == 1:
            if hard:
                return plist.original
            if not getattr(parametrize, "_cache_enabled", True):  # torch's private flag; absent: defer to torch
                return plist[0](plist.original)
        return torch_property.fget(self)

    setattr(module.__class__, tensor_name, property(get, torch_property.fset, torch_property.fdel,
                                                    torch_property.__doc__))


@dataclass
class TensorStats:
    """What one refresh did to one tensor."""

    name: str
    bank: str
    numel: int
    num_blocks: int
    num_motifs: int
    distortion: float
    weights_changed: int
    usage: torch.Tensor  # (k,) how many of this tensor's blocks use each motif

    @property
    def rmse(self) -> float:
        return math.sqrt(self.distortion / self.numel)


@dataclass
class BankStats:
    """What one refresh did to one bank: its k, m, distortion and motif usage over all its tensors."""

    name: str
    num_motifs: int
    num_blocks: int
    distortion: float
    weights_changed: int
    usage: torch.Tensor
    tensors: list[str] = field(default_factory=list)


@dataclass
class RefreshStats:
    """Per-tensor and per-bank results of one `momos.refresh`, with totals."""

    tensors: dict[str, TensorStats]
    banks: dict[str, BankStats]

    @property
    def distortion(self) -> float:
        return sum(t.distortion for t in self.tensors.values())

    @property
    def weights_changed(self) -> int:
        return sum(t.weights_changed for t in self.tensors.values())

    @property
    def num_blocks(self) -> int:
        return sum(t.num_blocks for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def rmse(self) -> float:
        return math.sqrt(self.distortion / max(self.numel, 1))

    def __str__(self) -> str:
        return (f"refresh: {len(self.tensors)} tensors in {len(self.banks)} bank(s), "
                f"{self.num_blocks} blocks, distortion {self.distortion:.6g}, "
                f"{self.weights_changed} weights changed, rmse {self.rmse:.4g}")


# Elements per step of a refresh's assignment and write-back: bounds its temporaries whatever the model size.
_REFRESH_CHUNK = 1 << 16

# A member of a bank: its fully-qualified tensor name, the parametrized module, and the tensor's name there.
Member = tuple[str, nn.Module, str]


def latent(module: nn.Module, tensor_name: str) -> torch.Tensor:
    """The latent (dense, trained) tensor behind a MoMos parametrization."""
    return module.parametrizations[tensor_name].original


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (a shard of a tensor, as FSDP2 keeps parameters between forwards)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # never imported (0.9 s): no tensor is one
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or the whole tensor behind a sharded one (a DTensor: FSDP2's parameters between forwards),
    all-gathered: a bank is drawn from all its blocks and a mosaic covers every block. Every rank gets the
    same values, so every rank computes the same bank and mosaic."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def momos_of(module: nn.Module, tensor_name: str) -> MoMosParametrization:
    return module.parametrizations[tensor_name][0]


def refresh_bank(bank: MotifBank, members: list[Member]) -> tuple[BankStats, list[TensorStats]]:
    """One MoMos projection of every tensor served by `bank`; deterministic for a given seed.

    Draws a new bank from the current blocks, assigns each block to its nearest motif and, in hard
    mode, writes the reconstruction into the weights. In STE mode the latent weights are left alone.
    Extra memory: the bank, the mosaics, and chunks of `_REFRESH_CHUNK` values: the bank is drawn from
    the tensors in place (`momos.bank`), and assignment and write-back run chunk by chunk.
    """
    config = bank.config
    s = bank.block_size
    with torch.no_grad():
        originals = [latent(module, tensor_name) for _, module, tensor_name in members]
        weights = [whole(original) for original in originals]  # sharded (FSDP2) parameters: all-gathered copies
        for (name, _, _), weight in zip(members, weights, strict=True):
            if not torch.isfinite(weight).all():
                raise MoMosValueError(f"tensor {name!r} holds NaN or Inf values; cannot refresh it")
        generator = bank.generator()
        motifs = sample_motifs(weights, s, bank.num_motifs, force_zero=config.force_zero, generator=generator)
        if config.motif_init == "kmeans":
            motifs = kmeans_motifs(weights, s, motifs, iterations=config.kmeans_iters, force_zero=config.force_zero,
                                   generator=generator)
        # Round through the stored dtype so the weights written are exactly what the packed form decodes.
        stored = motifs.to(bank.motifs.dtype)
        if not torch.isfinite(stored).all():
            largest = float(motifs.abs().max())
            raise MoMosValueError(f"bank {bank.name!r}: a motif value of magnitude {largest:.4g} overflows "
                                  f"motif_dtype={config.motif_dtype!r}; give the config motif_dtype='float32'")
        motifs = stored.to(weights[0].dtype)
        search = assign.MotifSearch(motifs, num_queries=bank.num_blocks)

        tensor_stats = []
        usage = torch.zeros(bank.num_motifs, dtype=torch.int64)
        chunk = max(1, _REFRESH_CHUNK // s) * s  # whole blocks, so only a tensor's last chunk is padded
        for (name, module, tensor_name), weight, original in zip(members, weights, originals, strict=True):
            param = momos_of(module, tensor_name)
            table = motifs.to(weight.device, weight.dtype)  # searches run on the CPU, the rest on the weight's device
            flat = weight.view(-1) if weight.is_contiguous() else weight.flatten()  # a copy if not contiguous
            distortion, changed = 0.0, 0
            counts = torch.zeros(bank.num_motifs, dtype=torch.int64, device=weight.device)
            for start in range(0, flat.numel(), chunk):
                part = flat[start:start + chunk]
                own = search.nearest(to_blocks(part, s))
                new = reconstruct(table, own, part.shape)
                diff = (part - new).to(torch.float64)
                distortion += float((diff * diff).sum())
                changed += int((part != new).sum())
                if config.mode == "hard":
                    part.copy_(new)
                param.mosaic[start // s:start // s + own.numel()].copy_(own)
                counts += torch.bincount(own, minlength=bank.num_motifs)
            if config.mode == "hard" and not weight.is_contiguous():
                weight.copy_(flat.view(weight.shape))
            if config.mode == "hard" and original is not weight:  # each rank keeps its own shard of the result
                from torch.distributed.tensor import distribute_tensor

                original.copy_(distribute_tensor(weight, original.device_mesh, original.placements,
                                                 src_data_rank=None))
            param.distortion.fill_(distortion)
            counts = counts.cpu()
            usage += counts
            tensor_stats.append(TensorStats(name, bank.name, param.numel, param.num_blocks, bank.num_motifs,
                                            distortion, changed, counts))
        bank.motifs.copy_(stored)
        bank.count_refresh()
    bank_stats = BankStats(bank.name, bank.num_motifs, bank.num_blocks, sum(t.distortion for t in tensor_stats),
                           sum(t.weights_changed for t in tensor_stats), usage, [t.name for t in tensor_stats])
    return bank_stats, tensor_stats


def prepared_members(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every MoMos-parametrized tensor of `model` in module order: (full name, module, tensor name)."""
    found = []
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            if any(isinstance(p, MoMosParametrization) for p in plist):
                found.append((f"{module_name}.{tensor_name}" if module_name else tensor_name, module, tensor_name))
    return found


def prepared_tensors(model: nn.Module) -> Iterator[tuple[str, MoMosParametrization, torch.Tensor]]:
    """``(name, parametrization, latent tensor)`` for every prepared tensor of `model`."""
    for name, module, tensor_name in prepared_members(model):
        yield name, momos_of(module, tensor_name), latent(module, tensor_name)
