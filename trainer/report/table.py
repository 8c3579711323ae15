"""The comparison with the seed's table: one row per run, as markdown (rounded) and CSV (full precision),
with the data and device named above it and the runs that are missing listed below it.

The seed's table's figures are the "paper" columns (paper_test_acc, ...): published figures, beside
runs that have random seeds of their own (train_seed). A finished run whose accuracy means little
(too few images, near chance) or that overran its time budget is flagged (flags.py)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

from trainer import models
from trainer.data.checks import describe_record
from trainer.report.flags import FLAG_NOTES, MARK, flags, images_seen
from trainer.report.runs import Run, primary_acc
from trainer.report.stats import Group, best_points, groups, has_grid

COLUMNS = [
    # flag: "; "-separated, e.g. "too few images: 21k seen (one pass: 50k); near chance (10%)" (flags.py)
    "arch", "status", "test_acc", "flag", "paper_test_acc", "test_acc_delta", "params", "paper_params_m", "best_epoch",
    "paper_best_epoch", "train_acc", "paper_train_acc", "train_acc_delta", "gap", "paper_gap", "gpu_s_to_best",
    "cpu_s_to_best", "train_images_per_s", "epochs_run", "images_seen", "world_size", "device",
    # the deployment figures (empty with --no-deploy)
    "deploy_device", "deploy_precision", "latency_b1_ms", "throughput_b256_img_s", "peak_mem_mb", "model_file_bytes",
    # seeds and grids: the run's architecture, grid point and seed, its validation accuracy if
    # recorded, and its group's (architecture at grid point) statistics over the finished seeds,
    # repeated on each of the group's rows; the 95% interval of the mean is Student's t
    "architecture", "point", "train_seed", "val_acc", "n_seeds", "test_acc_mean", "test_acc_std", "test_acc_ci95_low",
    "test_acc_ci95_high", "best_point",
    # how test_acc was chosen: "val" (the validation split chose the epoch) or "test"; and the best
    # test accuracy over epochs, chosen on the test set as the seed's table was
    "selected_by", "best_test_acc",
]


def train_images_per_s(metrics: list[dict]) -> tuple[float | None, bool]:
    """The median training images/s over the epochs after the first (which includes compilation and
    the loader's start-up), and whether only the first epoch was there to use."""
    rates = [m["images_per_s"] for m in metrics if "images_per_s" in m]  # not in a line of evaluation alone
    if not rates:
        return None, False
    return (statistics.median(rates[1:]), False) if len(rates) > 1 else (rates[0], True)


def comparison_row(run: Run, group: Group | None = None, best: bool | None = None) -> dict[str, Any]:
    """One row of the table at full precision (the CSV's values; the markdown rounds them); with the
    run's group, its statistics over seeds, and whether it is its architecture's best grid point."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(arch=run.name, status=run.detail, architecture=run.arch, point=run.point, train_seed=run.seed, best_point=best)
    if group is not None and group.test is not None:
        t = group.test
        interval = t.interval or (None, None)
        row.update(n_seeds=t.n, test_acc_mean=t.mean, test_acc_std=t.std, test_acc_ci95_low=interval[0],
                   test_acc_ci95_high=interval[1])
    seed = models.seed_row(run.arch)
    if seed is not None:
        _, theirs = seed
        row.update(paper_test_acc=theirs.test_acc, paper_params_m=theirs.params_m, paper_best_epoch=theirs.best_epoch,
                   paper_train_acc=theirs.train_acc, paper_gap=theirs.gap)
    if not run.finished:
        return row
    summary = run.summary
    # GPU-seconds as the seed's compute budget is counted: wall time up to the end of the best
    # epoch (training and evaluation) times the processes, each of which holds one GPU.
    to_best = summary["best_epoch_wall_time_s"] * summary["world_size"]
    rate, _ = train_images_per_s(run.metrics)
    row.update(
        val_acc=summary.get("val_acc"), test_acc=primary_acc(summary), params=summary["params"], best_epoch=summary["best_epoch"],
        selected_by=summary.get("selected_by", "test"), best_test_acc=summary["best_test_acc"],
        train_acc=summary["train_acc"], gap=summary["gap"], gpu_s_to_best=to_best if run.on_gpu else None,
        cpu_s_to_best=None if run.on_gpu else to_best, train_images_per_s=rate, epochs_run=summary["epochs_run"],
        world_size=summary["world_size"], device=summary["device"], images_seen=images_seen(run),
        flag="; ".join(text for _, text in flags(run)) or None,
    )
    if seed is not None:
        row.update(test_acc_delta=primary_acc(summary) - seed[1].test_acc,
                   train_acc_delta=summary["train_acc"] - seed[1].train_acc)
    return row


def table_order(runs: list[Run]) -> list[Run]:
    """Finished runs by their group's mean best test accuracy (a group: an architecture at a grid
    point, over seeds; one run alone is its own mean), each group's seeds together, best first;
    then the others in the sweep's order."""
    mean = {(g.arch, g.point): g.test.mean for g in groups(runs) if g.test is not None}

    def last_if_not_finite(acc: float) -> float:  # NaN compares false with everything: it would scramble the order
        return acc if math.isfinite(acc) else float("-inf")

    finished = sorted((r for r in runs if r.finished),
                      key=lambda r: (-mean.get(r.group, float("-inf")), r.group[0], r.group[1] or "",
                                     -last_if_not_finite(primary_acc(r.summary))))
    return finished + [r for r in runs if not r.finished]


