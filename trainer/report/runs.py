"""Reading a sweep's run folders for the report: each run's status, summary, metrics and config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import UserError, models, sweep_file
from trainer.config import Config, load_config
from trainer.models import options as model_options
from trainer.run_files import CHECKPOINTS, CONFIG, METRICS, SUMMARY, read_metrics
from trainer.training import checkpoint

SUMMARY_NUMBERS = ("best_test_acc", "best_epoch", "train_acc", "gap", "params", "epochs_run", "wall_time_s",
                   "best_epoch_wall_time_s", "world_size")
SUMMARY_KEYS = ("arch", *SUMMARY_NUMBERS, "gpu_seconds", "device")
METRIC_KEYS = ("epoch", "elapsed_s")  # what the table and plots read from every line
# Numbers when there: an epoch that train.eval_every did not evaluate has no test_acc, and a run's
# end evaluated on its own (a resumed run ended sooner) has a line without training figures.
OPTIONAL_METRIC_KEYS = ("test_acc", "images_per_s")


@dataclass
class Run:
    name: str  # the folder name: the architecture, or architecture-point-s<seed> with a grid or seeds
    dir: Path
    status: str  # "finished", "unfinished", "not started" or "corrupt"
    detail: str  # what the table shows for a run that is not finished, e.g. "unfinished: epoch 3 of 150"
    summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    config: Config | None = None
    problem: str | None = None  # a file that could not be read, named in one line
    point: str | None = None  # the grid point (sweep.json), e.g. "lr0.05-ema0"; None without a grid

    @property
    def group(self) -> tuple[str, str | None]:
        """What the report averages over seeds: the architecture at its grid point."""
        return self.arch, self.point

    @property
    def seed(self) -> int | None:
        return self.config.train.seed if self.config is not None else None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def arch(self) -> str:
        if self.summary is not None:
            return self.summary["arch"]
        return self.config.model.arch if self.config is not None else self.name

    @property
    def on_gpu(self) -> bool:
        return self.summary is not None and self.summary["gpu_seconds"] is not None


def primary_acc(summary: dict) -> float:
    """The test accuracy a run reports: at the epoch chosen on the validation split when it had one
    (the test set then chose nothing), else its best test epoch's, as the seed's table has it."""
    if summary.get("selected_by") == "val":
        return summary["test_acc_at_best_val"]
    return summary["best_test_acc"]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """Every readable epoch, and what was left out in one line: a line cut short by a crash or a
    full disk costs that line, not the run's whole history."""
    skipped: list[str] = []
    try:
        rows = read_metrics(path, skipped)
    except OSError as e:
        return [], f"{path}: unreadable ({e.strerror or e})"
    good = []
    for row in rows:
        if (all(is_number(row.get(k)) for k in METRIC_KEYS)
                and all(is_number(row[k]) for k in OPTIONAL_METRIC_KEYS if k in row)):
            good.append(row)
        else:
            skipped.append(f"{path}: epoch {row.get('epoch', '?')} lacks a number for one of "
                           f"{', '.join(METRIC_KEYS + OPTIONAL_METRIC_KEYS)}")
    if not skipped:
        return good, None
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return good, f"{skipped[0]}{more}; left out, the other {len(good)} epochs kept"


def evaluated(metrics: list[dict]) -> list[dict]:
    """The lines with a test accuracy: the epochs evaluated (train.eval_every may skip some)."""
    return [m for m in metrics if "test_acc" in m]


def read_run(name: str, run_dir: Path) -> Run:
    config_path, summary_path = run_dir / CONFIG, run_dir / SUMMARY
    if not config_path.exists() and not summary_path.exists():  # the trainer writes config.yaml first
        return Run(name, run_dir, "not started", "not started")
    config, problem = None, None
    try:
        config = load_config(config_path, archs=models.names())
    except UserError as e:  # missing, or written by an older version of the code
        problem = f"{config_path}: unreadable ({e})"
    metrics, metrics_problem = _read_metrics(run_dir / METRICS)
    problem = problem or metrics_problem
    if not summary_path.exists():
        epochs = config.train.epochs if config is not None else "?"
        done = metrics[-1]["epoch"] if metrics else 0
        return Run(name, run_dir, "unfinished", f"unfinished: epoch {done} of {epochs}", None, metrics, config, problem)
    try:
        summary = json.loads(summary_path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        wrong = [k for k in SUMMARY_NUMBERS if not is_number(summary[k])]
        if wrong:
            raise ValueError(f"not a number: {', '.join(wrong)}")
    except (OSError, ValueError) as e:
        why = f"{summary_path}: corrupt summary ({type(e).__name__}: {e})"
        return Run(name, run_dir, "corrupt", "corrupt summary.json", None, metrics, config, why)
    return Run(name, run_dir, "finished", "finished", summary, metrics, config, problem)


def find_runs(folder: Path) -> tuple[str, list[Run]]:
    """The report's name and its runs: the runs of sweep.json, or the subfolders with a config.yaml."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    if sweep_file.path(folder).exists():
        record = sweep_file.read(folder)  # a record that cannot be read is one error line naming it
        runs = [read_run(job.name, folder / job.name) for job in record.runs]
        for run, job in zip(runs, record.runs):
            run.point = job.point
        if all(r.status == "not started" for r in runs):
            raise UserError(f"{folder}: no runs at all: none of the sweep's {len(runs)} runs has a run folder yet")
        return record.sweep, runs
    run_dirs = sorted(p.parent for p in folder.glob(f"*/{CONFIG}"))
    if not run_dirs:
        hint = "; it is a run folder itself: pass the folder above it" if (folder / CONFIG).exists() else ""
        raise UserError(f"{folder}: not a sweep folder (no sweep.json) and no run folders in it "
                        f"(subfolders with config.yaml){hint}")
    return folder.resolve().name, [read_run(p.name, p) for p in run_dirs]


def load_best(run: Run, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
    """The network of the run's checkpoints/best.pt, in eval mode on `device`."""
    path = run.dir / CHECKPOINTS / "best.pt"
    try:
        state = checkpoint.load(path)
    except ValueError as e:  # missing, truncated, or not weights only: name it, go on
        raise UserError(f"{path}: unusable ({e})") from None
    try:
        net = model_options.build_saved(state)  # with the run's model options
        net.load_state_dict(state["model"])
    except Exception as e:  # from another architecture, or not a best.pt
        raise UserError(f"{path}: unusable ({checkpoint.describe_load_error(e)})") from None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return net.to(device, memory_format=fmt).eval()
