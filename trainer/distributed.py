"""Process-group set-up and tear-down, the same way under every starter.

The trainer runs as one plain process, as the N workers of `torchrun` (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), or as the N tasks `srun` starts inside a SLURM job (which set
SLURM_PROCID, SLURM_NTASKS...; submitit's TorchDistributedEnvironment turns them into the torch
variables). CUDA processes use NCCL on their local GPU; CPU processes use gloo.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Dist:
        """One process on its own: for tools (the report, the bench) that are not distributed."""
        return cls(0, 0, 1, torch.device(device))


def _export_slurm_env() -> None:
    """Inside an srun step with several tasks and no torch variables, derive them from SLURM's."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return
    import submitit

    # submitit recognises a SLURM job by this variable, which only its own batch files set.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup() -> Dist:
    _export_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device if backend == "nccl" else None)
    return Dist(rank, local_rank, world_size, device)


def teardown(failed: bool = False) -> None:
    """Destroys the process group; callers drop their DDP wrapper (`del`) before calling.

    With gloo, destroying the group while a DDP object is alive aborts the process at exit now
    and then ("terminate called without an active exception"); collecting it first avoids that.
    After a failure there is no barrier: the other ranks may be inside another collective (this
    rank failed writing while they trained on) and would never reach it; they fail at their next
    collective once this process's connections close, and the launcher ends the job.
    """
    gc.collect()
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
