"""The sweep report behind `python jobs/report.py runs/<sweep>`: the comparison with the seed's table.

    python jobs/report.py runs/<sweep> [--no-deploy] [--ensemble a,b | --no-ensemble] [--wandb-mode MODE]

Reads each run's summary.json and metrics.jsonl and writes into the sweep folder:

- report.md and report.csv: one row per architecture with the seed's columns (best test accuracy,
  params, best epoch, training accuracy, gap), the seed's accuracies beside ours with the
  difference, GPU-seconds to the best epoch and training images/s; the data and device named above;
- deployment figures measured from each checkpoints/best.pt on the device at hand: batch-1 latency,
  batch-256 throughput, peak memory and the size of the weights file (--no-deploy skips them);
- the accuracy of an ensemble that averages the softmax outputs of the best checkpoints over the
  test set (default: every finished run), beside the best single model;
- plots/: accuracy vs parameters (the seed's points too), test accuracy by epoch, accuracy vs
  GPU-seconds;
- a W&B run of job type `report` in the sweep's group holding the tables and plots.

It also works on a folder of run folders without sweep.json (the runs are then the subfolders that
hold a config.yaml). Runs that are unfinished, not started or whose summary is corrupt are listed
as such. `python jobs/launch.py --wait` ends with this report.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import UserError, cli, models
from trainer.config import Config, load_config
from trainer.files import atomic_path, write_text_atomic


# ---- the seed's table: the one copy in the project ----------------------------------------------


@dataclass(frozen=True)
class SeedRow:
    test_acc: float  # %, the best epoch's
    params_m: float  # millions
    best_epoch: int
    train_acc: float  # %, in the best epoch
    gap: float  # train - test, points


# Row name (as models.spec(arch).seed_row gives it) -> the seed's figures (150 epochs configured,
# early stopping).
SEED: dict[str, SeedRow] = {
    "ResNet": SeedRow(93.19, 21.2, 53, 99.93, 6.74),
    "EfficientNet": SeedRow(92.65, 17.4, 69, 99.45, 6.8),
    "MobileNet": SeedRow(90.75, 1.0, 65, 99.94, 9.19),
    "MobileNetBig": SeedRow(90.10, 3.2, 58, 99.87, 9.77),
    "Inception+BN": SeedRow(89.87, 1.6, 50, 99.31, 9.44),
    "VGG+BN": SeedRow(86.58, 33.6, 50, 95.29, 8.71),
    "AlexNet": SeedRow(77.53, 3.2, 50, 81.97, 4.44),
}


def seed_of(arch: str) -> tuple[str, SeedRow] | None:
    """The seed's row this architecture reproduces, or None (an extra network, or an unknown name)."""
    try:
        row = models.spec(arch).seed_row
    except models.UnknownModelError:
        return None
    return (row, SEED[row]) if row in SEED else None


# ---- reading the runs ------------------------------------------------------------------------------

SUMMARY_NUMBERS = ("best_test_acc", "best_epoch", "train_acc", "gap", "params", "epochs_run", "wall_time_s",
                   "best_epoch_wall_time_s", "world_size")
SUMMARY_KEYS = ("arch", *SUMMARY_NUMBERS, "gpu_seconds", "device")
METRIC_KEYS = ("epoch", "test_acc", "images_per_s", "elapsed_s")  # what the table and plots read per epoch
PLOTS = {  # file name under plots/ -> title
    "acc_vs_params.png": "Best test accuracy vs parameters",
    "test_acc_curves.png": "Test accuracy by epoch",
    "acc_vs_seconds.png": "Test accuracy vs device-seconds",
}


@dataclass
class Run:
    name: str  # the folder name: the architecture, in a sweep
    dir: Path
    status: str  # "finished", "unfinished", "not started" or "corrupt"
    detail: str  # what the table shows for a run that is not finished, e.g. "unfinished: epoch 3 of 150"
    summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    config: Config | None = None
    problem: str | None = None  # a file that could not be read, named in one line

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


