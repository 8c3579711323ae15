"""--local on a machine with several GPUs: one job per GPU (or per gpus_per_node of them), at most
array_parallelism at once, the rest queued until a job ends. This machine has no GPU: the tests
name simulated ones with $TRAINER_LOCAL_GPUS, so each job trains on the CPU but sees its own list in
CUDA_VISIBLE_DEVICES, which is what a GPU job would be confined to."""

import json
import os
import random
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from test_launch import launch, sweep_record


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
        return local_executor(tmp_path / "submitit" / "%j", c, devices).submit(_record_task, out, name, 1.5)

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
    # The launcher runs in this process (test_launch.launch); each job is a process of its own.
    from trainer.device import cpu_flags, native_bf16_cpu

    env = {"TRAINER_LOCAL_GPUS": "0,1"}
    r = launch("--arch", "resnet9_tiny", "--seeds", "3", "--profile", "smoke", "--local", "--sweep", "here", "--runs",
               tmp_path, f"data.dir={beton_dir}", "logging.mode=disabled", env=env)
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
        log = (tmp_path / f"here/submitit/{job_id}/{job_id}_0_log.out").read_text()
        start = datetime.strptime(STARTED.search(log).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        end = (tmp_path / f"here/submitit/{job_id}/{job_id}_0_result.pkl").stat().st_mtime
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
