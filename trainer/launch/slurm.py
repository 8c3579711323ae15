"""SLURM: whether its controller answers (sinfo), the executor whose settings become the sbatch
lines, the submission of a sweep's jobs as one job array, and of one job again (a retry).
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime
from pathlib import Path

from trainer import UserError
from trainer.launch.plan import Plan
from trainer.launch.state import submitit_folder

# Scripts a containerised job uses (containers/job/run.sh says how): on the shared file system, as
# the sweep folder is; mounted into the container at INSIDE.
JOB_TOOLS = Path(__file__).resolve().parents[2] / "containers/job"
INSIDE = "/opt/cifar-job"


def check_slurm() -> None:
    """One clear line instead of pages of sacct/sbatch errors when the controller is unreachable."""
    import subprocess

    # SLURM's commands retry a missing SLURM_CONF for a minute before they fail.
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        reason = "not a file" if os.path.exists(conf) else "no such file"
        raise UserError(f"SLURM_CONF={conf}: {reason}; point it at the cluster's slurm.conf, or pass --local to run here")
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"SLURM is not reachable (sinfo: {e}); pass --local to run here") from None
    if r.returncode != 0:
        reason = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"SLURM is not reachable (sinfo: {reason}); check SLURM_CONF, or pass --local to run here")


def sweep_executor(plan: Plan):
    """submitit's executor for the sweep's job array, every cluster setting given as its parameter."""
    import submitit  # here, not above: a mistaken command line is told without it

    c = plan.cluster
    ex = submitit.AutoExecutor(folder=submitit_folder(plan.executor, plan.sweep_dir), cluster=plan.executor,
                               slurm_max_num_timeout=c.max_requeues, slurm_python=job_python(plan))
    params = dict(name=f"cifar-{plan.sweep}", timeout_min=c.time_min, nodes=c.nodes, tasks_per_node=c.tasks,
                  cpus_per_task=c.cpus_per_task, stderr_to_stdout=False)
    if c.gpus_per_node and not c.gres:  # asking a GPU-less cluster for gpus:0 is itself an error
        params["gpus_per_node"] = c.gpus_per_node
    if plan.executor == "slurm":
        slurm = dict(partition=c.partition, account=c.account, qos=c.qos, constraint=c.constraint,
                     signal_delay_s=c.signal_delay_s, array_parallelism=c.array_parallelism, gres=c.gres,
                     exclude=c.exclude, mem_per_gpu=f"{c.mem_per_gpu}G" if c.mem_per_gpu else None,
                     setup=[*c.setup, *requeue_watcher(plan), *step_watchdog(plan)] or None,
                     srun_args=srun_args(plan) or None,
                     additional_parameters=c.sbatch_options() or None)
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
        if c.mem_gb is not None:
            params["mem_gb"] = c.mem_gb
    ex.update_parameters(**params)
    return ex


def job_python(plan: Plan) -> str | None:
    """The command that starts Python in each SLURM job: None (submitit: the launcher's own
    interpreter) without a container; containers/job/run.sh for Apptainer and podman; for pyxis,
    srun starts the container (srun_args) and this is the Python inside it."""
    c = plan.cluster
    if not c.container:
        return None
    if c.container_runtime == "pyxis":
        return f"{INSIDE}/python"
    return shlex.join(["bash", str(JOB_TOOLS / "run.sh"), c.container_runtime, c.container, ",".join(mounts(plan))])


# How long srun waits, once a task of a job of several has ended, before it ends the others. A
# rank on a node whose link was down for a moment may exit unheard: slurmstepd does not send its
# exit message again, and srun (and the job) would wait for it until the time limit, even with
# --kill-on-bad-exit (the chaos soak, tests/chaos.py, found this). The ranks of a healthy run
# leave together (the trainer's last barrier), so they never wait this long.
STEP_WAIT_S = 60


def srun_args(plan: Plan) -> list[str]:
    """srun's options: --wait for a job of several tasks (STEP_WAIT_S); pyxis's image, and the
    same folders run.sh mounts for the other runtimes."""
    c = plan.cluster
    wait = [f"--wait={STEP_WAIT_S}"] if c.nodes * c.tasks > 1 else []
    if not c.container or c.container_runtime != "pyxis":
        return wait
    return [*wait, f"--container-image={c.container}", "--container-workdir=" + os.getcwd(),
            "--container-mounts=" + ",".join([f"{JOB_TOOLS}:{INSIDE}:ro", *(f"{m}:{m}" for m in mounts(plan))])]


def step_watchdog(plan: Plan) -> list[str]:
    """A batch-script line for a job of several tasks: once slurmctld no longer knows the job's
    step (all its tasks ended) while srun still waits, for two looks 10 s apart, srun is killed
    and the job ends (FAILED: --retries resubmits it). A rank's exit message lost with its node's
    link is not sent again; srun waits for it even after slurmctld has seen the step end, and its
    --wait (STEP_WAIT_S) then signals a step that is gone, in vain (the chaos soak found both)."""
    c = plan.cluster
    if c.nodes * c.tasks <= 1:
        return []
    return ['(seen=; gone=0; while sleep 10; do if scontrol show step "$SLURM_JOB_ID.0" >/dev/null 2>&1; then '
            'seen=1; gone=0; elif [ -n "$seen" ]; then gone=$((gone + 1)); if [ "$gone" -ge 2 ]; then '
            'pkill -KILL -P $$ -x srun; break; fi; fi; done) &']


def mounts(plan: Plan) -> list[str]:
    """Host folders a containerised job reads or writes, each mounted at its own path: the sweep
    folder (run folders, submitit's files), the data, the checkout the configs come from, the
    folder the job starts in (relative paths)."""
    folders = dict.fromkeys(str(Path(f).resolve()) for f in
                            [plan.sweep_dir, *plan.data_dirs(), Path(__file__).resolve().parents[2], Path.cwd()])
    for folder in folders:
        if "," in folder or ":" in folder:  # the runtimes' separators
            raise UserError(f"container: {folder} cannot be mounted into the container (',' or ':' in its path)")
    return list(folders)


def requeue_watcher(plan: Plan) -> list[str]:
    """Batch-script lines that requeue the job from outside its container: the container's
    scontrol (containers/job/scontrol) writes the request into $CIFAR_REQUEUE_FILE; this loop, in
    the batch script on the job's first node, runs SLURM's scontrol and answers by removing it."""
    if not plan.cluster.container:
        return []
    request = shlex.quote(str(plan.sweep_dir / "submitit")) + '/requeue-"$SLURM_JOB_ID"'
    return [
        f"export CIFAR_REQUEUE_FILE={request}",
        'rm -f "$CIFAR_REQUEUE_FILE" "$CIFAR_REQUEUE_FILE.failed"',
        'while sleep 0.5; do if [ -s "$CIFAR_REQUEUE_FILE" ]; then if scontrol requeue "$(cat "$CIFAR_REQUEUE_FILE")"; '
        'then rm -f "$CIFAR_REQUEUE_FILE"; else mv "$CIFAR_REQUEUE_FILE" "$CIFAR_REQUEUE_FILE.failed"; fi; break; fi; '
        'done &',
    ]


def sbatch_script(plan: Plan) -> str:
    """The batch script submitit would submit for this sweep's jobs (one array), for the dry run:
    every cluster setting as the sbatch line it becomes. submitit has no public call that renders
    it; this is the one its submit() uses."""
    ex = sweep_executor(plan)
    return ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "<uid>")


def submit(plan: Plan, names: list[str], force: bool) -> list:
    """Submits the jobs `names` to SLURM as one job array, at most array_parallelism running at once
    (--local jobs start through run_local)."""
    if force:
        plan.move_aside(names)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    ex = sweep_executor(plan)
    calls = [plan.train_job(plan.job(name)) for name in names]
    with ex.batch():  # one job array
        jobs = [ex.submit(call) for call in calls]
    now = datetime.now().isoformat(timespec="seconds")
    for name, job in zip(names, jobs):
        plan.jobs[name] = {"job_id": job.job_id, "submitted": now}
    plan.save()
    return jobs



def resubmit(plan: Plan, name: str) -> dict:
    """Submits the job `name` again, alone (a retry: retry.py); its new sweep.json entry."""
    job = sweep_executor(plan).submit(plan.train_job(plan.job(name)))
    return {"job_id": job.job_id, "submitted": datetime.now().isoformat(timespec="seconds")}
