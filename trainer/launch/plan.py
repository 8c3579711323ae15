"""The plan of a sweep: which jobs, with which config and overrides, where their run folders are,
and which of them to submit now (a re-launch skips jobs that finished or are still queued).

Each architecture trains with the recipe config its ModelSpec names (jobs/configs/), then the
profile's overrides (jobs/profiles.yaml), then the command line's, then its grid point's and seed's.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from trainer import UserError, models, run_files, sweep_file
from trainer.config import Config, load_config
from trainer.launch.cluster import ClusterConfig, load_cluster
from trainer.launch.grid import CONFIRM_ABOVE, MAX_JOBS, expand_grid, name_width, plan_jobs
from trainer.launch.state import ACTIVE_STATES, job_handle
from trainer.provenance import git_sha
from trainer.strict_yaml import ConfigError, load_dataclass, parse_yaml
from trainer.sweep_file import Job, SweepFileError, SweepRecord

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "jobs/configs"
PROFILES = REPO / "jobs/profiles.yaml"


def config_path(arch: str) -> Path:
    """The recipe config `arch` trains with: the file under jobs/configs/ that its ModelSpec names."""
    return recipe_path(models.spec(arch))


def recipe_path(spec: models.ModelSpec) -> Path:
    # An architecture without its own recipe is refused by name: another network's is no default.
    if spec.recipe is None:
        raise UserError(f"architecture '{spec.name}' names no recipe config: add recipe=\"<file under {CONFIGS}>\" "
                        "to its register line in trainer/models/__init__.py")
    path = CONFIGS / spec.recipe
    if not path.is_file():
        raise UserError(f"architecture '{spec.name}': its recipe config {path} does not exist")
    return path


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

    def train_job(self, job: Job):
        from trainer.launch.job import TrainJob  # submitit, imported once there is a job to submit

        return TrainJob(config_path(job.arch), self.job_overrides(job), self.run_dir(job.name))

    def data_dirs(self) -> list[Path]:
        """The data folders the jobs read (a containerised job mounts them); the seeds of an
        architecture and grid point share their first's."""
        configs = [load_config(config_path(job.arch), self.job_overrides(job), archs=models.names())
                   for job in self.runs if job.seed in (None, 0)]
        return list(dict.fromkeys(Path(cfg.data.dir) for cfg in configs))

    def save(self) -> None:
        sweep_file.write(self.sweep_dir, SweepRecord(self.sweep, self.runs, self.archs, self.executor, self.profile,
                                                     self.overrides, asdict(self.cluster), self.jobs, git_sha()))

    def move_aside(self, names: list[str]) -> None:
        """--force keeps what a previous run wrote: the folder is renamed, not deleted."""
        for name in names:
            kept = run_files.move_aside(self.run_dir(name))
            if kept is not None:
                print(f"{name:15s} previous run kept as {kept}")


def make_plan(args: argparse.Namespace) -> Plan:
    if args.all:
        archs = models.seed_names()
    else:
        archs = models.parse_names(args.arch, "--arch")

    profiles = load_profiles()
    if args.profile not in profiles:
        raise UserError(f"--profile: unknown profile '{args.profile}'; defined in {PROFILES}: {', '.join(profiles)}")

    cluster = load_cluster(args.cluster, args.set, args.nodes, args.retries)

    # Only --local runs the jobs here: a machine without SLURM is told so (below), not handed a
    # sweep of 150-epoch runs unasked. Whether SLURM answers is checked by run(), and only when
    # something is to be submitted: a dry run shows the plan on a machine without a controller too.
    executor = "local" if args.local else "slurm"
    if executor == "local" and cluster.nodes > 1:
        raise UserError("--nodes: the local executor runs on this machine only (nodes: 1)")
    if executor == "slurm" and cluster.container:
        check_image(cluster.container, cluster.container_runtime)
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
    count = len(archs) * len(points) * (args.seeds or 1)  # before listing them: --seeds 200000 is a typo
    sizes = f"({len(archs)} architecture(s) x {len(points)} grid point(s) x {args.seeds or 1} seed(s))"
    if count > MAX_JOBS:
        raise UserError(f"{count} jobs {sizes}: one sweep holds at most {MAX_JOBS} (a SLURM job array's default "
                        "MaxArraySize); split it into several sweeps")
    if count > CONFIRM_ABOVE and not args.yes and not args.dry_run:
        raise UserError(f"{count} jobs {sizes}: more than {CONFIRM_ABOVE}; add --yes to submit them "
                        "(--dry-run lists them)")
    runs = plan_jobs(archs, points, args.seeds)
    overrides = [*profiles[args.profile], *shared, f"logging.group={sweep}"]

    # Every job's config must resolve, and its data must exist, before anything is submitted (the
    # seeds of an architecture and point differ in train.seed only: their first stands for them).
    configs = [load_config(config_path(job.arch), [f"model.arch={job.arch}", *overrides, *job.overrides],
                           archs=models.names()) for job in runs if job.seed in (None, 0)]
    if executor == "slurm" and not args.dry_run and not slurm_here():
        raise UserError(f"no SLURM here (no sbatch on PATH): add --local to run the {len(runs)} job(s) of profile "
                        f"'{args.profile}' on this machine ({_length_text(configs)}), or launch from a SLURM login "
                        "node (--cluster slurm/example-cluster.yaml documents its settings)")
    for cfg in configs:
        ensure_data(cfg.data.dir, cfg.data.format)  # damaged or foreign data fails here, before anything is queued
    return Plan(sweep, Path(args.runs) / sweep, archs, overrides, cluster, executor, args.profile, runs)


