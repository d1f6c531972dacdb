"""The lifecycle: `prepare` a model, `refresh` it while training, `convert` it to packed modules."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from momos.blocks import num_blocks, reconstruct, to_blocks
from momos.config import BANK_FIELDS, MoMosConfig, build_rules, index_bits, resolve
from momos.errors import MoMosConfigError, MoMosSelectionError, MoMosStateError, MoMosWarning
from momos.nn import calibrate as calibration
from momos.nn.finetune import finetune
from momos.nn.finetune import inputs_of as finetune_inputs
from momos.nn.packed import MotifTable, PackedTensor, attach, is_packed, own_class
from momos.nn.parametrize import (
    Member,
    MoMosParametrization,
    MotifBank,
    RefreshStats,
    is_sharded,
    latent,
    momos_of,
    prepared_members,
    refresh_bank,
    register,
    whole,
)
from momos.search import assign

GLOBAL_BANK = "global"


def prepare(model: nn.Module, config: MoMosConfig, *, include: Iterable[Any] | None = None,
            exclude: Iterable[Any] | None = None, overrides: Mapping[Any, MoMosConfig | None] | None = None,
            inplace: bool = False) -> nn.Module:
    """Put a MoMos parametrization on the selected tensors of `model` and return it.

    By default the tensors `config.targets` names are selected with `config`: every trainable floating-point
    parameter with at least two dimensions (``"matrices"``), or every one (``"all"``, the paper's, as
    `MoMosConfig.paper()` sets it). `include` restricts the selection to the tensors its selectors match;
    `exclude` removes tensors; `overrides` maps selectors to a config of their own (or ``None`` to exclude).
    Selectors and their precedence are described in `momos.config`. All tensors of scope ``"global"`` share
    one bank and so must agree on the bank fields (block size, capacity, ...). Weights are not changed until
    the first `refresh`. A tensor whose bank would hold only the forced zero motif stays dense, with a
    `MoMosWarning`.

    Args:
        model: the model; copied unless `inplace`.
        config: what MoMos does to the selected tensors.
        include, exclude, overrides: selectors (names, ``"re:"`` regexes, module types), see `momos.config`.
        inplace: parametrize `model` itself instead of a copy.

    Returns:
        The prepared model.

    Raises:
        MoMosConfigError: a config that is not a `MoMosConfig`, or global-bank tensors that disagree.
        MoMosSelectionError: nothing selected, a selector that matches nothing, or every bank zero-only.
        MoMosStateError: `model` is already prepared or converted.
    """
    if not isinstance(config, MoMosConfig):
        raise MoMosConfigError(f"config must be a MoMosConfig, got {type(config).__name__}")
    if prepared_members(model) or is_packed(model):
        raise MoMosStateError("model is already prepared or converted by momos; prepare it only once")
    if not inplace:
        model = copy.deepcopy(model)

    chosen, owners = _selection(model, config, include, exclude, overrides)
    weights = {n: owners[n][0]._parameters[owners[n][1]] for n in chosen}
    global_names = [n for n, c in chosen.items() if c.scope == "global"]
    _check_global_agreement(global_names, chosen, weights)
    # The MoMos buffers live on the device of the tensors they serve (a global bank: of the first one).
    banks: dict[str, MotifBank] = {}
    if global_names:
        total = sum(num_blocks(weights[n].numel(), chosen[n].block_size) for n in global_names)
        first = global_names[0]
        banks[GLOBAL_BANK] = MotifBank(GLOBAL_BANK, chosen[first], total, weights[first].device,
                                       num_weights=sum(weights[n].numel() for n in global_names))
    placed = []
    for name, cfg in chosen.items():
        weight = weights[name]
        if cfg.scope == "global":
            bank = banks[GLOBAL_BANK]
        else:
            bank = MotifBank(name, cfg, num_blocks(weight.numel(), cfg.block_size), weight.device,
                             num_weights=weight.numel())
        if _zero_only(bank):
            _warn_left_dense(name, bank)
        else:
            placed.append((name, bank))
    if not placed:
        raise MoMosSelectionError(f"no tensor left to compress: every selected tensor's bank would hold only the zero "
                                  f"motif ({len(chosen)} tensors); give the banks more motifs")
    for name, bank in placed:
        module, tensor_name = owners[name]
        register(module, tensor_name, MoMosParametrization(bank, weights[name].shape, weights[name].device))
    return model


def _selection(model: nn.Module, config: MoMosConfig, include: Iterable[Any] | None, exclude: Iterable[Any] | None,
               overrides: Mapping[Any, MoMosConfig | None] | None,
               ) -> tuple[dict[str, MoMosConfig], dict[str, tuple[nn.Module, str]]]:
    """What `prepare` selects, ``{parameter name: config}``, and ``{parameter name: (owner module, name in it)}``."""
    candidates = _candidates(model)
    owners = {full: (module, full.rsplit(".", 1)[-1]) for full, _, module in candidates}
    rules = build_rules(config, include, exclude, overrides)
    chosen = resolve(candidates, None if include else config, rules,
                     targeted=lambda name: _targeted(config, owners[name][0]._parameters[owners[name][1]]))
    if not chosen:
        raise MoMosSelectionError(f"no tensor selected: the model has no trainable floating-point parameter that the "
                                  f"selectors and targets={config.targets!r} admit (name the tensors with include=, "
                                  f"or give targets='all')")
    return chosen, owners


def _targeted(config: MoMosConfig, param: torch.Tensor) -> bool:
    """Whether `config.targets` selects `param` when no `include` is given."""
    return config.targets == "all" or param.dim() >= 2


def _zero_only(bank: MotifBank) -> bool:
    """Whether the bank's only motif is the forced zero, which would turn its tensors into zeros.

    One motif drawn from the blocks is the least that keeps a projection an approximation of the tensor (its
    error then shows in `refresh`'s stats and in `report`), so that is the threshold.
    """
    return bank.num_motifs - bank.config.force_zero < 1


def _warn_left_dense(name: str, bank: MotifBank) -> None:
    size = {f: getattr(bank.config, f) for f in ("capacity", "num_motifs", "bits_per_weight")
            if getattr(bank.config, f) is not None}
    (field, value), = size.items()
    where = "its own bank (scope='tensor')" if bank.name == name else f"the {bank.name!r} bank"
    warnings.warn(f"tensor {name!r} is left dense: {where} would get k={bank.num_motifs} motif for "
                  f"{bank.num_blocks} blocks with {field}={value!r}, and force_zero=True makes that motif zero "
                  f"(give it more motifs, exclude it, or share the global bank)", MoMosWarning, stacklevel=3)


def refresh(model: nn.Module) -> RefreshStats:
    """One MoMos projection of every prepared tensor: a new bank per bank, and every block's nearest motif.

    Args:
        model: a prepared model.

    Returns:
        `RefreshStats` per tensor and bank (k, m, distortion, weights changed, motif usage).

    Raises:
        MoMosStateError: `model` is not prepared (or is sharded with FSDP1).
        MoMosValueError: a tensor holds NaN or Inf values.
    """
    banks = _banks(model)
    tensors, bank_stats = {}, {}
    for bank, members in banks:
        stats, per_tensor = refresh_bank(bank, members)
        bank_stats[bank.name] = stats
        tensors.update((t.name, t) for t in per_tensor)
    return RefreshStats(tensors, bank_stats)


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turn a prepared model into packed modules holding exactly the MoMos weights it computes.

    Hard mode: a bank whose weights moved since its last refresh (or that was never refreshed) is
    refreshed once more first; otherwise its current bank and mosaic are packed as they are. STE mode:
    the mosaic packed is the assignment of the latent weights to the current bank, which is what the
    forward uses (a bank never refreshed is refreshed first). A tied parameter (prepared once, under its
    first name) becomes one packed tensor that each of its owners reads, so the tie holds.

    Args:
        model: a prepared model; copied unless `inplace`.
        inplace: convert `model` itself.

    Returns:
        The packed model: every MoMos tensor a `PackedTensor` (see `momos.nn.packed`).

    Raises:
        MoMosStateError: `model` is not prepared, or is sharded (gather a full state dict first).
    """
    banks = _banks(model)
    for name, module, tensor_name in (member for _, members in banks for member in members):
        if is_sharded(latent(module, tensor_name)):
            raise MoMosStateError(
                f"tensor {name!r} is sharded (FSDP), and convert packs whole tensors: gather a full state dict "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True), load "
                "it into the same model prepared without FSDP, and convert that")
    if not inplace:
        model = copy.deepcopy(model)
        for module in model.modules():
            if parametrize.is_parametrized(module):
                own_class(module)  # removing the copy's parametrizations must not touch the original
        banks = _banks(model)
    slots = _parameter_slots(model)
    converted, tied = [], []
    for bank, members in banks:
        if _stale(bank, members):
            refresh_bank(bank, members)
        table = MotifTable(bank.name, bank.config, bank.motifs.detach().clone())
        for _, module, tensor_name in members:
            param = momos_of(module, tensor_name)
            weight = whole(latent(module, tensor_name))
            mosaic = param.mosaic
            if bank.config.mode == "ste":
                mosaic = assign.nearest(to_blocks(weight, bank.block_size), bank.motifs.to(weight.dtype))
            rmse = float((param.distortion / param.numel).sqrt())
            packed = PackedTensor(table, mosaic, param.shape, weight.dtype, rmse)
            converted.append((module, tensor_name, packed))
            # The other owners of a tied parameter (prepared once, under its first name) read the same packed
            # tensor, so the tie holds and the tensor is stored once.
            tied += [(owner, name, packed) for owner, name in slots.get(id(latent(module, tensor_name)), [])]
    # Remove every parametrization before attaching: torch restores a module's class when its last
    # parametrization goes, which must happen before the packed class is put on top.
    for module, tensor_name, _ in converted:
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    for module, tensor_name, packed in converted + tied:
        attach(module, tensor_name, packed)
    return model


