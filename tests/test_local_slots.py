"""--local on a machine with several GPUs: one job per GPU (or per gpus_per_node of them), at most
array_parallelism at once, the rest queued until a job ends. This machine has no GPU: the tests
name simulated ones with $TRAINER_LOCAL_GPUS, so each job trains on the CPU but sees its own list in
CUDA_VISIBLE_DEVICES, which is what a GPU job would be confined to."""

import json
import os
import random
import re
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from test_launch import launch, remove_after_first_failure, sweep_record


def cluster(**values):
    from trainer.launch import ClusterConfig

    return ClusterConfig(**{"array_parallelism": 8, **values})


@pytest.mark.parametrize(
    "gpus, values, slots",
    [
        ([0, 1, 2, 3], {}, [(0,), (1,), (2,), (3,)]),  # gpus_per_node 0: one GPU per job
        ([0, 1, 2, 3], {"gpus_per_node": 2}, [(0, 1), (2, 3)]),
        ([0, 1, 2], {"gpus_per_node": 2}, [(0, 1)]),  # a GPU too few for a second job stays idle
        ([0, 1, 2, 3], {"tasks_per_node": 2}, [(0, 1), (2, 3)]),  # one GPU per process
        ([0, 1, 2, 3], {"array_parallelism": 3}, [(0,), (1,), (2,)]),
        ([0, 1], {"jobs_per_gpu": 3, "array_parallelism": 5}, [(0,), (1,), (0,), (1,), (0,)]),  # spread first
        ([5, 7], {}, [(5,), (7,)]),  # the indices CUDA_VISIBLE_DEVICES named, not 0..K-1
        ([], {"array_parallelism": 3}, [(), (), ()]),  # no GPU: CPU jobs, array_parallelism at a time
    ],
)
def test_slots_from_gpus_and_cluster_settings(gpus, values, slots):
    from trainer.launch import local_slots

    assert local_slots(gpus, cluster(**values)) == slots


@pytest.mark.parametrize(
    "gpus, values, fragment",
    [
        ([], {"gpus_per_node": 1}, "gpus_per_node=1: --local found no GPU on this machine"),
        ([0, 1], {"gpus_per_node": 4}, "a job needs 4 GPUs (gpus_per_node=4, tasks_per_node=4) but this machine has 2: 0, 1"),
    ],
)
def test_a_job_this_machine_cannot_hold_is_one_error(gpus, values, fragment):
    from trainer import UserError
    from trainer.launch import local_slots

    with pytest.raises(UserError) as info:
        local_slots(gpus, cluster(**values))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_gpu_list_from_the_environment(monkeypatch):
    import torch

    from trainer import UserError
    from trainer.launch import LOCAL_GPUS_ENV, local_gpus

    monkeypatch.setenv(LOCAL_GPUS_ENV, "2, 3")
    assert local_gpus() == [2, 3]
    monkeypatch.setenv(LOCAL_GPUS_ENV, "")
    assert local_gpus() == []
    for bad in ("0,GPU-5f3a", "1,1"):
        monkeypatch.setenv(LOCAL_GPUS_ENV, bad)
        with pytest.raises(UserError, match=f"{LOCAL_GPUS_ENV}={bad}: --local gives each job GPUs by index"):
            local_gpus()
    monkeypatch.delenv(LOCAL_GPUS_ENV)
    if not torch.cuda.is_available():  # what torch sees: nothing here, whatever CUDA_VISIBLE_DEVICES says
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        assert local_gpus() == []


@pytest.mark.parametrize("seed", range(5))
def test_queue_never_runs_more_jobs_than_slots_and_starts_every_job(seed):
    from trainer.launch import SlotQueue

    slots = [(0,), (1,), (2,)]
    names = [f"job{i}" for i in range(8)]
    queue, rng = SlotQueue(slots, names), random.Random(seed)
    running: dict[str, tuple] = {}
    started = []
    while queue.busy:
        for name, devices in queue.start():
            assert devices not in running.values(), "a slot given to two running jobs"
            running[name] = devices
            started.append(name)
        assert 0 < len(running) <= len(slots)
        if len(started) < len(names):
            assert len(running) == len(slots)  # a job waits only while every slot is taken
        done = rng.choice(sorted(running))  # jobs end in any order
        queue.finish(done)
        del running[done]
    assert started == names  # each once, in the order asked


