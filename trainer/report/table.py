"""The comparison with the seed's table: one row per run, as markdown (rounded) and CSV (full precision),
with the data and device named above it and the runs that are missing listed below it."""

from __future__ import annotations

import csv
import io
import statistics
from typing import Any

from trainer import models
from trainer.report.runs import Run

COLUMNS = [
    "arch", "status", "test_acc", "seed_test_acc", "test_acc_delta", "params", "seed_params_m", "best_epoch",
    "seed_best_epoch", "train_acc", "seed_train_acc", "train_acc_delta", "gap", "seed_gap", "gpu_s_to_best",
    "cpu_s_to_best", "train_images_per_s", "epochs_run", "world_size", "device",
    # the deployment figures (empty with --no-deploy)
    "deploy_device", "deploy_precision", "latency_b1_ms", "throughput_b256_img_s", "peak_mem_mb", "model_file_bytes",
]


def train_images_per_s(metrics: list[dict]) -> tuple[float | None, bool]:
    """The median training images/s over the epochs after the first (which includes compilation and
    the loader's start-up), and whether only the first epoch was there to use."""
    rates = [m["images_per_s"] for m in metrics]
    if not rates:
        return None, False
    return (statistics.median(rates[1:]), False) if len(rates) > 1 else (rates[0], True)


def comparison_row(run: Run) -> dict[str, Any]:
    """One row of the table at full precision (the CSV's values; the markdown rounds them)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(arch=run.name, status=run.detail)
    seed = models.seed_row(run.arch)
    if seed is not None:
        _, theirs = seed
        row.update(seed_test_acc=theirs.test_acc, seed_params_m=theirs.params_m, seed_best_epoch=theirs.best_epoch,
                   seed_train_acc=theirs.train_acc, seed_gap=theirs.gap)
    if not run.finished:
        return row
    summary = run.summary
    # GPU-seconds as the seed's compute budget is counted: wall time up to the end of the best
    # epoch (training and evaluation) times the processes, each of which holds one GPU.
    to_best = summary["best_epoch_wall_time_s"] * summary["world_size"]
    rate, _ = train_images_per_s(run.metrics)
    row.update(
        test_acc=summary["best_test_acc"], params=summary["params"], best_epoch=summary["best_epoch"],
        train_acc=summary["train_acc"], gap=summary["gap"], gpu_s_to_best=to_best if run.on_gpu else None,
        cpu_s_to_best=None if run.on_gpu else to_best, train_images_per_s=rate, epochs_run=summary["epochs_run"],
        world_size=summary["world_size"], device=summary["device"],
    )
    if seed is not None:
        row.update(test_acc_delta=summary["best_test_acc"] - seed[1].test_acc,
                   train_acc_delta=summary["train_acc"] - seed[1].train_acc)
    return row


def table_order(runs: list[Run]) -> list[Run]:
    """Finished runs by best test accuracy, best first; then the others in the sweep's order."""
    finished = sorted((r for r in runs if r.finished), key=lambda r: -r.summary["best_test_acc"])
    return finished + [r for r in runs if not r.finished]


def number_or_dash(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def seconds_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown_table(runs: list[Run]) -> str:
    lines = ["| arch | test acc % | seed | Δ | params M | best epoch | train acc % | seed | Δ | gap "
             "| GPU-s to best ¹ | train img/s ² |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in table_order(runs):
        r = comparison_row(run)
        seed_test, seed_train = number_or_dash(r["seed_test_acc"]), number_or_dash(r["seed_train_acc"])
        if not run.finished:
            lines.append(f"| {r['arch']} | {r['status']} | {seed_test} | - | - | - | - | {seed_train} | - | - | - | - |")
            continue
        if r["gpu_s_to_best"] is not None:
            device_s = seconds_text(r["gpu_s_to_best"])
        else:
            device_s = f"- ({seconds_text(r['cpu_s_to_best'])} CPU-s)"
        rate, first_only = train_images_per_s(run.metrics)
        rate_text = number_or_dash(rate, ",.0f") + (" †" if first_only else "")
        lines.append(
            f"| {r['arch']} | {r['test_acc']:.2f} | {seed_test} | {number_or_dash(r['test_acc_delta'], '+.2f')} "
            f"| {r['params'] / 1e6:.2f} | {r['best_epoch']} | {r['train_acc']:.2f} | {seed_train} "
            f"| {number_or_dash(r['train_acc_delta'], '+.2f')} | {r['gap']:.2f} | {device_s} | {rate_text} |"
        )
    return "\n".join(lines)


TABLE_NOTES = (
    "Test accuracy is each run's best epoch (as the seed's table has it); train accuracy is the best "
    "epoch's, and the gap is train − test. Seed: the seed's figure; Δ: ours − seed's.\n"
    "¹ Wall time of training and evaluation up to the end of the best epoch × processes (one GPU each). "
    "Runs on the CPU have no GPU-seconds: their cell gives the same product as CPU-s (wall time × processes).\n"
    "² The median over the epochs after the first, which includes compilation and the loader's start-up; "
    "† marks a run with one epoch only, whose figure includes that start-up."
)


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
        sha = (recorded.get("train_sha256") or "?")[:12], (recorded.get("test_sha256") or "?")[:12]
        text = (f"{recorded.get('dir', '?')} (CIFAR-10 from {recorded.get('source_dir') or 'an unrecorded source'}; "
                f"train.beton sha256 {sha[0]}…, test.beton {sha[1]}…); trained on {train} training images, "
                f"tested on {test} test images")
        data.setdefault(text, []).append(r.name)
        device.setdefault(f"{r.summary['world_size']} x {r.summary['device']}", []).append(r.name)
    for label, groups in (("data", data), ("device", device)):
        for text, names in groups.items():
            which = f" ({', '.join(names)})" if len(groups) > 1 else ""
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
