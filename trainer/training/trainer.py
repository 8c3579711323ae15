"""The Trainer: builds the model, optimizer, schedule and DDP wrapper from a Config, trains epoch by
epoch, evaluates, checkpoints, and stops when stopping.should_stop says so."""

from __future__ import annotations

import resource
import signal
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer import UserError, models, run_files
from trainer.cli import naming
from trainer.config import Config
from trainer.data import build_loaders
from trainer.data.common import default_threads
from trainer.device import amp_dtype
from trainer.distributed import Dist, all_reduce_max, all_reduce_sum
from trainer.logger import NullLogger
from trainer.training import checkpoint, stopping
from trainer.training.evaluate import evaluate
from trainer.training.optim import lr_lambda, param_groups
from trainer.training.progress import Best, Progress
from trainer.training.summary import ranks_in_sync, summary

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopCheck:
    """When, inside an epoch, the ranks next agree whether a stop signal arrived: every `every`
    steps, with `every` adapted to the measured step time so that the checks are at most about
    `bound_s` seconds apart, whatever the step time and the logging interval.

    A signal sets a Python flag at once, but the ranks must stop after the same step, and agreeing
    costs a collective and a host sync; doing that every step would stall a GPU's queue, so it is
    done every `every` steps instead. The time is measured between two agreements, each of which
    waits for the device, so it is the true time of the steps in between, on the slowest rank; all
    ranks compute `every` from the same all-reduced numbers and so stay in step.
    """

    def __init__(self, bound_s: float, device: torch.device) -> None:
        self.bound_s, self.device = bound_s, device
        self.every = 1  # the first check comes after one step, then the step time is known
        self.steps = 0
        self.since = time.perf_counter()

    def restart(self) -> None:
        """From here on (an epoch starts): the time between epochs (evaluation, checkpoint) is no step time."""
        self.steps = 0
        self.since = time.perf_counter()

    def due(self) -> bool:
        """Counts a step; True when the ranks are to agree now (every rank reaches it at the same step)."""
        self.steps += 1
        return self.steps >= self.every

    def agree(self, signum: int | None) -> int | None:
        """The stop signal any rank received (a collective), and the interval to the next check."""
        measured = torch.tensor([float(signum or 0), time.perf_counter() - self.since], dtype=torch.float64,
                                device=self.device)
        any_signal, slowest_s = all_reduce_max(measured).tolist()
        fits = int(self.bound_s * self.steps / slowest_s) if slowest_s > 0 else 2 * self.every
        # At most doubling: one interval that happened to be fast cannot stretch the next one far
        # past the bound.
        self.every = max(1, min(fits, 2 * self.every))
        self.restart()
        return int(any_signal) or None