def _read_metrics(path: Path) -> tuple[list[dict], str | None]:
    if not path.exists():
        return [], None
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict) or not all(_is_number(row.get(k)) for k in METRIC_KEYS):
                raise ValueError(f"line {i}: expected {', '.join(METRIC_KEYS)}")
        return rows, None
    except (OSError, ValueError) as e:
        return [], f"{path}: unreadable ({type(e).__name__}: {e})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(name: str, run_dir: Path) -> Run:
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    if not config_path.exists() and not summary_path.exists():  # the trainer writes config.yaml first
        return Run(name, run_dir, "not started", "not started")
    config, problem = None, None
    try:
        config = load_config(config_path)
    except UserError as e:  # missing, or written by an older version of the code
        problem = f"{config_path}: unreadable ({e})"
    metrics, metrics_problem = _read_metrics(run_dir / "metrics.jsonl")
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
        wrong = [k for k in SUMMARY_NUMBERS if not _is_number(summary[k])]
        if wrong:
            raise ValueError(f"not a number: {', '.join(wrong)}")
    except (OSError, ValueError) as e:
        why = f"{summary_path}: corrupt summary ({type(e).__name__}: {e})"
        return Run(name, run_dir, "corrupt", "corrupt summary.json", None, metrics, config, why)
    return Run(name, run_dir, "finished", "finished", summary, metrics, config, problem)


