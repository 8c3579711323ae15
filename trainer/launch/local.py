"""--local: the jobs of a sweep run on this machine, as children of the launcher, which stays with
them. Each job gets its own GPUs (gpus_per_node of them, one when 0, one process each; jobs_per_gpu
jobs may share them), at most array_parallelism jobs run at once, and the others wait in the
launcher's queue until a job ends and frees its GPUs. Without GPUs, jobs run on the CPU,
array_parallelism at a time. With retries (retry.py), a failed job goes back to the end of the queue.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from trainer import UserError
from trainer.launch.cluster import ClusterConfig
from trainer.launch.grid import name_width
from trainer.launch.plan import Plan
from trainer.launch.retry import Retrier, kept
from trainer.launch.state import submitit_folder
from trainer.launch.status import wait

if TYPE_CHECKING:  # submitit itself is imported when jobs start: a mistaken command line is told without it
    import submitit

# The GPUs --local schedules on, instead of those torch sees: comma-separated indices, empty for none.
# Tests simulate a machine with GPUs with it (the jobs then train on the CPU, but each sees its list).
LOCAL_GPUS_ENV = "TRAINER_LOCAL_GPUS"


def _gpu_indices(text: str, source: str) -> list[int]:
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not all(e.isdigit() for e in entries) or len(set(entries)) != len(entries):
        raise UserError(f"{source}={text}: --local gives each job GPUs by index: expected distinct indices such as 0,1")
    return [int(e) for e in entries]


def local_gpus() -> list[int]:
    """The GPUs --local may use: $TRAINER_LOCAL_GPUS if set, else those torch sees, named as
    CUDA_VISIBLE_DEVICES names them (each job's CUDA_VISIBLE_DEVICES replaces the launcher's)."""
    if LOCAL_GPUS_ENV in os.environ:
        return _gpu_indices(os.environ[LOCAL_GPUS_ENV], LOCAL_GPUS_ENV)
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return list(range(count)) if visible is None else _gpu_indices(visible, "CUDA_VISIBLE_DEVICES")[:count]


def local_slots(gpus: list[int], cluster: ClusterConfig) -> list[tuple[int, ...]]:
    """The device lists of the jobs that may run at once here, one per slot: disjoint groups of
    gpus_per_node GPUs (of one GPU per task when 0), each shared by jobs_per_gpu jobs; without GPUs,
    CPU slots (no device: CUDA_VISIBLE_DEVICES=""). At most array_parallelism slots."""
    c = cluster
    if not gpus:
        if c.gpus_per_node:
            raise UserError(f"gpus_per_node={c.gpus_per_node}: --local found no GPU on this machine; "
                            "-C gpus_per_node=0 trains on the CPU")
        return [()] * c.array_parallelism
    per_job = c.gpus_per_node or c.tasks  # one process per GPU
    if per_job > len(gpus):
        raise UserError(f"a job needs {per_job} GPUs (gpus_per_node={c.gpus_per_node}, tasks_per_node={c.tasks}) "
                        f"but this machine has {len(gpus)}: {', '.join(map(str, gpus))}")
    groups = [tuple(gpus[i:i + per_job]) for i in range(0, len(gpus) - per_job + 1, per_job)]
    # Round-robin: the first jobs spread over the GPUs before any GPU takes a second job.
    return [group for _ in range(c.jobs_per_gpu) for group in groups][:c.array_parallelism]


def slot_text(devices: tuple[int, ...]) -> str:
    return f"GPU {','.join(map(str, devices))}" if devices else "the CPU"


def slots_text(slots: list[tuple[int, ...]]) -> str:
    if all(not s for s in slots):
        return f"at most {len(slots)} job(s) at once, on the CPU"
    return f"at most {len(slots)} job(s) at once, on {'; '.join(slot_text(s) for s in slots)}"


class SlotQueue:
    """Which job runs on which slot: the queued jobs start in order, each on the lowest free slot,
    and a slot is free again when its job ends. Bookkeeping only, so the rule is tested alone."""

    def __init__(self, slots: list[tuple[int, ...]], names: list[str]) -> None:
        self.slots = slots
        self.free = list(range(len(slots)))  # slot indices; the lowest first spreads jobs over the GPUs
        self.queued = list(names)
        self.running: dict[str, int] = {}  # job name -> its slot

    def start(self) -> list[tuple[str, tuple[int, ...]]]:
        """The jobs to start now, with their devices: as many as there are free slots."""
        started = []
        while self.queued and self.free:
            name, slot = self.queued.pop(0), self.free.pop(0)
            self.running[name] = slot
            started.append((name, self.slots[slot]))
        return started

    def finish(self, name: str) -> None:
        self.free.append(self.running.pop(name))
        self.free.sort()

    @property
    def busy(self) -> bool:
        return bool(self.queued or self.running)


class LocalRunner:
    """Drives a SlotQueue with real jobs: step() frees the slots of jobs whose process ended and
    starts queued jobs on them. `start(name, devices)` submits one job and returns its handle."""

    def __init__(self, queue: SlotQueue, start: Callable[[str, tuple[int, ...]], submitit.LocalJob]) -> None:
        self.queue, self.start = queue, start
        self.jobs: dict[str, submitit.LocalJob] = {}

    def step(self) -> bool:
        """One poll; whether any job still runs or waits."""
        for name, job in list(self.jobs.items()):
            if job.done():  # the job's process has exited, whatever its result
                self.queue.finish(name)
                del self.jobs[name]
        for name, devices in self.queue.start():
            self.jobs[name] = self.start(name, devices)
        return self.queue.busy


def local_executor(folder: Path, cluster: ClusterConfig, devices: tuple[int, ...]) -> submitit.LocalExecutor:
    """submitit's local executor for one job on `devices`: it starts cluster.tasks processes, all
    with CUDA_VISIBLE_DEVICES set to the devices (process k uses the k-th)."""
    import submitit

    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=cluster.time_min, tasks_per_node=cluster.tasks, gpus_per_node=len(devices),
                         visible_gpus=list(devices), signal_delay_s=cluster.signal_delay_s, stderr_to_stdout=False)
    return ex


def run_local(plan: Plan, names: list[str], slots: list[tuple[int, ...]], force: bool, poll_s: float = 1.0) -> int:
    """Trains the jobs `names` on this machine, at most one per slot, and waits for all of them."""
    if force:
        plan.move_aside(names)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now().isoformat(timespec="seconds")
    for name in names:
        plan.jobs[name] = {"job_id": None, "queued": now}  # --status shows QUEUED until the job starts
    plan.save()
    width = name_width(names)

    def start(name: str, devices: tuple[int, ...]):
        ex = local_executor(submitit_folder("local", plan.sweep_dir), plan.cluster, devices)
        job = ex.submit(plan.train_job(plan.job(name)))
        plan.jobs[name] = {"job_id": job.job_id, "submitted": datetime.now().isoformat(timespec="seconds"),
                           "devices": list(devices), **kept(plan.jobs.get(name))}
        plan.save()
        print(f"{name:{width}s} started as job {job.job_id} on {slot_text(devices)}", flush=True)
        return job

    print(f"{len(names)} job(s) of sweep {plan.sweep} on this machine: {slots_text(slots)}; the others wait for a "
          "job to end")
    print(f"runs in {plan.sweep_dir}; the jobs are children of this process: it stays until they end")
    runner = LocalRunner(SlotQueue(slots, names), start)

    def requeue(name: str) -> dict:
        runner.queue.queued.append(name)
        return {"job_id": None, "queued": datetime.now().isoformat(timespec="seconds")}

    retrier = None
    if plan.cluster.retries:  # a job is retried once the runner has seen its process end and freed its slot
        retrier = Retrier(plan, plan.cluster.retries, requeue, idle=lambda name: name not in runner.jobs)
    return wait(plan.sweep_dir, poll_s=poll_s, step=runner.step, retrier=retrier)