class NonFiniteLoss(UserError):
    pass


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, group: Dist, stop_after_epoch: int | None = None) -> None:
        self.cfg, self.run_dir, self.group = cfg, run_dir, group
        self.stop_after_epoch = stop_after_epoch
        self.ckpt_dir = run_dir / run_files.CHECKPOINTS
        self.stop_signal: int | None = None  # set by the signal handler of this process
        # The longest a stop signal waits for the ranks to agree on it inside an epoch.
        self.stop_check = StopCheck(cfg.train.stop_check_s, group.device)
        device = group.device

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.threads = cfg.train.threads or default_threads()
        self.train_loader, self.test_loader = build_loaders(cfg.data, group, cfg.train.seed, self.threads)
        self.memory_format = torch.channels_last if cfg.data.channels_last else torch.contiguous_format

        self.model = models.build(cfg.model.arch).to(device, memory_format=self.memory_format)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True)
            if cfg.train.ema
            else None
        )
        global_batch = cfg.data.batch_size * group.world_size
        self.peak_lr = cfg.optim.lr * global_batch / 256  # linear scaling with the global batch
        self.optimizer = torch.optim.SGD(
            param_groups(self.model, cfg.optim.weight_decay),
            lr=self.peak_lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
        )
        self.steps_per_epoch = len(self.train_loader)
        total_steps = cfg.train.epochs * self.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, warmup, cfg.optim.schedule)
        )
        self.amp_dtype = amp_dtype(device, cfg.train.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

        use_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
        # Compile first, then wrap in DDP (DDP(compiled) lets DDP's hooks see whole graphs);
        # state is always saved from and loaded into self.model, so no prefixes leak into files.
        self.compiled = torch.compile(self.model) if use_compile else self.model
        self.ddp = DDP(self.compiled, device_ids=[device.index] if device.type == "cuda" else None) if group.enabled else None

        self.train_sums = torch.zeros(3, device=device, dtype=torch.float64)  # this epoch's loss sum, correct, count
        progress = checkpoint.resume(self.ckpt_dir, self._parts(), self.train_sums, group, cfg)
        self.resumed = progress is not None
        self.progress = progress or Progress()
        if self.resumed:
            self._apply_config_lr()
        else:  # from here on each rank draws its own random numbers
            torch.manual_seed(cfg.train.seed + 1 + group.rank)

    def _parts(self) -> dict[str, Any]:
        """What has a state_dict, under the names the checkpoint keeps it."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler}

    def _apply_config_lr(self) -> None:
        """The config is the recipe, the checkpoint the progress: a changed optim.lr applies from here."""
        self.scheduler.base_lrs = [self.peak_lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_lr * factor

    def save_last(self) -> None:
        with naming(self.ckpt_dir / checkpoint.LAST):  # a full disk: say where
            checkpoint.save_last(self.ckpt_dir, self._parts(), self.progress, self.train_sums, self.group, self.cfg)

    # ---- signals ------------------------------------------------------------------------

    @contextmanager
    def _catching_stop_signals(self) -> Iterator[None]:
        def on_signal(signum: int, frame: Any) -> None:
            self.stop_signal = signum

        previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _signalled(self) -> int | None:
        """The stop signal any rank received, on every rank (a collective: call at the same steps)."""
        signum = torch.tensor([self.stop_signal or 0], device=self.group.device)
        return int(all_reduce_max(signum).item()) or None

    # ---- one epoch ----------------------------------------------------------------------

    def train_epoch(self, logger: NullLogger) -> bool:
        """Trains until the epoch ends (True) or a stop signal arrives (False)."""
        cfg, device, progress = self.cfg, self.group.device, self.progress
        net = self.ddp or self.compiled
        net.train()
        self.train_loader.set_epoch(progress.epoch)  # this epoch's order, also after a resume
        skip = progress.epoch_step
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        window = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, count since last log
        from tqdm import tqdm

        bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {progress.epoch + 1}/{cfg.train.epochs}",
                   leave=False, disable=None if self.group.is_main else True, dynamic_ncols=True)
        self.stop_check.restart()
        # The batches are closed however the epoch ends: an ffcv iterator left open mid-epoch (an
        # error, a stop signal) keeps its thread decoding, and a process exiting while it does can abort.
        with bar, closing(iter(self.train_loader)) as batches:
            for i, (x, y) in enumerate(batches):
                if i < skip:  # replaying a partly trained epoch: these batches were already used
                    continue
                loss = self._step(net, x, y)
                n = y.shape[0]
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), progress.global_step, first_bad)
                window += torch.stack([loss * n, loss.new_tensor(n)])
                progress.global_step += 1
                progress.epoch_step += 1
                bar.update()
                # The only host syncs inside an epoch: the logging steps and the stop checks.
                if progress.global_step % cfg.logging.log_every == 0:
                    self._check_finite(first_bad)
                    all_reduce_sum(window)
                    logger.log_step(progress.global_step, {"loss": (window[0] / window[1]).item(),
                                                           "lr": self.scheduler.get_last_lr()[0]})
                    window.zero_()
                # Not after the epoch's last step: the check between epochs comes next anyway, and a
                # mid-epoch checkpoint then always has batches left to train.
                if (progress.epoch_step < self.steps_per_epoch and self.stop_check.due()
                        and self.stop_check.agree(self.stop_signal) is not None):
                    self._check_finite(first_bad)  # the checkpoint saved next must hold finite weights
                    return False
        self._check_finite(first_bad)
        return True

    def _step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the batch; adds it to the epoch's sums and returns its loss (on the
        device: reading it would be a host sync)."""
        with torch.autocast(self.group.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
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
        self.train_sums += torch.stack([loss * n, (out.argmax(1) == y).sum().double(), loss.new_tensor(n)])
        return loss

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
        if self.group.enabled:
            for buffer in [*self.model.buffers(), *(self.ema.buffers() if self.ema else [])]:
                torch.distributed.broadcast(buffer, src=0)

    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy (%) over the whole test set: each rank its shard, counts summed."""
        self._sync_buffers()
        net = self.ema.module if self.ema else self.compiled
        return evaluate(net, self.test_loader, self.cfg.train.tta, self.amp_dtype)

    def _end_epoch(self, logger: NullLogger, start: float, images_before: float, sums: list[float]) -> None:
        """Evaluates the epoch just trained, records it in the progress, saves and logs it."""
        group, progress = self.group, self.progress
        train_s = time.perf_counter() - start
        test_loss, test_acc = self.evaluate()
        progress.elapsed_s += time.perf_counter() - start
        progress.epoch += 1
        progress.epoch_step = 0
        self.train_sums.zero_()
        progress.last_test_acc = test_acc
        train_acc = 100.0 * sums[1] / sums[2]
        metrics = {
            "epoch": progress.epoch,
            "train_loss": sums[0] / sums[2],
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": (sums[2] - images_before * group.world_size) / train_s,
            "epoch_s": time.perf_counter() - start,
            "peak_mem_mb": _peak_memory_mb(group.device),
            "elapsed_s": progress.elapsed_s,
        }
        if test_acc > progress.best.test_acc:
            progress.best = Best(test_acc, progress.epoch, train_acc, progress.elapsed_s)
            progress.bad_epochs = 0
            if group.is_main:
                weights = (self.ema.module if self.ema else self.model).state_dict()
                with naming(self.ckpt_dir / checkpoint.BEST):
                    checkpoint.save_best(self.ckpt_dir, weights, self.cfg, progress.epoch, test_acc)
        else:
            progress.bad_epochs += 1
        self.save_last()
        with naming(self.run_dir / run_files.METRICS):
            logger.log_epoch(metrics)
        logger.info(
            f"epoch {progress.epoch:3d}  train loss {metrics['train_loss']:.3f} acc {train_acc:5.2f}  "
            f"test loss {test_loss:.3f} acc {test_acc:5.2f}  {metrics['images_per_s']:,.0f} img/s  "
            f"{metrics['epoch_s']:.1f} s"
        )

    # ---- the run ------------------------------------------------------------------------

    def run(self, logger: NullLogger) -> dict[str, Any]:
        """Trains until should_stop gives a reason; returns the summary if the run is over, or raises
        Stopped (with the checkpoint saved) if it was paused."""
        with self._catching_stop_signals():
            while (stop := stopping.should_stop(self.progress, self.cfg.train, self.stop_after_epoch,
                                                self._signalled())) is None:
                start = time.perf_counter()
                if self.group.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.group.device)
                images_before = self.train_sums[2].item()
                finished = self.train_epoch(logger)
                sums = all_reduce_sum(self.train_sums.clone()).tolist()
                if finished:
                    self._end_epoch(logger, start, images_before, sums)
                else:  # paused mid-epoch: should_stop names the signal next
                    self.progress.elapsed_s += time.perf_counter() - start
                    self.save_last()
        if not stop.ends_run:
            raise stopping.Stopped(stop.message, self.stop_signal)
        logger.info(stop.message)
        return summary(self.cfg, self.progress, self.params, self.group, ranks_in_sync(self.model, self.group))
