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

from trainer import UserError, models, run_files
from trainer.cli import naming
from trainer.config import Config
from trainer.data import build_loaders, build_val_loader
from trainer.data.common import DTYPES, default_threads, per_process_batch
from trainer.device import amp_dtype
from trainer.distributed import Dist
from trainer.logger import NullLogger
from trainer.training import checkpoint, stopping
from trainer.training.collectives import all_reduce_max, all_reduce_sum, broadcast, tracking
from trainer.training.ema import EMA
from trainer.training.evaluate import evaluate_counted, predict
from trainer.training.optim import lr_lambda, param_groups
from trainer.training.progress import Progress
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
        any_signal, slowest_s = all_reduce_max(measured, self.device).tolist()
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
        with tracking():  # strict collectives (tests): note the tensors made without a device
            self._build(cfg, run_dir, group, stop_after_epoch)

    def _build(self, cfg: Config, run_dir: Path, group: Dist, stop_after_epoch: int | None) -> None:
        self.cfg, self.run_dir, self.group = cfg, run_dir, group
        self.stop_after_epoch = stop_after_epoch
        self.ckpt_dir = run_dir / run_files.CHECKPOINTS
        self.stop_signal: int | None = None  # set by the signal handler of this process
        # The longest a stop signal waits for the ranks to agree on it inside an epoch.
        self.stop_check = StopCheck(cfg.train.stop_check_s, group.device)
        device = group.device
        if device.type == "cuda":
            # Every training batch has the same shape (drop_last) and so has every test batch
            # (evaluate pads the last one), so cuDNN's one-off search for the fastest algorithms
            # pays off. A GPU run must confirm the speed-up; it also makes results differ from run
            # to run in the last bits (see the resume note in run.py).
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.threads = cfg.train.threads or default_threads()
        self.train_loader, self.test_loader = build_loaders(cfg.data, group, cfg.train.seed, self.threads)
        # With data.val_split, the held-out training images: the best epoch, best.pt and early
        # stopping are chosen on them, and the test set is only reported.
        self.val_loader = build_val_loader(cfg.data, group, self.threads)
        self.memory_format = torch.channels_last if cfg.data.channels_last else torch.contiguous_format

        self.model = models.build(cfg.model.arch).to(device, memory_format=self.memory_format)
        self.params = sum(p.numel() for p in self.model.parameters())
        # On the training device: its buffers are broadcast before each evaluation (NCCL: GPU tensors only).
        self.ema = EMA(self.model, cfg.train.ema, device) if cfg.train.ema else None
        # data.batch_size is the global batch: the recipe, whatever the number of processes.
        self.batch = per_process_batch(cfg.data.batch_size, group.world_size)
        self.peak_lr = cfg.optim.lr * cfg.data.batch_size / 256  # linear scaling with the global batch
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

        self.use_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
        # Compile first, then wrap in DDP (DDP(compiled) lets DDP's hooks see whole graphs);
        # state is always saved from and loaded into self.model, so no prefixes leak into files.
        self.compiled = torch.compile(self.model) if self.use_compile else self.model
        self.compile_s = 0.0  # this process's compile time, not yet added to the progress
        self.train_compiled = self.eval_compiled = not self.use_compile
        self.ddp = DDP(self.compiled, device_ids=[device.index] if device.type == "cuda" else None) if group.enabled else None

        self.train_sums = torch.zeros(3, device=device, dtype=torch.float64)  # this epoch's loss sum, correct, count
        # Per step, reset each epoch: the first step with a non-finite loss; loss sum and count since the last log.
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.window = torch.zeros(2, device=device, dtype=torch.float64)
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
        return int(all_reduce_max(signum, self.group.device).item()) or None

    # ---- one epoch ----------------------------------------------------------------------

    def train_epoch(self, logger: NullLogger) -> bool:
        """Trains until the epoch ends (True) or a stop signal arrives (False)."""
        cfg, device, progress = self.cfg, self.group.device, self.progress
        net = self.ddp or self.compiled
        net.train()
        self.train_loader.set_epoch(progress.epoch)  # this epoch's order, also after a resume
        skip = progress.epoch_step
        self.first_bad.fill_(-1)
        self.window.zero_()
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
                if self.train_compiled:
                    self._step(net, x, y)
                else:
                    self._timed_compile(self._step, net, x, y)
                    self.train_compiled = True
                progress.global_step += 1
                progress.epoch_step += 1
                bar.update()
                # The only host syncs inside an epoch: the logging steps and the stop checks.
                if progress.global_step % cfg.logging.log_every == 0:
                    self._check_finite()
                    window = all_reduce_sum(self.window, device)
                    logger.log_step(progress.global_step, {"loss": (window[0] / window[1]).item(),
                                                           "lr": self.scheduler.get_last_lr()[0]})
                    window.zero_()
                # Not after the epoch's last step: the check between epochs comes next anyway, and a
                # mid-epoch checkpoint then always has batches left to train.
                if (progress.epoch_step < self.steps_per_epoch and self.stop_check.due()
                        and self.stop_check.agree(self.stop_signal) is not None):
                    self._check_finite()  # the checkpoint saved next must hold finite weights
                    return False
        self._check_finite()
        return True

    def _timed_compile(self, first_call: Any, *args: Any) -> None:
        """Runs the first call of a compiled graph and counts its time as compile time (the call
        itself is one step or batch: negligible beside compiling)."""
        start = time.perf_counter()
        first_call(*args)
        if self.group.device.type == "cuda":
            torch.cuda.synchronize(self.group.device)  # once per process: the compile ends when the work does
        self.compile_s += time.perf_counter() - start

    def _step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the batch, added to the epoch's sums, the logging window and the
        non-finite check. No host sync: the loss stays on the device, the image count is a Python
        int that reaches the device as a kernel argument, not as a copied tensor."""
        with torch.autocast(self.group.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = net(x)
            loss = self.criterion(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        loss = loss.detach().double()
        n = y.shape[0]
        count = torch.full_like(loss, n)
        self.train_sums += torch.stack([loss * n, (out.argmax(1) == y).sum().double(), count])
        self.window += torch.stack([loss * n, count])
        step = self.progress.global_step
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    def _check_finite(self) -> None:
        bad = all_reduce_max(self.first_bad.clone(), self.group.device).item()
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
            broadcast([*self.model.buffers(), *(self.ema.buffers() if self.ema else [])], self.group.device)

    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy (%) over the whole test set: each rank its shard, counts summed."""
        loss, acc, _ = self._evaluate(self._eval_net(), self.test_loader)
        return loss, acc

    def _evaluate(self, net: nn.Module, loader: Any) -> tuple[float, float, int]:
        return evaluate_counted(net, loader, self.cfg.train.tta, self.amp_dtype, pad_to=self.batch)

    def _eval_net(self) -> nn.Module:
        """The network to evaluate (the EMA's when there is one), the same on every rank, its eval
        graph compiled (and the time counted) if compiling."""
        self._sync_buffers()
        net = self.ema.module if self.ema else self.compiled
        if not self.eval_compiled and net is self.compiled:
            # The eval graph compiles on its first batch; warm it up on a dummy batch of the one
            # shape evaluation uses (evaluate pads the last batch), so its time is counted apart.
            x = torch.zeros(self.batch, 3, 32, 32, dtype=DTYPES[self.cfg.data.dtype], device=self.group.device)
            net.eval()
            with torch.no_grad():
                self._timed_compile(predict, net, x.contiguous(memory_format=self.memory_format),
                                    self.cfg.train.tta, self.amp_dtype)
            self.eval_compiled = True
        return net

    def _end_epoch(self, logger: NullLogger, start: float, images_before: float, sums: list[float]) -> None:
        """Evaluates the epoch just trained, records it in the progress, saves and logs it."""
        group, progress = self.group, self.progress
        train_s = time.perf_counter() - start - self.compile_s  # compiling so far: the first training step's
        net = self._eval_net()
        val = self._evaluate(net, self.val_loader) if self.val_loader is not None else None
        test_loss, test_acc, _ = self._evaluate(net, self.test_loader)
        compile_s = self._take_compile_s()
        epoch_s = time.perf_counter() - start  # compiling included: it is spent, and it counts in the budget
        progress.elapsed_s += epoch_s
        progress.epoch += 1
        progress.epoch_step = 0
        self.train_sums.zero_()
        train_acc = 100.0 * sums[1] / sums[2]
        metrics = {
            "epoch": progress.epoch,
            "train_loss": sums[0] / sums[2],
            "train_acc": train_acc,
        }
        if val is not None:  # val_images: counted over every rank's shard, data.val_split when each counts once
            metrics.update(val_loss=val[0], val_acc=val[1], val_images=val[2])
        metrics |= {
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": (sums[2] - images_before * group.world_size) / train_s,
            "epoch_s": epoch_s,
            "compile_s": compile_s,  # the part of epoch_s spent compiling
            "peak_mem_mb": _peak_memory_mb(group.device),
            "elapsed_s": progress.elapsed_s,
        }
        # Selected on the validation accuracy when there is a split (the EMA's and with TTA if on,
        # as the test accuracy): the test set then chooses nothing, it is only reported.
        selected = progress.record_epoch(test_acc, val[1] if val is not None else None, train_acc)
        if selected and group.is_main:
            weights = (self.ema.module if self.ema else self.model).state_dict()
            with naming(self.ckpt_dir / checkpoint.BEST):
                checkpoint.save_best(self.ckpt_dir, weights, self.cfg, progress.best)
        self.save_last()
        with naming(self.run_dir / run_files.METRICS):
            logger.log_epoch(metrics)
        logger.info(
            f"epoch {progress.epoch:3d}  train loss {metrics['train_loss']:.3f} acc {train_acc:5.2f}  "
            + (f"val loss {val[0]:.3f} acc {val[1]:5.2f}  " if val is not None else "")
            + f"test loss {test_loss:.3f} acc {test_acc:5.2f}  {metrics['images_per_s']:,.0f} img/s  "
            f"{metrics['epoch_s']:.1f} s"
        )

    def _take_compile_s(self) -> float:
        """The compile time since the last call, added to the progress's total. The wall times and the
        time budget include it (compiling is time the run spends, and must pay for itself inside a
        budget); it is reported apart so that a warm cache or another machine can be told apart."""
        compile_s, self.compile_s = self.compile_s, 0.0
        self.progress.compile_s += compile_s
        return compile_s

    # ---- the run ------------------------------------------------------------------------

    def run(self, logger: NullLogger) -> dict[str, Any]:
        """Trains until should_stop gives a reason; returns the summary if the run is over, or raises
        Stopped (with the checkpoint saved) if it was paused."""
        with self._catching_stop_signals(), tracking():
            while (stop := stopping.should_stop(self.progress, self.cfg.train, self.stop_after_epoch,
                                                self._signalled())) is None:
                start = time.perf_counter()
                if self.group.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.group.device)
                images_before = self.train_sums[2].item()
                finished = self.train_epoch(logger)
                sums = all_reduce_sum(self.train_sums.clone(), self.group.device).tolist()
                if finished:
                    self._end_epoch(logger, start, images_before, sums)
                else:  # paused mid-epoch: should_stop names the signal next
                    self._take_compile_s()
                    self.progress.elapsed_s += time.perf_counter() - start
                    self.save_last()
        if not stop.ends_run:
            raise stopping.Stopped(stop.message, self.stop_signal)
        logger.info(stop.message)
        return summary(self.cfg, self.progress, self.params, self.group, ranks_in_sync(self.model, self.group))
