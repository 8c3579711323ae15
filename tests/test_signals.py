"""A stop signal (SIGTERM, SIGUSR2) is honoured within seconds, whatever the logging interval: the
ranks agree on it at an interval measured in seconds (train.stop_check_s), not in logging steps.

One test sends a real SIGUSR2 to a real trainer process from outside; the others use the
deterministic stop hook (conftest.signal_at_step), which lands the signal at a known step."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SIGNALLED_STEP, SMALL_RUN
from helpers import SMALL
from trainer.config import TrainConfig
from trainer.training.stopping import StopCheck

# On the CPU, where an epoch takes a minute (on a GPU it could end before the first check), and
# with the trainer's lines arriving as it prints them.
CPU_UNBUFFERED = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def run_steps(check: StopCheck, steps: int, step_s: float) -> None:
    for _ in range(steps):
        time.sleep(step_s)  # a step of at least step_s
        if check.due():
            assert check.agree(None) is None
            # Steps of at least step_s each: `every` of them never add up to more than the bound.
            assert check.every * step_s <= check.bound_s + 1e-9


def test_stop_check_interval_stays_within_the_bound_in_seconds():
    run_steps(StopCheck(0.05, torch.device("cpu")), 100, 0.005)


def test_stop_check_interval_grows_to_many_steps_when_steps_are_short():
    check = StopCheck(1.0, torch.device("cpu"))
    run_steps(check, 300, 0.002)
    assert check.every >= 16  # unless a 2 ms step took over 60 ms: no sync every step


def test_stop_check_keeps_coming_inside_epochs_shorter_than_its_interval():
    """Epochs of 5 steps, as the trainer runs them (a clock restart at each epoch start, no check
    after an epoch's last step): quick steps stretch the interval past an epoch, then steps 20x
    slower must bring it back within the bound. Counted from each epoch's start, an interval of 5
    steps or more never came due again, and a budget's clock went unchecked to the epoch's end."""
    check, checks = StopCheck(0.1, torch.device("cpu")), 0

    def epochs(count: int, step_s: float) -> None:
        nonlocal checks
        for _ in range(count):
            check.restart()
            for i in range(5):
                time.sleep(step_s)
                if i + 1 < 5 and check.due():
                    check.agree(None)
                    checks += 1

    epochs(12, 0.002)  # the interval doubles at each check up to about 50 steps: 32 here, or 5 or more on a busy machine
    assert check.every >= 5 and checks >= 5
    epochs(8, 0.04)  # its next check comes within 32 steps, 8 epochs of 4 counted steps
    assert check.every * 0.04 <= check.bound_s


def test_stop_check_reports_the_signal():
    check = StopCheck(TrainConfig().stop_check_s, torch.device("cpu"))
    assert check.due()  # the first check comes after one step
    assert check.agree(signal.SIGUSR2) == signal.SIGUSR2


def _start(beton_dir: Path, run_dir: Path) -> subprocess.Popen:
    # 5,000 images in batches of 8: an epoch of 625 steps, tens of seconds on a CPU, and no logging
    # step in it, so a stop that waited for one would wait for the epoch's end.
    args = ["--config", str(SMALL), f"data.dir={beton_dir}", *SMALL_RUN, "data.train_subset=0", "data.batch_size=8",
            "train.epochs=1", "logging.log_every=100000", "--run-dir", str(run_dir)]
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CPU_UNBUFFERED)


def _wait_for_training(proc: subprocess.Popen) -> None:
    """Returns once the trainer says it is training (its signal handlers are then installed)."""
    for line in proc.stdout:
        if line.startswith("training "):
            time.sleep(2)  # into the epoch
            return
    pytest.fail(f"the trainer ended before training: {proc.communicate()[1][-3000:]}")


def test_sigusr2_stops_within_seconds_with_a_long_logging_interval(beton_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(beton_dir, run_dir)
    try:
        _wait_for_training(proc)
        proc.send_signal(signal.SIGUSR2)
        signalled = time.monotonic()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("still training 60 s after SIGUSR2")
    finally:
        proc.kill()
    took = time.monotonic() - signalled
    assert proc.returncode == 0, err
    assert "stopped by signal SIGUSR2 in epoch 1" in out
    # The bound (5 s) plus a step and the checkpoint; generous, for a loaded machine: the epoch
    # itself takes a minute or more.
    assert took < 20, f"{took:.1f} s from the signal to the exit"
    stopped = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert stopped["epoch"] == 0 and 0 < stopped["epoch_step"] < 625


@pytest.mark.slow
def test_two_ranks_agree_on_the_step_when_only_one_is_signalled(two_rank_run):
    # conftest.two_rank_run: SIGUSR2 to rank 1 only, right after global step SIGNALLED_STEP, with no
    # logging step in the epoch. Rank 0 must learn of it at the next check and both stop after the
    # same step: a rank that trained on would wait in its next collective for one that had left.
    assert two_rank_run.paused.returncode == 0
    epoch, step = divmod(SIGNALLED_STEP, 20)  # 2,000 images / 100 a step (50 a rank)
    assert f"stopped by signal SIGUSR2 in epoch {epoch + 1} at step {step}" in two_rank_run.paused.stdout
    stopped = two_rank_run.paused_state
    assert (stopped["epoch"], stopped["epoch_step"], stopped["global_step"]) == (epoch, step, SIGNALLED_STEP)


def test_ctrl_c_stops_with_a_checkpoint_like_sigterm_and_a_second_one_interrupts(beton_dir, tmp_path, monkeypatch):
    # #22: Ctrl-C mid-epoch used to end the run with no checkpoint (KeyboardInterrupt); SIGTERM saved one.
    from conftest import EVERY_STEP, signal_at_step, small_run_args
    from helpers import run_main
    from trainer.training.stopping import StopSignal

    run_dir = tmp_path / "run"
    signal_at_step(monkeypatch, 7, signal.SIGINT)
    r = run_main("trainer", *small_run_args(beton_dir, "train.epochs=1"), EVERY_STEP, "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "stopped by signal SIGINT in epoch 1 at step 7; checkpoint saved" in r.stdout
    saved = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert (saved["epoch"], saved["epoch_step"], saved["global_step"]) == (0, 7, 7)
    assert not (run_dir / "summary.json").exists()

    # Pressed twice, it interrupts at once (cli.run then prints "interrupted" and exits 130).
    stop = StopSignal()
    with stop.catching():
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_sigterm_while_starting_is_one_line_and_leaves_no_folder_behind(beton_dir, tmp_path):
    # #22: a SIGTERM in the run's first seconds (loading data, building the network) killed the process
    # and left a new run folder holding only its .lock. The signal lands deterministically: the Trainer's
    # constructor sends it. A real process, since SIGTERM's default action would end a test process.
    from conftest import small_run_args

    run_dir = tmp_path / "run"
    probe = ("import os, signal, sys\n"
             "from trainer.training import trainer\n"
             "build = trainer.Trainer.__init__\n"
             "def signalled(self, *a, **k):\n"
             "    os.kill(os.getpid(), signal.SIGTERM)\n"
             "    build(self, *a, **k)\n"
             "trainer.Trainer.__init__ = signalled\n"
             "from trainer.training.run import main\n"
             "main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", probe, *small_run_args(beton_dir), "--run-dir", str(run_dir)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=CPU_UNBUFFERED)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip() == "error: stopped by SIGTERM while starting, before training began; run the command again"
    assert not run_dir.exists()
