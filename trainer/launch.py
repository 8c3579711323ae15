"""The sweep launcher behind `python jobs/launch.py`: one SLURM job per architecture, via submitit.

    python jobs/launch.py --all [--profile smoke|full] [--cluster slurm/local.yaml] [-C key=value]
                          [--sweep NAME] [--force] [--nodes K] [--local] [--dry-run] [--wait]
                          [--seeds N] [--yes] [key=value ...]
    python jobs/launch.py --status SWEEP [--wait]

A sweep has an id (default: date, time and the code's short git hash) that names its folder,
runs/<sweep>/, with one run folder per job, submitit's logs (runs/<sweep>/submitit/) and sweep.json
(each job by name: its architecture, grid point, seed, and the SLURM job it was submitted as). The
id is also the W&B group. Re-running a sweep skips jobs that finished (summary.json) or are still
queued or running, and resubmits the others, which resume from their checkpoints.

Seeds and grids: `--seeds N` trains every job N times with train.seed=0..N-1, and a comma list in an
override (`optim.lr=0.05,0.1 train.ema=0,0.999`) makes a grid: every combination x architecture x
seed, all in one job array. A job's name, which is its run folder's and its W&B run's, is the
architecture, then the grid point (lr0.05-ema0), then s<seed>: runs/<sweep>/resnet-lr0.05-ema0-s1/.
Without either, it is the architecture alone, as before. More than CONFIRM_ABOVE jobs need --yes.

Each job is one node (or --nodes K) with one task per GPU started by srun (on CPU-only clusters,
`tasks_per_node` tasks); ranks come from submitit's TorchDistributedEnvironment. The submitted
callable is Checkpointable: on USR2 (preemption or the time limit coming) the trainer saves a
checkpoint within about train.stop_check_s, then submitit requeues the job, which resumes.

--local runs the jobs on this machine with submitit's local executor, as children of the launcher,
which stays with them: each job gets its own GPUs (gpus_per_node of them, one when 0, one process
each), at most array_parallelism jobs run at once, and the others wait in the launcher's queue until
a job ends and frees its GPUs. Without GPUs, jobs run on the CPU, array_parallelism at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import submitit

from trainer import UserError, cli, models, run_files
from trainer.config import ConfigError, load_config, load_dataclass, parse_override, parse_yaml
from trainer.data.checks import verify
from trainer.provenance import git_sha
from trainer.run_files import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs/configs"
PROFILES = REPO / "jobs/profiles.yaml"
DEFAULT_CLUSTER = REPO / "slurm/local.yaml"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}
# The GPUs --local schedules on, instead of those torch sees: comma-separated indices, empty for none.
# Tests simulate a machine with GPUs with it (the jobs then train on the CPU, but each sees its list).
LOCAL_GPUS_ENV = "TRAINER_LOCAL_GPUS"


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
    # --local only: jobs that share one GPU (or one group of gpus_per_node), for runs too small to
    # fill a GPU; SLURM jobs never share theirs.
    jobs_per_gpu: int = 1
    gres: str | None = None  # e.g. "gpu:a100:4", for clusters that take GPUs only as --gres (replaces --gpus-per-node)
    mem_per_gpu: int | None = None  # GB per GPU, instead of mem_gb (SLURM takes one of the two)
    exclude: str | None = None  # nodes never to use, e.g. "node[07,12]"
    # Lines the batch script runs before srun starts the trainers: `module load cuda/12.4`,
    # `source /path/to/venv/bin/activate`, `conda activate cifar`...
    setup: list[str] = field(default_factory=list)
    # Further sbatch options as "name=value" (or "name" alone), e.g. "reservation=gpu-week", "exclusive".
    sbatch: list[str] = field(default_factory=list)
    # How many times a job that reaches its time limit is requeued (it resumes from its checkpoint);
    # submitit's default is 3. A 150-epoch run on a 2-hour partition needs more: about total time /
    # time_min. Preemptions do not count against it.
    max_requeues: int = 3
    # An Apptainer image (.sif) to run each job's Python in (`apptainer exec --nv IMAGE python`), e.g.
    # one built from containers/cifar-infinity.def; null: the launcher's own interpreter. The image
    # must hold this version of the project: the jobs unpickle the launcher's job objects.
    container: str | None = None

    def __post_init__(self) -> None:
        for name in ("time_min", "cpus_per_task", "array_parallelism", "nodes", "jobs_per_gpu"):
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
        if self.mem_per_gpu is not None and self.mem_gb is not None:
            raise ValueError("mem_per_gpu: SLURM takes mem_gb (per node) or mem_per_gpu, not both; set the other to null")
        if self.mem_per_gpu is not None and self.mem_per_gpu < 1:
            raise ValueError(f"mem_per_gpu: must be at least 1 (GB), got {self.mem_per_gpu}")
        if self.max_requeues < 0:
            raise ValueError(f"max_requeues: must not be negative, got {self.max_requeues}")
        self.sbatch_options()  # malformed entries fail when the file is read

    def sbatch_options(self) -> dict[str, str | bool]:
        """The `sbatch` entries as submitit's additional_parameters: "name=value" or a bare flag."""
        options: dict[str, str | bool] = {}
        for entry in self.sbatch:
            name, eq, value = entry.partition("=")
            name = name.strip().removeprefix("--")
            if not name or " " in name or (eq and not value.strip()):
                raise ValueError(f"sbatch: '{entry}' is not 'name=value' or 'name' (e.g. 'reservation=gpu-week')")
            options[name] = value.strip() if eq else True
        return options

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