def _parameter_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, name) that holds it as a plain parameter (a parametrized one's latent
    tensor is held by its ParametrizationList, which is left out)."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue
        for name, param in module._parameters.items():
            if param is not None:
                slots.setdefault(id(param), []).append((module, name))
    return slots


def default_config() -> MoMosConfig:
    """`compress`'s default: blocks of 4, k-means motifs in one global bank over the weight matrices, 3 bits per
    compressed weight."""
    return MoMosConfig(block_size=4, bits_per_weight=3.0)


def compress(model: nn.Module, config: MoMosConfig | None = None, data: Iterable[Any] | None = None, *,
             teacher: nn.Module | None = None, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             include: Iterable[Any] | None = None, exclude: Iterable[Any] | None = None,
             overrides: Mapping[Any, MoMosConfig | None] | None = None, calibrate: bool = True,
             embedding_bits: float | str | None = "auto", embedding_block_size: int | None = None,
             **finetune_args: Any) -> nn.Module:
    """The recommended path for a trained or pretrained model: one projection, convert, then fine-tune the motifs.

    `prepare` (on a copy), one `refresh`, `convert`; then, when `data` is given, `momos.calibrate` (each Linear
    and Conv weight's blocks re-assigned to keep the layer's outputs on `data`'s inputs close to the dense ones,
    where that lowers the model's output error) and `finetune` of the motif tables: on labelled batches with
    `loss`, else by distillation from `teacher` (default: `model` itself, as given).
    Without `data`, a model with BatchNorm wants `momos.recalibrate_batchnorm(packed, inputs)` after this: its
    statistics describe the dense weights (`finetune` re-estimates them itself).

    Args:
        model: the dense model; left unchanged.
        config: the MoMos config (default `default_config()`: 3 bits per compressed weight).
        data: batches for fine-tuning (see `momos.finetune`); None: no fine-tuning.
        teacher: the model to distill from (default `model`).
        loss: a task loss on ``(inputs, target)`` batches instead of distillation.
        calibrate: with `data`, re-assign the Linear and Conv weights' blocks by output error before fine-tuning.
        embedding_bits: give each selected, untied `nn.Embedding` weight a bank of its own, with the motifs this
            many bits per weight buy the largest of them (capped at a tensor's blocks), and the other tensors of
            `config` the rest of `config.bits_per_weight`'s budget over all of them: a lookup row serves one
            token, a matrix every token. ``"auto"`` (the default), where `config` has a `bits_per_weight`
            budget and the selection holds both kinds: the first whole index width at or above one bit per
            weight below the budget, at the block size (the config's or a longer one) that gets nearest, with a
            table of at most 5% of the mosaic's bits (`EMBEDDING_BITS_BELOW` and the rule beside it); otherwise,
            or where no table is that cheap (a small vocabulary), one bank. None: one bank. docs/accuracy.md
            measures the gain.
        embedding_block_size: the embeddings' block size when they have banks of their own (default: with a
            number `embedding_bits`, `config.block_size`; with ``"auto"``, as above: longer blocks at the same
            bits per weight cut the error, and their table costs little next to a large vocabulary).
        include, exclude, overrides: the selection, as in `prepare`; by default `config.targets`: the weight
            matrices (every trainable parameter with at least two dimensions), biases and norms left dense.
        **finetune_args: passed to `momos.finetune` (epochs, lr, distill, dense, progress, ...).

    Returns:
        The packed model.

    Raises:
        MoMosConfigError: a number `embedding_bits` without `config.bits_per_weight`, not positive, or leaving
            the other tensors no budget; `embedding_block_size` with ``embedding_bits=None`` or not a valid block
            size; and what `prepare` and `finetune` raise.
        MoMosSelectionError: a number `embedding_bits` with no untied Embedding weight or no other tensor
            selected.
    """
    config = default_config() if config is None else config
    if embedding_block_size is not None and (isinstance(embedding_block_size, bool)
                                             or not isinstance(embedding_block_size, int) or embedding_block_size < 1):
        raise MoMosConfigError(f"embedding_block_size must be an integer >= 1, got {embedding_block_size!r}")
    if embedding_block_size is not None and embedding_bits is None:
        raise MoMosConfigError(f"embedding_block_size={embedding_block_size!r} sets the block size of the banks "
                               "embedding_bits gives the embeddings: give embedding_bits too")
    if embedding_bits is not None:
        config, overrides = _split_budget(model, config, include, exclude, overrides, embedding_bits,
                                          embedding_block_size)
    prepared = prepare(model, config, include=include, exclude=exclude, overrides=overrides)
    refresh(prepared)
    packed = convert(prepared, inplace=True)
    if data is not None:
        if calibrate:
            calibration.calibrate(packed, model, [finetune_inputs(batch, labelled=loss is not None) for batch in data])
        if loss is None and teacher is None:
            teacher = model
        finetune(packed, data, teacher=teacher, loss=loss, **finetune_args)
    return packed