def find_runs(folder: Path) -> tuple[str, list[Run]]:
    """The report's name and its runs: the archs of sweep.json, or the subfolders with a config.yaml."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    record_path = folder / "sweep.json"
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
            archs, name = list(record["archs"]), str(record["sweep"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{record_path}: unreadable sweep record ({type(e).__name__}: {e})") from None
        runs = [read_run(arch, folder / arch) for arch in archs]
        if all(r.status == "not started" for r in runs):
            raise UserError(f"{folder}: no runs at all: none of the sweep's {len(archs)} architectures has a run folder yet")
        return name, runs
    run_dirs = sorted(p.parent for p in folder.glob("*/config.yaml"))
    if not run_dirs:
        hint = "; it is a run folder itself: pass the folder above it" if (folder / "config.yaml").exists() else ""
        raise UserError(f"{folder}: not a sweep folder (no sweep.json) and no run folders in it "
                        f"(subfolders with config.yaml){hint}")
    return folder.resolve().name, [read_run(p.name, p) for p in run_dirs]


# ---- the comparison table --------------------------------------------------------------------------

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
    seed = seed_of(run.arch)
    if seed is not None:
        _, s = seed
        row.update(seed_test_acc=s.test_acc, seed_params_m=s.params_m, seed_best_epoch=s.best_epoch,
                   seed_train_acc=s.train_acc, seed_gap=s.gap)
    if not run.finished:
        return row
    s = run.summary
    # GPU-seconds as the seed's compute budget is counted: wall time up to the end of the best
    # epoch (training and evaluation) times the processes, each of which holds one GPU.
    to_best = s["best_epoch_wall_time_s"] * s["world_size"]
    rate, _ = train_images_per_s(run.metrics)
    row.update(
        test_acc=s["best_test_acc"], params=s["params"], best_epoch=s["best_epoch"], train_acc=s["train_acc"],
        gap=s["gap"], gpu_s_to_best=to_best if run.on_gpu else None, cpu_s_to_best=None if run.on_gpu else to_best,
        train_images_per_s=rate, epochs_run=s["epochs_run"], world_size=s["world_size"], device=s["device"],
    )
    if seed is not None:
        row.update(test_acc_delta=s["best_test_acc"] - seed[1].test_acc, train_acc_delta=s["train_acc"] - seed[1].train_acc)
    return row


def table_order(runs: list[Run]) -> list[Run]:
    """Finished runs by best test accuracy, best first; then the others in the sweep's order."""
    finished = sorted((r for r in runs if r.finished), key=lambda r: -r.summary["best_test_acc"])
    return finished + [r for r in runs if not r.finished]


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _seconds(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown_table(runs: list[Run]) -> str:
    lines = ["| arch | test acc % | seed | Δ | params M | best epoch | train acc % | seed | Δ | gap "
             "| GPU-s to best ¹ | train img/s ² |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in table_order(runs):
        r = comparison_row(run)
        seed_test, seed_train = _f(r["seed_test_acc"]), _f(r["seed_train_acc"])
        if not run.finished:
            lines.append(f"| {r['arch']} | {r['status']} | {seed_test} | - | - | - | - | {seed_train} | - | - | - | - |")
            continue
        if r["gpu_s_to_best"] is not None:
            device_s = _seconds(r["gpu_s_to_best"])
        else:
            device_s = f"- ({_seconds(r['cpu_s_to_best'])} CPU-s)"
        rate, first_only = train_images_per_s(run.metrics)
        rate_text = _f(rate, ",.0f") + (" †" if first_only else "")
        lines.append(
            f"| {r['arch']} | {r['test_acc']:.2f} | {seed_test} | {_f(r['test_acc_delta'], '+.2f')} | {r['params'] / 1e6:.2f} "
            f"| {r['best_epoch']} | {r['train_acc']:.2f} | {seed_train} | {_f(r['train_acc_delta'], '+.2f')} "
            f"| {r['gap']:.2f} | {device_s} | {rate_text} |"
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
        d = r.summary.get("data") or {}
        cfg = r.config.data if r.config is not None else None
        train = "?" if cfg is None else (f"the first {cfg.train_subset:,}" if cfg.train_subset else "all")
        test = "?" if cfg is None else (f"the first {cfg.test_subset:,}" if cfg.test_subset else "all")
        sha = (d.get("train_sha256") or "?")[:12], (d.get("test_sha256") or "?")[:12]
        text = (f"{d.get('dir', '?')} (CIFAR-10 from {d.get('source_dir') or 'an unrecorded source'}; train.beton "
                f"sha256 {sha[0]}…, test.beton {sha[1]}…); trained on {train} training images, tested on {test} test images")
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


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:  # None -> empty cell; floats at full precision (repr round-trips)
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


# ---- deployment figures --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployBudget:
    """Every timing stops after `runs` timed runs or `seconds`, whichever comes first (but not before
    `min_runs`): a 30 M-parameter net at batch 256 takes seconds per forward on a CPU."""

    latency_runs: int = 50
    throughput_runs: int = 10
    seconds: float = 1.0
    min_runs: int = 3
    warmup: int = 3  # untimed batch-1 runs first (allocations, kernel selection)
    batch: int = 256


def report_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_text(device: torch.device) -> str:
    from trainer.distributed import device_name

    return device_name(device) + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_best(run: Run, device: torch.device, channels_last: bool = True) -> tuple[torch.nn.Module, dict]:
    """The network of the run's checkpoints/best.pt, in eval mode on `device`, and the checkpoint."""
    path = run.dir / "checkpoints" / "best.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = models.build(state["arch"])
        net.load_state_dict(state["model"])
    except Exception as e:  # missing, truncated or from another architecture: name it, go on
        raise UserError(f"{path}: unusable ({type(e).__name__}: {e})") from None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return net.to(device, memory_format=fmt).eval(), state


def _autocast_dtype(run: Run, device: torch.device) -> torch.dtype | None:
    from trainer.train import amp_dtype  # the trainer's choice: bf16, fp16 where bf16 is missing, or none

    return amp_dtype(device, run.config.train.amp)


def _precision_text(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]


def _timed(fn: Callable[[], Any], device: torch.device, runs: int, budget: DeployBudget) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (len(times) < budget.min_runs or time.perf_counter() - start < budget.seconds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


@contextmanager
def _fd2_silenced():
    """The profiler's C++ side (kineto) writes start/stop lines straight to file descriptor 2, past
    Python's sys.stderr; they would interleave with the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_memory_bytes(forward: Callable[[], Any], resident: int, device: torch.device) -> int | None:
    """Tensor memory at the peak of one forward: the weights and input already there plus the
    activations. CUDA: the allocator's max_memory_allocated. CPU: torch.profiler's allocation and
    free events replayed in time order (the process's RSS says little: freed memory stays mapped)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        forward()
        _sync(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    with _fd2_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward()
    try:  # the raw allocation records; the profiler's tables attribute frees to no operator
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # another torch version's profiler internals: leave the cell empty
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return resident + peak


def measure_deployment(run: Run, device: torch.device, budget: DeployBudget = DeployBudget()) -> dict[str, Any]:
    """Latency (batch 1), throughput (batch 256), peak memory and file size of the run's best.pt."""
    from trainer.data.loaders import DTYPES

    net, state = load_best(run, device)
    dtype = _autocast_dtype(run, device)
    input_dtype = DTYPES[run.config.data.dtype]  # what the run's loader handed the network
    generator = torch.Generator().manual_seed(0)

    def batch(n: int) -> torch.Tensor:
        x = torch.randn(n, 3, 32, 32, generator=generator)
        return x.to(device, input_dtype).contiguous(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> Callable[[], Any]:
        def run_once() -> Any:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return net(x)

        return run_once

    one, many = batch(1), batch(budget.batch)
    for _ in range(budget.warmup):
        forward(one)()
    _sync(device)
    latency = statistics.median(_timed(forward(one), device, budget.latency_runs, budget))

    resident = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers(), many])
    peak = _peak_memory_bytes(forward(many), resident, device)  # also the batch-256 warm-up
    per_batch = statistics.median(_timed(forward(many), device, budget.throughput_runs, budget))

    weights = io.BytesIO()
    torch.save(state["model"], weights)  # the state_dict alone, as it would be shipped
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "deploy_device": device_text(device),
        "deploy_precision": _precision_text(dtype),
        "latency_b1_ms": 1000 * latency,
        "throughput_b256_img_s": budget.batch / per_batch,
        "peak_mem_mb": None if peak is None else peak / 2**20,
        "model_file_bytes": weights.getbuffer().nbytes,
    }


def deployment_table(rows: list[dict]) -> str:
    lines = ["| arch | precision | latency batch 1 ms | throughput batch 256 img/s | peak memory MB | weights file MB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["latency_b1_ms"] is None:
            continue
        lines.append(f"| {r['arch']} | {r['deploy_precision']} | {r['latency_b1_ms']:.2f} | {r['throughput_b256_img_s']:,.0f} "
                     f"| {_f(r['peak_mem_mb'], '.1f')} | {r['model_file_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def deployment_notes(device: torch.device, budget: DeployBudget) -> str:
    memory = ("torch.cuda.max_memory_allocated over one batch-256 forward (weights, input, activations, workspace)"
              if device.type == "cuda" else
              "the peak of live tensor memory over one batch-256 forward, from torch.profiler's allocation events, "
              "plus the weights and input already resident (not the process's RSS)")
    return (
        f"Each run's checkpoints/best.pt in eval mode, channels_last, inputs in the run's data.dtype, under the run's "
        f"autocast (bf16 where it trained with AMP) or in fp32 as the precision column says; one forward, no TTA. "
        f"Latency: the median of up to {budget.latency_runs} timed batch-1 forwards (at least {budget.min_runs}, "
        f"{budget.seconds:g} s at most) after {budget.warmup} untimed ones. Throughput: {budget.batch} / the median "
        f"time of up to {budget.throughput_runs} batch-{budget.batch} forwards, after one untimed. Peak memory: "
        f"{memory}. Weights file: the state_dict alone saved with torch.save (MB = 2^20 bytes)."
    )


# ---- the ensemble ------------------------------------------------------------------------------


@dataclass
class EnsembleResult:
    members: list[str]
    member_correct: list[int]
    member_summary_acc: list[float]  # the best_test_acc each run's summary gives, for the check
    correct: int
    total: int
    test_set: str

    def member_acc(self, i: int) -> float:
        return 100.0 * self.member_correct[i] / self.total

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / self.total


def _test_set(run: Run) -> tuple[str, int]:
    # The summary records the data folder resolved when the run trained; config.yaml may hold a
    # path relative to where it was started.
    data_dir = (run.summary.get("data") or {}).get("dir") or run.config.data.dir
    return str(data_dir), run.config.data.test_subset


def run_ensemble(members: list[Run], device: torch.device) -> EnsembleResult:
    """Averages the members' softmax outputs over the test set, read through the project's test loader
    (SEQUENTIAL, the run's normalisation), and counts each member's own correct answers the same way.

    Each member sees the batch as its own training run evaluated it: in its data.dtype, under its
    autocast, with its flip TTA if it had one.
    """
    from trainer.data.loaders import DTYPES, build_loaders, default_threads

    sets = {_test_set(m) for m in members}
    if len(sets) > 1:
        raise UserError("the members were tested on different test sets: "
                        + "; ".join(f"{m.name}: {_test_set(m)[0]} (test_subset {_test_set(m)[1]})" for m in members))
    data_dir, subset = sets.pop()
    # One float32 loader for all: a member trained on bf16 batches gets x.to(bf16), which is exactly
    # what its loader's final Convert did.
    data = dataclasses.replace(members[0].config.data, dir=data_dir, dtype="float32")
    _, test = build_loaders(data, device, members[0].config.train.seed, default_threads())
    nets = []
    for m in members:
        net, _ = load_best(m, device, m.config.data.channels_last)
        fmt = torch.channels_last if m.config.data.channels_last else torch.contiguous_format
        nets.append((net, DTYPES[m.config.data.dtype], fmt, _autocast_dtype(m, device), m.config.train.tta))

    member_correct = [0] * len(members)
    correct = total = 0
    with torch.no_grad():
        for x, y in test:
            probs = []
            for i, (net, input_dtype, fmt, amp, tta) in enumerate(nets):
                xi = x.to(dtype=input_dtype, memory_format=fmt)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = net(xi).float()
                    if tta:  # as the trainer evaluates
                        logits = (logits + net(xi.flip(-1)).float()) / 2
                member_correct[i] += int((logits.argmax(1) == y).sum())
                probs.append(logits.softmax(1))
            mean = torch.stack(probs).mean(0)
            correct += int((mean.argmax(1) == y).sum())
            total += y.shape[0]
    where = f"{total:,} test images of {data_dir}" + (f" (test_subset {subset})" if subset else "")
    return EnsembleResult([m.name for m in members], member_correct, [m.summary["best_test_acc"] for m in members],
                          correct, total, where)


def ensemble_text(e: EnsembleResult) -> str:
    lines = [f"Softmax outputs of the best checkpoints averaged over {e.test_set}; each member's accuracy is "
             "recomputed the same way, beside its summary's best_test_acc as a check.", "",
             "| model | test acc % | correct | summary's best_test_acc % |", "| --- | ---: | ---: | ---: |"]
    for i, name in enumerate(e.members):
        lines.append(f"| {name} | {e.member_acc(i):.2f} | {e.member_correct[i]:,} / {e.total:,} "
                     f"| {e.member_summary_acc[i]:.2f} |")
    lines.append(f"| ensemble of {len(e.members)} | {e.acc:.2f} | {e.correct:,} / {e.total:,} | |")
    best = max(range(len(e.members)), key=e.member_acc)
    lines += ["", f"Ensemble {e.acc:.2f}% vs the best single model, {e.members[best]}, {e.member_acc(best):.2f}%: "
                  f"{e.acc - e.member_acc(best):+.2f} points."]
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------------


def _seconds_label(finished: list[Run]) -> str:
    gpu = {r.on_gpu for r in finished}
    if gpu == {True}:
        return "GPU-seconds (wall time × GPUs)"
    if gpu == {False}:
        return "CPU-seconds (wall time × processes; no GPU)"
    return "device-seconds (GPU-s for CUDA runs, CPU-s for CPU runs)"


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def make_plots(runs: list[Run], folder: Path) -> list[Path]:
    """The three PNGs under folder/plots/, drawn on matplotlib's Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ordered = table_order(runs)
    colour = {r.name: f"C{i % 10}" for i, r in enumerate(ordered)}  # one colour per run in every plot
    finished = [r for r in ordered if r.finished]
    seconds = _seconds_label(finished)
    paths = [folder / "plots" / name for name in PLOTS]
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
    for r in finished:
        xy = (r.summary["params"] / 1e6, r.summary["best_test_acc"])
        ax.scatter(*xy, s=30 + 470 * device_s[r.name] / longest, alpha=0.7, color=colour[r.name])
        ax.annotate(f"{r.name} ({_seconds(device_s[r.name])} s)", xy, textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.scatter([], [], s=60, marker="s", facecolors="none", edgecolors="grey", label="seed")
    ax.scatter([], [], s=60, color="grey", alpha=0.7, label=f"this sweep (area ∝ training {seconds.split(' (')[0]})")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel("best test accuracy %")
    ax.legend(loc="lower right", fontsize=8)

    # Test accuracy by epoch; unfinished runs dashed.
    ax = figures[1][1]
    for r in ordered:
        if r.metrics:
            ax.plot([m["epoch"] for m in r.metrics], [m["test_acc"] for m in r.metrics], marker=".",
                    linestyle="-" if r.finished else "--", color=colour[r.name],
                    label=r.name if r.finished else f"{r.name} ({r.detail})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy %")

    # Accuracy vs the compute spent, epoch by epoch; the best epoch starred.
    ax = figures[2][1]
    for r in finished:
        world = r.summary["world_size"]
        ax.plot([m["elapsed_s"] * world for m in r.metrics], [m["test_acc"] for m in r.metrics], marker=".",
                color=colour[r.name], label=r.name)
        ax.scatter(r.summary["best_epoch_wall_time_s"] * world, r.summary["best_test_acc"], s=80, marker="*",
                   color=colour[r.name])
    ax.set_title(f"Test accuracy vs {seconds.split(' (')[0]} (★ best epoch)")
    ax.set_xlabel(seconds)
    ax.set_ylabel("test accuracy %")

    for fig, ax in figures[1:]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for (fig, _), path in zip(figures, paths):
        _save(fig, path)
    return paths


# ---- W&B -----------------------------------------------------------------------------------------


def log_to_wandb(name: str, folder: Path, runs: list[Run], rows: list[dict], plots: list[Path],
                 ensemble: EnsembleResult | None, mode: str | None) -> str:
    """A small run of job type `report` in the sweep's W&B group; returns one line saying what happened."""
    from trainer.logger import resolve_wandb_mode

    configs = [r.config for r in runs if r.config is not None]
    logging = configs[0].logging if configs else None
    mode = resolve_wandb_mode(mode or (logging.mode if logging else "auto"))
    if mode == "disabled":
        return "W&B: disabled"
    group = (logging.group if logging else None) or name
    try:
        import wandb

        run = wandb.init(
            project=logging.project if logging else "cifar-infinity", group=group, job_type="report",
            name=f"report-{name}", dir=str(folder), mode=mode, config={"sweep": name, "runs": [r.name for r in runs]},
            settings=wandb.Settings(console="off", quiet=True, silent=True),
        )
        values: dict[str, Any] = {"comparison": wandb.Table(columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in rows])}
        values.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
        if ensemble is not None:
            values["ensemble"] = wandb.Table(
                columns=["model", "test_acc", "correct", "total"],
                data=[[n, ensemble.member_acc(i), ensemble.member_correct[i], ensemble.total]
                      for i, n in enumerate(ensemble.members)]
                + [["ensemble", ensemble.acc, ensemble.correct, ensemble.total]])
        run.log(values)
        if ensemble is not None:
            run.summary.update({"ensemble/acc": ensemble.acc, "ensemble/members": ensemble.members})
        run_dir = Path(run.dir).parent
        run.finish()
    except Exception as e:
        return f"warning: W&B could not log the report ({type(e).__name__}: {e}); the files above have it all"
    where = f"; upload it with: wandb sync {run_dir}" if mode == "offline" else ""
    return f"W&B: report run in group {group} ({mode}){where}"


# ---- the whole report ------------------------------------------------------------------------------


@dataclass
class Report:
    name: str
    folder: Path
    runs: list[Run]
    rows: list[dict]
    ensemble: EnsembleResult | None
    plots: list[Path]
    markdown: str


def _choose_members(runs: list[Run], names: list[str] | None) -> list[Run]:
    usable = [r for r in runs if r.finished and r.config is not None]
    if names is None:
        return usable
    by_name = {r.name: r for r in usable}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UserError(f"--ensemble: {', '.join(unknown)}: not a finished run here (finished: "
                        f"{', '.join(by_name) or 'none'})")
    return [by_name[n] for n in dict.fromkeys(names)]


def make_report(folder: Path, deploy: bool = True, ensemble: list[str] | None = None, use_ensemble: bool = True,
                wandb_mode: str | None = None, out: Callable[[str], None] = print,
                budget: DeployBudget = DeployBudget()) -> Report:
    """Reads the runs, measures, writes report.md, report.csv, plots/ and the W&B run; prints the report."""
    folder = Path(folder)
    name, runs = find_runs(folder)
    members = _choose_members(runs, ensemble) if use_ensemble else []
    for r in runs:
        if r.problem:
            print(f"warning: {r.problem}", file=sys.stderr)

    order = table_order(runs)
    rows = [comparison_row(r) for r in order]
    sections = [sweep_header(name, runs), "", markdown_table(runs), "", TABLE_NOTES]
    missing = not_finished_lines(runs)
    if missing:
        sections += ["", "Not in the table, or with files that could not be read:", *missing]

    device = report_device()
    from trainer.data.loaders import default_threads

    torch.set_num_threads(default_threads())  # importing ffcv leaves torch with one thread
    if deploy:
        notes = []
        if device.type == "cpu":  # other processes on the cores slow every CPU figure, batch 1 most
            notes.append(f"- The 1-minute load average was {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when the "
                         "measurements began; above the core count, the CPU figures are slower than the machine can do.")
        for row, run in zip(rows, order):
            if not run.finished:
                continue
            if run.config is None:
                notes.append(f"- {run.name}: not measured: no readable config.yaml")
                continue
            try:
                row.update(measure_deployment(run, device, budget))
            except UserError as e:
                notes.append(f"- {run.name}: not measured: {e}")
        sections += ["", f"## Deployment, measured on {device_text(device)}", "", deployment_table(rows), "",
                     deployment_notes(device, budget), *([""] + notes if notes else [])]

    result = None
    if use_ensemble:
        sections += ["", "## Ensemble", ""]
        if len(members) < 2:
            sections.append(f"Not computed: it needs two finished runs with a readable config; "
                            f"{len(members)} {'is' if len(members) == 1 else 'are'} here.")
        else:
            try:
                result = run_ensemble(members, device)
                sections.append(ensemble_text(result))
            except UserError as e:
                sections.append(f"Not computed: {e}")

    plots = make_plots(runs, folder)
    text = "\n".join(sections)
    images = "\n".join(f"![{PLOTS[p.name]}](plots/{p.name})" for p in plots)
    markdown = f"{text}\n\n## Plots\n\n{images}\n"
    write_text_atomic(folder / "report.md", markdown)
    write_text_atomic(folder / "report.csv", csv_text(rows))
    out(text)
    out("")
    out(f"report: {folder / 'report.md'}, {folder / 'report.csv'}, plots in {folder / 'plots'}")
    out(log_to_wandb(name, folder, runs, rows, plots, result, wandb_mode))
    return Report(name, folder, runs, rows, result, plots, markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python jobs/report.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sweep folder (runs/<sweep>) or a folder of run folders")
    parser.add_argument("--no-deploy", action="store_true", help="skip the latency/throughput/memory measurements")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--ensemble", metavar="a,b,...", help="the runs to ensemble (default: every finished run)")
    choice.add_argument("--no-ensemble", action="store_true", help="skip the ensemble")
    parser.add_argument("--wandb-mode", choices=["auto", "online", "offline", "disabled"],
                        help="W&B mode for the report run (default: the runs' logging.mode)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.ensemble.split(",") if n.strip()] if args.ensemble is not None else None
    if names is not None and not names:
        parser.error("--ensemble: give run names, e.g. --ensemble resnet,mobilenet")

    def run() -> int:
        make_report(args.folder, deploy=not args.no_deploy, ensemble=names, use_ensemble=not args.no_ensemble,
                    wandb_mode=args.wandb_mode)
        return 0

    cli.run(run)
