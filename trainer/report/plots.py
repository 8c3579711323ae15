"""The report's four PNGs under plots/: accuracy vs parameters (the seed's networks too), test
accuracy by epoch, accuracy vs the device-seconds spent, and the training loss by step (steps.jsonl:
drawn for every sweep, since a run of a few epochs has a few points in the others). With seeds, an
architecture (at a grid point) is one colour and one point at its mean, with the 95% interval of the
mean as error bars. Every legend is outside the axes, below them, so that it covers no point."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trainer.files import atomic_path
from trainer.models.seed_table import SEED
from trainer.report.runs import Run, evaluated, primary_acc
from trainer.report.stats import groups
from trainer.report.table import seconds_text, table_order

PLOTS = {  # file name under plots/ -> title
    "acc_vs_params.png": "Best test accuracy vs parameters",
    "test_acc_curves.png": "Test accuracy by epoch",
    "acc_vs_seconds.png": "Test accuracy vs device-seconds",
    "train_loss_steps.png": "Training loss by step",
}
LEGEND_ROW_INCHES = 0.2  # the figure grows by this per row of legend, so the axes keep their size


def _seconds_label(finished: list[Run]) -> str:
    gpu = {r.on_gpu for r in finished}
    if gpu == {True}:
        return "GPU-seconds (wall time × GPUs)"
    if gpu == {False}:
        return "CPU-seconds (wall time × processes; no GPU)"
    return "device-seconds (GPU-s for CUDA runs, CPU-s for CPU runs)"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _legend_below(fig: Any, ax: Any) -> None:
    """The axes' legend, if it has entries, below the axes: constrained layout makes room for it,
    and the figure grows by its rows."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    columns = min(len(labels), 2 if max(map(len, labels)) > 40 else 3)
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + LEGEND_ROW_INCHES * math.ceil(len(labels) / columns))
    fig.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=8)


def make_plots(runs: list[Run], folder: Path) -> list[Path]:
    """The PNGs of PLOTS under folder/plots/."""
    paths = [folder / "plots" / name for name in PLOTS]
    for (fig, _), path in zip(draw_plots(runs), paths):
        _save(fig, path)
    return paths


def draw_plots(runs: list[Run]) -> list[tuple[Any, Any]]:
    """The figures of PLOTS, in its order, as (figure, axes), drawn on matplotlib's Agg canvas (no
    display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ordered = table_order(runs)
    found = {(g.arch, g.point): g for g in groups(ordered)}  # in the table's order
    # One colour per group (an architecture at a grid point; its seeds share it) in every plot.
    group_colour = {key: f"C{i % 10}" for i, key in enumerate(found)}
    colour = {r.name: group_colour[r.group] for r in ordered}
    finished = [r for r in ordered if r.finished]
    several = [g for g in found.values() if g.test is not None and g.test.n > 1]
    seconds = _seconds_label(finished)
    figures = []
    for title in PLOTS.values():
        fig = Figure(figsize=(8, 5.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        figures.append((fig, ax))

    # Accuracy vs parameters, marker area by training time, the seed's networks beside ours.
    ax = figures[0][1]
    for i, (row, seed) in enumerate(sorted(SEED.items(), key=lambda item: item[1].params_m)):
        ax.scatter(seed.params_m, seed.test_acc, s=60, marker="s", facecolors="none", edgecolors="grey")
        # Labels alternately below and above, so that neighbours (EfficientNet, ResNet) stay apart.
        ax.annotate(row, (seed.params_m, seed.test_acc), textcoords="offset points",
                    xytext=(5, -11 if i % 2 == 0 else 5), fontsize=8, color="grey")
    device_s = {r.name: r.summary["wall_time_s"] * r.summary["world_size"] for r in finished}
    longest = max(device_s.values(), default=0.0) or 1.0
    for key, g in found.items():
        if g.test is None:
            continue
        spent = _mean([device_s[r.name] for r in g.finished])
        xy = (g.finished[0].summary["params"] / 1e6, g.test.mean)
        ax.scatter(*xy, s=30 + 470 * spent / longest, alpha=0.7, color=group_colour[key])
        if g.test.half_width is not None:  # the 95% interval of the mean over the seeds
            ax.errorbar(*xy, yerr=g.test.half_width, color=group_colour[key], capsize=4, linewidth=1.2)
        name = g.finished[0].name if g.test.n == 1 else f"{g.label}, n={g.test.n}"
        ax.annotate(f"{name} ({seconds_text(spent)} s)", xy, textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.scatter([], [], s=60, marker="s", facecolors="none", edgecolors="grey", label="paper (the seed's table)")
    ax.scatter([], [], s=60, color="grey", alpha=0.7, label=f"this sweep (area ∝ training {seconds.split(' (')[0]})")
    if several:
        ax.errorbar([], [], yerr=[], color="grey", capsize=4, label="mean over seeds, 95% interval")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel("best test accuracy %" + (" (mean over seeds)" if several else ""))

    # Test accuracy by epoch; unfinished runs dashed.
    ax = figures[1][1]
    for r in ordered:
        if rows := evaluated(r.metrics):
            ax.plot([m["epoch"] for m in rows], [m["test_acc"] for m in rows], marker=".",
                    linestyle="-" if r.finished else "--", color=colour[r.name],
                    label=r.name if r.finished else f"{r.name} ({r.detail})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy %")

    # Accuracy vs the compute spent, epoch by epoch; the best epoch starred.
    ax = figures[2][1]
    for r in finished:
        world = r.summary["world_size"]
        rows = evaluated(r.metrics)
        ax.plot([m["elapsed_s"] * world for m in rows], [m["test_acc"] for m in rows], marker=".",
                color=colour[r.name], label=r.name)
        ax.scatter(r.summary["best_epoch_wall_time_s"] * world, primary_acc(r.summary), s=80, marker="*",
                   color=colour[r.name])
    for g in several:  # each group's mean best epoch: its mean seconds, its mean accuracy ± the 95% interval
        spent = _mean([r.summary["best_epoch_wall_time_s"] * r.summary["world_size"] for r in g.finished])
        ax.errorbar(spent, g.test.mean, yerr=g.test.half_width, fmt="D", markersize=6, capsize=4,
                    color=group_colour[(g.arch, g.point)], label=f"{g.label}: mean of {g.test.n}, 95% interval")
    ax.set_title(f"Test accuracy vs {seconds.split(' (')[0]} (★ best epoch)")
    ax.set_xlabel(seconds)
    ax.set_ylabel("test accuracy %")

    # Training loss by step, every logging.log_every steps; unfinished runs dashed.
    ax = figures[3][1]
    for r in ordered:
        if r.steps:
            ax.plot([p["step"] for p in r.steps], [p["loss"] for p in r.steps], marker="." if len(r.steps) < 50 else None,
                    linestyle="-" if r.finished else "--", color=colour[r.name],
                    label=r.name if r.finished else f"{r.name} ({r.detail})")
    if not any(r.steps for r in ordered):
        ax.text(0.5, 0.5, "no training loss by step recorded: runs from before steps.jsonl,\n"
                "or shorter than logging.log_every steps", transform=ax.transAxes, ha="center", va="center")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (mean since the previous point)")

    for fig, ax in figures:
        _legend_below(fig, ax)
    return figures
