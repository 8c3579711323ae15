"""train.budget_s: a plan of training steps fitted to a wall-time budget.

The budget counts the clock of progress.elapsed_s (and summary.json's wall_time_s): training,
evaluating, checkpointing and compiling. Nothing of that is known before the run, so the first steps
measure it (Calibration), on the real network, data and ranks, and `fit_steps` then chooses the
total number of steps so that the rest of the run (its steps, an evaluation and a checkpoint at
each epoch end that train.eval_every evaluates and at the plan's end, and a margin) ends inside the
budget. The plan is in steps,
not epochs: a network whose one epoch is longer than the budget trains part of an epoch, which is
then evaluated as an epoch of its own. It is fitted once, from all-reduced numbers (the same on
every rank), and kept in the checkpoint, so a resumed run follows it instead of measuring again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from trainer.training.collectives import all_reduce_max

SKIP_STEPS = 3  # not timed: the first step compiles, the next ones still autotune (cuDNN) and fill caches
MIN_WINDOW, MAX_WINDOW = 3, 200  # steps timed for the fit


@dataclass(frozen=True)
class Plan:
    budget_s: float
    calibrated_at: int  # the global step at which the plan was fitted
    step_s: float  # one training step, on the slowest rank
    eval_s: float  # one evaluation (test set, and validation set if any), on the slowest rank
    checkpoint_s: float  # one checkpoint (last.pt's state and best.pt's weights serialised)
    margin_s: float
    total_steps: int  # the plan: training ends after this many steps, the schedule reaches zero there
    epochs: float  # total_steps in epochs
    images_per_s: float  # global images per second while training (steps only)

    def record(self, elapsed_s: float) -> dict[str, Any]:
        """summary.json's `budget`: the plan, and how the run used the budget."""
        return {"budget_s": self.budget_s, "fitted_steps": self.total_steps, "fitted_epochs": self.epochs,
                "images_per_s": self.images_per_s, "calibrated_at_step": self.calibrated_at, "step_s": self.step_s,
                "eval_s": self.eval_s, "checkpoint_s": self.checkpoint_s, "margin_s": self.margin_s,
                "used_s": elapsed_s, "within_budget": elapsed_s <= self.budget_s}

    def describe(self) -> str:
        return (f"budget plan: {self.total_steps} steps ({self.epochs:.2f} epochs) in train.budget_s={self.budget_s:g}"
                f" (fitted at step {self.calibrated_at}: {self.step_s * 1000:.1f} ms/step, "
                f"{self.images_per_s:,.0f} img/s, evaluation {self.eval_s:.1f} s, checkpoint {self.checkpoint_s:.2f} s, "
                f"margin {self.margin_s:.1f} s)")


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
