"""Prepared models under DistributedDataParallel (2 gloo processes on the CPU; 2 nccl processes where 2 CUDA
devices are present): replicas stay identical, refreshes agree without communication, and training equals one
process on the same global batch."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import momos
from momos.nn.distributed import exclude_from_ddp_sync
from momos.nn.parametrize import MoMosParametrization, MotifBank, is_sharded, whole

WORLD = 2
STEPS = 6
REFRESH_EVERY = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# The backends DDP is tested on: gloo on the CPU, nccl with a CUDA device per rank.
BACKENDS = ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    not dist.is_nccl_available() or torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices"))]
CPU = torch.device("cpu")


def _device(backend: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else CPU


def _model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    return momos.prepare(model, momos.MoMosConfig(block_size=2, capacity=0.25, mode=mode))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


def _train(model: nn.Module, rank: int, world: int, wrapped: bool | None = None,
           device: torch.device = CPU) -> None:
    """STEPS AdamW steps, each on this rank's contiguous share of the global batch (on `device`), refreshing
    the (wrapped or plain) model every REFRESH_EVERY steps and once before training."""
    wrapped = world > 1 if wrapped is None else wrapped
    momos.refresh(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step, (x, y) in enumerate(_batches(), 1):
        x, y = x.to(device), y.to(device)
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = nn.functional.cross_entropy(model(x[share]), y[share])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % REFRESH_EVERY == 0:
            stats = momos.refresh(model)
            assert all(name.startswith("module.") for name in stats.tensors) == wrapped


def _worker(rank: int, port: int, mode: str, out: str, backend: str) -> None:
    torch.set_num_threads(1)
    device = _device(backend, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model(mode).to(device)
        excluded = exclude_from_ddp_sync(model)
        ddp = DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
        synced = {id(b) for b in ddp.modules_buffers}
        momos_buffers = {id(b) for m in model.modules() if isinstance(m, (MotifBank, MoMosParametrization))
                         for b in m.buffers(recurse=False)}
        assert excluded and not synced & momos_buffers
        _train(ddp, rank, WORLD, device=device)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while a peer's collective is in flight (a rare SIGABRT)
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, port: int, mode: str, out: str, meta: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        if not meta:
            model = fully_shard(_model(mode))  # in place: every parameter becomes a DTensor shard
        else:  # built, prepared and sharded on the meta device, then materialized
            with torch.device("meta"):
                model = fully_shard(_model(mode))
            model.to_empty(device="cpu")
            for buffer in model.buffers():  # what to_empty leaves there, different on each rank
                buffer.fill_(7 + rank if buffer.dtype == torch.int64 else math.nan)
            _init_from(model, _model(mode))
        assert all(is_sharded(p) for p in model.parameters())
        _train(model, rank, WORLD, wrapped=False)
        with pytest.raises(momos.MoMosStateError, match="sharded"):
            momos.convert(model)
        torch.save({k: whole(v).detach() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _init_from(sharded: nn.Module, initial: nn.Module) -> None:
    """Each parameter shard of `sharded` from the same parameter of `initial` (as an init function or a
    checkpoint would give it)."""
    from torch.distributed.tensor import distribute_tensor

    full = dict(initial.named_parameters())
    with torch.no_grad():
        for name, param in sharded.named_parameters():
            param.copy_(distribute_tensor(full[name].detach(), param.device_mesh, param.placements))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_agree_and_match_one_process(mode: str, tmp_path: Path,
                                       device: torch.device = CPU) -> dict[str, torch.Tensor]:
    """The state dicts the ranks saved are identical and equal one process trained on the global batch on
    `device` (floats within 1e-5 relative, integers exactly); returns rank 0's."""
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _model(mode).to(device)
    _train(single, 0, 1, device=device)
    expected = {k: v.cpu() for k, v in single.state_dict().items()}
    assert ranks[0].keys() == expected.keys()
    assert any(k.endswith("motifs") for k in expected) and any(k.endswith("mosaic") for k in expected)
    for key, value in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between ranks"
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)
        else:
            assert torch.equal(ranks[0][key], value), f"{key} differs from the single-process run"
    assert int(ranks[0]["0.parametrizations.weight.0.bank.refreshes"]) == 1 + STEPS // REFRESH_EVERY
    return ranks[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_ddp_replicas_agree_and_match_one_process(mode: str, backend: str, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), mode, str(tmp_path), backend), nprocs=WORLD, join=True)
    _ranks_agree_and_match_one_process(mode, tmp_path, _device(backend, 0))


@pytest.mark.parametrize("meta", [False, True], ids=["built", "meta-init"])
@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_fsdp_shards_agree_and_match_one_process(mode: str, meta: bool, tmp_path: Path) -> None:
    """FSDP2 (`fully_shard`): each refresh all-gathers the bank's tensors, so every rank draws the same
    bank and mosaic, and training equals one process on the same global batch. The same from a model built
    on the meta device, whose MoMos buffers hold different values on each rank after `to_empty`. The full
    state dict loads into the unsharded prepared model, which converts."""
    mp.spawn(_fsdp_worker, args=(_free_port(), mode, str(tmp_path), meta), nprocs=WORLD, join=True)
    state = _ranks_agree_and_match_one_process(mode, tmp_path)
    unsharded = _model(mode)
    unsharded.load_state_dict(state)
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(momos.convert(unsharded)(x), unsharded(x), rtol=0, atol=0)


def _fsdp1_worker(rank: int, port: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(_model("hard"), device_id=torch.device("cpu"))
        wrapped(torch.randn(2, 12)).sum().backward()
        for call in (momos.refresh, momos.convert):
            with pytest.raises(momos.MoMosStateError, match="fully_shard"):
                call(wrapped)
    finally:
        dist.destroy_process_group()


def test_fsdp1_is_refused_with_the_way_out() -> None:
    """FSDP1's flat shards leave the module's tensors on freed storage between forwards (reading them
    crashed): refresh and convert say so and point to FSDP2."""
    mp.spawn(_fsdp1_worker, args=(_free_port(),), nprocs=1, join=True)


def test_exclude_from_ddp_sync_needs_a_prepared_model() -> None:
    with pytest.raises(momos.MoMosStateError, match="prepare"):
        exclude_from_ddp_sync(nn.Linear(2, 2))
