"""Distributed training from the ``torchrun`` environment (DDP; NCCL on GPUs, Gloo on CPU).

``torchrun --nproc_per_node N -m usfm_edge.train.pretrain ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and starts the
process group. Without them the run is a single process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from usfm_edge.core.errors import ConfigError

__all__ = ["DistInfo", "init_distributed", "resolve_device", "cleanup", "all_reduce_mean"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 for a single process).
        local_rank: rank on this machine (selects the GPU).
        world_size: number of processes.
        is_main: rank 0, the process that logs and writes checkpoints.
        device: the torch device this process trains on.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    is_main: bool = True
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cuda`` without CUDA raises."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available", hint="use --device cpu")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")


def init_distributed(device: str = "auto") -> DistInfo:
    """Read the torchrun environment, start the process group if ``WORLD_SIZE > 1``, pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, rank == 0, dev)


def cleanup() -> None:
    """Destroy the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``values`` over all ranks (identity for a single process)."""
    if not info.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world_size
