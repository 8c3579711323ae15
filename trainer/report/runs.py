"""Reading a sweep's run folders for the report: each run's status, summary, metrics, steps and config."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import UserError, models, sweep_file
from trainer.config import PLACEMENT_KEYS, Config, flat, load_config, matches, to_dict
from trainer.models import options as model_options
from trainer.run_files import CHECKPOINTS, CONFIG, METRICS, STEPS, SUMMARY, read_metrics, read_steps
from trainer.training import checkpoint

SUMMARY_NUMBERS = ("best_test_acc", "best_epoch", "train_acc", "gap", "params", "epochs_run", "wall_time_s",
                   "best_epoch_wall_time_s", "world_size")
SUMMARY_KEYS = ("arch", *SUMMARY_NUMBERS, "gpu_seconds", "device")
METRIC_KEYS = ("epoch", "elapsed_s")  # what the table and plots read from every line
# Numbers when there: an epoch that train.eval_every did not evaluate has no test_acc, and a run's
# end evaluated on its own (a resumed run ended sooner) has a line without training figures.
OPTIONAL_METRIC_KEYS = ("test_acc", "images_per_s")
STEP_KEYS = ("step", "loss")  # what the loss-by-step plot reads from every line of steps.jsonl
OPTIONAL_STEP_KEYS = ("epoch", "lr")


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
    steps: list[dict] = field(default_factory=list)  # steps.jsonl: the training loss every logging.log_every steps

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


def _read_checked(path: Path, reader: Callable, required: tuple[str, ...], optional: tuple[str, ...],
                  what: str) -> tuple[list[dict], str | None]:
    """Every readable line (`what`: an epoch of metrics.jsonl, a step of steps.jsonl), and what was
    left out in one line: a line cut short by a crash or a full disk costs that line, not the run's
    whole history."""
    skipped: list[str] = []
    try:
        rows = reader(path, skipped)
    except OSError as e:
        return [], f"{path}: unreadable ({e.strerror or e})"
    good = []
    for row in rows:
        if all(is_number(row.get(k)) for k in required) and all(is_number(row[k]) for k in optional if k in row):
            good.append(row)
        else:
            skipped.append(f"{path}: {what} {row.get(required[0], '?')} lacks a number for one of "
                           f"{', '.join(required + optional)}")
    if not skipped:
        return good, None
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return good, f"{skipped[0]}{more}; left out, the other {len(good)} {what}s kept"


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
    metrics, metrics_problem = _read_checked(run_dir / METRICS, read_metrics, METRIC_KEYS, OPTIONAL_METRIC_KEYS, "epoch")
    steps, steps_problem = _read_checked(run_dir / STEPS, read_steps, STEP_KEYS, OPTIONAL_STEP_KEYS, "step")
    problem = problem or metrics_problem or steps_problem
    if not summary_path.exists():
        epochs = config.train.epochs if config is not None else "?"
        done = metrics[-1]["epoch"] if metrics else 0
        return Run(name, run_dir, "unfinished", f"unfinished: epoch {done} of {epochs}", None, metrics, config, problem,
                   steps=steps)
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
        return Run(name, run_dir, "corrupt", "corrupt summary.json", None, metrics, config, why, steps=steps)
    # A non-finite figure (a run whose loss went NaN) is named, and left out of the statistics.
    odd = [f"{k}={summary[k]}" for k in ("best_test_acc", "train_acc", "test_acc_at_best_val")
           if is_number(summary.get(k)) and not math.isfinite(summary[k])]
    if odd:
        problem = problem or f"{summary_path}: {', '.join(odd)}: not a finite number, left out of the statistics"
    return Run(name, run_dir, "finished", "finished", summary, metrics, config, problem, steps=steps)


# Runs whose configs differ only in these are seeds of one recipe.
SAME_RECIPE_KEYS = ("train.seed", *PLACEMENT_KEYS)


def _recipe(config: Config | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {name: value for name, value in flat(to_dict(config)).items() if not matches(name, SAME_RECIPE_KEYS)}


def separate_recipes(runs: list[Run]) -> None:
    """Runs of one architecture and grid point whose configs differ in more than the seed (two
    launches into one sweep with other overrides, a folder of unrelated runs) are not seeds of one
    point: each recipe gets a point of its own, named by what differs (`optim.lr=0.2`)."""
    by_point: dict[tuple[str, str | None], list[Run]] = {}
    for run in runs:
        by_point.setdefault((run.arch, run.point), []).append(run)
    for (_, point), same in by_point.items():
        recipes = [_recipe(r.config) for r in same]
        known = [r for r in recipes if r is not None]
        if all(r == known[0] for r in known):
            continue
        differ = sorted({k for r in known for k in r if any(o.get(k) != r.get(k) for o in known)})
        for run, recipe in zip(same, recipes):
            if recipe is not None:
                label = " ".join(f"{k}={recipe.get(k)}" for k in differ)
                run.point = f"{point} {label}" if point else label


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
        separate_recipes(runs)
        return record.sweep, runs
    run_dirs = sorted(p.parent for p in folder.glob(f"*/{CONFIG}"))
    if not run_dirs:
        hint = "; it is a run folder itself: pass the folder above it" if (folder / CONFIG).exists() else ""
        raise UserError(f"{folder}: not a sweep folder (no sweep.json) and no run folders in it "
                        f"(subfolders with config.yaml){hint}")
    runs = [read_run(p.name, p) for p in run_dirs]
    separate_recipes(runs)
    return folder.resolve().name, runs


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
