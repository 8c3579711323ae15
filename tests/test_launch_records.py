"""What the launcher reads and writes besides the jobs: sweep.json (one reader and writer, which the
report shares without pulling in submitit), the run folders --force moves aside, each architecture's
recipe config, and the metrics --status shows."""

import json
import os
import subprocess
import sys

import pytest
from torch import nn

from conftest import REPO


def test_sweep_json_round_trip_and_the_record_from_before_seeds(tmp_path):
    from trainer import sweep_file
    from trainer.sweep_file import Job, SweepRecord

    runs = [Job("resnet-lr0.1-s0", "resnet", "lr0.1", 0, ("optim.lr=0.1", "train.seed=0")), Job("vgg_bn", "vgg_bn")]
    record = SweepRecord("s", runs, ["resnet", "vgg_bn"], "local", "smoke", ["logging.group=s"], {"nodes": 1},
                         {"vgg_bn": {"job_id": "7", "submitted": "now"}}, "abc")
    sweep_file.write(tmp_path, record)
    assert sweep_file.read(tmp_path) == record
    assert list(json.loads((tmp_path / "sweep.json").read_text())) == [
        "sweep", "executor", "profile", "archs", "runs", "overrides", "cluster", "jobs", "git_sha"]

    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": "old", "archs": ["alexnet", "resnet"]}))
    old = sweep_file.read(tmp_path)
    assert old.runs == [Job("alexnet", "alexnet"), Job("resnet", "resnet")] and old.jobs == {} and old.executor is None


@pytest.mark.parametrize("cluster, expected", [({"poll_s": 0.25}, 0.25), ({}, 5.0)])
def test_a_watching_launcher_looks_as_often_as_the_sweeps_cluster_says(cluster, expected, tmp_path, monkeypatch):
    # slurm/local.yaml's poll_s: 1 for the dev cluster; a sweep.json from before the key: 5 s, as always.
    from trainer import sweep_file
    from trainer.launch import status
    from trainer.sweep_file import SweepRecord

    sweep_file.write(tmp_path, SweepRecord("s", [], [], "local", "smoke", [], cluster, {}, "abc"))
    slept = []

    class Looked(Exception):
        pass

    def sleep(seconds):
        slept.append(seconds)
        raise Looked  # one look is enough

    monkeypatch.setattr(status.time, "sleep", sleep)
    with pytest.raises(Looked):
        status.wait(tmp_path, step=lambda: True)  # a job still running
    assert slept == [expected]