# ---- seeds and grids ------------------------------------------------------------------------

# A sweep of more jobs than this (architectures x grid points x seeds) needs --yes: a typo in a
# grid (a list where one value was meant) should not fill a cluster's queue.
CONFIRM_ABOVE = 50


def grid_values(override: str) -> list[str]:
    """The values of one `key=value` override: several when the value is a comma list
    (`optim.lr=0.05,0.1`), one otherwise. Only top-level commas of scalars split: a comma inside
    brackets or braces (`logging.tags=[a,b]`) or inside a quoted value (`data.dir="a,b"`) is part
    of the value."""
    _, sep, raw = override.partition("=")
    if not sep:
        return [raw]  # not key=value: the config's parser names the problem
    values, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(raw):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"" and depth == 0 and raw[start:i].strip() == "":  # a quote opening a value
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    if len(values) == 1:
        return [raw]
    values = [v.strip() for v in values]
    if any(v == "" for v in values):
        raise UserError(f"'{override}': an empty value in a comma list; a grid is key=v1,v2,...")
    if len(set(values)) != len(values):
        raise UserError(f"'{override}': a value given twice in a comma list")
    return values


def _safe(text: str) -> str:
    """`text` with what a folder name or a shell could trip on replaced by '_'."""
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in text).strip("_") or "_"


@dataclass(frozen=True)
class Job:
    """One training run of a sweep: an architecture at a grid point with a seed."""

    name: str  # the run folder's name under runs/<sweep>/, the W&B run's name and sweep.json's key
    arch: str
    point: str | None = None  # the grid point's name, e.g. "lr0.05-ema0"; None without a grid
    seed: int | None = None  # train.seed; None without --seeds (the config's seed)
    overrides: tuple[str, ...] = ()  # the point's key=value overrides and train.seed=K


def expand_grid(overrides: list[str]) -> tuple[list[str], list[tuple[str, tuple[str, ...]]]]:
    """The overrides every job shares, and the grid's points in order (the first key varies
    slowest): each a short, filesystem-safe name and its key=value overrides. One point named ""
    without a comma list."""
    fixed, axes = [], []
    for override in overrides:
        values = grid_values(override)
        if len(values) == 1:
            fixed.append(override)
        else:
            axes.append((override.partition("=")[0], values))
    keys = [k for k, _ in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1} | {k for k in keys if any(o.startswith(f"{k}=") for o in fixed)})
    if repeated:
        raise UserError(f"{', '.join(repeated)}: given twice (once as a comma list); give each grid key once")
    if not axes:
        return fixed, [("", ())]
    # The key's last part names it in the point (lr, ema), unless two keys share it (then the whole key).
    last = [k.rpartition(".")[2] for k in keys]
    labels = [_safe(k if last.count(s) > 1 else s) for k, s in zip(keys, last)]
    points = [()]
    for key, values in axes:
        points = [(*p, (key, v)) for p in points for v in values]
    named = [("-".join(f"{label}{_safe(v)}" for label, (_, v) in zip(labels, p)), tuple(f"{k}={v}" for k, v in p))
             for p in points]
    if len({name for name, _ in named}) < len(named):  # values that differ only in characters _safe replaced
        named = [(f"p{i}", o) for i, (_, o) in enumerate(named)]
    return fixed, named


