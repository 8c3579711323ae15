"""A run folder survives whatever is done to it (issue #12): a command that fails changes nothing in
it, two trainers never share it, a torn metrics line or unreadable checkpoints never cost the run,
--restart keeps the old folder, and torch's unsafe-load advice never reaches a message.

One trainer run makes the good folder every test copies; every command runs in this process
(helpers.run_main) but the first trainer of the lock test, which must be another live process and
then die holding the lock.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL_RUN
from helpers import SMALL, error_lines, run_main

WEIGHTS_ONLY = "not a weights-only checkpoint (refused: it would run code)"
TORN = '{"epoch": 3, "train_loss": 1.2, "train_a'  # an append cut short by a crash or a full disk


class RunsCode:
    """A pickle that calls a function when loaded: what a hostile checkpoint holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def overrides(beton_dir: Path, *extra: str) -> list[str]:
    return [f"data.dir={beton_dir}", *SMALL_RUN, *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes, but the lock file (it names its latest holder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def good_run(beton_dir, tmp_path_factory) -> Path:
    """A run paused after epoch 2 of 3: config.yaml, metrics of epochs 1-2, last.pt (epoch 2),
    prev.pt (epoch 1), best.pt. Copy it (copy_run) before changing anything."""
    run_dir = tmp_path_factory.mktemp("good") / "run"
    r = run_main("trainer", "--config", str(SMALL), *overrides(beton_dir), "--run-dir", str(run_dir),
                 "--stop-after-epoch", "2")
    assert r.returncode == 0, r.stderr
    return run_dir


@pytest.fixture
def run_dir(good_run, tmp_path) -> Path:
    """A private copy of the good run folder."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def write_code_pickle(path: Path, marker: Path) -> None:
    torch.save({"arch": "resnet9_tiny", "model": RunsCode(marker)}, path)


# ---- 1. a failed command changes nothing ------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ("data.dir=/nonexistent/cifar", "/nonexistent/cifar/train.beton: not found"),
    ("data.batch_size=100000", "exceeds the 3000 training images"),
    ("model.arch=resnet9", "holds a 'resnet9_tiny' run, not 'resnet9'"),  # another architecture's config
    ("model.activation=gelu", "began with model.activation='relu'"),  # would load: GELU has no weights
    ("optim.bias_lr_mult=2", "began with optim.bias_lr_mult=1.0 (now 2.0)"),  # another set of parameter groups
    # #22: what the run trains on, its recipe and its seed stay as the run began (config.yaml says so)
    ("optim.lr=0.5", "began with optim.lr="),
    ("train.seed=7", "began with train.seed=0 (now 7); a resumed run trains as it began"),
    ("data.cutout=4", "began with data.cutout=0 (now 4)"),
])
def test_a_failed_command_changes_nothing_in_the_run_folder(run_dir, beton_dir, bad, message):
    from trainer import UserError
    from trainer.training.run import train

    (run_dir / "checkpoints/.last.pt.abc123.tmp").write_bytes(b"half a save")  # not even this goes
    before = snapshot(run_dir)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(SMALL, overrides(beton_dir, bad), run_dir)
    assert snapshot(run_dir) == before


def test_a_failed_command_leaves_no_new_folder_behind(beton_dir, tmp_path):
    from trainer import UserError
    from trainer.training.run import train

    with pytest.raises(UserError, match="exceeds"):
        train(SMALL, overrides(beton_dir, "data.batch_size=100000"), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


# ---- 2. one trainer per run folder ---------------------------------------------------------------


def test_the_lock_refuses_a_second_holder_naming_the_first(run_dir, beton_dir):
    from trainer import UserError
    from trainer.training.run import train
    from trainer.training.run_folder import claim_run_dir

    claim = claim_run_dir(run_dir)  # as a trainer running in this process holds it
    try:
        before = snapshot(run_dir)
        with pytest.raises(UserError) as e:
            train(None, [], run_dir)
        assert str(e.value).startswith(f"{run_dir}: in use by another trainer (PID {os.getpid()} on host "
                                       f"{socket.gethostname()}, since ")
        assert snapshot(run_dir) == before
    finally:
        claim.release()
    claim_run_dir(run_dir).release()  # free again


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_the_lock_dies_with_its_holder(run_dir, tmp_path):
    from trainer import run_files

    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([sys.executable, "-m", "trainer", "--run-dir", str(run_dir), "train.epochs=50"],
                                 cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        # The lock file names its holder once the lock is taken (the copy names the process that
        # trained the folder): no need to wait for an epoch.
        lock = run_dir / run_files.LOCK
        while not (lock.exists() and f"PID {first.pid} " in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        second = run_main("trainer", "--run-dir", str(run_dir), "--stop-after-epoch", "4")
        assert second.returncode == 1, second.stderr
        (line,) = error_lines(second.stderr)
        assert line.startswith(f"error: {run_dir}: in use by another trainer (PID {first.pid} on host "
                               f"{socket.gethostname()}"), line
    finally:
        first.send_signal(signal.SIGKILL)  # gone without a word, as after a node failure or an OOM kill
        first.wait(timeout=60)
    from trainer.training.run_folder import claim_run_dir

    claim_run_dir(run_dir).release()  # so a requeued job's next incarnation gets the lock


# ---- 3. a torn metrics line ----------------------------------------------------------------------


def test_resume_drops_a_torn_metrics_line_with_a_warning(run_dir, capsys):
    from trainer.config import load_config
    from trainer.logger import RunLogger
    from trainer.run_files import read_metrics

    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + TORN)
    RunLogger(run_dir, load_config(SMALL, ["logging.mode=disabled"]), None, resume_epoch=2)
    warning = capsys.readouterr().err
    assert f"warning: {metrics}: line 3 is not JSON" in warning and len(error_lines(warning)) == 1
    assert [r["epoch"] for r in read_metrics(metrics)] == [1, 2]  # strict reading works again
    assert metrics.read_text().endswith("}\n")  # the next epoch's line starts a line of its own


def test_read_metrics_tolerant_mode_keeps_every_readable_line(run_dir):
    from trainer.run_files import read_metrics

    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(f"{lines[0]}\n{TORN}{lines[1]}\n[1, 2]\n")  # a torn line glued to the next, a non-object
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(metrics)
    skipped: list[str] = []
    assert [r["epoch"] for r in read_metrics(metrics, skipped)] == [1]
    assert len(skipped) == 2 and "line 2 is not JSON" in skipped[0] and "line 3 is not a JSON object" in skipped[1]


def test_the_report_keeps_every_readable_epoch_of_a_torn_history(run_dir):
    from trainer.report.runs import read_run

    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + TORN)
    run = read_run("tiny", run_dir)
    assert [m["epoch"] for m in run.metrics] == [1, 2]
    assert run.status == "unfinished" and run.detail == "unfinished: epoch 2 of 3"
    assert f"{metrics}: line 3 is not JSON" in run.problem and "\n" not in run.problem


def test_resume_removes_the_temporary_files_of_killed_saves(run_dir, capsys):
    from trainer.training.run import train
    from trainer.training.stopping import Stopped

    stale = [run_dir / "checkpoints/.last.pt.k1ll3d.tmp", run_dir / "checkpoints/.best.pt.k1ll3d.tmp",
             run_dir / ".metrics.jsonl.k1ll3d.tmp"]
    for path in stale:
        path.write_bytes(b"half a save")
    unrelated = run_dir / "checkpoints/.notes.tmp"  # not a temporary file of the run's own: kept
    unrelated.write_bytes(b"mine")
    before = snapshot(run_dir)
    with pytest.raises(Stopped):
        train(None, [], run_dir, stop_after_epoch=2)  # resumes after epoch 2 and stops at once
    assert not any(p.exists() for p in stale)
    assert snapshot(run_dir) == {k: v for k, v in before.items() if run_dir / k not in stale}
    assert "removed 3 temporary file(s) of saves killed mid-write" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_a_crash_mid_write_finishes_the_run(run_dir, tmp_path):
    """Killed while writing: metrics.jsonl ends in a torn line, a save left its temporary file, and
    last.pt was replaced by a file that runs code. The run resumes from prev.pt and finishes."""
    from trainer.run_files import read_metrics

    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + TORN)
    stale = run_dir / "checkpoints/.last.pt.x1y2z3.tmp"
    stale.write_bytes(b"half a save")
    marker = tmp_path / "code-ran"
    write_code_pickle(run_dir / "checkpoints/last.pt", marker)
    r = run_main("trainer", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "from epoch 2, step 0" in r.stdout  # prev.pt: the state after epoch 1
    warnings = error_lines(r.stderr)
    assert any(f"last.pt is unreadable ({WEIGHTS_ONLY})" in w for w in warnings), r.stderr
    assert any("line 3 is not JSON" in w for w in warnings), r.stderr
    assert not any("Weights only load failed" in w or "weights_only" in w for w in warnings), r.stderr
    assert not marker.exists() and not stale.exists()
    assert [m["epoch"] for m in read_metrics(metrics)] == [1, 2, 3]
    assert (run_dir / "summary.json").exists()


# ---- 4. unreadable checkpoints, and --restart ---------------------------------------------------


def spoil_checkpoints(run_dir: Path, tmp_path: Path) -> None:
    last = run_dir / "checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short
    write_code_pickle(run_dir / "checkpoints/prev.pt", tmp_path / "code-ran")


def test_unreadable_checkpoints_stop_with_one_line_instead_of_starting_over(run_dir, tmp_path):
    from trainer import UserError
    from trainer.training.run import train

    spoil_checkpoints(run_dir, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(UserError) as e:
        train(None, [], run_dir)
    message = str(e.value)
    assert message.startswith(f"{run_dir / 'checkpoints'}: no readable checkpoint to resume from (last.pt: ")
    assert f"prev.pt: {WEIGHTS_ONLY}" in message and "add --restart" in message and "\n" not in message
    assert snapshot(run_dir) == before and not (tmp_path / "code-ran").exists()


def test_a_history_without_checkpoints_is_not_overwritten(run_dir):
    from trainer import UserError
    from trainer.training.run import train

    shutil.rmtree(run_dir / "checkpoints")
    before = snapshot(run_dir)
    with pytest.raises(UserError, match="holds metrics.jsonl but no checkpoint to resume from; .* add --restart"):
        train(None, [], run_dir)
    assert snapshot(run_dir) == before


def test_restart_keeps_the_old_folder_and_starts_afresh(run_dir, tmp_path, capsys):
    from trainer.run_files import read_metrics
    from trainer.training.run import train
    from trainer.training.stopping import Stopped

    spoil_checkpoints(run_dir, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(Stopped):
        train(None, [], run_dir, stop_after_epoch=1, restart=True)  # its own config.yaml, from the old folder
    (old,) = tmp_path.glob("run.replaced-*")
    assert snapshot(old) == before  # renamed, every byte kept
    out = capsys.readouterr().out
    assert f"starting over: the previous run is kept in {old}" in out and "training resnet9_tiny" in out
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert (run_dir / "config.yaml").read_bytes() == before["config.yaml"]


def test_a_failed_restart_puts_the_old_folder_back(run_dir, tmp_path):
    spoil_checkpoints(run_dir, tmp_path)
    before = snapshot(run_dir)
    r = run_main("trainer", "--run-dir", str(run_dir), "--restart", "data.dir=/nonexistent/cifar")
    assert r.returncode == 1
    (line,) = error_lines(r.stderr)
    assert line.startswith("error: /nonexistent/cifar/train.beton: not found"), r.stderr
    assert snapshot(run_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_restart_needs_a_run_dir():
    from trainer import UserError
    from trainer.training.run import train

    with pytest.raises(UserError, match="--restart needs --run-dir"):
        train(SMALL, [], None, restart=True)


# ---- torch's unsafe-load advice stays out of messages ---------------------------------------------


def test_a_checkpoint_that_runs_code_is_refused_in_one_line(run_dir, tmp_path, capsys):
    from trainer.training import checkpoint

    marker = tmp_path / "code-ran"
    write_code_pickle(run_dir / "checkpoints/last.pt", marker)
    state = checkpoint.load_latest(run_dir / "checkpoints")
    assert state is not None and state["epoch"] == 1  # prev.pt
    (warning,) = error_lines(capsys.readouterr().err)
    last = run_dir / "checkpoints/last.pt"
    assert warning == f"warning: {last} is unreadable ({WEIGHTS_ONLY}); resuming from prev.pt"
    assert not marker.exists()


def test_the_report_refuses_a_best_checkpoint_that_runs_code_in_one_line(run_dir, tmp_path):
    from trainer import UserError
    from trainer.report.runs import load_best, read_run

    best = run_dir / "checkpoints/best.pt"
    write_code_pickle(best, tmp_path / "code-ran")
    with pytest.raises(UserError) as e:
        load_best(read_run("tiny", run_dir), torch.device("cpu"))
    assert str(e.value) == f"{best}: unusable ({WEIGHTS_ONLY})"
    assert not (tmp_path / "code-ran").exists()


def test_a_raw_pickle_is_refused_in_one_line_without_torchs_protocol_warning(run_dir, tmp_path, capsys):
    # #22: a pickle.dump()ed file (not torch.save's zip) drew torch's pickle-protocol warning: 3 lines.
    import pickle
    import warnings

    from trainer.training import checkpoint

    marker = tmp_path / "code-ran"
    last = run_dir / "checkpoints/last.pt"
    last.write_bytes(pickle.dumps({"arch": "resnet9_tiny", "model": RunsCode(marker)}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:  # as a command shows them, on its stderr
        warnings.simplefilter("always")
        state = checkpoint.load_latest(run_dir / "checkpoints")
    assert state is not None and state["epoch"] == 1  # prev.pt
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    (warning,) = error_lines(err)
    assert warning.startswith(f"warning: {last} is unreadable (not a weights-only checkpoint")
    assert not marker.exists()
