"""train.budget_s: a plan of training steps fitted to a wall-time budget, and kept to it.

The budget counts the clock of progress.elapsed_s (and summary.json's wall_time_s): training,
evaluating and compiling, from the first step on. What it does not count is the run's start-up:
the process starting, imports, building the loaders and the network, loading a checkpoint, and the
writing of checkpoints between two epochs' clocks (last.pt records the clock before its own save);
the plan leaves room for those checkpoints all the same. Nothing of that is known before the run,
so the first steps measure it (Calibration), on the real network, data and ranks, and `fit_steps`
then chooses the total number of steps so that the rest of the run (its steps, an evaluation and a
checkpoint at each epoch end that train.eval_every evaluates and at the plan's end, and a margin)
ends inside the budget. The plan is in steps, not epochs: a network whose one epoch is longer than
the budget trains part of an epoch, which is then evaluated as an epoch of its own.

A machine shared with other work can slow down after the fit. So the steps are timed again after
it (RefitTimer) and the rest of the plan is re-fitted at REFIT_AT of its steps (`refit`); the
schedule then ends at the new total. Should the clock still leave too little for the final
evaluation and checkpoint (`time_up`, read at the stop checks and at epoch ends), the plan ends at
once: the schedule's end, the final evaluation, the summary. Every number each decision reads is
all-reduced (the slowest rank's), so all ranks take it at the same step. The plan and its re-fits
are kept in the checkpoint, so a resumed run follows them instead of measuring again.
BudgetController runs all of that for the trainer, which calls it after each step.
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
# Where the rest of the plan is fitted again: at these fractions of its steps (of the plan as it
# stands then), from the steps timed since its last fit.
REFIT_AT = (0.25, 0.5, 0.75)
# The stop checks read the budget's clock too: in a budgeted run they come at most this fraction
# of the budget apart (or a step, where steps are longer).
CHECK_FRACTION = 0.02


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


def stop_check_s(stop_check_s: float, budget_s: float) -> float:
    """The stop checks' interval bound (train.stop_check_s): with a budget, at most CHECK_FRACTION of it."""
    return min(stop_check_s, CHECK_FRACTION * budget_s) if budget_s else stop_check_s


def next_refit(plan: Plan) -> int | None:
    """The global step of the plan's next re-fit: the first of REFIT_AT's fractions of its steps
    that leaves at least MIN_WINDOW steps to time since its last fit, before its end; None if none."""
    last = plan.refits[-1][0] if plan.refits else plan.calibrated_at
    for fraction in REFIT_AT:
        at = math.ceil(fraction * plan.total_steps)
        if last + MIN_WINDOW <= at < plan.total_steps:
            return at
    return None


def slowdown(plan: Plan, step_s: float) -> float:
    """How many times slower a step is than at the fit (at least 1): evaluations and checkpoints
    are assumed to slow alike (a machine shared with other work slows everything it runs), but
    never to speed up, which the few timed evaluation batches could not show."""
    return max(1.0, step_s / plan.step_s) if plan.step_s > 0 else 1.0


def end_cost_s(plan: Plan, step_s: float) -> float:
    """The final evaluation and checkpoint's cost at the speed of a step of `step_s`."""
    return (plan.eval_s + plan.checkpoint_s) * slowdown(plan, step_s)


def refit(plan: Plan, step: int, epochs_done: int, steps_per_epoch: int, max_steps: int, eval_every: int,
          elapsed_s: float, step_s: float) -> Plan:
    """The plan with its rest fitted again at `step`, the clock at `elapsed_s`, from steps of
    `step_s` (the steps since its last fit): fit_steps, with the evaluations and checkpoints slowed
    alike. Never fewer steps than trained: where not even one more fits, it ends at `step` (time up)."""
    factor = slowdown(plan, step_s)
    total = fit_steps(plan.budget_s, elapsed_s, step, epochs_done, steps_per_epoch, max_steps, step_s,
                      plan.eval_s * factor, plan.checkpoint_s * factor, margin_s(plan.budget_s, step_s), eval_every)
    refitted = plan.refitted(step, step_s, total, steps_per_epoch)
    return refitted.ended(step, elapsed_s, steps_per_epoch) if total <= step else refitted


