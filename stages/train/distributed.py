"""Several processes (GPUs, nodes) through torchrun: process group from the environment, rank helpers.

torchrun (or SLURM via `srun torchrun ...`, see examples/slurm/train.sbatch) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 `setup` joins the process group
(`nccl` on GPUs, `gloo` on CPUs) and gives each process the GPU of its LOCAL_RANK. One process
(WORLD_SIZE unset or 1) runs plain, on `choose_device(--device)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stages.core.batching import choose_device
from stages.core.errors import InputError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    joined_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device_spec: str = "auto") -> DistInfo:
    """Join the process group when WORLD_SIZE > 1 (env:// rendezvous), else describe one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, choose_device(device_spec))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec.strip().lower() != "cpu"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here: start "
                "at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    joined = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise InputError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start the processes with torchrun")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        joined = True
    return DistInfo(rank, world, local_rank, device, joined)


def teardown(info: DistInfo) -> None:
    if info.joined_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar tensor across processes (the value itself for one process)."""
    if not info.active:
        return float(value.detach())
    total = value.detach().float().clone().reshape(1)
    dist.all_reduce(total)
    return float(total) / info.world_size
