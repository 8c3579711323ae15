"""train.budget_s: a plan of training steps fitted to a wall-time budget.

The budget counts the clock of progress.elapsed_s (and summary.json's wall_time_s): training,
evaluating and compiling. Saving a checkpoint falls between two epochs' clocks (last.pt records the
clock before its own save), but the plan leaves room for it all the same. Nothing of that is known
before the run, so the first steps measure it (Calibration), on the real network, data and ranks,
and `fit_steps` then chooses the total number of steps so that the rest of the run (its steps, an
evaluation and a checkpoint at each epoch end that train.eval_every evaluates and at the plan's
end, and a margin) ends inside the budget. The plan is in steps, not epochs: a network whose one
epoch is longer than the budget trains part of an epoch, which is then evaluated as an epoch of its
own. It is fitted once, from all-reduced numbers (the same on every rank), and kept in the
checkpoint, so a resumed run follows it instead of measuring again. BudgetController runs all of
that for the trainer, which calls it after each step until the fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from trainer.training.collectives import all_reduce_max
from trainer.training.progress import Plan, Progress  # Plan: the progress holds it; named here too

if TYPE_CHECKING:
    from trainer.logger import NullLogger

SKIP_STEPS = 3  # not timed: the first step compiles, the next ones still autotune (cuDNN) and fill caches
MIN_WINDOW, MAX_WINDOW = 3, 200  # steps timed for the fit


def margin_s(budget_s: float, step_s: float) -> float:
    """Slack for what the few timed steps cannot foresee: step times that drift (a shared machine,
    clocks), logging, the metrics line."""
    return 0.03 * budget_s + 2 * step_s


def evaluations(total_steps: int, epochs_done: int, steps_per_epoch: int, eval_every: int = 1) -> int:
    """Evaluations (each with a checkpoint) still to come in a plan of `total_steps`: one at each
    epoch end before the plan's end that train.eval_every evaluates (every `eval_every`-th epoch;
    none with 0), after the `epochs_done` already trained, and one at the plan's end."""
    last_before = math.ceil(total_steps / steps_per_epoch) - 1  # the last epoch that ends before the plan does
    if not eval_every or last_before <= epochs_done:
        return 1
    return last_before // eval_every - epochs_done // eval_every + 1


