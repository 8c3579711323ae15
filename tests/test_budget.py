"""train.budget_s: the plan fitted to a wall-time budget (trainer/training/budget.py), as runs end to end
on the test CIFAR-10 (conftest) and as its parts: the fit, the stopping rule, the checkpointed plan.
Also optim.bias_lr_mult on a real Trainer."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
import torch

from helpers import SMALL
from test_trainer import metrics, trainer

from trainer.logger import NullLogger
from trainer.training import budget
from trainer.training.progress import Progress
from trainer.training.stopping import Reason, should_stop

# The resident loader: no ffcv pipeline compilation (7-12 s per new loader) inside a budget of seconds.
BASE = ["data.loader=resident", "data.test_subset=100", "train.tta=false", "data.val_split=0", "data.flip=false", "data.translate=0",
        "logging.mode=disabled", "logging.log_every=1000"]


def budget_run(beton_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(SMALL), f"data.dir={beton_dir}", *BASE, *extra]


def plan(**changes) -> budget.Plan:
    values = dict(budget_s=60.0, calibrated_at=10, step_s=0.1, eval_s=1.0, checkpoint_s=0.1, margin_s=2.0,
                  total_steps=300, epochs=3.0, images_per_s=1000.0)
    return budget.Plan(**{**values, **changes})


# ---- the parts ---------------------------------------------------------------------------------


def test_fit_takes_the_most_steps_whose_steps_evaluations_and_checkpoints_fit():
    args = dict(budget_s=61.0, elapsed_s=5.0, step=10, epochs_done=0, steps_per_epoch=100, max_steps=10_000,
                step_s=0.1, eval_s=2.0, checkpoint_s=0.5, margin=3.05)

    def cost(total: int) -> float:  # written out: one evaluation and checkpoint per epoch end and at the end
        ends = len(range(100, total, 100)) + 1
        return 5.0 + (total - 10) * 0.1 + ends * 2.5 + 3.05

    total = budget.fit_steps(**args)
    assert cost(total) <= 61.0 < cost(total + 1)
    assert total == 414  # 404 steps, 5 evaluations (4 epoch ends and the plan's end): 60.95 s
    assert budget.fit_steps(**{**args, "max_steps": 200}) == 200  # train.epochs stays an upper bound
    assert budget.fit_steps(**{**args, "budget_s": 4.0}) == 10  # spent already: the plan ends now
    # The evaluations still to come: epoch ends not yet evaluated before the plan's end, and its end.
    assert budget.evaluations(250, 0, 100) == 3 and budget.evaluations(200, 0, 100) == 2
    assert budget.evaluations(250, 2, 100) == 1 and budget.evaluations(30, 0, 100) == 1


def test_fit_counts_evaluations_only_at_the_epochs_eval_every_evaluates():
    # train.eval_every=3 in a plan of 10 epochs: epochs 3, 6 and 9, and the plan's end.
    assert budget.evaluations(1000, 0, 100, eval_every=3) == 4
    assert budget.evaluations(1000, 4, 100, eval_every=3) == 3  # 6, 9, the end
    assert budget.evaluations(1000, 0, 100, eval_every=0) == 1  # the end only
    args = dict(budget_s=61.0, elapsed_s=5.0, step=10, epochs_done=0, steps_per_epoch=100, max_steps=10_000,
                step_s=0.1, eval_s=2.0, checkpoint_s=0.5, margin=3.05)
    # One evaluation (2.5 s) in all instead of 5: 4 x 2.5 s more for steps, 100 of them.
    assert budget.fit_steps(**args, eval_every=0) == 514
    assert budget.fit_steps(**args, eval_every=1) == budget.fit_steps(**args) == 414


def test_refit_points_are_quarters_of_the_plan_as_it_stands_after_its_last_fit():
    assert budget.next_refit(plan(calibrated_at=10, total_steps=400)) == 100
    assert budget.next_refit(plan(calibrated_at=98, total_steps=400)) == 200  # 100: too few steps to time
    refitted = plan(total_steps=400).refitted(100, 0.2, 240, steps_per_epoch=100)
    assert refitted.refits == ((100, 0.2, 240),) and refitted.epochs == 2.4
    assert budget.next_refit(refitted) == 120  # half of the new plan: 60 and 120 of 240, after 100
    assert budget.next_refit(plan(total_steps=400).refitted(300, 0.2, 400, 100)) is None  # none left after 75%
    assert budget.next_refit(plan(calibrated_at=10, total_steps=11)) is None


def test_refit_fits_the_rest_from_the_new_step_time_with_evaluations_slowed_alike():
    # Fitted at 0.1 s a step; at step 100 (1 epoch done), 30.1 s on the clock, the steps take 0.2 s.
    new = budget.refit(plan(), step=100, epochs_done=1, steps_per_epoch=100, max_steps=10_000, eval_every=1,
                       elapsed_s=30.1, step_s=0.2)

    def cost(total: int) -> float:  # written out: evaluation 2 x 1.0 s and checkpoint 2 x 0.1 s at each end
        ends = len(range(200, total, 100)) + 1
        return 30.1 + (total - 100) * 0.2 + ends * 2.2 + (0.03 * 60 + 2 * 0.2)

    assert cost(new.total_steps) <= 60.0 < cost(new.total_steps + 1)
    assert new.total_steps == 216  # 116 steps (23.2 s), two evaluations (4.4 s) and the margin (2.2 s): 59.9 s
    assert new.refits == ((100, 0.2, 216),) and new.epochs == 2.16 and new.time_up_at_s is None
    assert new.step_s == 0.1 and new.calibrated_at == 10  # the first fit's record stays
    # Faster steps give more, but evaluations are never assumed faster than measured.
    faster = budget.refit(plan(), 100, 1, 100, 10_000, 1, 30.1, 0.05)
    assert faster.total_steps > 300 and budget.end_cost_s(plan(), 0.05) == pytest.approx(1.1)
    assert budget.end_cost_s(plan(), 0.3) == pytest.approx(3.3)


def test_refit_with_no_time_left_ends_the_plan_now_never_before_the_steps_trained():
    ended = budget.refit(plan(), step=150, epochs_done=1, steps_per_epoch=100, max_steps=10_000, eval_every=1,
                         elapsed_s=59.0, step_s=0.2)
    assert ended.total_steps == 150 and ended.time_up_at_s == 59.0 and ended.refits == ((150, 0.2, 150),)
    from trainer.config import TrainConfig

    stop = should_stop(Progress(epoch=2, global_step=150, elapsed_s=60.5, plan=ended),
                       TrainConfig(epochs=10, patience=0, budget_s=60.0))
    assert stop.reason is Reason.BUDGET_TIME_UP and stop.ends_run
    assert stop.message == ("budget: time up at step 150: 59.0 s of train.budget_s=60 left too little for more steps "
                            "and the final evaluation; 60.5 s used")


def test_time_is_up_when_the_final_evaluation_would_not_fit_after_the_next_check():
    # budget 60: the next check at most 1.2 s later, the final evaluation and checkpoint 1.1 s.
    assert not budget.time_up(plan(), elapsed_s=57.6, end_s=1.1, ahead_s=1.2)
    assert budget.time_up(plan(), elapsed_s=57.8, end_s=1.1, ahead_s=1.2)
    assert budget.stop_check_s(5.0, 60.0) == pytest.approx(1.2) and budget.stop_check_s(5.0, 0.0) == 5.0


def test_an_overrun_is_one_warning_line():
    assert budget.overrun(75.0, 83.1) == "warning: train.budget_s=75 overrun: 83.1 s used (+11%)"
    assert budget.overrun(75.0, 75.0) is None


def test_controller_retimes_the_steps_refits_and_ends_the_plan_when_time_is_up(monkeypatch):
    """A resumed plan (fitted at 0.1 s a step) whose steps take 0.2 s, on a fake clock: the
    controller leaves SKIP_STEPS untimed, re-fits at the plan's first quarter from the steps timed
    (the time between epochs left out), and ends the plan at the first clock check past the budget."""
    clock = [0.0]
    monkeypatch.setattr(budget, "_synced_now", lambda device: clock[0])
    schedule = []
    fitted = plan(total_steps=400, epochs=4.0)
    progress = Progress(epoch=0, epoch_step=10, global_step=10, elapsed_s=1.0, plan=fitted)
    controller = budget.BudgetController(
        60.0, 100, 10_000, 1, 100, torch.device("cpu"), fitted, elapsed_s=lambda: 1.0 + clock[0],
        eval_cost_s=lambda: pytest.fail("measured again"), checkpoint_cost_s=lambda: pytest.fail("measured again"),
        set_schedule=schedule.append)
    refitted_at = []
    while not refitted_at:
        clock[0] += 0.2
        progress.global_step += 1
        if controller.after_step(progress, NullLogger()):
            refitted_at.append(progress.global_step)
        if progress.global_step == 50:  # an epoch end: 5 s between epochs, which no step takes
            assert not controller.epoch_end(progress)
            clock[0] += 5.0
            controller.restart()
    assert refitted_at == [100]
    ((at, step_s, total),) = progress.plan.refits
    assert at == 100 and step_s == pytest.approx(0.2) and schedule == [total]
    assert 1.0 + clock[0] == pytest.approx(1.0 + 90 * 0.2 + 5.0)  # the clock at the re-fit, the epoch end's 5 s in it
    expected = budget.refit(fitted, 100, 0, 100, 10_000, 1, 1.0 + clock[0], step_s)
    assert total == expected.total_steps > 200 and controller.next_refit == budget.next_refit(progress.plan)
    assert controller.end_s == pytest.approx(2.2)  # the final evaluation and checkpoint, slowed alike

    assert not controller.check_time(progress, elapsed_s=50.0)
    assert not controller.check_time(progress, elapsed_s=56.5)  # 56.5 + 1.2 (the next check) + 2.2 <= 60
    assert controller.check_time(progress, elapsed_s=56.5, ahead_s=2.0)  # the steps now take 2 s
    assert progress.plan.total_steps == 100 and progress.plan.time_up_at_s == 56.5 and schedule[-1] == 100
    assert not controller.check_time(progress, elapsed_s=59.0)  # ended already
    assert budget.overrun(60.0, 61.0) and controller.overrun(Progress(elapsed_s=61.0, plan=progress.plan))


def test_warmup_is_at_most_a_fifth_of_the_plan():
    assert budget.warmup_steps(2.0, 100, 10_000) == 200
    assert budget.warmup_steps(2.0, 100, 40) == 8


def test_plan_done_ends_the_run_and_is_checkpointed_with_the_progress():
    from trainer.config import TrainConfig

    cfg = TrainConfig(epochs=10, patience=0, budget_s=60.0)
    done = should_stop(Progress(epoch=1, global_step=300, plan=plan()), cfg, stop_after_epoch=1)
    assert done.reason is Reason.BUDGET_PLAN_DONE and done.ends_run and "300 steps (3.00 epochs)" in done.message
    assert should_stop(Progress(epoch=1, global_step=299, plan=plan()), cfg) is None
    assert should_stop(Progress(epoch=1, global_step=300), cfg) is None  # no plan yet: nothing to end

    progress = Progress(epoch=1, global_step=120, plan=plan().refitted(100, 0.2, 250, 100))
    assert Progress.from_dict(progress.to_dict()) == progress  # plain values: a weights-only checkpoint holds it
    old = progress.to_dict()
    del old["plan"]["refits"], old["plan"]["time_up_at_s"]  # a checkpoint from before re-fits
    assert Progress.from_dict(old).plan == plan(total_steps=250, epochs=2.5)
    del old["plan"]  # a checkpoint from before budgets
    assert Progress.from_dict(old).plan is None


def test_bias_lr_mult_gives_biases_the_multiplied_lr(beton_dir, tmp_path):
    from trainer.config import load_config
    from trainer.distributed import Dist
    from trainer.training.trainer import Trainer

    cfg = load_config(SMALL, [f"data.dir={beton_dir}", *BASE, "data.train_subset=1000", "data.batch_size=100",
                             "optim.bias_lr_mult=64"])
    t = Trainer(cfg, tmp_path / "run", Dist.single())
    names = {id(p): n for n, p in t.model.named_parameters()}
    weights, scales, biases = t.optimizer.param_groups
    assert all(names[id(p)].endswith(".bias") for p in biases["params"]) and biases["params"]
    assert all(not names[id(p)].endswith(".bias") and p.ndim == 1 for p in scales["params"]) and scales["params"]
    assert biases["weight_decay"] == 0.0 and weights["weight_decay"] == cfg.optim.weight_decay
    for _ in range(3):
        t.optimizer.step()
        t.scheduler.step()
        assert weights["lr"] > 0 and scales["lr"] == weights["lr"]
        assert biases["lr"] == pytest.approx(64 * weights["lr"])
    t.schedule.apply_config_lr()  # as after a resume: the multiplier is the config's, per group
    assert biases["lr"] == pytest.approx(64 * weights["lr"])


# ---- runs ------------------------------------------------------------------------------------------


def pause_once_the_plan_is_fitted(monkeypatch) -> None:
    """The deterministic stop hook for a budget: the trainer sends itself SIGUSR2 right after the
    step whose calibration fitted the plan, whatever the machine's speed."""
    from trainer.training.trainer import Trainer

    calibrate = Trainer._calibrate

    def calibrate_then_signal(self, *args, **kwargs):
        fitted_before = self.progress.plan is not None
        calibrate(self, *args, **kwargs)
        if not fitted_before and self.progress.plan is not None:
            os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(Trainer, "_calibrate", calibrate_then_signal)