def recorded_plan(sweep_dir: Path, retries: int) -> Plan:
    """The plan of a sweep launched earlier, as its sweep.json recorded it, with `retries`: what
    `--status SWEEP --wait --retries N` submits a failed job again with."""
    record = sweep_file.read(sweep_dir)
    if record.executor != "slurm":
        raise UserError(f"--retries: {sweep_dir} is a --local sweep, whose jobs only the launcher that runs them "
                        "can retry: launch it again with the same --sweep and --retries N (it resumes the jobs)")
    cluster = load_dataclass(ClusterConfig, [(f"{sweep_file.path(sweep_dir)}: cluster", record.cluster),
                                             ("--retries", {"retries": retries})])
    return Plan(record.sweep, sweep_dir, record.archs, record.overrides, cluster, record.executor,
                record.profile or "full", record.runs, record.jobs)


def check_image(image: str, runtime: str) -> None:
    """A missing image fails every job as it starts: the launch (and its dry run) says so first. The
    login node sees the files the compute nodes do, and (podman, the dev cluster) the same images."""
    if runtime == "apptainer" and not Path(image).is_file():
        raise UserError(f"container: {image}: no such image file (build it from containers/cifar-infinity.def, or "
                        "set container: null)")
    if runtime == "podman":
        podman = shutil.which("podman")
        if podman is None:
            raise UserError("container_runtime: podman is not installed here")
        import subprocess

        if subprocess.run([podman, "image", "exists", image], capture_output=True).returncode != 0:
            raise UserError(f"container: {image}: no such podman image here (containers/build.sh builds it)")
    # pyxis: an image reference enroot pulls on the compute node; nothing here can check it.


def slurm_here() -> bool:
    """Whether this machine can submit to SLURM (sbatch, and the srun that submitit looks for)."""
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def _length_text(configs: list[Config]) -> str:
    """How long each job trains, as the configs say: '150 epochs each', 'at most 75 s each'."""
    budgets = sorted({c.train.budget_s for c in configs})
    if all(budgets):
        return f"at most {_range(budgets)} s of training each"
    epochs = _range(sorted({c.train.epochs for c in configs}))
    return f"{epochs} epoch{'' if epochs == '1' else 's'} each"


def _range(values: list) -> str:
    text = [f"{v:g}" for v in (values[0], values[-1])]
    return text[0] if text[0] == text[1] else f"{text[0]}-{text[1]}"


def ensure_data(data_dir: str | Path, data_format: str = "beton") -> None:
    """Checks the data every job will read; a data.dir with no .beton at all (a newcomer's first
    sweep) is prepared first, from $CIFAR10_SOURCE or the official download, as `prepare` would.
    data.format=python: the batch folder is validated as the jobs' loader will read it (no .beton
    is made: the point of that format is a machine where ffcv may not import)."""
    from trainer.data.checks import verify, verify_python  # numpy, and ffcv for .beton files: past the config checks

    data_dir = Path(data_dir)
    if data_format == "python":
        verify_python(data_dir)
        return
    if not any(data_dir.glob("*.beton")):
        from trainer.data.cifar10 import prepare

        print(f"{data_dir}: no .beton files yet; preparing CIFAR-10 there first (python -m trainer.data prepare)")
        prepare(data_dir)
    verify(data_dir)


def _previous_jobs(sweep_dir: Path) -> tuple[str | None, dict, list[Job]]:
    """What sweep.json recorded: the executor, each job's submission, and the runs; nothing for a
    new sweep (or a record that cannot be read)."""
    try:
        record = sweep_file.read(sweep_dir)
    except SweepFileError:
        return None, {}, []
    return record.executor, record.jobs, record.runs


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
    width = name_width(list(names))
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
            state = job_handle(executor, plan.sweep_dir, previous[name]["job_id"]).state
            if state in ACTIVE_STATES:
                print(f"{name:{width}s} still {state} as job {previous[name]['job_id']}: not submitted again")
                continue
        chosen.append(name)
    return chosen


def names_in_order(plan: Plan, names: set[str]) -> list[str]:
    return [j.name for j in plan.runs if j.name in names]
