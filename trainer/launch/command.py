"""The sweep launcher behind `python jobs/launch.py`: one SLURM job per architecture, via submitit.

    python jobs/launch.py --all [--profile smoke|full] [--cluster slurm/local.yaml] [-C key=value]
                          [--sweep NAME] [--force] [--nodes K] [--local] [--dry-run] [--wait]
                          [--seeds N] [--yes] [--retries N] [key=value ...]
    python jobs/launch.py --status SWEEP [--wait [--retries N]]

How a sweep works, and which file of trainer/launch/ holds what: trainer/launch/__init__.py.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from trainer import UserError, cli, sweep_file
from trainer.launch.grid import CONFIRM_ABOVE
from trainer.launch.local import local_gpus, local_slots, run_local, slots_text
from trainer.launch.plan import REPO, Plan, make_plan, recorded_plan, select, slurm_here
from trainer.launch.retry import Retrier
from trainer.launch.slurm import check_slurm, resubmit, sbatch_script, submit
from trainer.launch.status import print_status, wait

DEFAULT_CLUSTER = REPO / "slurm/local.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python jobs/launch.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="every architecture of the seed's table")
    what.add_argument("--arch", help="a comma-separated list of architectures")
    what.add_argument("--status", metavar="SWEEP", help="show the jobs of a sweep (a name under --runs, or a folder)")
    parser.add_argument("--profile", default="full", help="a named set of overrides from jobs/profiles.yaml (default: full)")
    parser.add_argument("--cluster", type=Path, default=DEFAULT_CLUSTER, help=f"cluster settings YAML (default: {DEFAULT_CLUSTER.relative_to(REPO)})")
    parser.add_argument("-C", "--set", action="append", default=[], metavar="key=value", help="override a cluster setting, e.g. -C time_min=60")
    parser.add_argument("--nodes", type=int, help="nodes per job (multi-node DDP)")
    parser.add_argument("--sweep", help="the sweep's name (default: date-time-githash); re-using one resumes it")
    parser.add_argument("--runs", default="runs", help="where sweeps live (default: runs)")
    parser.add_argument("--seeds", type=int, metavar="N", help="train each architecture (and grid point) N times, train.seed=0..N-1; run folders end in -s<seed>")
    parser.add_argument("--yes", action="store_true", help=f"submit a sweep of more than {CONFIRM_ABOVE} jobs")
    parser.add_argument("--force", action="store_true", help="train finished runs again (their old folders are kept)")
    parser.add_argument("--local", action="store_true", help="run the jobs on this machine with submitit's local executor "
                        "(without it, they go to SLURM: a machine without sbatch is an error)")
    parser.add_argument("--dry-run", action="store_true", help="print each job's resources and command; submit nothing "
                        "(the SLURM plan even where SLURM is not; with --local, this machine's)")
    parser.add_argument("--wait", action="store_true", help="block until the jobs end, then print the comparison")
    parser.add_argument("--retries", type=int, metavar="N", help="submit a job that FAILED (or whose node failed) "
                        "without finishing again, up to N times, resuming from its checkpoint; only while this "
                        "launcher watches (--wait, --local). Default: the cluster YAML's retries (0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="trainer config overrides for every job; a comma list (optim.lr=0.05,0.1) makes a grid")
    args = parser.parse_args(argv)
    cli.run(lambda: run(args))


def _sweep_dir(runs: str, sweep: str) -> Path:
    path = Path(sweep) if Path(sweep).is_dir() and sweep_file.path(Path(sweep)).exists() else Path(runs) / sweep
    if not sweep_file.path(path).exists():
        raise UserError(f"{path}: no sweep.json: not a sweep folder")
    return path


def run(args: argparse.Namespace) -> int:
    if args.status:
        sweep_dir = _sweep_dir(args.runs, args.status)
        if args.retries is not None and not args.wait:
            raise UserError("--retries with --status needs --wait: only a launcher that watches the jobs retries them")
        if args.retries:  # a SLURM sweep launched without --wait, watched now
            plan = recorded_plan(sweep_dir, args.retries)
            check_slurm()
            return wait(sweep_dir, retrier=slurm_retrier(plan))
        if args.wait:
            return wait(sweep_dir)
        entries = print_status(sweep_dir)
        return 1 if any(e["error"] for e in entries) else 0

    plan = make_plan(args)
    slots = None
    if plan.executor == "local":
        print("--local: running the jobs on this machine with submitit's local executor")
        slots = local_slots(local_gpus(), plan.cluster)  # a job this machine cannot hold fails here
    elif not args.dry_run:  # a dry run submits nothing, so needs no controller
        check_slurm()
    if args.dry_run:  # the plan's first line, before the jobs it leaves out are named
        print(dry_run_header(plan))
    names = select(plan, args.force, ask_slurm=not args.dry_run)
    if args.dry_run:
        dry_run(plan, names, slots)
        if plan.executor == "slurm" and slurm_here():
            print(f"the batch script (one job array; submitit's, with the cluster settings as sbatch lines):\n"
                  f"{sbatch_script(plan)}")
        elif plan.executor == "slurm":  # submitit renders it only where it finds srun
            print("the batch script: not shown, submitit writes it only on a machine with SLURM (srun on PATH)")
        return 0
    if not names:
        print("nothing to submit")
        return 0
    if slots is not None:  # local jobs are children of this process: it stays with them
        return run_local(plan, names, slots, args.force)
    jobs = submit(plan, names, args.force)
    print(f"submitted {len(jobs)} job(s) of sweep {plan.sweep} to partition {plan.cluster.partition}: "
          + ", ".join(f"{n}={j.job_id}" for n, j in zip(names, jobs)))
    retries = plan.cluster.retries
    watch = f"python jobs/launch.py --status {plan.sweep} --wait" + (f" --retries {retries}" if retries else "")
    print(f"runs in {plan.sweep_dir}; watch with: {watch}")
    if args.wait:
        return wait(plan.sweep_dir, retrier=slurm_retrier(plan))
    if retries:
        print(f"retries={retries}: only a launcher that watches retries failed jobs, and this one ends now: watch "
              "with the command above (or launch with --wait)")
    return 0


def slurm_retrier(plan: Plan) -> Retrier | None:
    """What submits the sweep's failed SLURM jobs again, with retries set."""
    limit = plan.cluster.retries
    return Retrier(plan, limit, lambda name: resubmit(plan, name)) if limit else None


