"""The sweep launcher behind `python jobs/launch.py`: one SLURM job per architecture, via submitit.

    python jobs/launch.py --all [--profile smoke|full] [--cluster slurm/local.yaml] [-C key=value]
                          [--sweep NAME] [--force] [--nodes K] [--local] [--dry-run] [--wait] [key=value ...]
    python jobs/launch.py --status SWEEP [--wait]

A sweep has an id (default: date, time and the code's short git hash) that names its folder,
runs/<sweep>/, with one run folder per architecture (runs/<sweep>/<arch>/), submitit's logs
(runs/<sweep>/submitit/) and sweep.json (what was submitted, as which job). The id is also the W&B
group. Re-running a sweep skips architectures that finished (summary.json) or whose job is still
queued or running, and resubmits the others, which resume from their checkpoints.

Each job is one node (or --nodes K) with one task per GPU started by srun (on CPU-only clusters,
`tasks_per_node` tasks); ranks come from submitit's TorchDistributedEnvironment. The submitted
callable is Checkpointable: on USR2 (preemption or the time limit coming) the trainer saves a
checkpoint within about train.stop_check_s, then submitit requeues the job, which resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import submitit

from trainer import UserError, cli, models
from trainer.config import ConfigError, load_config, load_dataclass, parse_override, parse_yaml
from trainer.data.checks import verify
from trainer.provenance import git_sha
from trainer.run_files import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs/configs"
PROFILES = REPO / "jobs/profiles.yaml"
DEFAULT_CLUSTER = REPO / "slurm/local.yaml"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}


@dataclass
class ClusterConfig:
    """Where and how big each job is; slurm/example-cluster.yaml documents every key."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 720  # the job's time limit, minutes
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    cpus_per_task: int = 8
    mem_gb: int | None = None  # per node
    constraint: str | None = None
    signal_delay_s: int = 120  # USR2 this long before the time limit
    array_parallelism: int = 8  # jobs of the sweep running at once
    nodes: int = 1

    def __post_init__(self) -> None:
        for name in ("time_min", "cpus_per_task", "array_parallelism", "nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node: must not be negative, got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"tasks_per_node: must be at least 1, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError("tasks_per_node: must equal gpus_per_node (one task per GPU)")
        if self.signal_delay_s < 0 or self.signal_delay_s >= 60 * self.time_min:
            raise ValueError(f"signal_delay_s: must be within the time limit ({60 * self.time_min} s)")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def config_path(arch: str) -> Path:
    path = CONFIGS / f"{arch}.yaml"
    return path if path.is_file() else CONFIGS / "tiny.yaml"  # resnet9_tiny's config is tiny.yaml


def load_profiles() -> dict[str, list[str]]:
    data = parse_yaml(PROFILES.read_text(), str(PROFILES))
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(o, str) for o in v) for v in data.values()
    ):
        raise ConfigError(f"{PROFILES}: expected a mapping of profile name to a list of key=value strings")
    return data


def default_sweep_id() -> str:
    sha = (git_sha() or "nogit")[:7]
    return f"{datetime.now():%Y%m%d-%H%M%S}-{sha}"


@dataclass
class Plan:
    """One sweep as resolved before anything is submitted."""

    sweep: str
    sweep_dir: Path
    archs: list[str]
    overrides: list[str]  # profile + command line + the sweep's W&B group, in that order
    cluster: ClusterConfig
    executor: str  # "slurm" or "local"
    profile: str
    jobs: dict[str, dict] = field(default_factory=dict)  # arch -> {"job_id", "submitted"}

    def run_dir(self, arch: str) -> Path:
        return self.sweep_dir / arch

    def job_overrides(self, arch: str) -> list[str]:
        """What the job of `arch` passes to the trainer after its config file (one list for both
        the job and the dry run's command, so the dry run shows what runs)."""
        return [f"model.arch={arch}", *self.overrides]

    def command(self, arch: str) -> list[str]:
        return ["python", "-m", "trainer", "--config", str(config_path(arch)), "--run-dir", str(self.run_dir(arch)),
                *self.job_overrides(arch)]

    def save(self) -> None:
        from trainer.files import write_text_atomic

        record = {"sweep": self.sweep, "executor": self.executor, "profile": self.profile, "archs": self.archs,
                  "overrides": self.overrides, "cluster": asdict(self.cluster), "jobs": self.jobs,
                  "git_sha": git_sha()}
        write_text_atomic(self.sweep_dir / "sweep.json", json.dumps(record, indent=2) + "\n")