@pytest.mark.parametrize("text", ["{", "[]", '{"archs": ["resnet"]}', '{"sweep": "s", "runs": [{"name": "x"}]}'])
def test_an_unreadable_sweep_json_is_one_line_naming_it(tmp_path, text):
    from trainer import UserError, sweep_file

    (tmp_path / "sweep.json").write_text(text)
    with pytest.raises(UserError) as error:
        sweep_file.read(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'sweep.json'}: unreadable sweep record (")
    assert "\n" not in str(error.value)


def test_the_report_reads_a_sweep_without_submitit(tmp_path):
    code = ("import sys; from trainer.report.runs import find_runs; import trainer.sweep_file; "
            "assert 'submitit' not in sys.modules, 'submitit imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_launcher_mistakes_are_told_before_the_heavy_imports(tmp_path):
    """A mistaken profile, cluster key, override or architecture, and a launch without SLURM or
    --local, are each one line before torch, ffcv, submitit or wandb are imported (issue #21: one
    line within ~2 s). One fresh process for all five: this one has them all imported."""
    bin_dir = tmp_path / "bin"  # a PATH without sbatch
    bin_dir.mkdir()
    code = f"""
import sys
from trainer.launch import main
for argv in (["--all"], ["--all", "--profile", "nosuch"], ["--all", "-C", "partitionn=gpu"], ["--all", "optim.lr=fast"],
             ["--arch", "resnet,lenet"]):
    try:
        main(["--sweep", "s", "--runs", {str(tmp_path / "runs")!r}, *argv])
    except SystemExit as e:
        print("exit", e.code)
print("heavy:", sorted(m for m in ("torch", "ffcv", "submitit", "wandb") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": str(bin_dir)})
    assert r.stdout.splitlines() == ["exit 1"] * 5 + ["heavy: []"], r.stdout + r.stderr[-3000:]
    errors = r.stderr.splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors), r.stderr[-3000:]
    assert [fragment in line for fragment, line in zip(
        ["no SLURM here", "unknown profile 'nosuch'", "unknown key 'partitionn'", "optim.lr: expected a number",
         "lenet"], errors)] == [True] * 5, errors
    assert not (tmp_path / "runs").exists()


def test_a_folder_replaced_twice_within_a_second_keeps_both_copies(tmp_path):
    """The launcher's --force once named the copy by the second alone: a second --force within that
    second failed to rename onto the first copy."""
    from trainer import run_files

    run_dir = tmp_path / "resnet"
    assert run_files.move_aside(run_dir) is None  # nothing there: nothing to keep
    for _ in range(3):  # the two moves must fall within one clock second; a tick between them retries
        kept = []
        for n in range(2):
            run_dir.mkdir()
            (run_dir / "summary.json").write_text(str(n))
            kept.append(run_files.move_aside(run_dir))
        if kept[1].name.startswith(kept[0].name):
            break
    first, second = kept
    assert first.name.startswith(f"resnet{run_files.REPLACED}") and second.name == f"{first.name}-2"
    assert (first / "summary.json").read_text() == "0" and (second / "summary.json").read_text() == "1"
    assert not run_dir.exists()


def test_every_architecture_trains_with_its_own_recipe():
    from trainer import models
    from trainer.config import load_config
    from trainer.launch import CONFIGS, config_path

    for arch in models.names():
        path = config_path(arch)
        assert path.parent == CONFIGS and path.is_file(), arch
        assert load_config(path, [f"model.arch={arch}"]).model.arch == arch
    assert config_path("resnet9_tiny").name == "tiny.yaml" and config_path("airbench94").name == "airbench94.yaml"


def test_an_architecture_without_a_recipe_is_refused_by_name():
    """It once trained with tiny.yaml's recipe, silently."""
    from trainer import UserError
    from trainer.launch.plan import recipe_path
    from trainer.models import Registry

    registry = Registry()
    spec = registry.register("linear", lambda num_classes=10: nn.Linear(4, num_classes), seed_row=None, params_target=0.0)
    with pytest.raises(UserError, match="^architecture 'linear' names no recipe config"):
        recipe_path(spec)
    spec = registry.register("gone", lambda num_classes=10: nn.Linear(4, num_classes), seed_row=None, params_target=0.0,
                             recipe="gone.yaml")
    with pytest.raises(UserError, match="^architecture 'gone': its recipe config .*gone.yaml does not exist"):
        recipe_path(spec)


def test_status_shows_the_best_of_the_evaluated_epochs(tmp_path):
    """With train.eval_every, epochs without a test accuracy once stopped --status with a KeyError."""
    from trainer.launch.status import _progress

    lines = [{"epoch": 1, "elapsed_s": 1.0}, {"epoch": 2, "elapsed_s": 2.0, "test_acc": 41.5}, {"epoch": 3, "elapsed_s": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert _progress(tmp_path) == (3, 41.5)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert _progress(tmp_path) == (1, None)
    assert _progress(tmp_path / "none") == (0, None)


# ---- retries (launch.py --retries): what is retried, and what sweep.json records ----------------


def _entry(name: str, job_id: str, state: str, error: str | None = None, finished: bool = False,
           note: str | None = None) -> dict:
    """A job as --status sees it (status.job_lines), in the fields the retrier reads."""
    return {"name": name, "job_id": job_id, "state": state, "note": note, "error": error, "finished": finished}


def _trace(line: str) -> str:
    """A failed job's error as submitit reports it: the traceback between two rules."""
    return ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
            f"last):\n  File \"run.py\", line 1, in train\n{line}\n----------------------\nYou can check full logs")


def test_retrier_retries_failures_up_to_the_limit_and_stops_on_the_same_error_twice(tmp_path):
    """The retrier's decisions on the states a watcher sees, with a real Plan writing a real
    sweep.json; the jobs' submissions are counted, not run (test_local_slots and test_launch's
    SLURM test retry real jobs)."""
    from trainer import sweep_file
    from trainer.launch import ClusterConfig
    from trainer.launch.plan import Plan
    from trainer.launch.retry import Retrier
    from trainer.sweep_file import Job

    names = ["flaky", "stuck", "lost", "timeout", "summary"]
    plan = Plan("s", tmp_path, ["resnet9_tiny"], [], ClusterConfig(retries=2), "slurm", "smoke",
                [Job(n, "resnet9_tiny") for n in names], {n: {"job_id": f"{n}-1", "submitted": "t"} for n in names})
    submitted = []

    def resubmit(name: str) -> dict:
        submitted.append(name)
        return {"job_id": f"{name}-{submitted.count(name) + 1}", "submitted": "t"}

    retrier = Retrier(plan, 2, resubmit)
    assert retrier.check([_entry("flaky", "flaky-1", "RUNNING"), _entry("timeout", "timeout-1", "TIMEOUT"),
                          _entry("summary", "summary-1", "FAILED", _trace("OSError: disk full"), finished=True),
                          _entry("stuck", "stuck-1", "PENDING"), _entry("lost", "lost-1", "CANCELLED")]) is False
    assert submitted == [] and all("attempts" not in info for info in plan.jobs.values())  # none of these retried

    assert retrier.check([_entry("flaky", "flaky-1", "FAILED", _trace("RuntimeError: NCCL timeout")),
                          _entry("stuck", "stuck-1", "FAILED", _trace("ValueError: bad config")),
                          _entry("lost", "lost-1", "NODE_FAIL")]) is True
    assert submitted == ["flaky", "stuck", "lost"]
    assert retrier.check([_entry("flaky", "flaky-2", "FAILED", _trace("OSError: disk full")),
                          _entry("stuck", "stuck-2", "FAILED", _trace("ValueError: bad config")),
                          _entry("lost", "lost-2", "NODE_FAIL")]) is True
    assert submitted == ["flaky", "stuck", "lost", "flaky", "lost"]  # stuck: the same error twice
    # A retried job that wrote its summary is recorded once SLURM has seen it end, not while it exits.
    retrier.check([_entry("flaky", "flaky-3", "COMPLETING", finished=True)])
    assert retrier.settling and len(plan.jobs["flaky"]["attempts"]) == 2
    retrier.check([_entry("flaky", "flaky-3", "COMPLETED", finished=True), _entry("lost", "lost-3", "NODE_FAIL"),
                   _entry("stuck", "stuck-2", "FAILED", _trace("ValueError: bad config"))])  # seen again: no change
    assert submitted == ["flaky", "stuck", "lost", "flaky", "lost"]  # lost: its 2 retries used

    jobs = sweep_file.read(tmp_path).jobs  # what was written, read back
    assert [(a["job_id"], a["state"], a["cause"]) for a in jobs["flaky"]["attempts"]] == [
        ("flaky-1", "FAILED", "RuntimeError: NCCL timeout"), ("flaky-2", "FAILED", "OSError: disk full"),
        ("flaky-3", "COMPLETED", None)]
    assert sweep_file.attempts_text(jobs["flaky"]) == (
        "3 attempts: 1st FAILED (RuntimeError: NCCL timeout), 2nd FAILED (OSError: disk full), 3rd COMPLETED")
    assert len(jobs["stuck"]["attempts"]) == 2 and jobs["stuck"]["job_id"] == "stuck-2"
    assert jobs["stuck"]["not_retried"] == "the same error twice: ValueError: bad config"
    assert sweep_file.attempts_text(jobs["stuck"]) == ("2 attempts: 1st FAILED (ValueError: bad config), 2nd FAILED "
                                                       "(ValueError: bad config); not retried: the same error twice")
    assert [a["state"] for a in jobs["lost"]["attempts"]] == ["NODE_FAIL"] * 3
    assert sweep_file.attempts_text(jobs["lost"]).endswith("3rd NODE_FAIL; not retried: its 2 retries used")
    assert jobs["lost"]["not_retried"] == "its 2 retries used"
    assert all("attempts" not in jobs[n] for n in ("timeout", "summary"))

    assert sweep_file.retried_lines(tmp_path) == [f"- {n}: {sweep_file.attempts_text(jobs[n])}"
                                                  for n in ("flaky", "stuck", "lost")]


def test_a_retry_that_cannot_be_submitted_leaves_the_job_failed_and_the_watch_going(tmp_path):
    from trainer.launch import ClusterConfig
    from trainer.launch.plan import Plan
    from trainer.launch.retry import SUBMIT_TRIES, Retrier
    from trainer.sweep_file import Job

    def refused(name: str) -> dict:
        raise RuntimeError("sbatch: error: Batch job submission failed\nmore")

    plan = Plan("s", tmp_path, ["resnet9_tiny"], [], ClusterConfig(retries=2), "slurm", "smoke",
                [Job("lost", "resnet9_tiny")], {"lost": {"job_id": "7", "submitted": "t"}})
    retrier = Retrier(plan, 2, refused)
    for _ in range(SUBMIT_TRIES - 1):  # a full disk or a controller away for a moment: tried again at the next look
        assert retrier.check([_entry("lost", "7", "NODE_FAIL")]) is False and retrier.settling
        assert "attempts" not in plan.jobs["lost"]
    assert retrier.check([_entry("lost", "7", "NODE_FAIL")]) is False and not retrier.settling
    assert plan.jobs["lost"]["job_id"] == "7" and [a["state"] for a in plan.jobs["lost"]["attempts"]] == ["NODE_FAIL"]
    assert plan.jobs["lost"]["not_retried"] == (
        "its retry could not be submitted (RuntimeError: sbatch: error: Batch job submission failed)")


def test_attempts_of_a_job_still_running_and_of_records_from_before_retries():
    from trainer.sweep_file import attempts_text

    assert attempts_text({"job_id": "7", "submitted": "t"}) is None  # a record from before retries: one attempt
    assert attempts_text(None) is None
    info = {"job_id": "8", "attempts": [{"job_id": "7", "state": "FAILED (killed: no result)", "cause": "job 7 ended"}]}
    assert attempts_text(info) == "2 attempts: 1st FAILED (killed: no result) (job 7 ended), 2nd: job 8, not ended"
    assert attempts_text({**info, "job_id": None}).endswith("2nd: queued, not ended")


def test_cause_line_is_the_exception_line_or_the_first():
    from trainer.launch.retry import cause_line

    assert cause_line(_trace("trainer.UserError: runs/s/x: not a folder")) == "trainer.UserError: runs/s/x: not a folder"
    assert cause_line("job 5 ended without writing a result\nlog tail") == "job 5 ended without writing a result"
    assert cause_line(None) is None and cause_line("") is None


def test_the_same_error_after_an_epoch_of_progress_is_retried_and_without_progress_is_not(tmp_path):
    # #22's chaos soak: two kills of one job's rank fail both attempts with the same collective
    # error line; the attempt between trained on, so the failure was not the job's own.
    from trainer.launch import ClusterConfig
    from trainer.launch.plan import Plan
    from trainer.launch.retry import Retrier
    from trainer.sweep_file import Job

    plan = Plan("s", tmp_path, ["resnet9_tiny"], [], ClusterConfig(retries=5), "slurm", "smoke",
                [Job("killed", "resnet9_tiny")], {"killed": {"job_id": "1", "submitted": "t"}})
    jobs = iter(range(2, 10))
    retrier = Retrier(plan, 5, lambda name: {"job_id": str(next(jobs)), "submitted": "t"})
    lost_peer = _trace("trainer.UserError: rank 0: a collective failed: a peer is gone")
    for job_id, epoch, retried in [("1", 1, True), ("2", 3, True), ("3", 3, False)]:
        entry = {**_entry("killed", job_id, "FAILED", lost_peer), "epoch": epoch}
        assert retrier.check([entry]) is retried, (job_id, plan.jobs["killed"])
    assert [a["epoch"] for a in plan.jobs["killed"]["attempts"]] == [1, 3, 3]
    assert plan.jobs["killed"]["not_retried"].startswith("the same error twice")


def test_a_full_disk_under_the_sweep_delays_a_retry_and_sweep_json_but_loses_neither(tmp_path, monkeypatch):
    # #22's chaos soak: a disk full for seconds under the sweep folder made the retry's submission
    # (submitit writes the job's pickle there) or sweep.json's write fail, and the job was left
    # failed, or the launcher ended with the error.
    import errno

    from trainer.launch import ClusterConfig
    from trainer.launch.plan import Plan
    from trainer.launch.retry import Retrier
    from trainer.sweep_file import Job, read

    plan = Plan("s", tmp_path, ["resnet9_tiny"], [], ClusterConfig(retries=2), "slurm", "smoke",
                [Job("full", "resnet9_tiny")], {"full": {"job_id": "7", "submitted": "t"}})
    plan.save()
    full = OSError(errno.ENOSPC, "No space left on device")
    tries = []

    def resubmit(name: str) -> dict:
        tries.append(name)
        if len(tries) == 1:
            raise full
        return {"job_id": "8", "submitted": "t"}

    retrier = Retrier(plan, 2, resubmit)
    assert retrier.check([_entry("full", "7", "FAILED")]) is False and retrier.settling  # refused: tried again
    save = plan.save
    monkeypatch.setattr(plan, "save", lambda: (_ for _ in ()).throw(full))
    assert retrier.check([_entry("full", "7", "FAILED")]) is True  # submitted; sweep.json could not be written
    assert read(tmp_path).jobs["full"]["job_id"] == "7"  # its last good state
    monkeypatch.setattr(plan, "save", save)
    retrier.check([_entry("full", "8", "RUNNING")])  # the next look writes it
    assert read(tmp_path).jobs["full"]["job_id"] == "8" and tries == ["full", "full"]
    assert [a["job_id"] for a in read(tmp_path).jobs["full"]["attempts"]] == ["7"]