# compress(embedding_bits="auto"): the embeddings' index width is the first whole width at or above the budget
# less EMBEDDING_BITS_BELOW bits per weight (at least EMBEDDING_BITS_FLOOR, at most the budget), at the config's
# block size or a longer one (up to EMBEDDING_MAX_BLOCK_SIZE, dividing their rows): the one nearest above, the
# longer on a tie, among those whose table stays within EMBEDDING_TABLE_SHARE of the mosaic's bits and
# EMBEDDING_MAX_MOTIFS motifs (k-means and the calibrated search cost grow with k). A lookup row is read by one
# token, a matrix by every token, so an error in a matrix costs more per weight; docs/accuracy.md has the splits
# the constants were chosen on.
EMBEDDING_BITS_BELOW = 1.0
EMBEDDING_BITS_FLOOR = 1.0
EMBEDDING_MAX_BLOCK_SIZE = 16
EMBEDDING_TABLE_SHARE = 0.05
EMBEDDING_MAX_MOTIFS = 2 ** 16


def _split_budget(model: nn.Module, config: MoMosConfig, include: Iterable[Any] | None,
                  exclude: Iterable[Any] | None, overrides: Mapping[Any, MoMosConfig | None] | None,
                  embedding_bits: float | str, embedding_block_size: int | None = None
                  ) -> tuple[MoMosConfig, Mapping[Any, MoMosConfig | None] | None]:
    """`compress`'s `embedding_bits`: the config for the tensors that keep `config`, with the budget the embeddings
    leave them, and the overrides that give each untied Embedding weight a bank of its own (the k that
    `embedding_bits` buy the largest of them). ``"auto"`` where there is nothing to split: `config` and
    `overrides` unchanged."""
    b = embedding_bits
    auto = isinstance(b, str) and b == "auto"
    if not auto and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0):
        raise MoMosConfigError(f"embedding_bits must be a positive number, 'auto' or None, got {b!r}")
    if config.bits_per_weight is None:
        if auto:
            return config, overrides
        raise MoMosConfigError("embedding_bits splits a bits_per_weight budget: give the config bits_per_weight "
                               f"(it has capacity={config.capacity!r}, num_motifs={config.num_motifs!r})")
    chosen, owners = _selection(model, config, include, exclude, overrides)
    holders = _parameter_slots(model)
    params = {name: owners[name][0]._parameters[owners[name][1]] for name in chosen}
    shared = [name for name, cfg in chosen.items() if cfg == config]
    lookups = [name for name in shared if isinstance(owners[name][0], nn.Embedding) and owners[name][1] == "weight"
               and len(holders.get(id(params[name]), [])) == 1]
    rest = [name for name in shared if name not in lookups]
    if not lookups or not rest:
        if auto:
            return config, overrides
        missing = "no untied nn.Embedding weight" if not lookups else "no other tensor"
        raise MoMosSelectionError(f"embedding_bits={b!r} splits the budget between untied nn.Embedding weights and "
                                  f"the other tensors, but {missing} is selected with the config")
    numels = {name: params[name].numel() for name in shared}
    total = sum(numels.values())
    # Every embedding gets the k that the budget buys the largest one: a small table (BERT's token types, read by
    # every token) would otherwise get almost nothing, its motif table costing more than its indices.
    largest = max(lookups, key=lambda name: numels[name])
    numel = numels[largest]
    if auto:
        budget = config.bits_per_weight
        target = min(budget, max(EMBEDDING_BITS_FLOOR, budget - EMBEDDING_BITS_BELOW))
        rows = [owners[name][0].embedding_dim for name in lookups]
        s, k = _embedding_bank(config, target, numel, rows, embedding_block_size)
        if s is None:
            return config, overrides
        looked_up = config.replace(bits_per_weight=None, num_motifs=k, block_size=s)
    else:
        s = config.block_size if embedding_block_size is None else embedding_block_size
        looked_up = config.replace(bits_per_weight=float(b), block_size=s)  # checks s as a block size
        k = looked_up.num_motifs_for(num_blocks(numel, s), numel)
        if k - config.force_zero < 1:
            raise MoMosConfigError(f"embedding_bits={b!r} leaves tensor {largest!r} only the zero motif: give it "
                                   "more bits")
    split = {name: looked_up.replace(bits_per_weight=None, capacity=None, num_motifs=k, scope="tensor")
             for name in lookups}
    spent = 0
    for name in lookups:
        blocks = num_blocks(numels[name], s)
        own = split[name].num_motifs_for(blocks)
        spent += blocks * index_bits(own) + own * s * config.motif_bits
    left = (config.bits_per_weight * total - spent) / sum(numels[name] for name in rest)
    if left <= 0:
        if auto:
            return config, overrides
        raise MoMosConfigError(f"embedding_bits={b!r} leaves no budget of bits_per_weight={config.bits_per_weight!r} "
                               f"for the other tensors")
    return config.replace(bits_per_weight=left), {**split, **(overrides or {})}


