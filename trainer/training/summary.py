"""What a run reports: each epoch's metrics line and log line, and summary.json, what a finished
run reached, with the provenance to trust and repeat it."""

from __future__ import annotations

import resource
import socket
from datetime import datetime
from typing import Any

import torch
import torch.nn as nn

from trainer import provenance
from trainer.config import Config
from trainer.data.checks import data_record
from trainer.data.common import split_record, train_labels
from trainer.device import amp_dtype, device_name, precision_name
from trainer.distributed import Dist
from trainer.training.collectives import all_gather_object, all_reduce_max, all_reduce_min
from trainer.training.progress import Progress


def ranks_in_sync(model: nn.Module, group: Dist) -> bool:
    """Whether every rank ends with bit-identical weights (DDP keeps them so; a mismatch is a bug).
    A collective: every rank calls it."""
    if not group.enabled:
        return True
    fingerprint = torch.stack([p.detach().double().sum() for p in model.state_dict().values()])
    lowest = all_reduce_min(fingerprint.clone(), group.device)
    highest = all_reduce_max(fingerprint.clone(), group.device)
    return bool(torch.equal(lowest, highest))


def hosts(group: Dist) -> list[str]:
    """The distinct host names the ranks run on, sorted (a collective: every rank calls it)."""
    return sorted(set(all_gather_object(socket.gethostname(), group)))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS


def evaluation_metrics(val: tuple[float, float, int] | None, test: tuple[float, float, int] | None) -> dict[str, Any]:
    """A metrics line's val_*/test_* keys: none for a set not evaluated (train.eval_every, no
    data.val_split). val_images: counted over every rank's shard, data.val_split when each counts once."""
    metrics: dict[str, Any] = {}
    if val is not None:
        metrics.update(val_loss=val[0], val_acc=val[1], val_images=val[2])
    if test is not None:
        metrics.update(test_loss=test[0], test_acc=test[1])
    return metrics


def epoch_line(metrics: dict[str, Any], steps_per_epoch: int, eval_every: int) -> str:
    """The log's line for a trained epoch, from its metrics line."""
    m, evaluated = metrics, "test_loss" in metrics
    return (f"epoch {m['epoch']:3d}  train loss {m['train_loss']:.3f} acc {m['train_acc']:5.2f}  "
            + (f"val loss {m['val_loss']:.3f} acc {m['val_acc']:5.2f}  " if "val_loss" in m else "")
            + (f"test loss {m['test_loss']:.3f} acc {m['test_acc']:5.2f}  " if evaluated else "")
            + f"{m['images_per_s']:,.0f} img/s  {m['epoch_s']:.1f} s"
            + (f"  (partial: {m['steps']} of {steps_per_epoch} steps)" if m["steps"] < steps_per_epoch else "")
            + ("" if evaluated else f"  (not evaluated: train.eval_every={eval_every})"))


def _split_record(cfg: Config) -> dict | None:
    """The validation split's record (common.split_record), None without one."""
    if not cfg.data.val_split:
        return None
    return split_record(train_labels(cfg.data), cfg.data)


def summary(cfg: Config, progress: Progress, params: int, group: Dist, in_sync: bool) -> dict[str, Any]:
    """A collective (it gathers the ranks' host names): every rank calls it."""
    best = progress.best
    selected_by = "val" if best.val_acc is not None else "test"
    return {
        "arch": cfg.model.arch,
        "test_acc": progress.last_test_acc,  # of the last epoch
        # How the best epoch (best.pt, best_epoch, train_acc, gap) was chosen: "val", on the
        # validation split (data.val_split), or "test", on the test set (no split: the seed's way).
        "selected_by": selected_by,
        "val_acc": best.val_acc,  # the best validation accuracy (None without a split)
        "test_acc_at_best_val": best.test_acc if selected_by == "val" else None,  # the unbiased test figure
        # The best test accuracy of any epoch, as the seed reported it: with a split, an optimistic
        # figure (chosen on the test set itself), kept for comparison with the seed's table.
        "best_test_acc": progress.best_test_acc,
        "best_test_epoch": progress.best_test_epoch,
        "best_epoch": best.epoch,  # the selected epoch: best.pt's
        "train_acc": best.train_acc,  # in the selected epoch, as the seed's table has it
        "gap": best.train_acc - best.test_acc,  # train minus test accuracy, both of the selected epoch
        "params": params,
        "epochs_run": progress.epoch,
        # Before train.epochs, for a reason other than the end of a budget's plan: patience.
        "stopped_early": progress.epoch < cfg.train.epochs and progress.plan is None,
        "wall_time_s": progress.elapsed_s,  # training, evaluating and compiling (compile_s of it)
        "compile_s": progress.compile_s,
        "best_epoch_wall_time_s": best.elapsed_s,
        # train.budget_s: the plan fitted to it and the time used (None without a budget, or when the
        # run ended before the plan was fitted).
        "budget": progress.plan.record(progress.elapsed_s) if progress.plan is not None else None,
        "gpu_seconds": progress.elapsed_s * group.world_size if group.device.type == "cuda" else None,
        "world_size": group.world_size,
        "hosts": hosts(group),  # the distinct hosts the ranks ran on
        "ranks_in_sync": in_sync,
        "device": device_name(group.device),
        # The precision trained in ("bf16", "fp16" or "fp32"), resolved from the setting on this device
        # by the rule the trainer used (train.amp=auto depends on the CPU's bf16 units).
        "amp": precision_name(amp_dtype(group.device, cfg.train.amp)),
        "amp_setting": cfg.train.amp,
        "torch_version": torch.__version__,
        "git_sha": provenance.git_sha(),
        "command": provenance.command(),
        # The record checks.verify (or verify_python, data.format=python) made when the loaders were built:
        # hashes of the files as read, not the sidecar's.
        # The validation split (images, seed, a hash of the indices held out) joins it: None without one.
        "data": {**data_record(cfg.data.dir, cfg.data.format), "val_split": _split_record(cfg)},
        "finished_at": datetime.now().isoformat(timespec="seconds"),
    }