def fit_steps(budget_s: float, elapsed_s: float, step: int, epochs_done: int, steps_per_epoch: int,
              max_steps: int, step_s: float, eval_s: float, checkpoint_s: float, margin: float,
              eval_every: int = 1) -> int:
    """The most total steps (from `step`, at most `max_steps`) whose remaining cost fits the budget;
    `step` itself when not even one more does (the plan then ends now)."""

    def cost(total: int) -> float:
        ends = evaluations(total, epochs_done, steps_per_epoch, eval_every)
        return elapsed_s + (total - step) * step_s + ends * (eval_s + checkpoint_s) + margin

    low, high = step, max(step, max_steps)  # cost grows with total: bisect for the last that fits
    if cost(high) <= budget_s:
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if cost(mid) <= budget_s:
            low = mid
        else:
            high = mid
    return low


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """optim.warmup_epochs of steps, but at most a fifth of the plan: a budget of a few dozen steps
    still spends most of them at the peak learning rate and in the decay."""
    return min(round(warmup_epochs * steps_per_epoch), total_steps // 5)


class Calibration:
    """Times the first steps of a budgeted run: SKIP_STEPS untimed, one probe step (for the
    window's length and a first estimate of the plan), then a window of steps for the fit. Each
    window is timed between two device syncs and reduced to the slowest rank's time, so every rank
    gets the same numbers and stays in step. An epoch end restarts the window: the time between
    epochs (evaluation, checkpoint) is no step time."""

    def __init__(self, budget_s: float, steps_per_epoch: int, device: torch.device) -> None:
        self.budget_s, self.steps_per_epoch, self.device = budget_s, steps_per_epoch, device
        self.skipped = 0
        self.window = 0  # steps to time in the current window; 0 while skipping
        self.steps = 0
        self.since = 0.0
        self.probe_s: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's ends are where the device's work is done
        return time.perf_counter()

    def restart(self) -> None:
        """An epoch starts: a window being timed starts over."""
        if self.window:
            self.steps, self.since = 0, self._now()

    def after_step(self, elapsed_s: float) -> tuple[str, float, float] | None:
        """Counts a step. ("probe" | "window", step_s, elapsed_s) when a window ends, with the
        slowest rank's step time and elapsed time (a collective, at the same step on every rank)."""
        if not self.window:
            self.skipped += 1
            if self.skipped >= SKIP_STEPS:
                self.window, self.steps, self.since = 1, 0, self._now()
            return None
        self.steps += 1
        if self.steps < self.window:
            return None
        local = torch.tensor([(self._now() - self.since) / self.steps, elapsed_s], dtype=torch.float64,
                             device=self.device)
        step_s, slowest_elapsed = all_reduce_max(local, self.device).tolist()
        if self.probe_s is None:
            self.probe_s = step_s
            # About 2% of the budget (0.5-5 s) of steps: enough to average out a step's jitter,
            # little enough to leave the calibration a small part of the warmup.
            target_s = min(5.0, max(0.5, 0.02 * self.budget_s))
            fits = math.ceil(target_s / step_s) if step_s > 0 else MAX_WINDOW
            # At most an epoch: the window restarts at every epoch end and must fit in one. At most
            # a fifth of the steps the budget has left: slow steps leave few, and the fit must
            # come early enough to place the warmup and the decay in them.
            left = (self.budget_s - slowest_elapsed) / step_s if step_s > 0 else MAX_WINDOW
            window = min(max(MIN_WINDOW, fits), MAX_WINDOW, self.steps_per_epoch)
            self.window = max(1, min(window, int(left // 5)))
            self.steps, self.since = 0, self._now()
            return "probe", step_s, slowest_elapsed
        return "window", step_s, slowest_elapsed


class BudgetController:
    """train.budget_s for one run, from its first step to the fitted plan: it times the steps
    (Calibration), sets the schedule from the probe's first estimate, then measures what the plan
    must leave room for, fits it (progress.plan) and sets the schedule to it.

    What only the trainer can do comes as callables: `elapsed_s`, the run's clock now (as
    progress.elapsed_s counts it); `eval_cost_s` and `checkpoint_cost_s`, one evaluation's and one
    checkpoint's cost on this rank (collectives, and the network left in training mode); and
    `set_schedule(total_steps)`, the learning-rate schedule ending there.
    """

    def __init__(self, budget_s: float, steps_per_epoch: int, max_steps: int, eval_every: int, global_batch: int,
                 device: torch.device, *, elapsed_s: Callable[[], float], eval_cost_s: Callable[[], float],
                 checkpoint_cost_s: Callable[[], float], set_schedule: Callable[[int], None]) -> None:
        self.budget_s, self.steps_per_epoch, self.max_steps = budget_s, steps_per_epoch, max_steps
        self.eval_every, self.global_batch, self.device = eval_every, global_batch, device
        self.elapsed_s, self.eval_cost_s, self.checkpoint_cost_s = elapsed_s, eval_cost_s, checkpoint_cost_s
        self.set_schedule = set_schedule
        self.calibration: Calibration | None = Calibration(budget_s, steps_per_epoch, device)

    @property
    def calibrating(self) -> bool:
        """Until the plan is fitted."""
        return self.calibration is not None

    def restart(self) -> None:
        """An epoch starts: the time between epochs is no step time."""
        if self.calibration is not None:
            self.calibration.restart()

    def after_step(self, progress: Progress, logger: NullLogger) -> bool:
        """Counts the step just trained; at the end of a timed window sets the schedule from the
        probe's estimate, or fits the plan (collectives, at the same step on every rank). True when
        it did: the time since the step was spent measuring, not training."""
        if self.calibration is None:
            return False
        timed = self.calibration.after_step(self.elapsed_s())
        if timed is None:
            return False
        stage, step_s, elapsed = timed
        if stage == "probe":
            # A first estimate from one step, without evaluations: the calibration's steps then run
            # in a warmup close to the fitted plan's, not one of train.epochs (a jump to many times
            # the learning rate at the fit).
            left = int(max(0.0, self.budget_s - elapsed) / step_s) if step_s > 0 else self.max_steps
            self.set_schedule(min(self.max_steps, progress.global_step + left))
        else:
            self._fit(progress, logger, step_s)
            self.calibration = None
        return True

    def _fit(self, progress: Progress, logger: NullLogger, step_s: float) -> None:
        eval_s = self.eval_cost_s()
        checkpoint_s = self.checkpoint_cost_s()
        # The slowest rank's numbers on every rank: each computes the same plan from them.
        measured = torch.tensor([eval_s, checkpoint_s, self.elapsed_s()], dtype=torch.float64, device=self.device)
        eval_s, checkpoint_s, elapsed = all_reduce_max(measured, self.device).tolist()
        budget_s = self.budget_s
        margin = margin_s(budget_s, step_s)
        total = fit_steps(budget_s, elapsed, progress.global_step, progress.epoch, self.steps_per_epoch,
                          self.max_steps, step_s, eval_s, checkpoint_s, margin, self.eval_every)
        progress.plan = Plan(
            budget_s=budget_s, calibrated_at=progress.global_step, step_s=step_s, eval_s=eval_s,
            checkpoint_s=checkpoint_s, margin_s=margin, total_steps=total, epochs=total / self.steps_per_epoch,
            images_per_s=self.global_batch / step_s if step_s > 0 else 0.0,
        )
        # The warmup now ends at a fifth of the plan at most; the calibration's steps ran in the
        # probe's estimate of it, so the learning rate may jump a little here.
        self.set_schedule(total)
        logger.info(progress.plan.describe())
        if total == progress.global_step:
            logger.info(f"warning: {elapsed:.1f} s of train.budget_s={budget_s:g} were spent before the plan could "
                        f"be fitted; training ends now")
