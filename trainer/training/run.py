"""Train one architecture on CIFAR-10; the same code as one process, under torchrun, or under srun.

    python -m trainer --config jobs/configs/resnet.yaml [--run-dir DIR] [key=value ...]
    torchrun --standalone --nproc_per_node=2 -m trainer --config jobs/configs/tiny.yaml

The run folder (default runs/<arch>-<timestamp>/) gets config.yaml, metrics.jsonl (a line per
epoch), checkpoints/{last,prev,best}.pt and, when the run ends, summary.json. Starting again with
the same run folder resumes from its newest readable checkpoint — also mid-epoch: the loader
replays that epoch's order and skips the batches already trained on. Bit-exact resume holds on the
CPU only: on a GPU, cuDNN's autotuned kernels, atomics in backward kernels and NCCL's reduction
order vary between runs, so a resumed GPU run ends close to, not equal to, an uninterrupted one.
SIGTERM and SIGUSR2 stop the
run at the next synchronisation point with a checkpoint; run the same command again to go on.

One trainer at a time uses a run folder: rank 0 holds its lock (.lock, naming the holder's PID and
host) for the whole run, and a second trainer is refused. A command that fails before training
(bad data, an impossible batch size, another architecture's checkpoint) changes nothing in the
folder. A folder whose checkpoints are all unreadable is refused rather than silently started
over; --restart starts it over deliberately, keeping the old folder under another name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only what checks a command: the training stack (torch, ffcv, wandb, submitit: seconds on a small
# CPU) is imported by _train, once the command line and the config have checked out, so that a
# mistake in either is one line at once (issue #21).
from trainer import UserError, cli, models, run_files
from trainer.config import Config, load_config, to_yaml
from trainer.files import remove_stale_temp_files, write_text_atomic

if TYPE_CHECKING:
    from trainer.distributed import Dist


def _run_dir(cfg: Config, requested: Path | None, group: Dist) -> Path:
    """The run folder: as asked, or runs/<arch>-<timestamp> chosen by rank 0 for every rank."""
    from trainer.training.collectives import broadcast_object

    if requested is not None:
        return requested
    return Path(broadcast_object(f"runs/{cfg.model.arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}", group))


def _load_run_config(config: Path | None, overrides: list[str], run_dir: Path | None, restart: bool) -> Config:
    """The command's config, and the checks of its arguments that need no torch."""
    if restart and run_dir is None:
        raise UserError("--restart needs --run-dir: the folder of the run to start over")
    if config is not None:
        return load_config(config, overrides, archs=models.names())
    if run_dir is not None and (run_dir / run_files.CONFIG).is_file():
        return load_config(run_dir / run_files.CONFIG, overrides, archs=models.names())  # resuming a run by its folder alone
    raise UserError("pass --config FILE (or --run-dir of an existing run to resume it)")


def _start_writing(cfg: Config, run_dir: Path) -> list[Path]:
    """The first writes of a command known to be valid for its folder: removes the temporary files
    of saves killed mid-write, and writes config.yaml if it changed. Returns the files removed."""
    from trainer.training import checkpoint

    stale = checkpoint.remove_stale_saves(run_dir / run_files.CHECKPOINTS)
    for name in (run_files.CONFIG, run_files.METRICS, run_files.SUMMARY):
        stale += remove_stale_temp_files(run_dir / name)
    config_path, text = run_dir / run_files.CONFIG, to_yaml(cfg)
    if not config_path.is_file() or config_path.read_text() != text:
        write_text_atomic(config_path, text)
    return stale


def _as_followed(cfg: Config, plan: Any) -> Config:
    """The config the run follows: a resumed budgeted run keeps its checkpoint's plan, and with it
    that plan's train.budget_s, whatever the command said (config.yaml must say what the run did)."""
    if plan is None or plan.budget_s == cfg.train.budget_s:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, budget_s=plan.budget_s))


# ---- the command --------------------------------------------------------------------------------


