"""Data-parallel training over processes started by torchrun (torch.distributed).

`torchrun --nproc-per-node N -m noisecraft train ...` starts N copies of the trainer; torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) tells each one who it is. Each process then:

- joins one process group: gloo on CPU, NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK);
- computes the gradient of its share of every global batch; DistributedDataParallel averages the gradients,
  so every process takes the same optimizer step and the weights stay identical everywhere;
- draws the randomness of the WHOLE batch (noise, t, label dropout) from the same seeded generator and keeps
  its own slice, so the training run is the same function of (seed, step) whatever the number of processes
  or accumulation steps — which is what lets a run resume on a different number of processes.

Without torchrun's environment everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import NoisecraftError


@dataclass(frozen=True)
class Distributed:
    """Who this process is in the job: rank r of world_size processes, on `device`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and samples; the others only compute."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of n items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks (in place, on the collective's device), returned on CPU."""
        if not self.active:
            return tensor
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return on_device.cpu()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "cpu", timeout_minutes: float = 30.0) -> Distributed:
    """Join the process group torchrun set up (or return the single-process context when not under torchrun).

    device "cpu" uses gloo; "cuda" uses NCCL with one GPU per process (cuda:LOCAL_RANK)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Distributed(device=torch.device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise NoisecraftError(f"process {rank} needs GPU {local_rank} but this machine has "
                                  f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; start at most "
                                  f"that many processes per node (--nproc-per-node) or train with --device cpu.")
        torch.cuda.set_device(local_rank)
        where, backend = torch.device("cuda", local_rank), "nccl"
    elif kind == "cpu":
        where, backend = torch.device("cpu"), "gloo"
    else:
        raise NoisecraftError(f"distributed training runs on cpu (gloo) or cuda (NCCL), not {device!r}; "
                              f"pass --device cpu or --device cuda.")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes))
    return Distributed(rank=rank, world_size=world, device=where)


def close_distributed(context: Distributed) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()
