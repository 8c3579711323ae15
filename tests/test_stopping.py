"""The stopping rules as a pure function of the progress and the config: no data, no training."""

import signal
from dataclasses import replace

import pytest
import torch

from trainer.config import TrainConfig
from trainer.training.budget import Plan
from trainer.training.progress import Progress
from trainer.training.stopping import Reason, should_stop

CFG = TrainConfig(epochs=10, patience=3)
BUDGET = TrainConfig(epochs=10, patience=0, budget_s=60.0)
# A plan fitted to train.budget_s=60: 250 steps of 100 an epoch.
PLAN = Plan(budget_s=60.0, calibrated_at=10, step_s=0.1, eval_s=1.0, checkpoint_s=0.1, margin_s=2.0,
            total_steps=250, epochs=2.5, images_per_s=1000.0)


def reason(progress: Progress, cfg: TrainConfig = CFG, **requests) -> Reason | None:
    stop = should_stop(progress, cfg, **requests)
    return stop.reason if stop else None


def test_a_run_with_nothing_to_stop_it_goes_on():
    assert reason(Progress()) is None
    assert reason(Progress(epoch=4, bad_epochs=2, elapsed_s=99.0), stop_after_epoch=5) is None


def test_epochs_done_ends_the_run():
    stop = should_stop(Progress(epoch=10), CFG)
    assert stop.reason is Reason.EPOCHS_DONE and stop.ends_run


def test_patience_ends_the_run_and_zero_means_never():
    stop = should_stop(Progress(epoch=5, bad_epochs=3), CFG)
    assert stop.reason is Reason.PATIENCE and stop.ends_run
    assert stop.message == "early stopping: no better test accuracy for 3 epochs"
    assert reason(Progress(epoch=5, bad_epochs=50), replace(CFG, patience=0)) is None


def test_a_budget_ends_the_run_at_its_plans_step_not_by_the_clock():
    stop = should_stop(Progress(epoch=3, global_step=250, elapsed_s=50.0, plan=PLAN), BUDGET)
    assert stop.reason is Reason.BUDGET_PLAN_DONE and stop.ends_run
    assert stop.message == "budget plan done: 250 steps (2.50 epochs) in 50.0 s of train.budget_s=60"
    # The plan was fitted to end inside the budget: the clock alone ends nothing, so every rank
    # takes the same decision whatever its own clock says.
    assert reason(Progress(epoch=2, global_step=200, elapsed_s=1e9, plan=PLAN), BUDGET) is None
    assert reason(Progress(epoch=1, global_step=100, elapsed_s=1e9), BUDGET) is None  # no plan fitted yet


def test_a_budgets_time_up_ends_the_run_where_the_clock_ended_its_plan():
    ended = PLAN.ended(at_step=180, elapsed_s=58.5, steps_per_epoch=100)
    assert ended.total_steps == 180 and ended.epochs == 1.8 and ended.time_up_at_s == 58.5
    stop = should_stop(Progress(epoch=2, global_step=180, elapsed_s=59.7, plan=ended), BUDGET)
    assert stop.reason is Reason.BUDGET_TIME_UP and stop.ends_run
    assert stop.message.startswith("budget: time up at step 180: 58.5 s of train.budget_s=60 ")
    # Mid-epoch (a resumed pause) it waits for the epoch's end like every reason but a signal.
    assert reason(Progress(epoch=1, epoch_step=80, global_step=180, plan=ended), BUDGET) is None


def test_the_stop_check_agrees_on_the_clock_too():
    from trainer.training.stopping import StopCheck

    check = StopCheck(1.0, torch.device("cpu"))
    assert check.due()
    assert check.agree(None, elapsed_s=12.5) is None and check.slowest_elapsed_s == 12.5
    assert check.ahead_s == 1.0  # a quick step: the next check comes within the bound
    check.due()
    check.since -= 3.0  # a step of 3 s: the next check may come that much later
    assert check.agree(signal.SIGUSR2) == signal.SIGUSR2 and check.slowest_elapsed_s == 0.0
    assert check.ahead_s == pytest.approx(3.0, abs=0.5)


