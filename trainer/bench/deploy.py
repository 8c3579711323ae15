"""Deployment figures of a trained network on the device at hand: batch-1 latency, batch-256
throughput, peak memory and the size of its weights file.

The sweep report (python jobs/report.py) measures each run's checkpoints/best.pt with `measure`.
Times come from torch.utils.benchmark's Timer, which synchronises the device around each timed
block of forwards and sizes the blocks so that the timer's own cost is negligible.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from trainer.device import device_name, synchronize


@dataclass(frozen=True)
class DeployBudget:
    """How long each timing runs: blocks of forwards are repeated until their interquartile range is
    within `spread` of their median (after at least four blocks and `min_seconds`), or until
    `max_seconds` have been timed, whichever comes first: a large net at batch 256 on a CPU may
    take longer than the whole budget for one forward, and is then timed once."""

    spread: float = 0.1
    min_seconds: float = 0.2
    max_seconds: float = 1.0
    warmup: int = 3  # untimed batch-1 forwards first (allocations, kernel selection)
    batch: int = 256


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_text(device: torch.device) -> str:
    return device_name(device) + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")


def precision_text(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]


def seconds_per_call(call: Callable[[], Any], budget: DeployBudget) -> float:
    """The time of one call: the median, over blocks of calls timed by torch.utils.benchmark's
    adaptive_autorange, of a block's time per call."""
    # Imported when needed, and quietly: it imports cpp_extension, which logs a warning on any machine
    # with a CUDA toolkit but no GPU, a stray line in the report's output.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        quiet.setLevel(level)

    # Timer runs with one thread unless told otherwise; the report sets the threads it deploys with.
    timer = Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    measurement = timer.adaptive_autorange(budget.spread, min_run_time=budget.min_seconds,
                                           max_run_time=budget.max_seconds)
    return measurement.median


@contextmanager
def _fd2_silenced() -> Iterator[None]:
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


def peak_memory_bytes(forward: Callable[[], Any], resident: int, device: torch.device) -> int | None:
    """Tensor memory at the peak of one forward: the weights and input already there plus the
    activations. CUDA: the allocator's max_memory_allocated. CPU: torch.profiler's allocation and
    free events replayed in time order (the process's RSS says little: freed memory stays mapped)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        forward()
        synchronize(device)
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


def measure(net: torch.nn.Module, device: torch.device, input_dtype: torch.dtype, amp: torch.dtype | None,
            budget: DeployBudget = DeployBudget()) -> dict[str, Any]:
    """Latency (batch 1), throughput (batch `budget.batch`), peak memory and weights-file size of
    `net` (in eval mode on `device`), fed channels_last random images in `input_dtype` under
    autocast to `amp` (None: none); keyed as the report's columns."""
    generator = torch.Generator().manual_seed(0)

    def batch(n: int) -> torch.Tensor:
        x = torch.randn(n, 3, 32, 32, generator=generator)
        return x.to(device, input_dtype).contiguous(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> Callable[[], Any]:
        def run_once() -> Any:
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                return net(x)

        return run_once

    one, many = batch(1), batch(budget.batch)
    for _ in range(budget.warmup):
        forward(one)()
    synchronize(device)
    latency = seconds_per_call(forward(one), budget)

    resident = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers(), many])
    peak = peak_memory_bytes(forward(many), resident, device)  # also the batch-256 warm-up
    per_batch = seconds_per_call(forward(many), budget)

    weights = io.BytesIO()
    torch.save(net.state_dict(), weights)  # the state_dict alone, as it would be shipped
    return {
        "deploy_device": device_text(device),
        "deploy_precision": precision_text(amp),
        "latency_b1_ms": 1000 * latency,
        "throughput_b256_img_s": budget.batch / per_batch,
        "peak_mem_mb": None if peak is None else peak / 2**20,
        "model_file_bytes": weights.getbuffer().nbytes,
    }


def method_text(device: torch.device, budget: DeployBudget = DeployBudget()) -> str:
    """How `measure` measured, for the notes under a table of its figures."""
    memory = ("torch.cuda.max_memory_allocated over one batch-256 forward (weights, input, activations, workspace)"
              if device.type == "cuda" else
              "the peak of live tensor memory over one batch-256 forward, from torch.profiler's allocation events, "
              "plus the weights and input already resident (not the process's RSS)")
    return (
        f"Each run's checkpoints/best.pt in eval mode, channels_last, inputs in the run's data.dtype, under the "
        f"autocast the run's train.amp resolves to on this device, as the precision column says (auto: bf16 on "
        f"GPUs and on CPUs with native bf16, else fp32; true: bf16, fp16 on GPUs without bf16); one forward, no TTA. "
        f"Latency (batch 1, after {budget.warmup} untimed forwards) and throughput ({budget.batch} / the time of one "
        f"batch-{budget.batch} forward, after one untimed): torch.utils.benchmark's Timer.adaptive_autorange times "
        f"blocks of forwards, the device synchronised around each block, and the figure is the median over the "
        f"blocks of the time per forward; blocks are repeated until their interquartile range is within "
        f"{budget.spread:.0%} of their median "
        f"(at least four blocks and {budget.min_seconds:g} s) or until {budget.max_seconds:g} s have been timed, so "
        f"a slow forward is timed fewer times, once at the least. Peak memory: {memory}. Weights file: the state_dict alone "
        f"saved with torch.save (MB = 2^20 bytes)."
    )
