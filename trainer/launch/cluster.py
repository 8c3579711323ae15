"""The cluster settings: where and how big each job of a sweep is (the --cluster YAML, -C and --nodes).

The schema is read by the strict loader the trainer's config uses (trainer/strict_yaml.py: an
unknown key, a wrong type or a bad value is one line naming it); slurm/example-cluster.yaml
documents every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.strict_yaml import ConfigError, load_dataclass, parse_override, parse_yaml


# sbatch options that a first-class key sets (by their long and short names): given again under
# `sbatch:`, submitit would let them win over the key, silently (a `signal=KILL@1` there took away
# the USR2 before the time limit that the checkpoint-and-requeue relies on).
FIRST_CLASS_OPTIONS = {
    "partition": "partition", "p": "partition", "account": "account", "A": "account", "qos": "qos", "q": "qos",
    "time": "time_min", "t": "time_min", "nodes": "nodes", "N": "nodes", "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task", "c": "cpus_per_task", "gpus-per-node": "gpus_per_node", "gres": "gres",
    "mem": "mem_gb", "mem-per-gpu": "mem_per_gpu", "constraint": "constraint", "C": "constraint",
    "exclude": "exclude", "x": "exclude", "signal": "signal_delay_s", "array": "array_parallelism",
}
# ...and those submitit writes itself: where the job's logs go (the launcher's --status reads them
# there), its name and the log's open mode.
SUBMITIT_OPTIONS = ("output", "o", "error", "e", "job-name", "J", "open-mode", "wckey")
CONTAINER_RUNTIMES = ("apptainer", "pyxis", "podman")


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
    # How many times a job that FAILED (or whose node failed) without finishing is submitted again
    # into its run folder, where it resumes from its checkpoint; only while a launcher watches the
    # sweep (--wait, --local). --retries N overrides it. Not time limits: those are max_requeues'.
    retries: int = 0
    # How often a launcher that watches the sweep (--wait, --status --wait) asks SLURM about its jobs,
    # seconds: each look is an sacct call that the controller answers; a small cluster of one's own
    # can take one a second.
    poll_s: float = 5.0
    # An image to run each job's Python in; null: the launcher's own interpreter. The image must hold
    # this version of the project (the jobs unpickle the launcher's job objects): containers/build.sh
    # tags it with the commit. container_runtime says how it starts (containers/job/run.sh):
    # apptainer (`apptainer exec --nv`, IMAGE a .sif file), pyxis (srun --container-image=IMAGE) or
    # podman (IMAGE an image name; the dev cluster's stand-in, CPU only). The sweep folder, the data,
    # the checkout and the submit folder are mounted at their own paths. Pre-emption still
    # requeues: images carry no scontrol, so the batch script requeues the job from outside.
    container: str | None = None
    container_runtime: str = "apptainer"

    def __post_init__(self) -> None:
        for name in ("time_min", "cpus_per_task", "array_parallelism", "nodes", "jobs_per_gpu"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s: must be more than 0 seconds, got {self.poll_s}")
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
        if self.retries < 0:
            raise ValueError(f"retries: must not be negative, got {self.retries}")
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise ValueError(f"container_runtime: expected one of {', '.join(CONTAINER_RUNTIMES)}, "
                             f"got '{self.container_runtime}'")
        self.sbatch_options()  # malformed entries fail when the file is read

    def sbatch_options(self) -> dict[str, str | bool]:
        """The `sbatch` entries as submitit's additional_parameters: "name=value" or a bare flag."""
        options: dict[str, str | bool] = {}
        for entry in self.sbatch:
            name, eq, value = entry.partition("=")
            name = name.strip().lstrip("-")
            if not name or " " in name or (eq and not value.strip()):
                raise ValueError(f"sbatch: '{entry}' is not 'name=value' or 'name' (e.g. 'reservation=gpu-week')")
            flag = name if len(name) == 1 else name.replace("_", "-")  # as submitit writes it; -c is not -C
            if flag in FIRST_CLASS_OPTIONS:
                raise ValueError(f"sbatch: '{entry}' sets what the key '{FIRST_CLASS_OPTIONS[flag]}' sets: "
                                 f"use {FIRST_CLASS_OPTIONS[flag]} instead")
            if flag in SUBMITIT_OPTIONS:
                raise ValueError(f"sbatch: '{entry}': submitit sets --{flag} itself (the launcher reads the job's "
                                 "logs where it puts them); remove it")
            options[name] = value.strip() if eq else True
        return options

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def load_cluster(path: Path, sets: list[str], nodes: int | None, retries: int | None = None) -> ClusterConfig:
    """The settings of the file `path`, then each -C key=value of `sets`, then --nodes and --retries."""
    layers = [(str(path), _read_yaml(path))]
    layers += [(f"--set '{o}'", parse_override(o)) for o in sets]
    if nodes is not None:
        layers.append(("--nodes", {"nodes": nodes}))
    if retries is not None:
        layers.append(("--retries", {"retries": retries}))
    return load_dataclass(ClusterConfig, layers)


def _read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read cluster settings ({e.strerror})") from None
    data = parse_yaml(text, str(path))
    return data if data is not None else {}