def test_stop_after_epoch_pauses_the_run():
    stop = should_stop(Progress(epoch=2), CFG, stop_after_epoch=2)
    assert stop.reason is Reason.STOP_AFTER_EPOCH and not stop.ends_run
    assert stop.message == "stopped after epoch 2 as asked; run again to resume"
    assert reason(Progress(epoch=1), stop_after_epoch=2) is None


def test_a_signal_between_epochs_pauses_the_run():
    stop = should_stop(Progress(epoch=2), CFG, signum=signal.SIGUSR2)
    assert stop.reason is Reason.SIGNAL and not stop.ends_run
    assert stop.message.startswith("stopped by signal SIGUSR2 after epoch 2;")


def test_mid_epoch_only_a_signal_stops():
    progress = Progress(epoch=1, epoch_step=7, bad_epochs=3, elapsed_s=1e9)
    assert reason(progress, stop_after_epoch=1) is None
    stop = should_stop(progress, CFG, stop_after_epoch=1, signum=signal.SIGTERM)
    assert stop.reason is Reason.SIGNAL and not stop.ends_run
    assert stop.message.startswith("stopped by signal SIGTERM in epoch 2 at step 7;")


@pytest.mark.parametrize(
    "progress, requests, expected",
    [
        # Reasons that end the run come before those that pause it...
        (Progress(epoch=4, bad_epochs=3, elapsed_s=100.0), {"signum": signal.SIGTERM}, Reason.PATIENCE),
        (Progress(epoch=3, global_step=250, plan=PLAN), {"stop_after_epoch": 3}, Reason.BUDGET_PLAN_DONE),
        (Progress(epoch=2, global_step=180, plan=PLAN.ended(180, 58.5, 100)), {"signum": signal.SIGTERM},
         Reason.BUDGET_TIME_UP),
        # ...but a requested stop at the last epoch pauses (the summary comes with the next start).
        (Progress(epoch=10), {"stop_after_epoch": 10}, Reason.STOP_AFTER_EPOCH),
        (Progress(epoch=10), {"signum": signal.SIGUSR2}, Reason.SIGNAL),
    ],
)
def test_order_of_reasons(progress, requests, expected):
    assert reason(progress, **requests) is expected


def test_should_stop_leaves_the_progress_alone():
    progress = Progress(epoch=3, epoch_step=2, bad_epochs=5, elapsed_s=500.0)
    before = replace(progress)
    should_stop(progress, CFG, stop_after_epoch=1, signum=signal.SIGTERM)
    assert progress == before


def test_eval_every_evaluates_its_epochs_and_every_end_of_the_run():
    from trainer.training.stopping import evaluates

    every2 = TrainConfig(epochs=5, patience=0, eval_every=2)
    assert [evaluates(Progress(epoch=e), every2) for e in range(1, 6)] == [False, True, False, True, True]
    once = replace(every2, eval_every=0)  # only the run's end
    assert [evaluates(Progress(epoch=e), once) for e in range(1, 6)] == [False, False, False, False, True]
    # Whatever ends the run: its epochs trained, its budget plan done (possibly mid-epoch).
    assert evaluates(Progress(epoch=3, global_step=250, plan=PLAN), replace(once, budget_s=60.0))
    assert not evaluates(Progress(epoch=2, global_step=200, elapsed_s=1e9, plan=PLAN), replace(once, budget_s=60.0))
    assert evaluates(Progress(epoch=2, global_step=180, plan=PLAN.ended(180, 58.5, 100)), replace(once, budget_s=60.0))
    # A pause is no end: the paused epoch is saved (last.pt), not evaluated.
    assert not evaluates(Progress(epoch=1), once)
    with pytest.raises(ValueError, match="eval_every: early stopping"):
        TrainConfig(patience=3, eval_every=2)


def test_old_checkpoints_evaluated_every_epoch():
    state = Progress(epoch=4, global_step=40).to_dict()
    del state["evaluated_epoch"], state["last_train_acc"]  # a checkpoint from before train.eval_every
    assert Progress.from_dict(state).evaluated_epoch == 4