class TrainJob(submitit.helpers.Checkpointable):
    """What each task of a job runs: the trainer, with ranks exported from SLURM's variables.

    Checkpointable's checkpoint() resubmits this same object, which is all a requeue needs: the
    trainer resumes from its run folder.
    """

    def __init__(self, config: Path, overrides: list[str], run_dir: Path) -> None:
        self.config, self.overrides, self.run_dir = config, overrides, run_dir

    def __call__(self) -> dict | None:
        from trainer.training.run import train
        from trainer.training.stopping import Stopped

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            return train(self.config, self.overrides, self.run_dir)
        except Stopped as stop:
            if stop.signum == signal.SIGUSR2:
                # The trainer saved its state and put submitit's handler back; hand that handler
                # the signal: it calls checkpoint() and requeues the job (from rank 0).
                os.kill(os.getpid(), signal.SIGUSR2)
            return None


# ---- planning -------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> Plan:
    if args.all:
        archs = models.seed_names()
    else:
        archs = models.parse_names(args.arch, "--arch")

    profiles = load_profiles()
    if args.profile not in profiles:
        raise UserError(f"--profile: unknown profile '{args.profile}'; defined in {PROFILES}: {', '.join(profiles)}")

    layers = [(str(args.cluster), _read_yaml(args.cluster))]
    layers += [(f"--set '{o}'", parse_override(o)) for o in args.set]
    if args.nodes is not None:
        layers.append(("--nodes", {"nodes": args.nodes}))
    cluster = load_dataclass(ClusterConfig, layers)

    # Whether SLURM answers is checked by run(), and only when something is to be submitted: a dry
    # run shows the plan on a machine without a live controller too.
    executor = "local" if args.local or shutil.which("sbatch") is None else "slurm"
    if executor == "local" and cluster.nodes > 1:
        raise UserError("--nodes: the local executor runs on this machine only (nodes: 1)")
    sweep = args.sweep or default_sweep_id()
    if "/" in sweep or sweep.startswith("."):
        raise UserError(f"--sweep: '{sweep}' is not a plain folder name")
    overrides = [*profiles[args.profile], *args.overrides, f"logging.group={sweep}"]

    # Every job's config must resolve, and its data must exist, before anything is submitted.
    for arch in archs:
        cfg = load_config(config_path(arch), [f"model.arch={arch}", *overrides])
        verify(cfg.data.dir)  # a damaged or foreign .beton fails here, before anything is queued
    return Plan(sweep, Path(args.runs) / sweep, archs, overrides, cluster, executor, args.profile)


def _read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read cluster settings ({e.strerror})") from None
    data = parse_yaml(text, str(path))
    return data if data is not None else {}


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


def _executor(plan: Plan):
    c = plan.cluster
    ex = submitit.AutoExecutor(folder=plan.sweep_dir / "submitit" / "%j", cluster=plan.executor)
    params = dict(name=f"cifar-{plan.sweep}", timeout_min=c.time_min, nodes=c.nodes, tasks_per_node=c.tasks,
                  cpus_per_task=c.cpus_per_task, stderr_to_stdout=False)
    if c.gpus_per_node:  # asking a GPU-less cluster for gpus:0 is itself an error
        params["gpus_per_node"] = c.gpus_per_node
    if plan.executor == "slurm":
        slurm = dict(partition=c.partition, account=c.account, qos=c.qos, constraint=c.constraint,
                     signal_delay_s=c.signal_delay_s, array_parallelism=c.array_parallelism)
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
        if c.mem_gb is not None:
            params["mem_gb"] = c.mem_gb
    ex.update_parameters(**params)
    return ex


def _job(executor: str, sweep_dir: Path, job_id: str):
    """The submitit handle of a job submitted earlier by `executor` ("slurm" or "local")."""
    folder = sweep_dir / "submitit" / "%j"
    if executor == "slurm":
        return submitit.SlurmJob(folder=folder, job_id=job_id)
    return submitit.LocalJob(folder=folder, job_id=job_id)


def _previous_jobs(sweep_dir: Path) -> tuple[str | None, dict]:
    try:
        record = json.loads((sweep_dir / "sweep.json").read_text())
        return record["executor"], record["jobs"]
    except (OSError, ValueError, KeyError):
        return None, {}