def plan_jobs(archs: list[str], points: list[tuple[str, tuple[str, ...]]], seeds: int | None) -> list[Job]:
    """Every architecture x point x seed, architecture-major. The name: the architecture, then the
    point's name, then s<seed> with --seeds (seed k of --seeds N is train.seed=k, k = 0..N-1)."""
    jobs = []
    for arch in archs:
        for point, point_overrides in points:
            for seed in range(seeds) if seeds is not None else [None]:
                parts = [arch, point, f"s{seed}" if seed is not None else ""]
                name = "-".join(p for p in parts if p)
                extra = (*point_overrides, *([f"train.seed={seed}"] if seed is not None else []))
                jobs.append(Job(name, arch, point or None, seed, extra))
    return jobs


@dataclass
class Plan:
    """One sweep as resolved before anything is submitted."""

    sweep: str
    sweep_dir: Path
    archs: list[str]
    overrides: list[str]  # what every job shares: profile + command line (less the grid) + the sweep's W&B group
    cluster: ClusterConfig
    executor: str  # "slurm" or "local"
    profile: str
    runs: list[Job] = field(default_factory=list)  # architectures x grid points x seeds
    jobs: dict[str, dict] = field(default_factory=dict)  # job name -> {"job_id", "submitted"}

    def job(self, name: str) -> Job:
        return next(j for j in self.runs if j.name == name)

    def run_dir(self, name: str) -> Path:
        return self.sweep_dir / name

    def job_overrides(self, job: Job) -> list[str]:
        """What `job` passes to the trainer after its config file (one list for both the job and
        the dry run's command, so the dry run shows what runs)."""
        return [f"model.arch={job.arch}", *self.overrides, *job.overrides]

    def command(self, job: Job) -> list[str]:
        return ["python", "-m", "trainer", "--config", str(config_path(job.arch)), "--run-dir",
                str(self.run_dir(job.name)), *self.job_overrides(job)]

    def train_job(self, job: Job) -> TrainJob:
        return TrainJob(config_path(job.arch), self.job_overrides(job), self.run_dir(job.name))

    def save(self) -> None:
        from trainer.files import write_text_atomic

        # "runs" says what each run folder is (the report groups seeds by architecture and point
        # with it); "archs" stays for readers of sweeps from before seeds and grids.
        runs = [{"name": j.name, "arch": j.arch, "point": j.point, "seed": j.seed, "overrides": list(j.overrides)}
                for j in self.runs]
        record = {"sweep": self.sweep, "executor": self.executor, "profile": self.profile, "archs": self.archs,
                  "runs": runs, "overrides": self.overrides, "cluster": asdict(self.cluster), "jobs": self.jobs,
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
        # In the job's log: when it started and with which GPUs (under --local, the slot it was given).
        print(f"{datetime.now().isoformat(timespec='milliseconds')} job started on {socket.gethostname()}: "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}", flush=True)
        from trainer.distributed import export_submitit_env
        from trainer.training.run import train
        from trainer.training.stopping import Stopped

        export_submitit_env()
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
    # Comma lists on the command line make the grid; the profile's values are single.
    shared, points = expand_grid(args.overrides)
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds: must be at least 1, got {args.seeds}")
        if any(o.startswith("train.seed=") for o in shared + [o for _, p in points for o in p]):
            raise UserError("--seeds sets train.seed (0..N-1) itself: drop the train.seed override")
    runs = plan_jobs(archs, points, args.seeds)
    if len(runs) > CONFIRM_ABOVE and not args.yes and not args.dry_run:
        raise UserError(f"{len(runs)} jobs ({len(archs)} architecture(s) x {len(points)} grid point(s) x "
                        f"{args.seeds or 1} seed(s)): more than {CONFIRM_ABOVE}; add --yes to submit them "
                        "(--dry-run lists them)")
    overrides = [*profiles[args.profile], *shared, f"logging.group={sweep}"]

    # Every job's config must resolve, and its data must exist, before anything is submitted (the
    # seeds of an architecture and point differ in train.seed only: their first stands for them).
    for job in [j for j in runs if j.seed in (None, 0)]:
        arch = job.arch
        cfg = load_config(config_path(arch), [f"model.arch={arch}", *overrides, *job.overrides])
        ensure_data(cfg.data.dir)  # a damaged or foreign .beton fails here, before anything is queued
    return Plan(sweep, Path(args.runs) / sweep, archs, overrides, cluster, executor, args.profile, runs)


def ensure_data(data_dir: str | Path) -> None:
    """Checks the data every job will read; a data.dir with no .beton at all (a newcomer's first
    sweep) is prepared first, from $CIFAR10_SOURCE or the official download, as `prepare` would."""
    data_dir = Path(data_dir)
    if not any(data_dir.glob("*.beton")):
        from trainer.data.cifar10 import prepare

        print(f"{data_dir}: no .beton files yet; preparing CIFAR-10 there first (python -m trainer.data prepare)")
        prepare(data_dir)
    verify(data_dir)


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
    ex = submitit.AutoExecutor(folder=plan.sweep_dir / "submitit" / "%j", cluster=plan.executor,
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
    ex = _executor(plan)
    return ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "<uid>")


# ---- this machine (--local) ------------------------------------------------------------------


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
    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=cluster.time_min, tasks_per_node=cluster.tasks, gpus_per_node=len(devices),
                         visible_gpus=list(devices), signal_delay_s=cluster.signal_delay_s, stderr_to_stdout=False)
    return ex


