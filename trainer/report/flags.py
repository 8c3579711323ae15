"""What the table flags beside a finished run's accuracy, so that a figure that means little is not
read as one on a par with the rest (report.md's flags column, report.csv's `flag`):

- too few images: the run trained on fewer images than one pass over its training set (the
  training file's images less a validation split; 50,000 for the whole CIFAR-10). Images seen are
  the training steps of metrics.jsonl × data.batch_size (the global batch: every training step is
  a full one), or, where the lines lack the steps, epochs × the images an epoch trains on;
- near chance: the test accuracy is within CHANCE_MARGIN points of chance (10% for ten classes),
  where a network has learnt next to nothing whatever its images;
- overran: a run with train.budget_s whose summary says it went past its budget
  (budget.within_budget false), as "overran: <used> s of <budget>".
"""

from __future__ import annotations

import math

from trainer.report.runs import Run, is_number, primary_acc

CLASSES = 10  # CIFAR-10
CHANCE = 100.0 / CLASSES
CHANCE_MARGIN = 5.0  # points above chance still counted as chance
CIFAR10_TRAIN_IMAGES = 50_000  # where the run's data record does not count its training images

TOO_FEW, NEAR_CHANCE, OVERRAN, NOT_FINITE = "too few images", "near chance", "overran", "not a number"
MARK = {TOO_FEW: "⁴", NEAR_CHANCE: "⁴", OVERRAN: "⁵", NOT_FINITE: "⁶"}  # the table's footnote for each kind of flag


def one_pass(run: Run) -> int:
    """The images of one pass over the run's training set: the training file's, less the
    validation split held out of it."""
    counted = ((run.summary or {}).get("data") or {}).get("train_images")
    images = counted if is_number(counted) and counted > 0 else CIFAR10_TRAIN_IMAGES
    held_out = run.config.data.val_split if run.config is not None else 0
    return int(images) - held_out


def images_seen(run: Run) -> int | None:
    """The training images a finished run went through; None without the config to count them."""
    if run.config is None or run.summary is None:
        return None
    batch = run.config.data.batch_size
    steps = [m.get("steps") for m in run.metrics]
    if steps and all(is_number(s) for s in steps):
        return int(sum(steps)) * batch
    # Lines from before the trainer wrote `steps`: every epoch whole (drop_last: full batches only).
    per_epoch = run.config.data.train_subset or one_pass(run)
    return run.summary["epochs_run"] * (per_epoch // batch) * batch


def count_text(n: int) -> str:
    return f"{n / 1000:,.0f}k" if n >= 10_000 else f"{n:,}"


def flags(run: Run) -> list[tuple[str, str]]:
    """The run's flags as (kind, text), e.g. (TOO_FEW, "too few images: 21k seen (one pass: 50k)");
    none for a run that is not finished (the table gives its status instead)."""
    if not run.finished:
        return []
    found = []
    seen, full = images_seen(run), one_pass(run)
    if seen is not None and seen < full:
        found.append((TOO_FEW, f"{TOO_FEW}: {count_text(seen)} seen (one pass: {count_text(full)})"))
    if not math.isfinite(primary_acc(run.summary)):
        found.append((NOT_FINITE, f"{NOT_FINITE}: left out of the statistics"))
    elif primary_acc(run.summary) < CHANCE + CHANCE_MARGIN:
        found.append((NEAR_CHANCE, f"{NEAR_CHANCE} ({CHANCE:g}%)"))
    budget = run.summary.get("budget")
    if isinstance(budget, dict) and budget.get("within_budget") is False:
        used, limit = budget.get("used_s"), budget.get("budget_s")
        amount = f": {used:,.0f} s of {limit:g}" if is_number(used) and is_number(limit) else ""
        found.append((OVERRAN, f"{OVERRAN}{amount}"))
    return found


FLAG_NOTES = {
    "⁴": ("⁴ Not an accuracy on a par with the rest. Too few images: the run trained on fewer images than one "
          "pass over its training set (training steps × data.batch_size, against the training file's images "
          "less any validation split). Near chance: its test accuracy is within "
          f"{CHANCE_MARGIN:g} points of chance ({CHANCE:g}% for CIFAR-10's {CLASSES} classes)."),
    "⁵": ("⁵ The run went past its time budget (train.budget_s; summary.json's budget.within_budget is false): "
          "seconds used of the budget. Its figures took longer than the budget promised."),
    "⁶": "⁶ The run's accuracy is not a finite number (its loss diverged): it is left out of every mean and interval.",
}