def select(plan: Plan, force: bool, ask_slurm: bool = True) -> list[str]:
    """The architectures to submit now; says why each other one is left out. Without `ask_slurm`
    (a dry run), the jobs submitted earlier are listed as if they had ended, and said to be."""
    executor, previous = _previous_jobs(plan.sweep_dir)
    plan.jobs = dict(previous)
    chosen = []
    for arch in plan.archs:
        run_dir = plan.run_dir(arch)
        done = (run_dir / "summary.json").exists()
        if done and not force:
            print(f"{arch:15s} finished already ({run_dir / 'summary.json'}); --force to train it again")
            continue
        if arch in previous and executor == "slurm":
            if not ask_slurm:
                print(f"{arch:15s} job {previous[arch]['job_id']} was submitted earlier; its state is not asked in a "
                      f"dry run (python jobs/launch.py --status {plan.sweep})")
                chosen.append(arch)
                continue
            state = _job(executor, plan.sweep_dir, previous[arch]["job_id"]).state
            if state in ACTIVE_STATES:
                print(f"{arch:15s} still {state} as job {previous[arch]['job_id']}: not submitted again")
                continue
        chosen.append(arch)
    return chosen


def dry_run(plan: Plan, archs: list[str]) -> None:
    c = plan.cluster
    print(f"sweep {plan.sweep} -> {plan.sweep_dir} (executor: {plan.executor}; nothing submitted)")
    for arch in archs:
        res = (f"nodes={c.nodes} tasks_per_node={c.tasks} gpus_per_node={c.gpus_per_node} cpus_per_task={c.cpus_per_task} "
               f"mem_gb={c.mem_gb} time_min={c.time_min} partition={c.partition} account={c.account} qos={c.qos} "
               f"constraint={c.constraint} signal=USR2@{c.signal_delay_s}s")
        print(f"{arch}: {res}")
        print(f"  srun {shlex.join(plan.command(arch))}")  # quoted: pasted into a shell, it runs as planned


def _move_aside(run_dir: Path) -> None:
    """--force keeps what a previous run wrote: the folder is renamed, not deleted."""
    if run_dir.exists():
        kept = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
        run_dir.rename(kept)
        print(f"{run_dir.name:15s} previous run kept as {kept}")


def submit(plan: Plan, archs: list[str], force: bool) -> list:
    if force:
        for arch in archs:
            _move_aside(plan.run_dir(arch))
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    ex = _executor(plan)
    calls = [TrainJob(config_path(arch), plan.job_overrides(arch), plan.run_dir(arch)) for arch in archs]
    if plan.executor == "slurm":
        with ex.batch():  # one job array
            jobs = [ex.submit(call) for call in calls]
    else:
        jobs = [ex.submit(call) for call in calls]
    now = datetime.now().isoformat(timespec="seconds")
    for arch, job in zip(archs, jobs):
        plan.jobs[arch] = {"job_id": job.job_id, "submitted": now}
    plan.save()
    return jobs


# ---- watching -------------------------------------------------------------------------------


def _progress(run_dir: Path) -> tuple[int, float | None]:
    try:
        rows = read_metrics(run_dir, skipped=[])  # a torn line is left out; the report names it
    except (OSError, ValueError):
        return 0, None
    return (rows[-1]["epoch"], max(r["test_acc"] for r in rows)) if rows else (0, None)


def job_lines(sweep_dir: Path) -> tuple[list[dict], dict]:
    """One entry per architecture of the sweep: state, epoch, best accuracy, log, failure."""
    record = json.loads((sweep_dir / "sweep.json").read_text())
    if record["executor"] == "slurm":
        check_slurm()
    entries = []
    for arch in record["archs"]:
        run_dir = sweep_dir / arch
        epoch, best = _progress(run_dir)
        info = record["jobs"].get(arch)
        entry = {"arch": arch, "job_id": info["job_id"] if info else None, "epoch": epoch, "best": best,
                 "finished": (run_dir / "summary.json").exists(), "log": None, "error": None}
        if info is None:
            entry["state"] = "NOT SUBMITTED"
        else:
            job = _job(record["executor"], sweep_dir, info["job_id"])
            entry["state"] = job.state if record["executor"] == "slurm" else ("FINISHED" if job.paths.result_pickle.exists() else "RUNNING?")
            entry["log"] = str(job.paths.stdout)
            if entry["state"] in ("FAILED", "FINISHED", "COMPLETED", "NODE_FAIL", "OUT_OF_MEMORY") and not entry["finished"]:
                entry["error"] = _failure(job)
        entries.append(entry)
    return entries, record


def _failure(job) -> str | None:
    """The remote traceback of a job that ended without a summary (submitit keeps it)."""
    try:
        if not job.paths.result_pickle.exists():
            return None
        error = job.exception()
        return str(error) if error is not None else None
    except Exception as e:  # a half-written result file: say so rather than fail the status
        return f"(could not read the job's result: {type(e).__name__}: {e})"