def dry_run_header(plan: Plan) -> str:
    """Where the jobs would go, and whether this machine could send them there."""
    where = "" if plan.executor == "local" or slurm_here() else (
        "; no SLURM here (no sbatch on PATH): the plan for a SLURM login node; --local runs the jobs here")
    return f"sweep {plan.sweep} -> {plan.sweep_dir} (executor: {plan.executor}; nothing submitted{where})"


def dry_run(plan: Plan, names: list[str], slots: list[tuple[int, ...]] | None = None) -> None:
    """Each job's resources and command, after dry_run_header."""
    c = plan.cluster
    if slots is not None:
        print(f"this machine: {slots_text(slots)}")
    if len(plan.runs) > CONFIRM_ABOVE:
        print(f"{len(plan.runs)} jobs: more than {CONFIRM_ABOVE}; submitting them needs --yes")
    for name in names:
        res = (f"nodes={c.nodes} tasks_per_node={c.tasks} gpus_per_node={c.gpus_per_node} cpus_per_task={c.cpus_per_task} "
               f"mem_gb={c.mem_gb} time_min={c.time_min} partition={c.partition} account={c.account} qos={c.qos} "
               f"constraint={c.constraint} signal=USR2@{c.signal_delay_s}s retries={c.retries}")
        print(f"{name}: {res}")
        print(f"  srun {shlex.join(plan.command(plan.job(name)))}")  # quoted: pasted into a shell, it runs as planned