# ---- real jobs through submitit's local executor -----------------------------------------------


def _record_task(out: Path, name: str, seconds: float) -> None:
    """A tiny job: each of its tasks writes when it ran and what it saw."""
    start = time.time()
    time.sleep(seconds)
    task = os.environ["SUBMITIT_LOCAL_GLOBALID"]
    (out / f"{name}.{task}.json").write_text(json.dumps(
        {"name": name, "task": task, "devices": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time()}))


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end sorts before a start at a tie
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def overlapping(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.slow
def test_runner_keeps_two_gpu_jobs_on_their_own_gpus(tmp_path):
    # 4 simulated GPUs, gpus_per_node=2: two slots of two GPUs, two processes per job; five jobs.
    import cloudpickle

    from trainer.launch import LocalRunner, SlotQueue, local_executor, local_slots

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs cannot import this test module
    out = tmp_path / "records"
    out.mkdir()
    c = cluster(gpus_per_node=2, time_min=5)
    slots = local_slots([0, 1, 2, 3], c)
    assert slots == [(0, 1), (2, 3)]
    names = [f"job{i}" for i in range(5)]

    def start(name, devices):
        return local_executor(tmp_path / "submitit", c, devices).submit(_record_task, out, name, 1.5)

    runner = LocalRunner(SlotQueue(slots, names), start)
    deadline = time.monotonic() + 120
    while runner.step():
        assert time.monotonic() < deadline, "the jobs did not end"
        time.sleep(0.1)

    records = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert sorted((r["name"], r["task"]) for r in records) == [(n, t) for n in names for t in ("0", "1")]
    jobs = {}
    for name in names:
        tasks = [r for r in records if r["name"] == name]
        assert {r["devices"] for r in tasks} in ({"0,1"}, {"2,3"}), tasks  # both processes see the job's two GPUs
        jobs[name] = (tasks[0]["devices"], min(r["start"] for r in tasks), max(r["end"] for r in tasks))
    assert most_at_once([(s, e) for _, s, e in jobs.values()]) == 2  # two at once, never three
    for a in names:
        for b in names:
            if a < b and overlapping(jobs[a][1:], jobs[b][1:]):
                assert jobs[a][0] != jobs[b][0], f"{a} and {b} ran at the same time on GPUs {jobs[a][0]}"


# ---- the launcher end to end -------------------------------------------------------------------

STARTED = re.compile(r"submitit INFO \((\S+ \S+)\) - Starting with JobEnvironment")
DEVICES = re.compile(r"job started on \S+: CUDA_VISIBLE_DEVICES='([^']*)'")


@pytest.mark.slow
def test_local_sweep_of_three_jobs_on_two_gpus(beton_dir, tmp_path):
    # Three seeds of the smallest network: the jobs' scheduling is the point, not what they train.
    # The launcher runs in this process (test_launch.launch); each job is a process of its own. One
    # thread each: two jobs at once share two cores.
    from trainer.device import cpu_flags, native_bf16_cpu

    env = {"TRAINER_LOCAL_GPUS": "0,1"}
    r = launch("--arch", "resnet9_tiny", "--seeds", "3", "--profile", "smoke", "--local", "--sweep", "here", "--runs",
               tmp_path, f"data.dir={beton_dir}", "logging.mode=disabled", "train.threads=1", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--local: running the jobs on this machine with submitit's local executor" in r.stdout
    assert "3 job(s) of sweep here on this machine: at most 2 job(s) at once, on GPU 0; GPU 1" in r.stdout
    record = sweep_record(tmp_path, "here")
    assert record["executor"] == "local"
    names = ["resnet9_tiny-s0", "resnet9_tiny-s1", "resnet9_tiny-s2"]
    assert sorted(record["jobs"]) == names

    # When each job ran and on what, from the job itself: submitit's first log line in the job,
    # the devices the job printed, and the result file it wrote last.
    jobs = {}
    for name in names:
        job_id = record["jobs"][name]["job_id"]
        log = (tmp_path / f"here/submitit/{job_id}_0_log.out").read_text()
        start = datetime.strptime(STARTED.search(log).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        end = (tmp_path / f"here/submitit/{job_id}_0_result.pkl").stat().st_mtime
        devices = DEVICES.search(log).group(1)
        assert devices in ("0", "1") and record["jobs"][name]["devices"] == [int(devices)]
        jobs[name] = (devices, start, end)

        summary = json.loads((tmp_path / "here" / name / "summary.json").read_text())
        assert summary["epochs_run"] == 1
        # The precision train.amp=auto (the recipe's) resolved to on this CPU, as summary.json records it.
        assert summary["amp_setting"] == "auto"
        assert summary["amp"] == ("bf16" if native_bf16_cpu(cpu_flags()) else "fp32")
    assert most_at_once([(s, e) for _, s, e in jobs.values()]) == 2  # the third waited for a free GPU
    for a in names:
        for b in names:
            if a < b and overlapping(jobs[a][1:], jobs[b][1:]):
                assert jobs[a][0] != jobs[b][0], f"{a} and {b} shared GPU {jobs[a][0]}"

    status = launch("--status", "here", "--runs", tmp_path, env=env)
    assert status.returncode == 0 and status.stdout.count("FINISHED") == 3
    assert [p for p in tmp_path.rglob("*") if "%" in p.name] == []  # no literal submitit/%j/ folder


def _task(out: Path, seconds: float, fail: bool) -> None:
    """A job of its own process: says which it is, sleeps, then returns or raises."""
    (out / f"{os.environ['SUBMITIT_LOCAL_JOB_ID']}.pid").write_text(str(os.getpid()))
    time.sleep(seconds)
    if fail:
        raise ValueError("the job's own error")


def test_a_local_job_is_finished_failed_or_running_as_its_process_ended(tmp_path):
    """submitit's local controller ends normally whatever its task did, and its state then says
    FINISHED; the launcher reads the job's result instead: a return, an exception, or none at all
    (the task was killed)."""
    import cloudpickle

    from trainer.launch import local_executor
    from trainer.launch.state import job_state, submitit_folder

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs cannot import this test module
    ex = local_executor(submitit_folder("local", tmp_path), cluster(time_min=5), ())
    ok, bad, killed = (ex.submit(_task, tmp_path, seconds, fail)
                       for seconds, fail in ((0, False), (0, True), (600, False)))  # returns, raises, is killed
    deadline = time.monotonic() + 120
    while not (tmp_path / f"{killed.job_id}.pid").exists() or not (ok.done() and bad.done()):
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.1)

    finished = job_state("local", tmp_path, ok.job_id)
    assert (finished.text(), finished.error) == ("FINISHED", None)
    failed = job_state("local", tmp_path, bad.job_id)
    assert failed.text() == "FAILED" and "ValueError: the job's own error" in failed.error
    running = job_state("local", tmp_path, killed.job_id)
    assert (running.text(), running.error) == (f"RUNNING (local process {killed.job_id})", None)

    os.kill(int((tmp_path / f"{killed.job_id}.pid").read_text()), signal.SIGKILL)  # as the OOM killer would
    while not killed.done():
        assert time.monotonic() < deadline, "the controller did not end"
        time.sleep(0.1)
    gone = job_state("local", tmp_path, killed.job_id)
    assert gone.text() == "FAILED (killed: no result)"
    assert gone.error.startswith(f"job {killed.job_id} ended without writing a result: its process was killed")
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["submitit"]
    assert all(p.is_file() for p in (tmp_path / "submitit").iterdir())  # no literal submitit/%j/ folder


@pytest.mark.slow  # two jobs, each a process that imports torch, one after the other
def test_a_local_job_that_fails_is_failed_in_every_view(beton_dir, tmp_path):
    """A real failure of the trainer (its run folder is a file), once labelled FINISHED: FAILED in
    the progress line (while the next job runs), the table, --status and the exit code."""
    sweep = tmp_path / "bad"
    sweep.mkdir()
    names = ["resnet9_tiny-s0", "resnet9_tiny-s1"]
    for name in names:
        (sweep / name).write_text("a file where the run folder goes\n")
    r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--seeds", "2", "--local", "-C", "array_parallelism=1",
               "--sweep", "bad", "--runs", tmp_path, f"data.dir={beton_dir}", "logging.mode=disabled")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"\] resnet9_tiny-s0:FAILED@0  resnet9_tiny-s1:RUNNING@0$", r.stdout, re.MULTILINE), r.stdout
    table = r.stdout[r.stdout.index("sweep bad (local"):]
    assert all(re.search(rf"^  {n}\s+FAILED\s", table, re.MULTILINE) for n in names), table
    assert "FINISHED" not in r.stdout and "DONE" not in r.stdout
    assert f"not finished: {', '.join(names)}" in r.stdout
    jobs = sweep_record(tmp_path, "bad")["jobs"]
    assert all("attempts" not in jobs[n] for n in names)  # --retries 0, the default: each job ran once
    assert ": attempt 1 FAILED" not in r.stdout and "not retried" not in r.stdout

    status = launch("--status", "bad", "--runs", tmp_path)
    assert status.returncode == 1 and "FINISHED" not in status.stdout
    assert all(re.search(rf"^  {n}\s+FAILED\s", status.stdout, re.MULTILINE) for n in names), status.stdout
    assert status.stdout.count("failed:\nJob (task=0) failed during processing") == 2  # each job's traceback
    assert [p for p in tmp_path.rglob("*") if "%" in p.name] == []  # no literal submitit/%j/ folder


