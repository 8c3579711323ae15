"""jobs/launch.py against a real single-node SLURM cluster (slurmctld, slurmd, slurmdbd, MariaDB,
munge) that slurm/devcluster/cluster.sh starts, and against submitit's local executor.

The launcher runs in this process (tests/helpers.run_main): what it submits runs as processes of
their own either way (SLURM's jobs, submitit's local jobs). tests/test_entry_points.py starts
`python jobs/launch.py` as a process for its exit code and its one error line."""

import functools
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from cluster_tools import release_requeued
from conftest import REPO, SMALL_RUN
from helpers import Result, one_error_line, run_main


def launch(*args: object, env: dict | None = None) -> Result:
    """`python jobs/launch.py ARGS` in this process, from the repository's root; `env` is laid over
    the environment for the call.

    Two things a fresh process would start without are fresh here too: submitit's cache of SLURM job
    states (one per process, shared by all its jobs and keyed by job id, so a finished job of an
    earlier test could stand for a new one) and --wait's poll, every second instead of every 5 s (the
    same states, seen sooner)."""
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    from trainer.launch import command, status

    with mock.patch.object(SlurmJob, "watcher", SlurmInfoWatcher(delay_s=600)), \
            mock.patch.object(command, "wait", functools.partial(status.wait, poll_s=1.0)):
        return run_main("jobs/launch.py", *map(str, args), env=env, cwd=REPO)


def sweep_record(runs: Path, sweep: str) -> dict:
    return json.loads((runs / sweep / "sweep.json").read_text())


def sacct_states(job_id: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id.split("_")[0]],
                         capture_output=True, text=True, env=env).stdout
    return dict(line.split("|")[:2] for line in out.splitlines() if "|" in line)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def remove_after_first_failure(sweep: Path, name: str, stop: threading.Event) -> None:
    """Removes the file standing where the job `name`'s run folder goes once its first attempt has
    failed on it (its result file, with the traceback, is written): the obstacle an operator clears
    (a full disk, a bad mount), so that the retry, a new process, trains. Run as a thread beside the
    launcher, which submits the retry a poll after it sees the failure."""
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            job_id = json.loads((sweep / "sweep.json").read_text())["jobs"][name]["job_id"]
        except (OSError, ValueError, KeyError):
            job_id = None
        if job_id and next(sweep.glob(f"submitit/**/{job_id}_0_result.pkl"), None):
            (sweep / name).unlink()
            return
        time.sleep(0.05)


