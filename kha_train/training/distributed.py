"""Process-group setup and teardown.

Launchers understood (checked in this order):

- torchrun (single or multi-node rendezvous): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
  ``MASTER_ADDR``/``MASTER_PORT`` come from torchrun.
- SLURM without torchrun (``srun python -m kha_train.train ...``, one task per GPU): ranks from
  ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``; the job script exports
  ``MASTER_ADDR`` and ``MASTER_PORT``.
- A plain ``python -m kha_train.train`` or ``kha-train train``: one process, with an in-memory
  store (no ports), so FSDP2, DCP and the rest run the same code path as on many ranks.

Backends: NCCL for CUDA tensors, gloo for CPU tensors (the whole group on a CPU run). Host-side
agreement (the preemption flag) and background checkpoint writes get gloo groups of their own,
so they never queue behind, or interleave with, the training collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kha_train.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, launched) from torchrun's or SLURM's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), True
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in env:
                raise ConfigError(
                    f"running under SLURM with {env['SLURM_NTASKS']} tasks but {key} is not set: "
                    "export MASTER_ADDR (the first node) and MASTER_PORT in the job script, or "
                    "launch through torchrun"
                )
        return (
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            True,
        )
    return 0, 1, 0, False


def env_world_size() -> int:
    """The number of ranks this launch will have (read before any process group exists)."""
    return launch_env()[1]


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``train.device``: auto (cuda if available) | cuda | cpu."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda but no CUDA device is visible: use train.device=auto or cpu"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU: only {count} visible. Launch at most {count} "
            "processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


_groups: dict[str, dist.ProcessGroup] = {}


def init_distributed(device_preference: str = "auto", timeout_min: int = 30) -> DistEnv:
    """Start the default process group (or reuse the existing one) and pick this rank's device."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return DistEnv(rank, world, local, resolve_device(device_preference, local))
    rank, world, local, launched = launch_env()
    device = resolve_device(device_preference, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    timeout = timedelta(minutes=timeout_min)
    if launched:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    else:
        # One process: an in-memory store, no rendezvous port to pick or collide on.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    return DistEnv(rank, world, local, device)


def gloo_group(name: str) -> dist.ProcessGroup:
    """A gloo group over all ranks, created once per name (every rank must ask in the same order)."""
    if name not in _groups:
        _groups[name] = dist.new_group(backend="gloo")
    return _groups[name]


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank if ``flag`` is true on any rank (host tensors only: no device sync)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group or gloo_group("control"))
    return bool(t.item())


def teardown() -> None:
    """Destroy every process group. Idempotent."""
    _groups.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