def run_local(plan: Plan, names: list[str], slots: list[tuple[int, ...]], force: bool, poll_s: float = 2.0) -> int:
    """Trains the jobs `names` on this machine, at most one per slot, and waits for all of them."""
    if force:
        for name in names:
            _move_aside(plan.run_dir(name))
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now().isoformat(timespec="seconds")
    for name in names:
        plan.jobs[name] = {"job_id": None, "queued": now}  # --status shows QUEUED until the job starts
    plan.save()
    width = _width(names)

    def start(name: str, devices: tuple[int, ...]):
        ex = local_executor(plan.sweep_dir / "submitit" / "%j", plan.cluster, devices)
        job = ex.submit(plan.train_job(plan.job(name)))
        plan.jobs[name] = {"job_id": job.job_id, "submitted": datetime.now().isoformat(timespec="seconds"),
                           "devices": list(devices)}
        plan.save()
        print(f"{name:{width}s} started as job {job.job_id} on {slot_text(devices)}", flush=True)
        return job

    print(f"{len(names)} job(s) of sweep {plan.sweep} on this machine: {slots_text(slots)}; the others wait for a "
          "job to end")
    print(f"runs in {plan.sweep_dir}; the jobs are children of this process: it stays until they end")
    return wait(plan.sweep_dir, poll_s=poll_s, step=LocalRunner(SlotQueue(slots, names), start).step)


def _width(names: list[str]) -> int:
    """The column width that fits every job name (15 fits the architectures alone)."""
    return max([15, *map(len, names)])


def _job(executor: str, sweep_dir: Path, job_id: str):
    """The submitit handle of a job submitted earlier by `executor` ("slurm" or "local")."""
    folder = sweep_dir / "submitit" / "%j"
    if executor == "slurm":
        return submitit.SlurmJob(folder=folder, job_id=job_id)
    return submitit.LocalJob(folder=folder, job_id=job_id)


def _previous_jobs(sweep_dir: Path) -> tuple[str | None, dict, list[Job]]:
    """What sweep.json recorded: the executor, each job's submission, and the runs (from a sweep
    before seeds and grids: one per architecture)."""
    try:
        record = json.loads((sweep_dir / "sweep.json").read_text())
        return record["executor"], record["jobs"], record_runs(record)
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}, []


def record_runs(record: dict) -> list[Job]:
    if "runs" not in record:
        return [Job(arch, arch) for arch in record["archs"]]
    return [Job(r["name"], r["arch"], r["point"], r["seed"], tuple(r["overrides"])) for r in record["runs"]]


def select(plan: Plan, force: bool, ask_slurm: bool = True) -> list[str]:
    """The jobs (by name) to submit now; says why each other one is left out. Without `ask_slurm`
    (a dry run), the jobs submitted earlier are listed as if they had ended, and said to be.

    The sweep keeps the runs of earlier launches that this one does not name (a second launch with
    --seeds 5 after --seeds 3 adds seeds 3 and 4; the report and --status show all five)."""
    executor, previous, earlier = _previous_jobs(plan.sweep_dir)
    plan.jobs = dict(previous)
    names = {j.name for j in plan.runs}
    plan.runs = [j for j in earlier if j.name not in names] + plan.runs
    plan.archs = list(dict.fromkeys(j.arch for j in plan.runs))
    width = _width(list(names))
    chosen = []
    for name in names_in_order(plan, names):
        run_dir = plan.run_dir(name)
        done = (run_dir / "summary.json").exists()
        if done and not force:
            print(f"{name:{width}s} finished already ({run_dir / 'summary.json'}); --force to train it again")
            continue
        if name in previous and executor == "slurm" and previous[name]["job_id"] is not None:
            if not ask_slurm:
                print(f"{name:{width}s} job {previous[name]['job_id']} was submitted earlier; its state is not asked "
                      f"in a dry run (python jobs/launch.py --status {plan.sweep})")
                chosen.append(name)
                continue
            state = _job(executor, plan.sweep_dir, previous[name]["job_id"]).state
            if state in ACTIVE_STATES:
                print(f"{name:{width}s} still {state} as job {previous[name]['job_id']}: not submitted again")
                continue
        chosen.append(name)
    return chosen