def _embedding_bank(config: MoMosConfig, target: float, numel: int, rows: list[int],
                    block_size: int | None) -> tuple[int, int] | tuple[None, None]:
    """``(s, k)`` for `compress`'s ``embedding_bits="auto"`` (the rule above `EMBEDDING_BITS_BELOW`) for the
    largest embedding, of `numel` values: per block size, the first whole index width at or above `target` bits
    per weight, or the widest below it whose table qualifies; then the rate nearest above `target` (else the
    highest below), the longer block on a tie. ``(None, None)`` where nothing qualifies."""
    lengths = [block_size] if block_size is not None else [config.block_size] + [
        s for s in range(config.block_size + 1, EMBEDDING_MAX_BLOCK_SIZE + 1) if not any(row % s for row in rows)]
    best: tuple[bool, float, int, int] | None = None  # (below target, distance, -s, k) of the best so far
    for s in lengths:
        blocks = num_blocks(numel, s)
        for width in range(math.ceil(target * s - 1e-9), 0, -1):
            k = min(2 ** width, blocks)
            if k - config.force_zero >= 1 and k <= EMBEDDING_MAX_MOTIFS \
                    and k * s * config.motif_bits <= EMBEDDING_TABLE_SHARE * blocks * index_bits(k):
                rate = math.log2(k) / s
                key = (rate < target - 1e-12, round(abs(rate - target), 12), -s, k)
                best = key if best is None or key < best else best
                break
    return (None, None) if best is None else (-best[2], best[3])


