"""The Trainer: builds the model, optimizer, schedule and DDP wrapper from a Config, trains epoch by
epoch, evaluates, checkpoints, and stops when stopping.should_stop says so. Its parts do the rest:
the Checkpointer saves and restores the run's state, the BudgetController fits train.budget_s's plan
of steps, re-fits it and ends it when the clock is up (the run ends where the plan does, mid-epoch
if need be), StopSignal and StopCheck catch a stop signal and let the ranks agree on it."""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import UserError, run_files
from trainer.cli import naming
from trainer.config import Config
from trainer.data import build_loaders, build_val_loader
from trainer.data.common import DTYPES, default_threads
from trainer.data.resident import normalised_images
from trainer.device import COMPILE_BACKEND, amp_dtype, fast_cuda_math
from trainer.distributed import Dist
from trainer.logger import NullLogger
from trainer.models import options as model_options
from trainer.models import whitening
from trainer.training import budget, checkpoint, stopping
from trainer.training.collectives import tracking
from trainer.training.ema import EMA
from trainer.training.evaluate import Evaluator, same_buffers_on_every_rank
from trainer.training.lookahead import Lookahead
from trainer.training.optim import Schedule, param_groups
from trainer.training.progress import CompileClock, EpochSums, Progress
from trainer.training.summary import epoch_line, evaluation_metrics, peak_memory_mb, ranks_in_sync, summary

WHITENING_IMAGES = 5000  # training images the patch-whitening layer is fitted to (airbench uses 5,000 too)