def time_up(plan: Plan, elapsed_s: float, end_s: float, ahead_s: float) -> bool:
    """Whether the clock at `elapsed_s` leaves too little of the budget for the final evaluation
    and checkpoint (`end_s`) after the next clock check (`ahead_s` later at most)."""
    return elapsed_s + ahead_s + end_s > plan.budget_s


def overrun(budget_s: float, used_s: float) -> str | None:
    """The warning line for a run whose clock went past its budget; None within it."""
    if used_s <= budget_s:
        return None
    return (f"warning: train.budget_s={budget_s:g} overrun: {used_s:.1f} s used "
            f"(+{100 * (used_s / budget_s - 1):.0f}%)")


def _synced_now(device: torch.device) -> float:
    """The time once the device's queued work is done: a timed window's ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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
        return _synced_now(self.device)

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


class RefitTimer:
    """Times the steps since the plan's last fit, for the next re-fit: between device syncs, the
    time between epochs (evaluation, checkpoint) left out, as Calibration does. A process that
    resumes a plan first leaves SKIP_STEPS steps untimed (compiling, autotuning)."""

    def __init__(self, device: torch.device, skip: int = 0) -> None:
        self.device, self.skip = device, skip
        self.steps, self.seconds = 0, 0.0
        self.since: float | None = None if skip else _synced_now(device)  # None: not timing now

    def step(self) -> None:
        if not self.skip:
            self.steps += 1
            return
        self.skip -= 1
        if not self.skip:
            self.since = _synced_now(self.device)

    def epoch_start(self) -> None:
        if not self.skip:
            self.since = _synced_now(self.device)

    def epoch_end(self) -> None:
        if self.since is not None:
            self.seconds += _synced_now(self.device) - self.since
            self.since = None

    def take(self) -> float:
        """This rank's mean step time since the last take; timing starts over."""
        now = _synced_now(self.device)
        seconds = self.seconds + (now - self.since if self.since is not None else 0.0)
        step_s = seconds / self.steps if self.steps else 0.0
        self.steps, self.seconds, self.since = 0, 0.0, now
        return step_s