def print_status(sweep_dir: Path) -> list[dict]:
    entries, record = job_lines(sweep_dir)
    print(f"sweep {record['sweep']} ({record['executor']}, profile {record['profile']}): {sweep_dir}")
    print(f"  {'arch':15s} {'state':13s} {'job':>10s}  {'epoch':>5s}  {'best':>7s}  summary  log")
    for e in entries:
        best = f"{e['best']:.2f}%" if e["best"] is not None else "-"
        print(f"  {e['arch']:15s} {e['state']:13s} {e['job_id'] or '-':>10s}  {e['epoch']:5d}  {best:>7s}  "
              f"{'yes' if e['finished'] else 'no':7s}  {e['log']}")
    for e in entries:
        if e["error"]:
            print(f"\n--- {e['arch']} (job {e['job_id']}) failed:\n{e['error'].rstrip()}")
    return entries


def _terminal(e: dict) -> bool:
    return e["finished"] or e["state"] not in ACTIVE_STATES | {"RUNNING?", "UNKNOWN", "NOT SUBMITTED"}


def wait(sweep_dir: Path, poll_s: float = 5.0) -> int:
    """Blocks until every job of the sweep has ended, showing progress; 1 if any failed."""
    last = None
    while True:
        entries, _ = job_lines(sweep_dir)
        view = [(e["arch"], e["state"], e["epoch"], e["finished"]) for e in entries]
        if view != last:
            print_status(sweep_dir) if all(_terminal(e) for e in entries) else _print_brief(entries)
            last = view
        if all(_terminal(e) for e in entries):
            break
        time.sleep(poll_s)
    print()
    try:  # the comparison with the seed's table, report.md/.csv, plots, the W&B report run
        from trainer.report import make_report

        # Deployment figures and the ensemble run models on this machine (a login node, often a
        # CPU): jobs/report.py measures them where it is run.
        make_report(sweep_dir, deploy=False, use_ensemble=False)
    except Exception as error:  # the jobs' outcome decides the exit code, not a failed report
        reason = (str(error).splitlines() or [""])[0]
        print(f"warning: the sweep report failed ({type(error).__name__}: {reason}); retry: python jobs/report.py {sweep_dir}")
    failed = [e["arch"] for e in entries if not e["finished"]]
    if failed:
        print(f"\nnot finished: {', '.join(failed)}")
    return 1 if failed else 0


def _print_brief(entries: list[dict]) -> None:
    parts = [f"{e['arch']}:{'DONE' if e['finished'] else e['state']}@{e['epoch']}" for e in entries]
    print(f"[{datetime.now():%H:%M:%S}] " + "  ".join(parts), flush=True)


# ---- command line ---------------------------------------------------------------------------


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
    parser.add_argument("--force", action="store_true", help="train finished architectures again (their old folders are kept)")
    parser.add_argument("--local", action="store_true", help="run the jobs on this machine with submitit's local executor")
    parser.add_argument("--dry-run", action="store_true", help="print each job's resources and command; submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the jobs end, then print the comparison")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides for every job")
    args = parser.parse_args(argv)
    cli.run(lambda: run(args))


def _sweep_dir(runs: str, sweep: str) -> Path:
    path = Path(sweep) if Path(sweep).is_dir() and (Path(sweep) / "sweep.json").exists() else Path(runs) / sweep
    if not (path / "sweep.json").exists():
        raise UserError(f"{path}: no sweep.json: not a sweep folder")
    return path


def run(args: argparse.Namespace) -> int:
    if args.status:
        sweep_dir = _sweep_dir(args.runs, args.status)
        if args.wait:
            return wait(sweep_dir)
        entries = print_status(sweep_dir)
        return 1 if any(e["error"] for e in entries) else 0

    plan = make_plan(args)
    if plan.executor == "local":
        why = "--local" if args.local else "no sbatch on PATH"
        print(f"{why}: running the jobs on this machine with submitit's local executor")
    elif not args.dry_run:  # a dry run submits nothing, so needs no controller
        check_slurm()
    archs = select(plan, args.force, ask_slurm=not args.dry_run)
    if args.dry_run:
        dry_run(plan, archs)
        return 0
    if not archs:
        print("nothing to submit")
        return 0
    jobs = submit(plan, archs, args.force)
    where = f"partition {plan.cluster.partition}" if plan.executor == "slurm" else "this machine"
    print(f"submitted {len(jobs)} job(s) of sweep {plan.sweep} to {where}: " + ", ".join(f"{a}={j.job_id}" for a, j in zip(archs, jobs)))
    print(f"runs in {plan.sweep_dir}; watch with: python jobs/launch.py --status {plan.sweep} --wait")
    if args.wait or plan.executor == "local":  # local jobs are children of this process: stay with them
        return wait(plan.sweep_dir, poll_s=2.0 if plan.executor == "local" else 5.0)
    return 0
