"""Training prepared models with torch.distributed: DistributedDataParallel as it is, and what MoMos adds.

Design: a refresh needs no communication. DDP all-reduces gradients, so every rank applies the same
update and holds bit-identical weights (the tests check this on gloo); a bank's random draw is seeded by
(config seed, bank name, refresh count) only, and the k-means and assignment steps are deterministic, so
every rank computes the same bank and mosaic from the same weights. Broadcasting the bank from rank 0
instead would cost a collective per refresh and would only matter if replicas drifted apart, which
under DDP they do not. Call `momos.refresh(ddp_model)` on every rank (the wrapper is walked like any
module), e.g. through `momos.refresh_every(ddp_model, optimizer)`.

Communication: DDP broadcasts all buffers from rank 0 at every forward by default. MoMos's buffers
(mosaics, banks, refresh counts, distortions) are identical on every rank already, and the mosaics alone
are half the size of the gradients at s=4 (one int64 per 4 float32 weights), so `exclude_from_ddp_sync`
takes them out of DDP's buffer sync; other buffers (BatchNorm statistics) are still synced. Excluded
buffers are not synced when DDP is constructed either: wrap a model that was prepared (and refreshed,
if at all) identically on every rank, as the usual same-seed construction does.

CUDA: the same holds with the nccl backend (all-reduce results are identical on every rank); it is
not tested here, as the test machines have no GPU.

FSDP2 (``fully_shard``, CPU/gloo tested): prepare, then shard; no extra user code. Between forwards each
parameter is a DTensor shard, while a bank is drawn from all its blocks and a mosaic covers the whole
tensor, so a refresh all-gathers the tensors of each bank (`momos.nn.parametrize.whole`: one all-gather of
the parameters, as a forward does), computes the same bank and mosaic on every rank, and in hard mode
writes back each rank's own shard. Forwards see FSDP's unsharded parameters, so STE works as usual.
`momos.convert` refuses sharded parameters (it packs whole tensors, and FSDP modules cannot be copied):
gather a full state dict (``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))``
from ``torch.distributed.checkpoint.state_dict``), load it into the model prepared without FSDP, and
convert that. The older FSDP1 wrapper (``FullyShardedDataParallel``) is not supported: its flat
parameters mix tensors, which a parametrization cannot see through.
"""

from __future__ import annotations

from torch import nn

from momos.errors import MoMosStateError
from momos.nn.parametrize import MoMosParametrization, MotifBank

__all__ = ["exclude_from_ddp_sync"]


def exclude_from_ddp_sync(model: nn.Module) -> list[str]:
    """Keep DistributedDataParallel from broadcasting MoMos's buffers; call it before wrapping `model`.

    Adds the buffers of every bank and parametrization to ``model._ddp_params_and_buffers_to_ignore``
    (DDP's own mechanism; names already there are kept) and returns the names added.

    Raises:
        MoMosStateError: `model` has no MoMos buffers (it was not prepared).
    """
    names = [name for module_name, module in model.named_modules()
             if isinstance(module, (MotifBank, MoMosParametrization))
             for name in (f"{module_name}.{b}" for b, _ in module.named_buffers(recurse=False))]
    if not names:
        raise MoMosStateError("model has no MoMos buffers: call momos.prepare(model, config) before wrapping")
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + [n for n in names if n not in ignored]
    return names