class NonFiniteLoss(UserError):
    pass


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, group: Dist, stop_after_epoch: int | None = None) -> None:
        with tracking():  # strict collectives (tests): note the tensors made without a device
            self._build(cfg, run_dir, group, stop_after_epoch)

    def _build(self, cfg: Config, run_dir: Path, group: Dist, stop_after_epoch: int | None) -> None:
        self.cfg, self.run_dir, self.group = cfg, run_dir, group
        self.stop_after_epoch = stop_after_epoch
        self.signal = stopping.StopSignal()
        # The longest a stop signal (or a budget's clock) waits for the ranks to agree on it inside an epoch.
        self.stop_check = stopping.StopCheck(budget.stop_check_s(cfg.train.stop_check_s, cfg.train.budget_s),
                                             group.device)
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
        self.batch = self.train_loader.batch_size  # this process's share
        self.peak_lr = cfg.optim.lr * cfg.data.batch_size / 256  # linear scaling with the global batch
        groups = param_groups(self.model, cfg.optim.weight_decay, self.peak_lr, cfg.optim.bias_lr_mult)
        self.optimizer = torch.optim.SGD(groups, lr=self.peak_lr, momentum=cfg.optim.momentum,
                                         nesterov=cfg.optim.nesterov)
        self.steps_per_epoch = len(self.train_loader)
        self.max_steps = cfg.train.epochs * self.steps_per_epoch  # train.epochs: with a budget, an upper bound
        self.schedule = Schedule(self.optimizer, cfg.optim, self.steps_per_epoch, self.max_steps, bool(cfg.train.budget_s))
        self.scheduler = self.schedule.scheduler
        self.lookahead = (Lookahead(self.model, cfg.train.lookahead_every, cfg.train.lookahead_decay)
                          if cfg.train.lookahead_every else None)
        self.amp_dtype = amp_dtype(device, cfg.train.amp)
        self.evaluator = Evaluator(self.test_loader, self.val_loader, cfg.train.tta, cfg.train.tta_translate,
                                   self.amp_dtype, self.batch, ffcv=cfg.data.loader == "ffcv")
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
        self.compile_clock = CompileClock(device)
        self.train_compiled = self.eval_compiled = not self.use_compile
        self.ddp = DDP(self.compiled, device_ids=[device.index] if device.type == "cuda" else None) if group.enabled else None

        self.sums = EpochSums(device)
        parts = {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "scaler": self.scaler, "lookahead": self.lookahead}
        self.checkpointer = checkpoint.Checkpointer(run_dir / run_files.CHECKPOINTS, parts, group, cfg)
        progress = self.checkpointer.resume(self.sums.train)
        self.resumed = progress is not None
        self.progress = progress or Progress()
        if self.resumed:
            self.schedule.set_total(self.total_steps)  # the checkpoint's plan, if it has one
        else:  # from here on each rank draws its own random numbers
            torch.manual_seed(cfg.train.seed + 1 + group.rank)
        # A budget: its plan fitted from the first steps, or the checkpoint's followed; re-fitted as it goes.
        self.budget = None
        if cfg.train.budget_s or self.progress.plan is not None:
            self.budget = budget.BudgetController(
                cfg.train.budget_s, self.steps_per_epoch, self.max_steps, cfg.train.eval_every, cfg.data.batch_size,
                device, self.progress.plan, elapsed_s=self._elapsed_s, eval_cost_s=self._eval_cost_s,
                checkpoint_cost_s=lambda: self.checkpointer.cost_s(self.progress, self.sums.train, self._best_weights()),
                set_schedule=self.schedule.set_total)
        self.epoch_start = time.perf_counter()  # when the epoch in progress (this segment of it) began

    # ---- the schedule -------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        """Where the schedule reaches zero and training ends: the budget's plan, else train.epochs."""
        plan = self.progress.plan
        return plan.total_steps if plan is not None else self.max_steps

    # ---- the run ------------------------------------------------------------------------

    def run(self, logger: NullLogger) -> dict[str, Any]:
        """Trains until should_stop gives a reason; returns the summary if the run is over, or raises
        Stopped (with the checkpoint saved) if it was paused."""
        plan = self.progress.plan
        if plan is not None and plan.budget_s != self.cfg.train.budget_s:
            logger.info(f"following the checkpoint's plan for train.budget_s={plan.budget_s:g}, not "
                        f"{self.cfg.train.budget_s:g}: {plan.total_steps} steps")
        saved = True  # last.pt holds the state as it is now
        with self.signal.catching(), tracking():
            while (stop := stopping.should_stop(self.progress, self.cfg.train, self.stop_after_epoch,
                                                self.signal.on_any_rank(self.group.device))) is None:
                start = self.epoch_start = time.perf_counter()
                if self.group.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.group.device)
                images_before = self.sums.train[2].item()
                finished = self.train_epoch(logger)
                sums = self.sums.totals()
                if finished:
                    saved = self._end_epoch(logger, start, images_before, sums)
                else:  # paused mid-epoch: should_stop names the signal next
                    self.compile_clock.take(self.progress)
                    self.progress.elapsed_s += time.perf_counter() - start
                    self.checkpointer.save_last(self.progress, self.sums.train)
                    saved = True
            if not stop.ends_run:
                if not saved:  # paused after an epoch that was not evaluated (train.eval_every)
                    self.checkpointer.save_last(self.progress, self.sums.train)
                raise stopping.Stopped(stop.message, self.signal.received)
            if self.progress.evaluated_epoch < self.progress.epoch:
                self._evaluate_end(logger)
        logger.info(stop.message)
        if self.budget is not None and (overrun := self.budget.overrun(self.progress)):
            logger.info(overrun)
        return summary(self.cfg, self.progress, self.params, self.group, ranks_in_sync(self.model, self.group))

    # ---- one epoch: a step, then the after-step hooks in order ----------------------------

    def train_epoch(self, logger: NullLogger) -> bool:
        """Trains until the epoch ends (True; early where a budget's plan ends) or a stop signal
        arrives (False)."""
        progress = self.progress
        net = self.ddp or self.compiled
        net.train()
        self.train_loader.set_epoch(progress.epoch)  # this epoch's order, also after a resume
        skip = progress.epoch_step
        self.sums.restart()
        from tqdm import tqdm

        bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {progress.epoch + 1}/{self.cfg.train.epochs}",
                   leave=False, disable=None if self.group.is_main else True, dynamic_ncols=True)
        self.stop_check.restart()
        if self.budget is not None:
            self.budget.restart()
        # The batches are closed however the epoch ends: an ffcv iterator left open mid-epoch (an
        # error, a stop signal) keeps its thread decoding, and a process exiting while it does can abort.
        with bar, closing(iter(self.train_loader)) as batches:
            for i, (x, y) in enumerate(batches):
                if i < skip:  # replaying a partly trained epoch: these batches were already used
                    continue
                self._train_step(net, x, y)
                self._lookahead_step()
                bar.update()
                self._calibrate(logger)
                self._log_window(logger)
                paused = self._stop_agreed()  # its check may also find the budget's time up, ending the plan here
                if self._schedule_end():
                    break  # the budget's plan is done, possibly mid-epoch: this partial epoch is evaluated as one
                if paused:
                    return False
        if self.budget is not None and self.budget.epoch_end(progress):
            self._schedule_end()  # the budget's time is up: the plan, and the lookahead's schedule, end here
        self._check_finite()
        return True

    def _train_step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.train_compiled:
            self._step(net, x, y)
        else:
            self.compile_clock.first_call(self._step, net, x, y)
            self.train_compiled = True
        self.progress.global_step += 1
        self.progress.epoch_step += 1

    def _lookahead_step(self) -> None:
        step = self.progress.global_step
        if self.lookahead is not None and step <= self.total_steps:
            self.lookahead.step(self.model, step, self.total_steps)

    def _calibrate(self, logger: NullLogger) -> None:
        """A budget's controller after each step: its calibration, then its re-fits (which set the schedule)."""
        if self.budget is not None and self.budget.after_step(self.progress, logger):
            self.stop_check.restart()  # the time spent measuring is no step time

    def _log_window(self, logger: NullLogger) -> None:
        """Every logging.log_every steps: the mean loss since the last log. With the stop checks,
        the only host syncs inside an epoch."""
        step = self.progress.global_step
        if step % self.cfg.logging.log_every:
            return
        self._check_finite()
        logger.log_step(step, {"loss": self.sums.window_loss(), "lr": self.optimizer.param_groups[0]["lr"]},
                        epoch=self.progress.epoch + self.progress.epoch_step / self.steps_per_epoch)

    def _schedule_end(self) -> bool:
        """At the schedule's end the run goes on with the lookahead's slow weights. True where a
        budget's plan ends training here."""
        step = self.progress.global_step
        if self.lookahead is not None and step == self.total_steps:
            self.lookahead.finish(self.model)
        plan = self.progress.plan
        return plan is not None and step >= plan.total_steps

    def _stop_agreed(self) -> bool:
        """Whether the ranks agree, at a stop check, that a stop signal arrived. Not after the
        epoch's last step: the check between epochs comes next anyway, and a mid-epoch checkpoint
        then always has batches left to train."""
        if self.progress.epoch_step >= self.steps_per_epoch or not self.stop_check.due():
            return False
        signum = self.stop_check.agree(self.signal.received, self._elapsed_s())
        if self.budget is not None:  # the slowest rank's clock: the same decision on every rank
            self.budget.check_time(self.progress, self.stop_check.slowest_elapsed_s, self.stop_check.ahead_s)
        if signum is None:
            return False
        self._check_finite()  # the checkpoint saved next must hold finite weights
        return True

    def _step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the batch, added to the epoch's sums. No host sync: the loss stays
        on the device (EpochSums)."""
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
        self.sums.add(loss, out, y, self.progress.global_step)

    def _check_finite(self) -> None:
        bad = self.sums.first_bad_step()
        if bad is not None:
            epoch = bad // self.steps_per_epoch + 1
            raise NonFiniteLoss(
                f"non-finite training loss at epoch {epoch}, step {bad + 1} (lr {self.peak_lr:g} may be too high); "
                f"the last good checkpoint is kept in {self.checkpointer.folder}"
            )

    # ---- evaluation -----------------------------------------------------------------------

    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy (%) over the whole test set: each rank its shard, counts summed."""
        loss, acc, _ = self.evaluator.test(self._eval_net())
        return loss, acc

    def _eval_net(self) -> nn.Module:
        """The network to evaluate (the EMA's when there is one), the same on every rank, its eval
        graph compiled (and the time counted) if compiling."""
        same_buffers_on_every_rank(self.model, self.ema, self.lookahead, self.group)
        net = self.ema.module if self.ema else self.compiled
        if not self.eval_compiled and net is self.compiled:
            self.compile_clock.first_call(self.evaluator.warm_up, net, DTYPES[self.cfg.data.dtype], self.memory_format,
                                self.group.device)
            self.eval_compiled = True
        return net

    def _best_weights(self) -> dict[str, torch.Tensor]:
        """What best.pt holds: the EMA's weights when there is one."""
        return (self.ema.module if self.ema else self.model).state_dict()

    # ---- the end of an epoch --------------------------------------------------------------

    def _end_epoch(self, logger: NullLogger, start: float, images_before: float, sums: list[float]) -> bool:
        """Records the epoch just trained in the progress and logs it; evaluates and saves it when
        stopping.evaluates says so (train.eval_every, the run's end). True if it saved last.pt."""
        group, progress = self.group, self.progress
        trained = time.perf_counter()
        train_s = trained - start - self.compile_clock.pending_s  # compiling so far: the first training step's
        elapsed_before = progress.elapsed_s
        steps = progress.epoch_step  # steps_per_epoch, or fewer where a budget's plan ended mid-epoch
        progress.epoch += 1
        progress.epoch_step = 0
        self.sums.train.zero_()
        # Each rank's own clock: no stopping decision reads it (a budget ends at its plan's step
        # count), and the budget's fit takes the slowest rank's.
        progress.elapsed_s += trained - start
        train_acc = progress.last_train_acc = 100.0 * sums[1] / sums[2]
        metrics = {"epoch": progress.epoch, "steps": steps, "train_loss": sums[0] / sums[2], "train_acc": train_acc}
        evaluated = stopping.evaluates(progress, self.cfg.train)
        if evaluated:  # else no val_*/test_* keys
            metrics |= self._evaluation(since=trained)
        metrics |= {
            # The next step's (the weights' group): get_last_lr() would miss a schedule set since (a budget's fit).
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": (sums[2] - images_before * group.world_size) / train_s,
            "epoch_s": progress.elapsed_s - elapsed_before,  # compiling included: it is spent, and counts in the budget
            "compile_s": self.compile_clock.take(self.progress),  # the part of epoch_s spent compiling
            "peak_mem_mb": peak_memory_mb(group.device),
            "elapsed_s": progress.elapsed_s,
        }
        if evaluated:
            self._record_evaluation(metrics, train_acc)
        self._log_epoch(logger, metrics)
        logger.info(epoch_line(metrics, self.steps_per_epoch, self.cfg.train.eval_every))
        return evaluated

    def _evaluate_end(self, logger: NullLogger) -> None:
        """Evaluates a run that ends on an epoch trained but not evaluated. Only a resumed run whose
        config ends it sooner than before (train.epochs lowered) gets here: a run otherwise
        evaluates every epoch it ends on (stopping.evaluates). Its metrics line holds the evaluation
        alone (steps 0); the epoch's training figures are in the line before."""
        progress, start = self.progress, time.perf_counter()
        metrics = {"epoch": progress.epoch, "steps": 0, **self._evaluation(since=start)}
        metrics |= {"epoch_s": time.perf_counter() - start, "compile_s": self.compile_clock.take(self.progress),
                    "elapsed_s": progress.elapsed_s}
        self._record_evaluation(metrics, progress.last_train_acc)
        self._log_epoch(logger, metrics)
        logger.info(f"epoch {progress.epoch:3d}  evaluated at the run's end: test loss {metrics['test_loss']:.3f} "
                    f"acc {metrics['test_acc']:5.2f}")

    def _evaluation(self, since: float) -> dict[str, Any]:
        """The val_*/test_* metrics of progress.epoch; the time since `since` counts in the
        progress (evaluating counts, in the budget too)."""
        val, test = self.evaluator.both(self._eval_net())
        self.progress.elapsed_s += time.perf_counter() - since
        return evaluation_metrics(val, test)

    def _record_evaluation(self, metrics: dict[str, Any], train_acc: float) -> None:
        """Notes the evaluation of progress.epoch, saves best.pt if it is the new selected epoch, and last.pt."""
        # Selected on the validation accuracy when there is a split (the EMA's and with TTA if on,
        # as the test accuracy): the test set then chooses nothing, it is only reported.
        if self.progress.record_epoch(metrics["test_acc"], metrics.get("val_acc"), train_acc):
            self.checkpointer.save_best(self._best_weights(), self.progress.best)
        self.checkpointer.save_last(self.progress, self.sums.train)

    def _log_epoch(self, logger: NullLogger, metrics: dict[str, Any]) -> None:
        with naming(self.run_dir / run_files.METRICS):
            logger.log_epoch(metrics)

    # ---- what the budget's controller asks of the trainer ---------------------------------

    def _elapsed_s(self) -> float:
        """The run's clock now, as progress.elapsed_s counts it, the epoch in progress included."""
        return self.progress.elapsed_s + time.perf_counter() - self.epoch_start

    def _eval_cost_s(self) -> float:
        """One evaluation's cost on this rank (Evaluator.cost_s), the eval graph compiled first if
        compiling (compile time, paid once)."""
        cost_s = self.evaluator.cost_s(self._eval_net())
        (self.ddp or self.compiled).train()  # evaluating set eval mode; training goes on
        return cost_s