def names_in_order(plan: Plan, names: set[str]) -> list[str]:
    return [j.name for j in plan.runs if j.name in names]


def dry_run(plan: Plan, names: list[str], slots: list[tuple[int, ...]] | None = None) -> None:
    c = plan.cluster
    print(f"sweep {plan.sweep} -> {plan.sweep_dir} (executor: {plan.executor}; nothing submitted)")
    if slots is not None:
        print(f"this machine: {slots_text(slots)}")
    if len(plan.runs) > CONFIRM_ABOVE:
        print(f"{len(plan.runs)} jobs: more than {CONFIRM_ABOVE}; submitting them needs --yes")
    for name in names:
        res = (f"nodes={c.nodes} tasks_per_node={c.tasks} gpus_per_node={c.gpus_per_node} cpus_per_task={c.cpus_per_task} "
               f"mem_gb={c.mem_gb} time_min={c.time_min} partition={c.partition} account={c.account} qos={c.qos} "
               f"constraint={c.constraint} signal=USR2@{c.signal_delay_s}s")
        print(f"{name}: {res}")
        print(f"  srun {shlex.join(plan.command(plan.job(name)))}")  # quoted: pasted into a shell, it runs as planned


def _move_aside(run_dir: Path) -> None:
    """--force keeps what a previous run wrote: the folder is renamed, not deleted."""
    if run_dir.exists():
        kept = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
        run_dir.rename(kept)
        print(f"{run_dir.name:15s} previous run kept as {kept}")


def submit(plan: Plan, names: list[str], force: bool) -> list:
    """Submits the jobs `names` to SLURM as one job array, at most array_parallelism running at once
    (--local jobs start through run_local)."""
    if force:
        for name in names:
            _move_aside(plan.run_dir(name))
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    ex = _executor(plan)
    calls = [plan.train_job(plan.job(name)) for name in names]
    with ex.batch():  # one job array
        jobs = [ex.submit(call) for call in calls]
    now = datetime.now().isoformat(timespec="seconds")
    for name, job in zip(names, jobs):
        plan.jobs[name] = {"job_id": job.job_id, "submitted": now}
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
    """One entry per job of the sweep (architecture, grid point, seed): state, epoch, best accuracy,
    log, failure."""
    record = json.loads((sweep_dir / "sweep.json").read_text())
    if record["executor"] == "slurm":
        check_slurm()
    entries = []
    for run in record_runs(record):
        run_dir = sweep_dir / run.name
        epoch, best = _progress(run_dir)
        info = record["jobs"].get(run.name)
        entry = {"name": run.name, "arch": run.arch, "job_id": info["job_id"] if info else None, "epoch": epoch, "best": best,
                 "finished": (run_dir / "summary.json").exists(), "log": None, "error": None,
                 "wandb": _wandb_link(run_dir)}
        if info is None:
            entry["state"] = "NOT SUBMITTED"
        elif info["job_id"] is None:  # --local: waiting in the launcher for a free slot
            entry["state"] = "QUEUED"
        else:
            job = _job(record["executor"], sweep_dir, info["job_id"])
            entry["state"] = job.state if record["executor"] == "slurm" else ("FINISHED" if job.paths.result_pickle.exists() else "RUNNING?")
            entry["log"] = str(job.paths.stdout)
            if entry["state"] in ("FAILED", "FINISHED", "COMPLETED", "NODE_FAIL", "OUT_OF_MEMORY") and not entry["finished"]:
                entry["error"] = _failure(job)
        entries.append(entry)
    return entries, record