class BudgetController:
    """train.budget_s for one run: before the plan is fitted it times the steps (Calibration), sets
    the schedule from the probe's first estimate, then measures what the plan must leave room for,
    fits it (progress.plan) and sets the schedule to it. After the fit (in this process or one that
    resumed the plan) it re-times the steps, re-fits the rest of the plan at its re-fit points and
    ends it when the clock is up (check_time, epoch_end).

    What only the trainer can do comes as callables: `elapsed_s`, the run's clock now (as
    progress.elapsed_s counts it); `eval_cost_s` and `checkpoint_cost_s`, one evaluation's and one
    checkpoint's cost on this rank (collectives, and the network left in training mode); and
    `set_schedule(total_steps)`, the learning-rate schedule ending there.
    """

    def __init__(self, budget_s: float, steps_per_epoch: int, max_steps: int, eval_every: int, global_batch: int,
                 device: torch.device, plan: Plan | None, *, elapsed_s: Callable[[], float],
                 eval_cost_s: Callable[[], float], checkpoint_cost_s: Callable[[], float],
                 set_schedule: Callable[[int], None]) -> None:
        self.budget_s, self.steps_per_epoch, self.max_steps = budget_s, steps_per_epoch, max_steps
        self.eval_every, self.global_batch, self.device = eval_every, global_batch, device
        self.elapsed_s, self.eval_cost_s, self.checkpoint_cost_s = elapsed_s, eval_cost_s, checkpoint_cost_s
        self.set_schedule = set_schedule
        self.calibration: Calibration | None = None
        self.timer: RefitTimer | None = None
        self.ahead_s = CHECK_FRACTION * budget_s  # to the next clock check: the stop checks say (check_time)
        if plan is None:
            self.calibration = Calibration(budget_s, steps_per_epoch, device)
        else:  # a resumed plan: its last step time stands until the steps are timed again here
            self._follow(plan, plan.refits[-1][1] if plan.refits else plan.step_s, RefitTimer(device, SKIP_STEPS))

    def _follow(self, plan: Plan, step_s: float, timer: RefitTimer) -> None:
        """From a fit or re-fit on: time the steps to the plan's next re-fit point."""
        self.timer, self.next_refit = timer, next_refit(plan)
        self.end_s = end_cost_s(plan, step_s)  # the final evaluation and checkpoint, at that speed

    def restart(self) -> None:
        """An epoch starts: the time between epochs is no step time."""
        if self.calibration is not None:
            self.calibration.restart()
        elif self.timer is not None:
            self.timer.epoch_start()

    def after_step(self, progress: Progress, logger: NullLogger) -> bool:
        """Counts the step just trained. At the end of a calibration window sets the schedule from
        the probe's estimate or fits the plan; at a re-fit point re-fits it (collectives, at the
        same step on every rank). True when it did: the time since the step was spent measuring."""
        if self.calibration is None:
            return self._after_fit_step(progress, logger)
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
        self._follow(progress.plan, step_s, RefitTimer(self.device))

    def _after_fit_step(self, progress: Progress, logger: NullLogger) -> bool:
        plan, timer, step = progress.plan, self.timer, progress.global_step
        if plan is None or timer is None:  # both are set from the fit on
            return False
        timer.step()
        if self.next_refit is None or not self.next_refit <= step < plan.total_steps or timer.steps < MIN_WINDOW:
            return False
        local = torch.tensor([timer.take(), self.elapsed_s()], dtype=torch.float64, device=self.device)
        step_s, elapsed = all_reduce_max(local, self.device).tolist()
        progress.plan = refit(plan, step, progress.epoch, self.steps_per_epoch, self.max_steps, self.eval_every,
                              elapsed, step_s)
        self.set_schedule(progress.plan.total_steps)
        logger.info(f"budget re-fit at step {step} ({elapsed:.1f} s of train.budget_s="
                    f"{plan.budget_s:g}): {step_s * 1000:.1f} ms/step (fitted at {plan.step_s * 1000:.1f}), "
                    f"{plan.total_steps} -> {progress.plan.total_steps} steps")
        self._follow(progress.plan, step_s, timer)
        return True

    def check_time(self, progress: Progress, elapsed_s: float, ahead_s: float | None = None) -> bool:
        """At a clock check (`elapsed_s`: the slowest rank's clock; `ahead_s`: the longest to the
        next check, if the stop check knows it; both the same on every rank): ends the plan at this
        step when the budget has too little left for the final evaluation and checkpoint (time_up),
        the schedule with it. True when it did."""
        self.ahead_s = self.ahead_s if ahead_s is None else ahead_s
        plan = progress.plan
        if (plan is None or plan.time_up_at_s is not None or progress.global_step >= plan.total_steps
                or not time_up(plan, elapsed_s, self.end_s, self.ahead_s)):
            return False
        progress.plan = plan.ended(progress.global_step, elapsed_s, self.steps_per_epoch)
        self.set_schedule(progress.global_step)
        return True

    def epoch_end(self, progress: Progress) -> bool:
        """An epoch's steps are done (not paused): the time from here to the next epoch is no step
        time, and the clock is checked (a collective, while the plan goes on: at the same epoch end
        on every rank). True when the time is up and the plan ends here."""
        if self.timer is None:
            return False
        self.timer.epoch_end()
        plan = progress.plan
        if plan is None or progress.global_step >= plan.total_steps:
            return False
        local = torch.tensor([self.elapsed_s()], dtype=torch.float64, device=self.device)
        return self.check_time(progress, all_reduce_max(local, self.device).item())

    def overrun(self, progress: Progress) -> str | None:
        """The warning line for a run that ends past its budget (its clock: start-up apart)."""
        plan = progress.plan
        return overrun(plan.budget_s if plan is not None else self.budget_s, progress.elapsed_s)
