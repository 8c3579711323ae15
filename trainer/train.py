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
import math
import os
import random
import resource
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer import UserError, checkpoint, cli, distributed, models, provenance
from trainer.config import Config, load_config, save_config, to_dict
from trainer.data.cifar10 import data_record
from trainer.data.loaders import build_loaders, default_threads
from trainer.distributed import Dist, all_reduce_max, all_reduce_sum
from trainer.files import write_text_atomic
from trainer.logger import make_logger

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class NonFiniteLoss(UserError):
    pass


class Stopped(Exception):
    """The run was asked to stop (a signal, or --stop-after-epoch) and has saved its state."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16  # needs a GradScaler: fp16 gradients underflow without one
    return torch.bfloat16


def lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    """Per-iteration factor on the peak LR: linear warmup from ~0, then cosine or linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights of convolutions and linear layers only: decaying BatchNorm scales
    and biases only fights the normalisation and costs accuracy."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, d: Dist, stop_after_epoch: int | None = None) -> None:
        self.cfg, self.run_dir, self.d = cfg, run_dir, d
        self.stop_after_epoch = stop_after_epoch
        self.ckpt_dir = run_dir / "checkpoints"
        self.stop_signal: int | None = None
        device = d.device

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.threads = cfg.train.threads or default_threads()
        self.train_loader, self.test_loader = build_loaders(cfg.data, device, cfg.train.seed, self.threads)
        self.memory_format = torch.channels_last if cfg.data.channels_last else torch.contiguous_format

        self.model = models.build(cfg.model.arch).to(device, memory_format=self.memory_format)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True)
            if cfg.train.ema
            else None
        )
        global_batch = cfg.data.batch_size * d.world_size
        self.peak_lr = cfg.optim.lr * global_batch / 256  # linear scaling with the global batch
        self.optimizer = torch.optim.SGD(
            param_groups(self.model, cfg.optim.weight_decay),
            lr=self.peak_lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
        )
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, warmup, cfg.optim.schedule)
        )
        self.amp_dtype = amp_dtype(device, cfg.train.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

        use_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
        # Compile first, then wrap in DDP (DDP(compiled) lets DDP's hooks see whole graphs);
        # state is always saved from and loaded into self.model, so no prefixes leak into files.
        self.compiled = torch.compile(self.model) if use_compile else self.model
        self.ddp = DDP(self.compiled, device_ids=[device.index] if device.type == "cuda" else None) if d.enabled else None

        # Progress, restored from a checkpoint if there is one.
        self.epoch = 0  # epochs completed
        self.epoch_step = 0  # steps done in the epoch in progress
        self.global_step = 0
        self.train_sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
        self.best: dict[str, Any] = {"test_acc": -1.0, "epoch": 0, "train_acc": 0.0, "elapsed_s": 0.0}
        self.bad_epochs = 0
        self.elapsed_s = 0.0  # training wall time over all segments of the run
        self.last_test_acc: float | None = None
        self.wandb_run_id: str | None = None
        self.resumed = self._resume()
        if not self.resumed:  # from here on each rank draws its own random numbers
            torch.manual_seed(cfg.train.seed + 1 + d.rank)

    # ---- checkpoints --------------------------------------------------------------------

    def _state(self) -> dict:
        rng = [None] * self.d.world_size
        if self.d.enabled:
            torch.distributed.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "global_step": self.global_step,
            "train_sums": self.train_sums.cpu(),
            "best": dict(self.best),
            "bad_epochs": self.bad_epochs,
            "elapsed_s": self.elapsed_s,
            "last_test_acc": self.last_test_acc,
            "rng": rng,
            "world_size": self.d.world_size,
            "wandb_run_id": self.wandb_run_id,
            "arch": self.cfg.model.arch,
            "config": to_dict(self.cfg),
        }

    def save_last(self) -> None:
        state = self._state()  # a collective (RNG gather): every rank takes part
        if self.d.is_main:
            checkpoint.save(state, self.ckpt_dir / "last.pt", keep_previous=True)

    def save_best(self, test_acc: float) -> None:
        if self.d.is_main:
            weights = (self.ema.module if self.ema else self.model).state_dict()
            state = {"model": weights, "arch": self.cfg.model.arch, "epoch": self.epoch, "test_acc": test_acc,
                     "config": to_dict(self.cfg)}
            checkpoint.save(state, self.ckpt_dir / "best.pt")

    def _resume(self) -> bool:
        state = checkpoint.load_latest(self.ckpt_dir)
        if state is None:
            return False
        if state["arch"] != self.cfg.model.arch:
            raise UserError(f"{self.ckpt_dir}: holds a '{state['arch']}' run, not '{self.cfg.model.arch}'; use another --run-dir")
        self.model.load_state_dict(state["model"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.epoch_step, self.global_step = state["epoch"], state["epoch_step"], state["global_step"]
        self.train_sums.copy_(state["train_sums"])
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self.elapsed_s, self.last_test_acc = state["elapsed_s"], state["last_test_acc"]
        self.wandb_run_id = state["wandb_run_id"]
        # The config is the recipe, the checkpoint the progress: a changed optim.lr applies from here.
        self.scheduler.base_lrs = [self.peak_lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_lr * factor
        if state["world_size"] == self.d.world_size:
            _set_rng_state(state["rng"][self.d.rank])
        else:  # a different number of ranks cannot replay the same random streams
            torch.manual_seed(self.cfg.train.seed + 1 + self.d.rank + 1000 * self.global_step)
        return True

    # ---- signals ------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum

    def _should_stop(self) -> bool:
        """True on every rank if any rank was signalled (a collective: call at the same steps)."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.d.device)
        return bool(all_reduce_max(flag).item())

    # ---- one epoch ----------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_epoch(self, logger) -> bool:
        """Trains until the epoch ends (True) or a stop is requested (False)."""
        cfg, device = self.cfg, self.d.device
        net = self.ddp or self.compiled
        net.train()
        self.train_loader.set_epoch(self.epoch)  # this epoch's order, also after a resume
        skip = self.epoch_step
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        window = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, count since last log
        from tqdm import tqdm

        bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                   leave=False, disable=None if self.d.is_main else True, dynamic_ncols=True)
        for i, (x, y) in enumerate(self.train_loader):
            if i < skip:  # replaying a partly trained epoch: these batches were already used
                continue
            with self._autocast():
                out = net(x)
                loss = self.criterion(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema:
                self.ema.update_parameters(self.model)
            loss = loss.detach().double()
            n = y.shape[0]
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), self.global_step, first_bad)
            self.train_sums += torch.stack([loss * n, (out.argmax(1) == y).sum().double(), loss.new_tensor(n)])
            window += torch.stack([loss * n, loss.new_tensor(n)])
            self.global_step += 1
            self.epoch_step += 1
            bar.update()
            if self.global_step % cfg.logging.log_every == 0:  # the only host syncs inside an epoch
                self._check_finite(first_bad)
                all_reduce_sum(window)
                logger.log_step(self.global_step, {"loss": (window[0] / window[1]).item(), "lr": self.scheduler.get_last_lr()[0]})
                window.zero_()
                if self._should_stop():
                    bar.close()
                    return False
        bar.close()
        self._check_finite(first_bad)
        return True

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = all_reduce_max(first_bad.clone()).item()
        if bad >= 0:
            epoch = bad // self.steps_per_epoch + 1
            raise NonFiniteLoss(
                f"non-finite training loss at epoch {epoch}, step {bad + 1} (lr {self.peak_lr:g} may be too high); "
                f"the last good checkpoint is kept in {self.ckpt_dir}"
            )

    def _sync_buffers(self) -> None:
        """Gives every rank rank 0's BatchNorm statistics (and EMA buffers).

        DDP broadcasts buffers at the start of each forward, but each rank then updates its own
        running statistics from its own batch, so after the last step they differ slightly; the
        ranks must evaluate, and end, with the same model.
        """
        if self.d.enabled:
            for buffer in [*self.model.buffers(), *(self.ema.buffers() if self.ema else [])]:
                torch.distributed.broadcast(buffer, src=0)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy (%) over the whole test set: each rank its shard, counts summed."""
        self._sync_buffers()
        net = self.ema.module if self.ema else self.compiled
        net.eval()
        sums = torch.zeros(3, device=self.d.device, dtype=torch.float64)
        for x, y in self.test_loader:
            with self._autocast():
                logits = net(x).float()
                if self.cfg.train.tta:  # the mirror image is as likely as the image itself
                    logits = (logits + net(x.flip(-1)).float()) / 2
            loss = F.cross_entropy(logits, y, reduction="sum")
            sums += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double(), sums.new_tensor(y.shape[0])])
        all_reduce_sum(sums)
        loss_sum, correct, count = sums.tolist()
        return loss_sum / count, 100.0 * correct / count

    # ---- the run ------------------------------------------------------------------------

    def run(self, logger) -> dict | None:
        cfg, d = self.cfg, self.d
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            while self.epoch < cfg.train.epochs:
                start = time.perf_counter()
                if d.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(d.device)
                images_before = self.train_sums[2].item()
                finished = self.train_epoch(logger)
                sums = all_reduce_sum(self.train_sums.clone()).tolist()
                train_s = time.perf_counter() - start
                if not finished:
                    self.elapsed_s += train_s
                    self.save_last()
                    raise Stopped(f"stopped by signal {signal.Signals(self.stop_signal).name} in epoch {self.epoch + 1} "
                                  f"at step {self.epoch_step}; checkpoint saved, run again to resume", self.stop_signal)
                test_loss, test_acc = self.evaluate()
                self.elapsed_s += time.perf_counter() - start
                self.epoch += 1
                self.epoch_step = 0
                self.train_sums.zero_()
                self.last_test_acc = test_acc
                train_acc = 100.0 * sums[1] / sums[2]
                metrics = {
                    "epoch": self.epoch,
                    "train_loss": sums[0] / sums[2],
                    "train_acc": train_acc,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "lr": self.scheduler.get_last_lr()[0],
                    "images_per_s": (sums[2] - images_before * d.world_size) / train_s,
                    "epoch_s": time.perf_counter() - start,
                    "peak_mem_mb": _peak_memory_mb(d.device),
                    "elapsed_s": self.elapsed_s,
                }
                if test_acc > self.best["test_acc"]:
                    self.best = {"test_acc": test_acc, "epoch": self.epoch, "train_acc": train_acc, "elapsed_s": self.elapsed_s}
                    self.bad_epochs = 0
                    self.save_best(test_acc)
                else:
                    self.bad_epochs += 1
                self.save_last()
                logger.log_epoch(metrics)
                logger.info(
                    f"epoch {self.epoch:3d}  train loss {metrics['train_loss']:.3f} acc {train_acc:5.2f}  "
                    f"test loss {test_loss:.3f} acc {test_acc:5.2f}  {metrics['images_per_s']:,.0f} img/s  "
                    f"{metrics['epoch_s']:.1f} s"
                )
                if cfg.train.patience and self.bad_epochs >= cfg.train.patience:
                    logger.info(f"early stopping: no better test accuracy for {cfg.train.patience} epochs")
                    break
                if cfg.train.time_budget_s and self.elapsed_s >= cfg.train.time_budget_s:
                    logger.info(f"time budget reached: {self.elapsed_s:.0f} s of training >= train.time_budget_s="
                                f"{cfg.train.time_budget_s:g}; stopping after epoch {self.epoch} of {cfg.train.epochs}")
                    break
                if self.stop_after_epoch is not None and self.epoch >= self.stop_after_epoch:
                    raise Stopped(f"stopped after epoch {self.epoch} as asked; run again to resume")
                if self._should_stop():
                    raise Stopped(f"stopped by signal {signal.Signals(self.stop_signal).name} after epoch {self.epoch}; "
                                  "checkpoint saved, run again to resume", self.stop_signal)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.summary()

    def ranks_in_sync(self) -> bool:
        """Whether every rank ends with bit-identical weights (DDP keeps them so; a mismatch is a bug)."""
        if not self.d.enabled:
            return True
        fingerprint = torch.stack([p.detach().double().sum() for p in self.model.state_dict().values()])
        lowest, highest = fingerprint.clone(), fingerprint.clone()
        torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
        return bool(torch.equal(lowest, highest))

    def summary(self) -> dict:
        d = self.d
        return {
            "arch": self.cfg.model.arch,
            "test_acc": self.last_test_acc,
            "best_test_acc": self.best["test_acc"],
            "best_epoch": self.best["epoch"],
            "train_acc": self.best["train_acc"],  # in the best epoch, as the seed's table has it
            "gap": self.best["train_acc"] - self.best["test_acc"],
            "params": self.params,
            "epochs_run": self.epoch,
            "stopped_early": self.epoch < self.cfg.train.epochs,
            "wall_time_s": self.elapsed_s,
            "best_epoch_wall_time_s": self.best["elapsed_s"],
            "gpu_seconds": self.elapsed_s * d.world_size if d.device.type == "cuda" else None,
            "world_size": d.world_size,
            "ranks_in_sync": self.ranks_in_sync(),
            "device": distributed.device_name(d.device),
            "torch_version": torch.__version__,
            "git_sha": provenance.git_sha(),
            "command": provenance.command(),
            "data": data_record(self.cfg.data.dir),
            "finished_at": datetime.now().isoformat(timespec="seconds"),
        }


def _run_dir(cfg: Config, requested: Path | None, d: Dist) -> Path:
    """The run folder: as asked, or runs/<arch>-<timestamp> chosen by rank 0 for every rank."""
    if requested is not None:
        return requested
    name = [f"runs/{cfg.model.arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
    if d.enabled:
        torch.distributed.broadcast_object_list(name, src=0)
    return Path(name[0])


def _load_run_config(config: Path | None, overrides: list[str], run_dir: Path | None) -> Config:
    if config is not None:
        return load_config(config, overrides)
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        return load_config(run_dir / "config.yaml", overrides)  # resuming a run by its folder alone
    raise UserError("pass --config FILE (or --run-dir of an existing run to resume it)")


def train(config: Path | None, overrides: list[str], run_dir: Path | None = None, stop_after_epoch: int | None = None) -> dict:
    """Trains to the end and returns the summary, or raises Stopped after saving a checkpoint."""
    d = distributed.setup()
    trainer = logger = None
    try:
        cfg = _load_run_config(config, overrides, run_dir)
        run_dir = _run_dir(cfg, run_dir, d)
        if d.is_main:
            save_config(cfg, run_dir / "config.yaml")
        trainer = Trainer(cfg, run_dir, d, stop_after_epoch)
        logger = make_logger(d.is_main, run_dir, cfg, trainer.wandb_run_id, trainer.epoch)
        trainer.wandb_run_id = logger.run_id
        logger.info(
            f"{'resuming' if trainer.resumed else 'training'} {cfg.model.arch} ({trainer.params / 1e6:.2f} M params) "
            f"in {run_dir} on {d.world_size} x {distributed.device_name(d.device)}"
            + (f" from epoch {trainer.epoch + 1}, step {trainer.epoch_step}" if trainer.resumed else "")
        )
        try:
            summary = trainer.run(logger)
        except Stopped as e:
            logger.info(str(e))
            raise
        if d.is_main:
            write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        logger.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})
        logger.info(f"done: best test accuracy {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}; "
                    f"summary in {run_dir / 'summary.json'}")
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