def _wandb_link(run_dir: Path) -> str | None:
    """Where the run is on W&B: its URL online, its `wandb sync` folder offline (the trainer's wandb.json)."""
    try:
        record = json.loads((run_dir / run_files.WANDB).read_text())
        return record.get("url") or (f"offline: {record['offline_dir']}" if record.get("offline_dir") else None)
    except (OSError, ValueError, KeyError, AttributeError):  # no W&B run (yet), or a file cut short
        return None


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
    width = _width([e["name"] for e in entries])
    print(f"sweep {record['sweep']} ({record['executor']}, profile {record['profile']}): {sweep_dir}")
    print(f"  {'run':{width}s} {'state':13s} {'job':>10s}  {'epoch':>5s}  {'best':>7s}  summary  log")
    for e in entries:
        best = f"{e['best']:.2f}%" if e["best"] is not None else "-"
        print(f"  {e['name']:{width}s} {e['state']:13s} {e['job_id'] or '-':>10s}  {e['epoch']:5d}  {best:>7s}  "
              f"{'yes' if e['finished'] else 'no':7s}  {e['log']}")
    links = [e for e in entries if e["wandb"]]
    if links:
        print("  W&B:" + "".join(f"\n    {e['name']:{width}s} {e['wandb']}" for e in links))
    for e in entries:
        if e["error"]:
            print(f"\n--- {e['name']} (job {e['job_id']}) failed:\n{e['error'].rstrip()}")
    return entries


def _terminal(e: dict) -> bool:
    return e["finished"] or e["state"] not in ACTIVE_STATES | {"RUNNING?", "UNKNOWN", "NOT SUBMITTED", "QUEUED"}


def wait(sweep_dir: Path, poll_s: float = 5.0, step: Callable[[], bool] | None = None) -> int:
    """Blocks until every job of the sweep has ended, showing progress; 1 if any failed. `step` (the
    --local scheduler's) is called every poll: it starts queued jobs, and says whether any job still
    runs or waits, which decides the end: it sees its jobs' processes, so a job killed before it
    wrote its result ends the wait too."""
    last = None
    while True:
        busy = step() if step is not None else None
        entries, _ = job_lines(sweep_dir)
        ended = not busy if step is not None else all(_terminal(e) for e in entries)
        view = [(e["name"], e["state"], e["epoch"], e["finished"]) for e in entries]
        if view != last or ended:
            print_status(sweep_dir) if ended else _print_brief(entries)
            last = view
        if ended:
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
    failed = [e["name"] for e in entries if not e["finished"]]
    if failed:
        print(f"\nnot finished: {', '.join(failed)}")
    return 1 if failed else 0


def _print_brief(entries: list[dict]) -> None:
    parts = [f"{e['name']}:{'DONE' if e['finished'] else e['state']}@{e['epoch']}" for e in entries]
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
    parser.add_argument("--seeds", type=int, metavar="N", help="train each architecture (and grid point) N times, train.seed=0..N-1; run folders end in -s<seed>")
    parser.add_argument("--yes", action="store_true", help=f"submit a sweep of more than {CONFIRM_ABOVE} jobs")
    parser.add_argument("--force", action="store_true", help="train finished runs again (their old folders are kept)")
    parser.add_argument("--local", action="store_true", help="run the jobs on this machine with submitit's local executor")
    parser.add_argument("--dry-run", action="store_true", help="print each job's resources and command; submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the jobs end, then print the comparison")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="trainer config overrides for every job; a comma list (optim.lr=0.05,0.1) makes a grid")
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
    slots = None
    if plan.executor == "local":
        why = "--local" if args.local else "no sbatch on PATH"
        print(f"{why}: running the jobs on this machine with submitit's local executor")
        slots = local_slots(local_gpus(), plan.cluster)  # a job this machine cannot hold fails here
    elif not args.dry_run:  # a dry run submits nothing, so needs no controller
        check_slurm()
    names = select(plan, args.force, ask_slurm=not args.dry_run)
    if args.dry_run:
        dry_run(plan, names, slots)
        if plan.executor == "slurm":
            print(f"the batch script (one job array; submitit's, with the cluster settings as sbatch lines):\n"
                  f"{sbatch_script(plan)}")
        return 0
    if not names:
        print("nothing to submit")
        return 0
    if slots is not None:  # local jobs are children of this process: it stays with them
        return run_local(plan, names, slots, args.force)
    jobs = submit(plan, names, args.force)
    print(f"submitted {len(jobs)} job(s) of sweep {plan.sweep} to partition {plan.cluster.partition}: "
          + ", ".join(f"{n}={j.job_id}" for n, j in zip(names, jobs)))
    print(f"runs in {plan.sweep_dir}; watch with: python jobs/launch.py --status {plan.sweep} --wait")
    if args.wait:
        return wait(plan.sweep_dir)
    return 0