@pytest.mark.slow  # four attempts, each a process that imports torch; one of them trains (seconds)
def test_a_failed_local_job_is_retried_and_the_same_error_twice_is_not(beton_dir, tmp_path):
    """Two jobs whose first attempts fail, a file standing where their run folders go: one file is
    removed once that failure is written (remove_after_first_failure), and the retry trains the run;
    the other stays, the second attempt fails with the same error line, and --retries 3 leaves it
    at that."""
    sweep = tmp_path / "retry"
    sweep.mkdir()
    healed, stuck = "resnet9_tiny-s0", "resnet9_tiny-s1"
    for name in (healed, stuck):
        (sweep / name).write_text("a file where the run folder goes\n")
    stop = threading.Event()
    repair = threading.Thread(target=remove_after_first_failure, args=(sweep, healed, stop))
    repair.start()
    try:
        r = launch("--arch", "resnet9_tiny", "--profile", "smoke", "--seeds", "2", "--local", "--retries", "3",
                   "--sweep", "retry", "--runs", tmp_path, f"data.dir={beton_dir}", "logging.mode=disabled")
    finally:
        stop.set()
        repair.join()
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # one job stayed failed
    jobs = sweep_record(tmp_path, "retry")["jobs"]

    first, second = jobs[healed]["attempts"]
    assert first["state"] == "FAILED" and str(sweep / healed) in first["cause"], first
    assert (second["state"], second["cause"], second["job_id"]) == ("FINISHED", None, jobs[healed]["job_id"])
    assert json.loads((sweep / healed / "summary.json").read_text())["epochs_run"] == 1

    once, twice = jobs[stuck]["attempts"]  # not a third, with --retries 3
    assert once["state"] == twice["state"] == "FAILED" and once["cause"] == twice["cause"]
    assert once["job_id"] != twice["job_id"] == jobs[stuck]["job_id"]
    assert jobs[stuck]["not_retried"] == f"the same error twice: {once['cause']}"
    assert f"{stuck}: not retried: the same error twice: {once['cause']}" in r.stdout
    assert r.stdout.count(": attempt 1 FAILED: ") == 2 and ": attempt 2 FAILED: " not in r.stdout

    healed_text = f"2 attempts: 1st FAILED ({first['cause']}), 2nd FINISHED"
    table = r.stdout[r.stdout.index("sweep retry (local"):]
    assert re.search(rf"^  {healed}\s+FINISHED\s", table, re.MULTILINE) and healed_text in table, table
    assert f"- {healed}: {healed_text}" in (sweep / "report.md").read_text()  # the report names the attempts too
    status = launch("--status", "retry", "--runs", tmp_path)
    assert status.returncode == 1 and healed_text in status.stdout
    assert (f"2 attempts: 1st FAILED ({once['cause']}), 2nd FAILED ({once['cause']}); not retried: the same error "
            "twice") in status.stdout
