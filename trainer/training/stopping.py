"""Should the run stop now, and why: one pure function of the progress, the config and the requests.

Some reasons end the run (it writes its summary); the others pause it (its checkpoint is saved,
`Stopped` is raised, and running the same command again resumes it).
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from trainer.config import TrainConfig
from trainer.training.progress import Progress


class Stopped(Exception):
    """The run was asked to stop (a signal, or --stop-after-epoch) and has saved its state."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class Reason(enum.Enum):
    PATIENCE = "patience"  # no better validation (or, without a split, test) accuracy for train.patience epochs
    TIME_BUDGET = "time budget"  # train.time_budget_s of training passed
    BUDGET_PLAN_DONE = "budget plan done"  # train.budget_s: the steps fitted to the budget are trained
    STOP_AFTER_EPOCH = "stop after epoch"  # --stop-after-epoch, a preemption on request
    SIGNAL = "signal"  # SIGTERM or SIGUSR2: a preemption
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
    if cfg.time_budget_s and progress.elapsed_s >= cfg.time_budget_s:
        return Stop(Reason.TIME_BUDGET, f"time budget reached: {progress.elapsed_s:.0f} s of training >= "
                                        f"train.time_budget_s={cfg.time_budget_s:g}; stopping after epoch {epoch} "
                                        f"of {cfg.epochs}")
    plan = progress.plan
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
    """Whether the epoch just completed (progress.epoch, its time in progress.elapsed_s) is evaluated
    and checkpointed: every train.eval_every epochs, and whenever the run ends after it, whatever
    ends it. The end is decided by should_stop itself, from the same numbers, so a run can never
    end on an epoch that was not evaluated (evaluating only adds time: an ending run stays ended)."""
    if cfg.eval_every and progress.epoch % cfg.eval_every == 0:
        return True
    stop = should_stop(progress, cfg)
    return stop is not None and stop.ends_run
