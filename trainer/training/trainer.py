"""The Trainer: builds the model, optimizer, schedule and DDP wrapper from a Config, trains epoch by
epoch, evaluates, checkpoints, and stops when stopping.should_stop says so. With train.budget_s it
times its first steps, fits a plan of steps to the budget (budget.py) and ends where the plan does,
mid-epoch if need be."""

from __future__ import annotations

import io
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import UserError, run_files
from trainer.cli import naming
from trainer.config import Config
from trainer.data import build_loaders, build_val_loader
from trainer.data.common import DTYPES, default_threads, per_process_batch
from trainer.data.resident import normalised_images
from trainer.device import amp_dtype, fast_cuda_math
from trainer.distributed import Dist
from trainer.logger import NullLogger
from trainer.models import options as model_options
from trainer.models import whitening
from trainer.training import budget, checkpoint, stopping
from trainer.training.collectives import all_reduce_max, all_reduce_sum, broadcast, tracking
from trainer.training.ema import EMA
from trainer.training.evaluate import evaluate_counted, predict
from trainer.training.lookahead import Lookahead
from trainer.training.optim import lr_lambda, param_groups
from trainer.training.progress import Progress
from trainer.training.summary import ranks_in_sync, summary

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
# torch.compile's backend. Tests of the compiled DDP path set aot_eager: the same dynamo graphs,
# DDP bucket split and AOT-autograd backward, without inductor's code generation (minutes on a
# small shared CPU). Read here only.
COMPILE_BACKEND = os.environ.get("TRAINER_COMPILE_BACKEND", "inductor")
WHITENING_IMAGES = 5000  # training images the patch-whitening layer is fitted to (airbench uses 5,000 too)


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
            # TF32 and cuDNN's algorithm search, as the step bench sets them (so their numbers compare).
            fast_cuda_math()

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.threads = cfg.train.threads or default_threads()
        self.train_loader, self.test_loader = build_loaders(cfg.data, group, cfg.train.seed, self.threads)
        # With data.val_split, the held-out training images: the best epoch, best.pt and early
        # stopping are chosen on them, and the test set is only reported.
        self.val_loader = build_val_loader(cfg.data, group, self.threads)
        self.memory_format = torch.channels_last if cfg.data.channels_last else torch.contiguous_format

        # The architecture with the config's options (output stride, whitening, activation, BatchNorm, dirac init).
        self.model = model_options.build(cfg.model).to(device, memory_format=self.memory_format)
        if cfg.model.whiten:
            # Fitted on every rank from the same images (identical weights), also when resuming,
            # where the checkpoint then puts back the same values.
            whitening.fit(self.model, normalised_images(cfg.data, n=WHITENING_IMAGES, device=device))
        self.params = sum(p.numel() for p in self.model.parameters())
        # On the training device: its buffers are broadcast before each evaluation (NCCL: GPU tensors only).
        self.ema = EMA(self.model, cfg.train.ema, device) if cfg.train.ema else None
        # data.batch_size is the global batch: the recipe, whatever the number of processes.
        self.batch = per_process_batch(cfg.data.batch_size, group.world_size)
        self.peak_lr = cfg.optim.lr * cfg.data.batch_size / 256  # linear scaling with the global batch
        groups = param_groups(self.model, cfg.optim.weight_decay, self.peak_lr, cfg.optim.bias_lr_mult)
        self.base_lrs = [g["lr"] for g in groups]  # per group: the biases' may be multiplied
        self.optimizer = torch.optim.SGD(groups, lr=self.peak_lr, momentum=cfg.optim.momentum,
                                         nesterov=cfg.optim.nesterov)
        self.steps_per_epoch = len(self.train_loader)
        self.max_steps = cfg.train.epochs * self.steps_per_epoch  # train.epochs: with a budget, an upper bound
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor(self.max_steps))
        self.lookahead = (Lookahead(self.model, cfg.train.lookahead_every, cfg.train.lookahead_decay)
                          if cfg.train.lookahead_every else None)
        self.amp_dtype = amp_dtype(device, cfg.train.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

        self.use_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
        # Compile the plain module, then wrap it in DDP (what PyTorch's "Where to apply
        # torch.compile?" recommends). The backward still overlaps the gradient all-reduce: dynamo
        # compiles the module's frame while DDP's forward is active, and then its DDPOptimizer splits
        # the graph at DDP's bucket boundaries, so each bucket's hook fires as soon as its gradients
        # are computed. Wrapping first and compiling the DDP module splits identically on torch 2.14
        # (measured), but adds graph breaks in DDP's own forward. Evaluation runs self.compiled, no DDP.
        # State is always saved from and loaded into self.model, so no prefixes leak into files.
        self.compiled = torch.compile(self.model, backend=COMPILE_BACKEND) if self.use_compile else self.model
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
            self._set_schedule(self.total_steps)  # the checkpoint's plan, if it has one
        else:  # from here on each rank draws its own random numbers
            torch.manual_seed(cfg.train.seed + 1 + group.rank)
        # A budget without a plan yet (a fresh run, or one stopped before the fit): time the first steps.
        self.calibration = (budget.Calibration(cfg.train.budget_s, self.steps_per_epoch, device)
                            if cfg.train.budget_s and self.progress.plan is None else None)
        self.epoch_start = time.perf_counter()  # when the epoch in progress (this segment of it) began

    def _parts(self) -> dict[str, Any]:
        """What has a state_dict, under the names the checkpoint keeps it."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "lookahead": self.lookahead}

    @property
    def total_steps(self) -> int:
        """Where the schedule reaches zero and training ends: the budget's plan, else train.epochs."""
        plan = self.progress.plan
        return plan.total_steps if plan is not None else self.max_steps

    def _lr_factor(self, total_steps: int) -> Callable[[int], float]:
        warmup = round(self.cfg.optim.warmup_epochs * self.steps_per_epoch)
        if self.cfg.train.budget_s:
            warmup = budget.warmup_steps(self.cfg.optim.warmup_epochs, self.steps_per_epoch, total_steps)
        return lr_lambda(total_steps, warmup, self.cfg.optim.schedule)

    def _set_schedule(self, total_steps: int) -> None:
        """The schedule ending at `total_steps`, from the current step on. LambdaLR keeps no
        function in its state_dict, so a resumed run sets its own here too."""
        self.scheduler.lr_lambdas = [self._lr_factor(total_steps)] * len(self.optimizer.param_groups)
        self._apply_config_lr()

    def _apply_config_lr(self) -> None:
        """The config is the recipe, the checkpoint the progress: a changed optim.lr applies from here."""
        self.scheduler.base_lrs = list(self.base_lrs)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor

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
        if self.calibration is not None:
            self.calibration.restart()
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
                if self.lookahead is not None and progress.global_step <= self.total_steps:
                    self.lookahead.step(self.model, progress.global_step, self.total_steps)
                bar.update()
                if self.calibration is not None:
                    self._calibrate(logger)
                # The only host syncs inside an epoch: the logging steps and the stop checks.
                if progress.global_step % cfg.logging.log_every == 0:
                    self._check_finite()
                    window = all_reduce_sum(self.window, device)
                    logger.log_step(progress.global_step, {"loss": (window[0] / window[1]).item(),
                                                           "lr": self.optimizer.param_groups[0]["lr"]})
                    window.zero_()
                if self.lookahead is not None and progress.global_step == self.total_steps:
                    self.lookahead.finish(self.model)  # the schedule's end: the run ends on the slow weights
                if progress.plan is not None and progress.global_step >= progress.plan.total_steps:
                    break  # the budget's plan is done, possibly mid-epoch: this partial epoch is evaluated as one
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
            loss = self.criterion(out, y)  # y: class indices, or (B, 10) probabilities (mixup, cutmix)
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
        labels = y.argmax(1) if y.ndim == 2 else y  # a mixed image counts as the class it shows most of
        self.train_sums += torch.stack([loss * n, (out.argmax(1) == labels).sum().double(), count])
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
            # The lookahead's slow copies of the buffers too: each rank lerps its own statistics into
            # them, and a resumed run loads rank 0's on every rank, so they must agree.
            slow = [self.lookahead.slow[name] for name, _ in self.model.named_buffers()
                    if name in self.lookahead.slow] if self.lookahead else []
            broadcast([*self.model.buffers(), *(self.ema.buffers() if self.ema else []), *slow], self.group.device)

    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy (%) over the whole test set: each rank its shard, counts summed."""
        loss, acc, _ = self._evaluate(self._eval_net(), self.test_loader)
        return loss, acc

    def _evaluate(self, net: nn.Module, loader: Any) -> tuple[float, float, int]:
        return evaluate_counted(net, loader, self.cfg.train.tta, self.amp_dtype, pad_to=self.batch,
                                tta_translate=self.cfg.train.tta_translate)

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
                                    self.cfg.train.tta, self.amp_dtype, self.cfg.train.tta_translate)
            self.eval_compiled = True
        return net

    def _end_epoch(self, logger: NullLogger, start: float, images_before: float, sums: list[float]) -> bool:
        """Records the epoch just trained in the progress and logs it; evaluates and saves it when
        stopping.evaluates says so (train.eval_every, the run's end). True if it saved last.pt."""
        group, progress = self.group, self.progress
        trained = time.perf_counter()
        train_s = trained - start - self.compile_s  # compiling so far: the first training step's
        elapsed_before = progress.elapsed_s
        steps = progress.epoch_step  # steps_per_epoch, or fewer where a budget's plan ended mid-epoch
        progress.epoch += 1
        progress.epoch_step = 0
        self.train_sums.zero_()
        progress.elapsed_s += trained - start
        self._sync_clock()  # the slowest rank's clock: every rank takes the same decision here
        evaluated = stopping.evaluates(progress, self.cfg.train)
        val = test = None
        if evaluated:
            val, test = self._evaluation()
            progress.elapsed_s += time.perf_counter() - trained  # evaluating counts, in the budget too
            self._sync_clock()
        compile_s = self._take_compile_s()
        train_acc = progress.last_train_acc = 100.0 * sums[1] / sums[2]
        metrics = {
            "epoch": progress.epoch,
            "steps": steps,
            "train_loss": sums[0] / sums[2],
            "train_acc": train_acc,
        }
        # An epoch not evaluated has no val_*/test_* keys (train.eval_every).
        if val is not None:  # val_images: counted over every rank's shard, data.val_split when each counts once
            metrics.update(val_loss=val[0], val_acc=val[1], val_images=val[2])
        if test is not None:
            metrics.update(test_loss=test[0], test_acc=test[1])
        metrics |= {
            # The next step's (the weights' group): get_last_lr() would miss a schedule set since (a budget's fit).
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": (sums[2] - images_before * group.world_size) / train_s,
            "epoch_s": progress.elapsed_s - elapsed_before,  # compiling included: it is spent, and counts in the budget
            "compile_s": compile_s,  # the part of epoch_s spent compiling
            "peak_mem_mb": _peak_memory_mb(group.device),
            "elapsed_s": progress.elapsed_s,
        }
        if evaluated:
            self._record_evaluation(val, test, train_acc)
        with naming(self.run_dir / run_files.METRICS):
            logger.log_epoch(metrics)
        logger.info(
            f"epoch {progress.epoch:3d}  train loss {metrics['train_loss']:.3f} acc {train_acc:5.2f}  "
            + (f"val loss {val[0]:.3f} acc {val[1]:5.2f}  " if val is not None else "")
            + (f"test loss {test[0]:.3f} acc {test[1]:5.2f}  " if test is not None else "")
            + f"{metrics['images_per_s']:,.0f} img/s  {metrics['epoch_s']:.1f} s"
            + (f"  (partial: {steps} of {self.steps_per_epoch} steps)" if steps < self.steps_per_epoch else "")
            + ("" if evaluated else f"  (not evaluated: train.eval_every={self.cfg.train.eval_every})")
        )
        return evaluated

    def _sync_clock(self) -> None:
        """The slowest rank's elapsed time on every rank (a collective): whether the run ends, and so
        whether an epoch is evaluated, follows from it (train.time_budget_s), and every rank must agree."""
        if self.group.enabled:
            clock = torch.tensor([self.progress.elapsed_s], dtype=torch.float64, device=self.group.device)
            self.progress.elapsed_s = all_reduce_max(clock, self.group.device).item()

    def _evaluation(self) -> tuple[tuple[float, float, int] | None, tuple[float, float, int]]:
        """The validation set's (None without one) and the test set's loss, accuracy and count."""
        net = self._eval_net()
        val = self._evaluate(net, self.val_loader) if self.val_loader is not None else None
        return val, self._evaluate(net, self.test_loader)

    def _record_evaluation(self, val: tuple[float, float, int] | None, test: tuple[float, float, int],
                           train_acc: float) -> None:
        """Notes the evaluation of progress.epoch, saves best.pt if it is the new selected epoch, and last.pt."""
        # Selected on the validation accuracy when there is a split (the EMA's and with TTA if on,
        # as the test accuracy): the test set then chooses nothing, it is only reported.
        selected = self.progress.record_epoch(test[1], val[1] if val is not None else None, train_acc)
        if selected and self.group.is_main:
            weights = (self.ema.module if self.ema else self.model).state_dict()
            with naming(self.ckpt_dir / checkpoint.BEST):
                checkpoint.save_best(self.ckpt_dir, weights, self.cfg, self.progress.best)
        self.save_last()

    def _evaluate_end(self, logger: NullLogger) -> None:
        """Evaluates a run that ends on an epoch trained but not evaluated. Only a resumed run whose
        config ends it sooner than before (train.epochs, train.time_budget_s lowered) gets here: a
        run otherwise evaluates every epoch it ends on (stopping.evaluates). Its metrics line holds
        the evaluation alone (steps 0); the epoch's training figures are in the line before."""
        progress, start = self.progress, time.perf_counter()
        val, test = self._evaluation()
        progress.elapsed_s += time.perf_counter() - start
        self._sync_clock()
        metrics: dict[str, Any] = {"epoch": progress.epoch, "steps": 0}
        if val is not None:
            metrics.update(val_loss=val[0], val_acc=val[1], val_images=val[2])
        metrics |= {"test_loss": test[0], "test_acc": test[1], "epoch_s": time.perf_counter() - start,
                    "compile_s": self._take_compile_s(), "elapsed_s": progress.elapsed_s}
        self._record_evaluation(val, test, progress.last_train_acc)
        with naming(self.run_dir / run_files.METRICS):
            logger.log_epoch(metrics)
        logger.info(f"epoch {progress.epoch:3d}  evaluated at the run's end: test loss {test[0]:.3f} "
                    f"acc {test[1]:5.2f}")

    def _take_compile_s(self) -> float:
        """The compile time since the last call, added to the progress's total. The wall times and the
        time budget include it (compiling is time the run spends, and must pay for itself inside a
        budget); it is reported apart so that a warm cache or another machine can be told apart."""
        compile_s, self.compile_s = self.compile_s, 0.0
        self.progress.compile_s += compile_s
        return compile_s

    # ---- the budget's plan ----------------------------------------------------------------

    def _calibrate(self, logger: NullLogger) -> None:
        """After each step until the plan is fitted: counts it, and at the end of a timed window
        sets the schedule from the probe's estimate, or fits the plan (collectives, at the same step
        on every rank)."""
        elapsed = self.progress.elapsed_s + time.perf_counter() - self.epoch_start
        timed = self.calibration.after_step(elapsed)
        if timed is None:
            return
        stage, step_s, elapsed = timed
        if stage == "probe":
            # A first estimate from one step, without evaluations: the calibration's steps then run
            # in a warmup close to the fitted plan's, not one of train.epochs (a jump to many times
            # the learning rate at the fit).
            left = int(max(0.0, self.cfg.train.budget_s - elapsed) / step_s) if step_s > 0 else self.max_steps
            self._set_schedule(min(self.max_steps, self.progress.global_step + left))
        else:
            self._fit_plan(logger, step_s)
            self.calibration = None
        self.stop_check.restart()  # the probes' time is no step time

    def _fit_plan(self, logger: NullLogger, step_s: float) -> None:
        cfg, progress, device = self.cfg, self.progress, self.group.device
        eval_s = self._time_evaluation()
        checkpoint_s = self._time_checkpoint()
        (self.ddp or self.compiled).train()  # evaluating set eval mode
        elapsed = progress.elapsed_s + time.perf_counter() - self.epoch_start
        # The slowest rank's numbers on every rank: each computes the same plan from them.
        measured = torch.tensor([eval_s, checkpoint_s, elapsed], dtype=torch.float64, device=device)
        eval_s, checkpoint_s, elapsed = all_reduce_max(measured, device).tolist()
        budget_s = cfg.train.budget_s
        margin_s = budget.margin_s(budget_s, step_s)
        total = budget.fit_steps(budget_s, elapsed, progress.global_step, progress.epoch, self.steps_per_epoch,
                                 self.max_steps, step_s, eval_s, checkpoint_s, margin_s, cfg.train.eval_every)
        progress.plan = budget.Plan(
            budget_s=budget_s, calibrated_at=progress.global_step, step_s=step_s, eval_s=eval_s,
            checkpoint_s=checkpoint_s, margin_s=margin_s, total_steps=total, epochs=total / self.steps_per_epoch,
            images_per_s=cfg.data.batch_size / step_s if step_s > 0 else 0.0,
        )
        # The warmup now ends at a fifth of the plan at most; the calibration's steps ran in the
        # probe's estimate of it, so the learning rate may jump a little here.
        self._set_schedule(total)
        logger.info(progress.plan.describe())
        if total == progress.global_step:
            logger.info(f"warning: {elapsed:.1f} s of train.budget_s={budget_s:g} were spent before the plan could "
                        f"be fitted; training ends now")

    def _time_evaluation(self) -> float:
        """One evaluation's cost on this rank: a few test batches timed with the eval network,
        scaled to the test and validation sets' batches (each costs the same: evaluate pads the
        last). The eval graph is compiled first if compiling (compile time, paid once); with ffcv an
        untimed batch first takes the compilation of the new loader's pipeline (7-12 s, once)."""
        net = self._eval_net()
        batches = sum(len(loader) for loader in (self.test_loader, self.val_loader) if loader is not None)
        warm = 1 if self.cfg.data.loader == "ffcv" and len(self.test_loader) > 1 else 0
        timed = min(2, len(self.test_loader) - warm)
        with closing(iter(self.test_loader)) as test_batches:
            if warm:
                self._evaluate(net, islice(test_batches, warm))
            start = time.perf_counter()
            self._evaluate(net, islice(test_batches, timed))  # ends with a host sync (the counts)
            return (time.perf_counter() - start) / timed * batches

    def _time_checkpoint(self) -> float:
        """One checkpoint's cost on this rank: last.pt's state gathered and serialised to memory,
        and best.pt's weights (an upper bound: best.pt is written only for a better epoch)."""
        start = time.perf_counter()
        state = checkpoint.training_state(self._parts(), self.progress, self.train_sums, self.group, self.cfg)
        torch.save(state, io.BytesIO())
        torch.save((self.ema.module if self.ema else self.model).state_dict(), io.BytesIO())
        return time.perf_counter() - start

    # ---- the run ------------------------------------------------------------------------

    def run(self, logger: NullLogger) -> dict[str, Any]:
        """Trains until should_stop gives a reason; returns the summary if the run is over, or raises
        Stopped (with the checkpoint saved) if it was paused."""
        plan = self.progress.plan
        if plan is not None and plan.budget_s != self.cfg.train.budget_s:
            logger.info(f"following the checkpoint's plan for train.budget_s={plan.budget_s:g}, not "
                        f"{self.cfg.train.budget_s:g}: {plan.total_steps} steps")
        saved = True  # last.pt holds the state as it is now
        with self._catching_stop_signals(), tracking():
            while (stop := stopping.should_stop(self.progress, self.cfg.train, self.stop_after_epoch,
                                                self._signalled())) is None:
                start = self.epoch_start = time.perf_counter()
                if self.group.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.group.device)
                images_before = self.train_sums[2].item()
                finished = self.train_epoch(logger)
                sums = all_reduce_sum(self.train_sums.clone(), self.group.device).tolist()
                if finished:
                    saved = self._end_epoch(logger, start, images_before, sums)
                else:  # paused mid-epoch: should_stop names the signal next
                    self._take_compile_s()
                    self.progress.elapsed_s += time.perf_counter() - start
                    self.save_last()
                    saved = True
            if not stop.ends_run:
                if not saved:  # paused after an epoch that was not evaluated (train.eval_every)
                    self.save_last()
                raise stopping.Stopped(stop.message, self.stop_signal)
            if self.progress.evaluated_epoch < self.progress.epoch:
                self._evaluate_end(logger)
        logger.info(stop.message)
        return summary(self.cfg, self.progress, self.params, self.group, ranks_in_sync(self.model, self.group))