def test_dry_run_prints_each_job_and_submits_nothing(beton_dir, tmp_path):
    r = launch("--all", "--profile", "smoke", "--local", "--dry-run", "--runs", str(tmp_path), f"data.dir={beton_dir}")
    assert r.returncode == 0, r.stderr
    commands = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("srun python -m trainer")]
    assert len(commands) == 7
    assert all("data.train_subset=256" in c and f"data.dir={beton_dir}" in c for c in commands)
    assert "tasks_per_node=1" in r.stdout and "time_min=30" in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-C", "time_min=0"], "time_min: must be at least 1"),
        (["-C", "partitionn=gpu"], "unknown key 'partitionn' (did you mean 'partition'?)"),
        (["-C", "gpus_per_node=two"], "gpus_per_node: expected an integer"),
        (["--cluster", "slurm/nope.yaml"], "slurm/nope.yaml: cannot read cluster settings"),
        (["--profile", "huge"], "unknown profile 'huge'"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
    ],
)
def test_bad_values_fail_before_anything_is_submitted(args, fragment, beton_dir, tmp_path):
    data = [] if any(a.startswith("data.dir") for a in args) else [f"data.dir={beton_dir}"]
    r = launch("--all", "--local", "--runs", str(tmp_path), *args, *data)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    assert fragment in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_data_folder_with_a_missing_file_is_named_not_prepared_over(beton_dir, tmp_path):
    """Only a folder with no .beton at all is prepared (a newcomer's first sweep); a half-present
    data set is an error naming the missing file, before anything is submitted."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(beton_dir / "train.beton", data / "train.beton")
    r = launch("--all", "--local", "--runs", str(tmp_path / "runs"), f"data.dir={data}")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert f"{data}/test.beton: not found" in r.stderr and "preparing" not in r.stdout
    assert sorted(p.name for p in data.iterdir()) == ["train.beton"] and not (tmp_path / "runs").exists()


def test_unknown_arch_lists_valid_names(tmp_path):
    r = launch("--arch", "resnet,lenet", "--local", "--runs", str(tmp_path))
    assert r.returncode == 1 and "lenet" in r.stderr and "mobilenet_big" in r.stderr


def no_slurm(tmp_path: Path) -> dict:
    """The environment of a machine without SLURM: a PATH on which no sbatch (nor srun) is found."""
    empty = tmp_path / "bin"
    empty.mkdir()
    return {"PATH": str(empty)}


@pytest.mark.parametrize("profile, length", [("full", "150 epochs each"), ("budget-cpu", "at most 75 s of training each")])
def test_no_slurm_and_no_local_is_one_line_naming_local(tmp_path, profile, length):
    """It once started the 150-epoch sweep on this machine unasked. Said before the data is
    prepared (the data folder here has none: it would have been downloaded into)."""
    data = tmp_path / "data"
    data.mkdir()
    r = launch("--all", "--profile", profile, "--sweep", "s", "--runs", tmp_path / "runs", f"data.dir={data}",
               env=no_slurm(tmp_path))
    one_error_line(r, "error: no SLURM here (no sbatch on PATH): add --local to run the 7 job(s) of profile "
                      f"'{profile}' on this machine ({length}), or launch from a SLURM login node")
    assert r.stdout == "" and list(data.iterdir()) == [] and not (tmp_path / "runs").exists()


def test_dry_run_without_slurm_shows_the_slurm_plan_and_says_so(beton_dir, tmp_path):
    runs = tmp_path / "runs"
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--dry-run", "--sweep", "s", "--runs", runs,
               f"data.dir={beton_dir}", env=no_slurm(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == (
        f"sweep s -> {runs / 's'} (executor: slurm; nothing submitted; no SLURM here (no sbatch on PATH): the plan "
        "for a SLURM login node; --local runs the jobs here)")
    assert "srun python -m trainer" in r.stdout and "#SBATCH" not in r.stdout
    assert not runs.exists()


# The local executor without a cluster: tests/test_local_slots.py runs a --local sweep end to end.


@pytest.mark.slow
def test_smoke_sweep_on_slurm_completes_then_rerun_skips(slurm, beton_dir, tmp_path):
    """What only SLURM shows, on the two smallest of the seed's networks: one job array, sacct's
    COMPLETED, the comparison beside the seed, a rerun that skips finished jobs, --status. That --all
    is the seven is test_dry_run_prints_each_job_and_submits_nothing; that every network trains,
    tests/test_models.py (the SLURM path is the same for each)."""
    archs = {"alexnet": "77.53", "mobilenet": "90.75"}  # the seed's test accuracy of each
    args = ("--arch", ",".join(archs), "--profile", "smoke", "--sweep", "smoke", "--runs", tmp_path,
            f"data.dir={beton_dir}", "train.threads=1")  # one thread each: the two jobs may run at once
    r = launch(*args, "--wait", env=slurm)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = sweep_record(tmp_path, "smoke")
    assert record["executor"] == "slurm" and sorted(record["jobs"]) == sorted(archs)
    assert len({job["job_id"].split("_")[0] for job in record["jobs"].values()}) == 1  # one array
    for arch, job in record["jobs"].items():
        summary = json.loads((tmp_path / "smoke" / arch / "summary.json").read_text())
        assert summary["arch"] == arch and summary["epochs_run"] == 1
        assert wait_for(lambda: sacct_states(job["job_id"], slurm).get(job["job_id"]) == "COMPLETED", 60,
                        f"sacct to show {arch} COMPLETED")
        assert f"| {arch} |" in r.stdout and archs[arch] in r.stdout  # the comparison beside the seed

    again = launch(*args, env=slurm)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished already") == 2 and "nothing to submit" in again.stdout

    status = launch("--status", "smoke", "--runs", tmp_path, env=slurm)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 2
    assert not (tmp_path / "smoke/submitit/%j").exists()  # each job's folder, no literal pattern beside them


# A job of two tasks (gloo DDP inside SLURM): tests/test_cluster_knobs.py's SLURM test, whose job
# has two tasks and the cluster settings it checks.


@pytest.mark.slow
def test_usr2_checkpoints_requeues_and_resumes_to_the_same_weights(slurm, beton_dir, tmp_path, monkeypatch):
    import submitit

    from trainer.launch import config_path

    # The tests' run of seconds, on 2,000 images (20 steps an epoch): the signal comes after epoch 1,
    # and the trainer looks for it every second of steps (train.stop_check_s), well before the end.
    # One thread each: the job and the reference below train at once on two cores (two threads each
    # made both ten times slower).
    run = [*SMALL_RUN, "data.train_subset=2000", "data.test_subset=200", "train.stop_check_s=1", "train.threads=1"]
    r = launch("--arch", "resnet9_tiny", "--sweep", "pre", "--runs", tmp_path, "-C", "time_min=30",
               f"data.dir={beton_dir}", *run, env=slurm)
    assert r.returncode == 0, r.stderr
    job_id = sweep_record(tmp_path, "pre")["jobs"]["resnet9_tiny"]["job_id"]
    run_dir = tmp_path / "pre/resnet9_tiny"
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 300, "the first epoch")

    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])  # submitit's own scancel/sacct calls
    job = submitit.SlurmJob(folder=tmp_path / "pre/submitit/%j", job_id=job_id)
    job._interrupt(timeout=True)  # USR2, as SLURM sends it before the time limit
    release_requeued(job_id, slurm)

    # The uninterrupted run to compare with, trained here while the requeued job starts: the config
    # the launcher trains resnet9_tiny with (jobs/configs/tiny.yaml), shrunk alike.
    reference = tmp_path / "reference"
    ref = run_main("trainer", "--config", str(config_path("resnet9_tiny")), "--run-dir", str(reference),
                   f"data.dir={beton_dir}", *run)
    assert ref.returncode == 0, ref.stderr

    done = launch("--status", "pre", "--runs", tmp_path, "--wait", env=slurm)
    assert done.returncode == 0, done.stdout[-3000:]
    log = "".join(p.read_text() for p in (tmp_path / "pre/submitit").rglob("*_log.out"))
    assert "stopped by signal SIGUSR2" in log and "resuming resnet9_tiny" in log
    a = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    b = torch.load(reference / "checkpoints/last.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part


@pytest.mark.slow
def test_failed_job_shows_its_traceback_and_fails_the_launch(slurm, beton_dir, tmp_path):
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--sweep", "bad", "--runs", tmp_path, "--wait",
               f"data.dir={beton_dir}", "optim.lr=1e9", env=slurm)
    assert r.returncode == 1
    assert "resnet9_tiny (job" in r.stdout and "failed:" in r.stdout
    assert "Traceback" in r.stdout and "non-finite training loss" in r.stdout
    assert "not finished: resnet9_tiny" in r.stdout


@pytest.mark.slow
def test_plain_sbatch_script(slurm, beton_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = {**slurm, "CONFIG": str(REPO / "tests/configs/small.yaml"), "RUN_DIR": str(run_dir)}
    r = subprocess.run(["sbatch", "--parsable", "-p", "debug", "--gpus-per-node=0", "--ntasks-per-node=1",
                        "--cpus-per-task=1", "-o", str(tmp_path / "slurm-%j.out"), str(REPO / "slurm/train.sbatch"),
                        f"data.dir={beton_dir}", "data.train_subset=256", "data.test_subset=256", "train.epochs=1",
                        "logging.mode=disabled"], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    wait_for(lambda: sacct_states(job_id, slurm).get(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the job")
    assert sacct_states(job_id, slurm)[job_id] == "COMPLETED", (tmp_path / f"slurm-{job_id}.out").read_text()[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 1


def test_dry_run_needs_no_slurm_controller_and_quotes_commands(beton_dir, tmp_path):
    import shlex

    # The controller is unreachable (SLURM_CONF names no file), and the sweep has a job submitted
    # earlier: the dry run asks SLURM nothing, says so, and writes nothing.
    runs = tmp_path / "runs"
    (runs / "again").mkdir(parents=True)
    record = {"sweep": "again", "executor": "slurm", "profile": "smoke", "archs": ["resnet9_tiny", "vgg_bn"],
              "overrides": [], "cluster": {}, "jobs": {"resnet9_tiny": {"job_id": "4242", "submitted": "then"}}}
    (runs / "again/sweep.json").write_text(json.dumps(record))
    env = {"SLURM_CONF": str(tmp_path / "no-such-slurm.conf")}
    tags = "logging.tags=[a b, it's]"  # a space and a quote: the printed command must keep them
    r = launch("--arch", "resnet9_tiny,vgg_bn", "--profile", "smoke", "--dry-run", "--sweep", "again", "--runs",
               str(runs), f"data.dir={beton_dir}", tags, env=env)
    assert r.returncode == 0, r.stderr
    assert "(executor: slurm; nothing submitted" in r.stdout.splitlines()[0]  # without --local, SLURM's plan
    # each job's command (indented); the batch script printed after them has submitit's own srun line
    commands = [shlex.split(ln.strip()) for ln in r.stdout.splitlines() if ln.startswith("  srun ")]
    assert len(commands) == 2
    for command, arch in zip(commands, ["resnet9_tiny", "vgg_bn"]):
        assert command[:4] == ["srun", "python", "-m", "trainer"]
        assert command[command.index("--run-dir") + 1] == str(runs / "again" / arch)
        assert tags in command and f"data.dir={beton_dir}" in command and f"model.arch={arch}" in command
    assert "job 4242 was submitted earlier; its state is not asked in a dry run" in r.stdout
    assert sorted(p.name for p in (runs / "again").iterdir()) == ["sweep.json"]
    assert json.loads((runs / "again/sweep.json").read_text()) == record


def test_unreadable_slurm_conf_is_one_line_at_once(tmp_path, monkeypatch):
    # SLURM's commands retry a missing SLURM_CONF for a minute before failing.
    from trainer import UserError
    from trainer.launch import check_slurm

    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    start = time.monotonic()
    with pytest.raises(UserError, match=r"SLURM_CONF=.*slurm\.conf: no such file"):
        check_slurm()
    assert time.monotonic() - start < 5


def test_retries_come_from_the_cluster_settings_or_the_command_line(beton_dir, tmp_path):
    args = ("--arch", "resnet9_tiny", "--profile", "smoke", "--local", "--dry-run", "--runs", tmp_path,
            f"data.dir={beton_dir}")
    assert "retries=0" in launch(*args).stdout  # slurm/local.yaml's
    assert "retries=2" in launch(*args, "-C", "retries=2").stdout
    assert "retries=3" in launch(*args, "-C", "retries=2", "--retries", "3").stdout
    one_error_line(launch(*args, "-C", "retrys=2"), "unknown key 'retrys' (did you mean 'retries'?)")
    one_error_line(launch(*args, "--retries", "-1"), "--retries: retries: must not be negative, got -1")

    (tmp_path / "old").mkdir()  # a sweep launched earlier
    record = {"sweep": "old", "executor": "local", "archs": ["resnet9_tiny"], "jobs": {}}
    (tmp_path / "old/sweep.json").write_text(json.dumps(record))
    one_error_line(launch("--status", "old", "--runs", tmp_path, "--retries", "2"),
                   "--retries with --status needs --wait: only a launcher that watches the jobs retries them")
    one_error_line(launch("--status", "old", "--runs", tmp_path, "--retries", "2", "--wait"),
                   "is a --local sweep, whose jobs only the launcher that runs them can retry")


@pytest.mark.slow
def test_a_failed_slurm_job_is_retried_into_its_run_folder(slurm, beton_dir, tmp_path):
    """The job's first attempt fails (a file stands where its run folder goes), the file is removed,
    and the launcher's retry, a SLURM job of its own, trains the run: two attempts in sweep.json
    with their SLURM job ids, the one that failed with its cause."""
    sweep = tmp_path / "retry"
    sweep.mkdir()
    (sweep / "resnet9_tiny").write_text("a file where the run folder goes\n")
    stop = threading.Event()
    repair = threading.Thread(target=remove_after_first_failure, args=(sweep, "resnet9_tiny", stop))
    repair.start()
    try:
        r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--sweep", "retry", "--runs", tmp_path, "--wait",
                   "--retries", "1", f"data.dir={beton_dir}", "logging.mode=disabled", env=slurm)
    finally:
        stop.set()
        repair.join()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = sweep_record(tmp_path, "retry")["jobs"]["resnet9_tiny"]
    first, second = info["attempts"]
    assert first["state"] == "FAILED" and str(sweep / "resnet9_tiny") in first["cause"], first
    assert (second["state"], second["cause"], second["job_id"]) == ("COMPLETED", None, info["job_id"])
    assert first["job_id"] != second["job_id"]
    for attempt in (first, second):  # SLURM's own record of each attempt
        assert wait_for(lambda: sacct_states(attempt["job_id"], slurm).get(attempt["job_id"]) == attempt["state"], 60,
                        f"sacct to show job {attempt['job_id']} {attempt['state']}")
    assert f"resnet9_tiny: attempt 1 FAILED: {first['cause']}; retry 1 of 1: job {second['job_id']}" in r.stdout
    assert f"2 attempts: 1st FAILED ({first['cause']}), 2nd COMPLETED" in r.stdout  # the final table
    assert json.loads((sweep / "resnet9_tiny/summary.json").read_text())["epochs_run"] == 1