@pytest.mark.slow
def test_budget_run_fits_its_plan_keeps_it_across_a_resume_and_ends_within_budget(beton_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    budget_s = 15.0
    # train.epochs is far more than the budget allows: the plan ends the run.
    args = budget_run(beton_dir, "data.train_subset=200", "data.batch_size=20", "train.epochs=500",
                      f"train.budget_s={budget_s}", "train.stop_check_s=0.2")
    # Paused by a signal as soon as the plan is fitted.
    pause_once_the_plan_is_fitted(monkeypatch)
    paused = trainer(*args, "--run-dir", str(run_dir))
    monkeypatch.undo()
    assert paused.returncode == 0 and paused.stdout.count("budget plan: ") == 1, paused.stderr
    assert "stopped by signal SIGUSR2" in paused.stdout
    saved = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["plan"]
    assert not (run_dir / "summary.json").exists() and saved["total_steps"] > saved["calibrated_at"]

    # The run's own config.yaml, with another budget: the checkpoint's plan is kept, and config.yaml
    # goes on saying the budget the run follows (#22: it was rewritten with the command's).
    resumed = trainer("--run-dir", str(run_dir), "train.budget_s=60")
    assert resumed.returncode == 0, resumed.stderr
    assert "budget plan: " not in resumed.stdout  # not measured again
    assert "following the checkpoint's plan for train.budget_s=15, not 60" in resumed.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["budget_s"] == budget_s
    assert "budget plan done" in resumed.stdout or "budget: time up" in resumed.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    plan = summary["budget"]
    # Paused right after the fit, before any re-fit: the resumed process re-fits (if at all) from steps
    # it timed itself, the first SKIP_STEPS after its start left out.
    assert saved["refits"] == () and plan["calibrated_at_step"] == saved["calibrated_at"]
    first_timed = saved["calibrated_at"] + budget.SKIP_STEPS + budget.MIN_WINDOW
    assert all(refit["at_step"] >= first_timed for refit in plan["refits"])
    if not plan["refits"] and plan["time_up_at_s"] is None:
        assert plan["fitted_steps"] == saved["total_steps"]
    assert plan["budget_s"] == budget_s and plan["fitted_steps"] > plan["calibrated_at_step"]
    assert plan["fitted_epochs"] == pytest.approx(plan["fitted_steps"] / 10)  # 200 images in batches of 20
    assert plan["images_per_s"] == pytest.approx(20 / plan["step_s"])
    rows = metrics(run_dir)
    assert sum(m["steps"] for m in rows) == plan["fitted_steps"]
    assert rows[-1]["lr"] == 0.0  # the schedule ends where the plan does
    # The budget counts the run's own clock (training, evaluation, checkpoints): it ends inside it and
    # uses most of it, if the machine kept the speed the plan was fitted at. A shared machine (a CI
    # runner, other tests) can slow or speed the steps after the fit, which no plan foresees: the
    # timing claim is checked only when the epochs after the first (which holds the calibration's
    # timed evaluation) trained at 0.8-1.25x the fitted speed, all together.
    assert summary["wall_time_s"] == plan["used_s"] and plan["within_budget"] == (plan["used_s"] <= budget_s)
    later = rows[1:]
    assert len(later) >= 2  # a 15-s plan of 10-step epochs has many
    images = sum(m["steps"] * 20 for m in later)
    speed = images / sum(m["steps"] * 20 / m["images_per_s"] for m in later) / plan["images_per_s"]
    if 0.8 < speed < 1.25:
        assert 0.4 * budget_s < summary["wall_time_s"] < budget_s + 5.0, speed


@pytest.mark.slow
def test_budget_shorter_than_an_epoch_ends_mid_epoch_with_that_partial_epoch_evaluated(beton_dir, tmp_path):
    run_dir = tmp_path / "run"
    # 500 steps an epoch of 10 images: several seconds, more than the budget.
    r = trainer(*budget_run(beton_dir, "data.train_subset=5000", "data.batch_size=10", "train.epochs=3",
                            "train.budget_s=4"), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    (row,) = metrics(run_dir)
    assert 0 < row["steps"] == summary["budget"]["fitted_steps"] < 500
    assert row["epoch"] == 1 and row["test_acc"] == summary["test_acc"] and summary["epochs_run"] == 1
    assert f"(partial: {row['steps']} of 500 steps)" in r.stdout
    assert "budget plan done" in r.stdout or "budget: time up" in r.stdout  # time up: a loaded machine slowed it
    last = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert (last["epoch"], last["epoch_step"], last["global_step"]) == (1, 0, row["steps"])


@pytest.mark.slow
def test_budget_run_with_eval_every_0_evaluates_only_the_plans_end(beton_dir, tmp_path):
    run_dir = tmp_path / "run"
    # 3 steps an epoch: several epochs even where a loaded machine makes the steps slow.
    r = trainer(*budget_run(beton_dir, "data.train_subset=60", "data.batch_size=20", "train.epochs=500",
                            "train.budget_s=10", "train.eval_every=0"), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    # Either end evaluates once: the plan's, or a time-up's where a loaded machine slowed the steps.
    assert "budget plan done" in r.stdout or "budget: time up" in r.stdout, r.stdout
    rows = metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(rows) >= 2 and sum(m["steps"] for m in rows) == summary["budget"]["fitted_steps"], r.stdout
    assert [("test_acc" in m) for m in rows] == [False] * (len(rows) - 1) + [True]
    assert summary["test_acc"] == rows[-1]["test_acc"] and summary["best_epoch"] == len(rows)


def slow_steps_after_the_fit(monkeypatch, times: float, after_the_last_refit: float = 0.0) -> None:
    """The deterministic slow-down hook: once the plan is fitted, every step sleeps `times` the
    fitted step time (as if other work came to share the machine right after the fit), and
    `after_the_last_refit` times more once the plan has no re-fit left to make up for it."""
    from trainer.training.trainer import Trainer

    train_step = Trainer._train_step

    def slowed_step(self, *args, **kwargs):
        train_step(self, *args, **kwargs)
        plan = self.progress.plan
        if plan is not None:
            late = bool(plan.refits) and self.budget.next_refit is None
            time.sleep((times + (after_the_last_refit if late else 0.0)) * plan.step_s)

    monkeypatch.setattr(Trainer, "_train_step", slowed_step)


def slowed_budget_run(beton_dir: Path, run_dir: Path, budget_s: float) -> tuple[str, dict, list[dict]]:
    """A run of 10-step epochs far longer than `budget_s` but for its budget: its stdout, summary and
    metrics. One thread: a busy 2-core machine slows a run with two tenfold."""
    r = trainer(*budget_run(beton_dir, "data.train_subset=200", "data.batch_size=20", "train.epochs=500",
                            "train.threads=1", f"train.budget_s={budget_s}"), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    return r.stdout, json.loads((run_dir / "summary.json").read_text()), metrics(run_dir)


@pytest.mark.slow  # a 12-s budget, and the start-up
def test_budget_holds_when_the_steps_slow_down_after_the_fit(beton_dir, tmp_path, monkeypatch):
    """Every step 2.2x slower from the fit on: the re-fits see it and shorten the plan, which ends
    inside the budget (10% allowed; the clock leaves out the start-up), its schedule decayed to its
    end. A plan fitted once and trusted took about twice its budget here."""
    budget_s = 12.0
    slow_steps_after_the_fit(monkeypatch, 1.2)
    stdout, summary, rows = slowed_budget_run(beton_dir, tmp_path / "run", budget_s)
    plan = summary["budget"]
    assert summary["wall_time_s"] <= 1.1 * budget_s, stdout
    assert plan["refits"] and stdout.count("budget re-fit at step ") == len(plan["refits"]), stdout
    # Each re-fit timed the slowed steps: every one of them sleeps 1.2 fitted steps.
    assert all(refit["step_s"] > 1.2 * plan["step_s"] for refit in plan["refits"])
    assert plan["fitted_steps"] == sum(m["steps"] for m in rows) and rows[-1]["lr"] == 0.0
    assert plan["within_budget"] == (summary["wall_time_s"] <= budget_s)
    assert ("warning: train.budget_s=12 overrun" in stdout) == (not plan["within_budget"])


@pytest.mark.slow  # a 12-s budget, and the start-up
def test_budget_past_its_time_ends_the_schedule_at_once(beton_dir, tmp_path, monkeypatch):
    """Slowed again, 10x, after the plan's last re-fit: no re-fit is left to shorten it, and a clock
    check ends the plan where the budget has just room for the final evaluation."""
    budget_s = 12.0
    slow_steps_after_the_fit(monkeypatch, 1.2, after_the_last_refit=8.0)
    stdout, summary, rows = slowed_budget_run(beton_dir, tmp_path / "run", budget_s)
    plan = summary["budget"]
    assert "budget: time up at step " in stdout and plan["time_up_at_s"] is not None, stdout
    assert len(plan["refits"]) >= 1 and plan["fitted_steps"] > plan["refits"][-1]["at_step"]
    assert summary["wall_time_s"] <= 1.1 * budget_s, stdout
    assert plan["fitted_steps"] == sum(m["steps"] for m in rows) and rows[-1]["lr"] == 0.0
    assert "test_acc" in rows[-1] and summary["test_acc"] == rows[-1]["test_acc"]  # the final evaluation
