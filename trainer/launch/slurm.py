"""SLURM: whether its controller answers (sinfo), the executor whose settings become the sbatch
lines, the submission of a sweep's jobs as one job array, and of one job again (a retry).
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime

from trainer import UserError
from trainer.launch.cluster import ClusterConfig
from trainer.launch.plan import Plan
from trainer.launch.state import submitit_folder


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
                               slurm_max_num_timeout=c.max_requeues, slurm_python=job_python(c))
    params = dict(name=f"cifar-{plan.sweep}", timeout_min=c.time_min, nodes=c.nodes, tasks_per_node=c.tasks,
                  cpus_per_task=c.cpus_per_task, stderr_to_stdout=False)
    if c.gpus_per_node and not c.gres:  # asking a GPU-less cluster for gpus:0 is itself an error
        params["gpus_per_node"] = c.gpus_per_node
    if plan.executor == "slurm":
        slurm = dict(partition=c.partition, account=c.account, qos=c.qos, constraint=c.constraint,
                     signal_delay_s=c.signal_delay_s, array_parallelism=c.array_parallelism, gres=c.gres,
                     exclude=c.exclude, mem_per_gpu=f"{c.mem_per_gpu}G" if c.mem_per_gpu else None,
                     setup=c.setup or None, additional_parameters=c.sbatch_options() or None)
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
        if c.mem_gb is not None:
            params["mem_gb"] = c.mem_gb
    ex.update_parameters(**params)
    return ex


def job_python(c: ClusterConfig) -> str | None:
    """The command that starts Python in each SLURM job: through Apptainer with the GPUs passed in
    (--nv) when a container is set, else None (submitit: the launcher's own interpreter)."""
    return f"apptainer exec --nv {shlex.quote(c.container)} python" if c.container else None


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