def comparison_rows(runs: list[Run]) -> tuple[list[Run], list[dict[str, Any]]]:
    """The table's runs in order and their rows, with each group's statistics."""
    order = table_order(runs)
    by_key = {(g.arch, g.point): g for g in groups(runs)}
    best = best_points(list(by_key.values())) if has_grid(list(by_key.values())) else {}
    rows = [comparison_row(r, by_key[r.group], (best.get(r.arch) is by_key[r.group]) if best else None) for r in order]
    return order, rows


def number_or_dash(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def seconds_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


# The markdown table's columns: (header, alignment, whether left out when no row has a value).
MD_COLUMNS = [
    ("arch", "---", False), ("test acc %", "---:", False), ("flags", "---", True), ("paper", "---:", False),
    ("Δ", "---:", False), ("params M", "---:", False), ("best epoch", "---:", False), ("train acc %", "---:", False),
    ("paper", "---:", False), ("Δ", "---:", False), ("gap", "---:", False), ("GPU-s to best ¹", "---:", True),
    ("CPU-s to best ¹", "---:", True), ("train img/s ²", "---:", False), ("best test % ³", "---:", False),
]


def _markdown_cells(run: Run) -> list[str | None]:
    """The run's cells in MD_COLUMNS' order, rounded; None where there is no value."""
    r = comparison_row(run)
    paper_test, paper_train = number_or_dash(r["paper_test_acc"]), number_or_dash(r["paper_train_acc"])
    if not run.finished:
        return [r["arch"], r["status"], None, paper_test, None, None, None, None, paper_train, None, None, None, None,
                None, None]
    found = flags(run)
    flag_text = "; ".join(f"{text} {MARK[kind]}" for kind, text in found) or None
    gpu_s = seconds_text(r["gpu_s_to_best"]) if r["gpu_s_to_best"] is not None else None
    cpu_s = seconds_text(r["cpu_s_to_best"]) if r["cpu_s_to_best"] is not None else None
    rate, first_only = train_images_per_s(run.metrics)
    return [r["arch"], f"{r['test_acc']:.2f}", flag_text, paper_test, number_or_dash(r["test_acc_delta"], "+.2f"),
            f"{r['params'] / 1e6:.2f}", str(r["best_epoch"]), f"{r['train_acc']:.2f}", paper_train,
            number_or_dash(r["train_acc_delta"], "+.2f"), f"{r['gap']:.2f}", gpu_s, cpu_s,
            number_or_dash(rate, ",.0f") + (" †" if first_only else ""), f"{r['best_test_acc']:.2f}"]


def markdown_table(runs: list[Run]) -> str:
    """The comparison, one row per run in the table's order; the GPU-s, CPU-s and flags columns
    are left out when no run has a value in them (a sweep on the CPU has no GPU-seconds)."""
    rows = [_markdown_cells(run) for run in table_order(runs)]
    shown = [i for i, (_, _, optional) in enumerate(MD_COLUMNS) if not optional or any(row[i] is not None for row in rows)]
    blank = {2: ""}  # an unflagged run's flags cell is empty, not "-"
    lines = ["| " + " | ".join(MD_COLUMNS[i][0] for i in shown) + " |",
             "| " + " | ".join(MD_COLUMNS[i][1] for i in shown) + " |"]
    for row in rows:
        cells = [row[i] if row[i] is not None else blank.get(i, "-") for i in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLE_NOTES = (
    "Test accuracy is at each run's selected epoch: chosen on its validation split (data.val_split) when it "
    "had one, else its best test epoch (as the seed's table has it); best epoch, train accuracy and the gap "
    "(train − test) are that epoch's. Paper: the published figure of the seed's table (README, \"The table to "
    "beat\": 150 epochs configured, early stopping); Δ: ours − paper's.\n"
    "¹ Wall time of training and evaluation up to the end of the best epoch × processes: GPU-s for runs on "
    "CUDA (one GPU each), CPU-s for runs on the CPU.\n"
    "² The median over the epochs after the first, which includes compilation and the loader's start-up; "
    "† marks a run with one epoch only, whose figure includes that start-up.\n"
    "³ The best test accuracy over all epochs, chosen on the test set as the seed's table was: equal to the "
    "test accuracy for runs without a validation split."
)


def table_notes(runs: list[Run]) -> str:
    """The notes under the table, with the footnotes of the flags its runs have."""
    marks = sorted({MARK[kind] for run in runs for kind, _ in flags(run)})
    return "\n".join([TABLE_NOTES, *(FLAG_NOTES[m] for m in marks)])


def sweep_header(name: str, runs: list[Run]) -> str:
    """What the numbers were measured on: the data and the device, named above the table."""
    finished = [r for r in runs if r.finished]
    lines = [f"# Sweep {name}: {len(finished)} of {len(runs)} runs finished", ""]
    data: dict[str, list[str]] = {}
    device: dict[str, list[str]] = {}
    for r in finished:
        recorded = r.summary.get("data") or {}
        cfg = r.config.data if r.config is not None else None
        train = "?" if cfg is None else (f"the first {cfg.train_subset:,}" if cfg.train_subset else "all")
        test = "?" if cfg is None else (f"the first {cfg.test_subset:,}" if cfg.test_subset else "all")
        text = f"{describe_record(recorded)}; trained on {train} training images, tested on {test} test images"
        data.setdefault(text, []).append(r.name)
        device.setdefault(f"{r.summary['world_size']} x {r.summary['device']}", []).append(r.name)
    for label, found in (("data", data), ("device", device)):
        for text, names in found.items():
            which = f" ({', '.join(names)})" if len(found) > 1 else ""
            lines.append(f"- {label}: {text}{which}")
    return "\n".join(lines)


def not_finished_lines(runs: list[Run]) -> list[str]:
    lines = []
    for r in runs:
        if r.status == "unfinished":
            lines.append(f"- {r.name}: {r.detail} ({r.dir})")
        elif r.status == "not started":
            why = f"no folder {r.dir}" if not r.dir.exists() else f"no config.yaml in {r.dir}"
            lines.append(f"- {r.name}: not started ({why})")
        elif r.status == "corrupt":
            lines.append(f"- {r.name}: {r.problem}")
        if r.problem and r.status != "corrupt":
            lines.append(f"- {r.name}: {r.problem}")
    return lines


def deployment_table(rows: list[dict]) -> str:
    lines = ["| arch | precision | latency batch 1 ms | throughput batch 256 img/s | peak memory MB | weights file MB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["latency_b1_ms"] is None:
            continue
        lines.append(f"| {r['arch']} | {r['deploy_precision']} | {r['latency_b1_ms']:.2f} "
                     f"| {r['throughput_b256_img_s']:,.0f} | {number_or_dash(r['peak_mem_mb'], '.1f')} "
                     f"| {r['model_file_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:  # None -> empty cell; floats at full precision (repr round-trips)
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()