def _stale(bank: MotifBank, members: list[Member]) -> bool:
    if not bank.refreshed:
        return True
    if bank.config.mode == "ste":
        return False
    motifs = bank.motifs
    for _, module, tensor_name in members:
        weight = whole(latent(module, tensor_name))
        if not torch.equal(weight, reconstruct(motifs, momos_of(module, tensor_name).mosaic, weight.shape,
                                               dtype=weight.dtype)):
            return True
    return False


def _candidates(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(parameter name, module name, module)`` of every trainable floating-point parameter, in module order; a
    tied parameter once, under its first name."""
    candidates, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and param.is_floating_point() and id(param) not in seen:
                seen.add(id(param))
                candidates.append((_join(module_name, name), module_name, module))
    return candidates


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_global_agreement(names: list[str], chosen: dict[str, MoMosConfig],
                            weights: dict[str, torch.Tensor]) -> None:
    if not names:
        return
    first = chosen[names[0]]
    for name in names[1:]:
        for f in BANK_FIELDS:
            if getattr(chosen[name], f) != getattr(first, f):
                raise MoMosConfigError(
                    f"tensors sharing the global bank must share {f}: {names[0]!r} has {getattr(first, f)!r}, "
                    f"{name!r} has {getattr(chosen[name], f)!r} (give one of them scope='tensor')"
                )
        # One bank, one device: its motifs are gathered with every mosaic it serves.
        if weights[name].device != weights[names[0]].device:
            raise MoMosConfigError(
                f"tensors sharing the global bank must be on one device (scope='global'): {names[0]!r} is on "
                f"{weights[names[0]].device}, {name!r} on {weights[name].device} (use scope='tensor': each tensor's "
                f"bank then lives on its device)"
            )


def _banks(model: nn.Module) -> list[tuple[MotifBank, list[Member]]]:
    """The banks of a prepared model with the tensors each serves, in module order."""
    members = prepared_members(model)
    if not members:
        state = "converted" if is_packed(model) else "not prepared"
        raise MoMosStateError(f"model is {state}: call momos.prepare(model, config) first")
    _refuse_flat_sharding(model)
    groups: dict[int, tuple[MotifBank, list[Member]]] = {}
    for member in members:
        bank = momos_of(member[1], member[2]).bank
        groups.setdefault(id(bank), (bank, []))[1].append(member)
    return list(groups.values())


def _refuse_flat_sharding(model: nn.Module) -> None:
    """FSDP1 (`FullyShardedDataParallel`) keeps parameters in flat shards and leaves module tensors pointing
    at freed storage between forwards: reading them would read garbage (or crash), so say so instead."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing is wrapped in it
    if fsdp is not None and any(isinstance(module, fsdp.FullyShardedDataParallel) for module in model.modules()):
        raise MoMosStateError("model is wrapped in FullyShardedDataParallel (FSDP1), whose flat parameter shards "
                              "momos cannot read between forwards: shard it with FSDP2's "
                              "torch.distributed.fsdp.fully_shard instead")
