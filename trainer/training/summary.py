"""summary.json: what a finished run reached, with the provenance to trust and repeat it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import torch
import torch.nn as nn

from trainer import provenance
from trainer.config import Config
from trainer.data.checks import data_record
from trainer.device import device_name
from trainer.distributed import Dist
from trainer.training.progress import Progress


def ranks_in_sync(model: nn.Module, group: Dist) -> bool:
    """Whether every rank ends with bit-identical weights (DDP keeps them so; a mismatch is a bug).
    A collective: every rank calls it."""
    if not group.enabled:
        return True
    fingerprint = torch.stack([p.detach().double().sum() for p in model.state_dict().values()])
    lowest, highest = fingerprint.clone(), fingerprint.clone()
    torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(lowest, highest))


def summary(cfg: Config, progress: Progress, params: int, group: Dist, in_sync: bool) -> dict[str, Any]:
    best = progress.best
    return {
        "arch": cfg.model.arch,
        "test_acc": progress.last_test_acc,
        "best_test_acc": best.test_acc,
        "best_epoch": best.epoch,
        "train_acc": best.train_acc,  # in the best epoch, as the seed's table has it
        "gap": best.train_acc - best.test_acc,
        "params": params,
        "epochs_run": progress.epoch,
        "stopped_early": progress.epoch < cfg.train.epochs,
        "wall_time_s": progress.elapsed_s,
        "best_epoch_wall_time_s": best.elapsed_s,
        "gpu_seconds": progress.elapsed_s * group.world_size if group.device.type == "cuda" else None,
        "world_size": group.world_size,
        "ranks_in_sync": in_sync,
        "device": device_name(group.device),
        "torch_version": torch.__version__,
        "git_sha": provenance.git_sha(),
        "command": provenance.command(),
        # The record checks.verify made when the loaders were built: hashes of the files as read, not the sidecar's.
        "data": data_record(cfg.data.dir),
        "finished_at": datetime.now().isoformat(timespec="seconds"),
    }
