"""Train one architecture on CIFAR-10; the same code as one process, under torchrun, or under srun.

    python -m trainer --config jobs/configs/resnet.yaml [--run-dir DIR] [key=value ...]
    torchrun --standalone --nproc_per_node=2 -m trainer --config jobs/configs/tiny.yaml

The run folder (default runs/<arch>-<timestamp>/) gets config.yaml, metrics.jsonl (a line per
epoch), checkpoints/{last,prev,best}.pt and, when the run ends, summary.json. Starting again with
the same run folder resumes from its newest readable checkpoint — also mid-epoch: the loader
replays that epoch's order and skips the batches already trained on. SIGTERM and SIGUSR2 stop the
run at the next synchronisation point with a checkpoint; run the same command again to go on.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from trainer import UserError, cli, distributed, run_files
from trainer.config import Config, load_config, save_config
from trainer.device import device_name
from trainer.distributed import Dist
from trainer.files import write_text_atomic
from trainer.logger import make_logger
from trainer.training.stopping import Stopped
from trainer.training.trainer import Trainer


def _run_dir(cfg: Config, requested: Path | None, group: Dist) -> Path:
    """The run folder: as asked, or runs/<arch>-<timestamp> chosen by rank 0 for every rank."""
    if requested is not None:
        return requested
    name = [f"runs/{cfg.model.arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
    if group.enabled:
        torch.distributed.broadcast_object_list(name, src=0)
    return Path(name[0])


def _load_run_config(config: Path | None, overrides: list[str], run_dir: Path | None) -> Config:
    if config is not None:
        return load_config(config, overrides)
    if run_dir is not None and (run_dir / run_files.CONFIG).is_file():
        return load_config(run_dir / run_files.CONFIG, overrides)  # resuming a run by its folder alone
    raise UserError("pass --config FILE (or --run-dir of an existing run to resume it)")


def train(
    config: Path | None, overrides: list[str], run_dir: Path | None = None, stop_after_epoch: int | None = None
) -> dict[str, Any]:
    """Trains to the end and returns the summary, or raises Stopped after saving a checkpoint."""
    group = distributed.setup()
    trainer = logger = None
    try:
        cfg = _load_run_config(config, overrides, run_dir)
        run_dir = _run_dir(cfg, run_dir, group)
        if group.is_main:
            save_config(cfg, run_dir / run_files.CONFIG)
        trainer = Trainer(cfg, run_dir, group, stop_after_epoch)
        progress = trainer.progress
        logger = make_logger(group.is_main, run_dir, cfg, progress.wandb_run_id, progress.epoch)
        progress.wandb_run_id = logger.run_id
        logger.info(
            f"{'resuming' if trainer.resumed else 'training'} {cfg.model.arch} ({trainer.params / 1e6:.2f} M params) "
            f"in {run_dir} on {group.world_size} x {device_name(group.device)}"
            + (f" from epoch {progress.epoch + 1}, step {progress.epoch_step}" if trainer.resumed else "")
        )
        try:
            summary = trainer.run(logger)
        except Stopped as e:
            logger.info(str(e))
            raise
        if group.is_main:
            write_text_atomic(run_dir / run_files.SUMMARY, json.dumps(summary, indent=2) + "\n")
        logger.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})
        logger.info(f"done: best test accuracy {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}; "
                    f"summary in {run_dir / run_files.SUMMARY}")
        return summary
    finally:
        if logger is not None:
            logger.finish()
        if trainer is not None:
            trainer.ddp = None  # no live DDP object when the group goes (see distributed.teardown)
        del trainer
        distributed.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="a YAML under jobs/configs/")
    parser.add_argument("--run-dir", type=Path, help="the run folder (default runs/<arch>-<timestamp>); resumes if it holds a checkpoint")
    parser.add_argument("--stop-after-epoch", type=int, metavar="N", help="stop after epoch N as if preempted (checkpoint, exit 0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.05")
    args = parser.parse_args()

    def run() -> int:
        try:
            train(args.config, args.overrides, args.run_dir, args.stop_after_epoch)
        except Stopped:
            pass  # a clean, resumable stop: exit 0 (the message is printed already)
        return 0

    cli.run(run)
