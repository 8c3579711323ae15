"""Should the run stop now, and why: one pure function of the progress, the config and the requests
(should_stop); and the stop signals those requests come from: caught (StopSignal), and agreed on by
the ranks inside an epoch at an interval in seconds (StopCheck).

Some reasons end the run (it writes its summary); the others pause it (its checkpoint is saved,
`Stopped` is raised, and running the same command again resumes it).
"""

from __future__ import annotations

import enum
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.training.collectives import all_reduce_max
from trainer.training.progress import Progress

# A preemption's notice (SIGTERM, SIGUSR2), under SLURM and elsewhere, and Ctrl-C (SIGINT): each stops
# the run with a checkpoint. A second Ctrl-C interrupts at once, as a user pressing it twice means.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class Stopped(Exception):
    """The run was asked to stop (a signal, or --stop-after-epoch) and has saved its state."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class Reason(enum.Enum):
    PATIENCE = "patience"  # no better validation (or, without a split, test) accuracy for train.patience epochs
    BUDGET_TIME_UP = "budget time up"  # train.budget_s: the clock ended the plan early (budget.time_up)
    BUDGET_PLAN_DONE = "budget plan done"  # train.budget_s: the steps fitted to the budget are trained
    STOP_AFTER_EPOCH = "stop after epoch"  # --stop-after-epoch, a preemption on request
    SIGNAL = "signal"  # SIGTERM or SIGUSR2 (a preemption), or SIGINT (Ctrl-C)
    EPOCHS_DONE = "epochs done"


@dataclass(frozen=True)
class Stop:
    reason: Reason
    message: str

    @property
    def ends_run(self) -> bool:
        """True: the run is over and writes its summary. False: paused, to be resumed."""
        return self.reason not in (Reason.STOP_AFTER_EPOCH, Reason.SIGNAL)


def should_stop(
    progress: Progress, cfg: TrainConfig, stop_after_epoch: int | None = None, signum: int | None = None
) -> Stop | None:
    """Why the run should stop now, or None to go on.

    Asked between epochs and, when a stop signal arrived (`signum`, that of any rank), in the middle
    of one, where only that signal stops the run. Between epochs the reasons are checked in the
    order listed in Reason, so a run that both ran out of patience and was signalled ends with its
    summary rather than pausing.
    """
    epoch = progress.epoch
    if progress.mid_epoch:
        if signum is None:
            return None
        return Stop(Reason.SIGNAL, f"stopped by signal {signal.Signals(signum).name} in epoch {epoch + 1} at step "
                                   f"{progress.epoch_step}; checkpoint saved, run again to resume")
    if cfg.patience and progress.bad_epochs >= cfg.patience:
        metric = "validation" if progress.best.val_acc is not None else "test"
        return Stop(Reason.PATIENCE, f"early stopping: no better {metric} accuracy for {cfg.patience} epochs")
    plan = progress.plan
    if plan is not None and progress.global_step >= plan.total_steps and plan.time_up_at_s is not None:
        return Stop(Reason.BUDGET_TIME_UP, f"budget: time up at step {plan.total_steps}: {plan.time_up_at_s:.1f} s of "
                                           f"train.budget_s={plan.budget_s:g} left too little for more steps and "
                                           f"the final evaluation; {progress.elapsed_s:.1f} s used")
    if plan is not None and progress.global_step >= plan.total_steps:
        return Stop(Reason.BUDGET_PLAN_DONE, f"budget plan done: {plan.total_steps} steps ({plan.epochs:.2f} epochs) "
                                             f"in {progress.elapsed_s:.1f} s of train.budget_s={plan.budget_s:g}")
    if stop_after_epoch is not None and epoch >= stop_after_epoch:
        return Stop(Reason.STOP_AFTER_EPOCH, f"stopped after epoch {epoch} as asked; run again to resume")
    if signum is not None:
        return Stop(Reason.SIGNAL, f"stopped by signal {signal.Signals(signum).name} after epoch {epoch}; "
                                   "checkpoint saved, run again to resume")
    if epoch >= cfg.epochs:
        return Stop(Reason.EPOCHS_DONE, f"all {cfg.epochs} epochs trained")
    return None


def evaluates(progress: Progress, cfg: TrainConfig) -> bool:
    """Whether the epoch just completed (progress.epoch) is evaluated and checkpointed: every
    train.eval_every epochs, and whenever the run ends after it, whatever ends it. The end is
    decided by should_stop itself, from the same progress, so a run can never end on an epoch that
    was not evaluated. No reason to end reads the clock (a budget ends at its plan's step count; its
    time up ends the plan from the all-reduced clock), so every rank takes the same decision from
    its own copy of the progress."""
    if cfg.eval_every and progress.epoch % cfg.eval_every == 0:
        return True
    stop = should_stop(progress, cfg)
    return stop is not None and stop.ends_run


class StopSignal:
    """The stop signal (STOP_SIGNALS) this process received while `catching()`. The handler only
    notes it: the ranks must stop after the same step, so they act on it together, at the next
    check (StopCheck inside an epoch, `on_any_rank` between epochs)."""

    def __init__(self) -> None:
        self.received: int | None = None

    @contextmanager
    def catching(self) -> Iterator[None]:
        def on_signal(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.received == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: no checkpoint, exit 130 (trainer/cli.py)
            self.received = signum

        previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_any_rank(self, device: torch.device) -> int | None:
        """The stop signal any rank received, on every rank (a collective: call at the same steps)."""
        signum = torch.tensor([self.received or 0], device=device)
        return int(all_reduce_max(signum, device).item()) or None


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
        self.slowest_elapsed_s = 0.0
        self.ahead_s = bound_s  # the longest to the next check, as far as known
        self.steps = 0  # since the last agreement: the next comes `every` of them after it
        self.timed = 0  # of those, the steps since the clock last (re)started, and their time
        self.since = time.perf_counter()

    def restart(self) -> None:
        """From here on (an epoch starts, a budget was measured) the time is step time again: the
        time since the last step (evaluation, checkpoint, measuring) is not. The steps since the last
        agreement still count toward the next: were they counted from each epoch's start, an
        interval as long as an epoch would never come due, and no check would come inside an epoch."""
        self.timed = 0
        self.since = time.perf_counter()

    def due(self) -> bool:
        """Counts a step; True when the ranks are to agree now (every rank reaches it at the same step)."""
        self.steps += 1
        self.timed += 1
        return self.steps >= self.every

    def agree(self, signum: int | None, elapsed_s: float = 0.0) -> int | None:
        """The stop signal any rank received (a collective), and the interval to the next check.
        The run's clock (`elapsed_s`) is agreed on too: the slowest rank's is then
        `slowest_elapsed_s`, which a budget's time check reads (the same on every rank) with
        `ahead_s`, the longest to the next check: the bound, or one step as slow as these."""
        measured = torch.tensor([float(signum or 0), time.perf_counter() - self.since, elapsed_s],
                                dtype=torch.float64, device=self.device)
        any_signal, slowest_s, self.slowest_elapsed_s = all_reduce_max(measured, self.device).tolist()
        self.ahead_s = max(self.bound_s, slowest_s / max(1, self.timed))
        fits = int(self.bound_s * self.timed / slowest_s) if slowest_s > 0 else 2 * self.every
        # At most doubling: one interval that happened to be fast cannot stretch the next one far
        # past the bound.
        self.every = max(1, min(fits, 2 * self.every))
        self.steps = 0
        self.restart()
        return int(any_signal) or None