def train(
    config: Path | None, overrides: list[str], run_dir: Path | None = None, stop_after_epoch: int | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Trains to the end and returns the summary, or raises Stopped after saving a checkpoint.

    Nothing in the run folder changes until the command is known to be valid for it: the folder
    is locked, the Trainer built (the data, the batch size and the checkpoint checked), and only
    then config.yaml written. A command that fails before that leaves the folder as it was.
    """
    cfg = _load_run_config(config, overrides, run_dir, restart)  # before joining: it holds the group's timeout
    return _train(cfg, run_dir, stop_after_epoch, restart)


@contextmanager
def _sigterm_ends_start_up() -> Iterator[None]:
    """SIGTERM while the run starts (data, network, checkpoint: seconds) ends the command as an
    error, through the clean-up that leaves the folder as it was, instead of killing the process
    with a new folder holding only its lock. Where SIGTERM already has a handler (submitit's, in a
    SLURM job) it is left alone; training installs its own stop handlers (stopping.StopSignal)."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise UserError("stopped by SIGTERM while starting, before training began; run the command again")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _train(cfg: Config, run_dir: Path | None, stop_after_epoch: int | None, restart: bool) -> dict[str, Any]:
    """train() with its config loaded and checked."""
    # The training stack, imported only now (see the module's imports).
    from trainer import distributed
    from trainer.device import amp_choice, device_name
    from trainer.logger import make_logger
    from trainer.training import checkpoint
    from trainer.training.run_folder import claim_on_every_rank
    from trainer.training.stopping import Stopped
    from trainer.training.trainer import Trainer

    group = distributed.setup(cfg.train.dist_timeout_s)
    trainer = logger = claim = None
    writing = False  # the command was found valid and has begun to write into the folder
    try:
        with _sigterm_ends_start_up():
            run_dir = _run_dir(cfg, run_dir, group)
            claim = claim_on_every_rank(run_dir, restart, group)
            trainer = Trainer(cfg, run_dir, group, stop_after_epoch)
            writing = True
            progress = trainer.progress
            stale = _start_writing(_as_followed(cfg, progress.plan), run_dir) if group.is_main else []
            logger = make_logger(group.is_main, run_dir, cfg, progress.wandb_run_id, progress.epoch)
            progress.wandb_run_id = logger.run_id
        if claim is not None and claim.replaced is not None:
            logger.info(f"starting over: the previous run is kept in {claim.replaced}")
        if stale:
            names = ", ".join(p.name for p in stale)
            logger.info(f"removed {len(stale)} temporary file(s) of saves killed mid-write: {names}")
        logger.info(
            f"{'resuming' if trainer.resumed else 'training'} {cfg.model.arch} ({trainer.params / 1e6:.2f} M params) "
            f"in {run_dir} on {group.world_size} x {device_name(group.device)}"
            + (f" from epoch {progress.epoch + 1}, step {progress.epoch_step}" if trainer.resumed else "")
        )
        logger.info(f"precision: {amp_choice(group.device, cfg.train.amp)}")
        try:
            summary = trainer.run(logger)
        except Stopped as e:
            logger.info(str(e))
            raise
        if group.is_main:
            write_text_atomic(run_dir / run_files.SUMMARY, json.dumps(summary, indent=2) + "\n")
        logger.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})
        logger.log_model(run_dir / run_files.CHECKPOINTS / checkpoint.BEST, cfg.model.arch,
                         {k: summary[k] for k in ("best_test_acc", "best_epoch", "selected_by", "val_acc",
                                                   "test_acc_at_best_val", "params", "git_sha")})
        if summary["selected_by"] == "val":
            logger.info(f"done: best validation accuracy {summary['val_acc']:.2f}% at epoch {summary['best_epoch']}, "
                        f"test accuracy there {summary['test_acc_at_best_val']:.2f}%; summary in "
                        f"{run_dir / run_files.SUMMARY}")
        else:
            logger.info(f"done: best test accuracy {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}; "
                        f"summary in {run_dir / run_files.SUMMARY}")
        return summary
    except RuntimeError as e:
        if group.enabled and distributed.is_collective_failure(e):
            raise distributed.describe_collective_failure(e, group.rank, cfg.train.dist_timeout_s) from None
        raise
    finally:
        if logger is not None:
            logger.finish()
        if trainer is not None:
            trainer.ddp = None  # no live DDP object when the group goes (see distributed.teardown)
        del trainer
        # After a failure, no barrier: the other ranks may be inside another collective.
        distributed.teardown(failed=sys.exc_info()[0] not in (None, Stopped))
        if claim is not None:  # last: the folder is ours until everything above has written
            if not writing:
                claim.undo()
            claim.release()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="a YAML under jobs/configs/")
    parser.add_argument("--run-dir", type=Path, help="the run folder (default runs/<arch>-<timestamp>); resumes if it holds a checkpoint")
    parser.add_argument("--stop-after-epoch", type=int, metavar="N", help="stop after epoch N as if preempted (checkpoint, exit 0)")
    parser.add_argument("--restart", action="store_true",
                        help="start the run in --run-dir over; the old folder is kept, renamed <dir>.replaced-<time>")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.05")
    args = parser.parse_args(argv)

    def run() -> int:
        cfg = _load_run_config(args.config, args.overrides, args.run_dir, args.restart)
        from trainer.training.stopping import Stopped  # torch: only once the command checked out

        try:
            _train(cfg, args.run_dir, args.stop_after_epoch, args.restart)
        except Stopped:
            pass  # a clean, resumable stop: exit 0 (the message is printed already)
        return 0

    cli.run(run)
