"""Process-group setup from `torchrun`'s environment, and small collective helpers.

`torchrun --nproc_per_node N ...` starts N processes and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in each. `init_distributed()` reads them, picks the backend
(NCCL on CUDA, gloo on CPU), binds the process to its GPU and creates the default process
group. Without those variables it creates nothing and reports a single process, so the same
code runs under `python` and under `torchrun`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: global rank, number of processes, rank on the host, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_distributed(device_type: str | None = None) -> DistributedInfo:
    """Create the default process group from torchrun's environment (idempotent).

    Args:
        device_type: "cuda" or "cpu"; None picks CUDA when a GPU is visible. On CUDA the
            backend is NCCL and the process is bound to GPU LOCAL_RANK; on CPU it is gloo.

    Returns the process's `DistributedInfo`. Outside torchrun no group is created and the
    result is rank 0 of 1 (a group of one is still created under `torchrun --nproc_per_node 1`,
    so FSDP and DDP run there too).
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_type='cuda' but no CUDA GPU is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if not launched_by_torchrun():
        return DistributedInfo(0, 1, 0, device)
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup_distributed() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0, and in a process that is not part of a group."""
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all processes (a detached copy; `value` itself when alone)."""
    if not dist.is_initialized():
        return value.detach()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_max(value: float) -> float:
    """The largest of a Python number over all processes (memory high-water marks, times)."""
    if not dist.is_initialized():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out.item())
