"""The step part: training images/s per architecture on synthetic batches already on the device.

Three modes: eager fp32 (the baseline), AMP (bf16 autocast; fp16 with a GradScaler on GPUs without
bf16), and AMP + torch.compile + channels_last; warm-up steps excluded, compile time reported apart.
AMP is measured even where train.amp=auto would not use it (a CPU without native bf16): the table
says which precision auto picks on the device, and the AMP column shows what it saves or costs.
On a GPU the block of steps is timed and the model FLOPs utilisation (MFU) of the compiled step
shown; on a CPU the median step (robust to other processes).

The eager modes of every architecture come before any compile (the smallest graphs' first), and each
row is handed out as soon as a mode is measured (the --json file is rewritten then): a run cut off in a long compile keeps every
eager number. A row's `modes_done` lists its measured modes and `complete` says all three are in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from trainer import models
from trainer.cli import described
from trainer.bench.common import Settings
from trainer.device import COMPILE_BACKEND, amp_choice, amp_dtype, device_name, precision_name, synchronize
from trainer.models.flops import forward_flops

# Peak dense bf16 tensor throughput (FLOP/s) by device name, from the vendors' data sheets; the
# first entry whose text is in the name wins, so the specific names come first. Unknown: no MFU.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (the name reads "H100 80GB HBM3")
    ("H200", 989e12),  # also GH200: the same H100-class tensor cores
    ("A100", 312e12),
)

MODES = {  # name: (autocast, torch.compile, channels_last)
    "eager_fp32": (False, False, False),
    "amp": (True, False, False),
    "compiled_amp": (True, True, True),
}


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def time_steps(arch: str, device: torch.device, mode: str, settings: Settings) -> dict:
    """Images/s of full training steps (forward, loss, backward, SGD) on one synthetic batch."""
    autocast, use_compile, channels_last = MODES[mode]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = models.build(arch).to(device, memory_format=memory_format).train()
    net = torch.compile(model, backend=COMPILE_BACKEND) if use_compile else model
    dtype = amp_dtype(device, autocast)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.2)
    x = torch.randn(settings.step_batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (settings.step_batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    start = time.perf_counter()
    for _ in range(settings.step_warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":  # the whole block, so that the GPU runs ahead of the host as in training
        start = time.perf_counter()
        for _ in range(settings.step_steps):
            step()
        synchronize(device)
        step_s = (time.perf_counter() - start) / settings.step_steps
    else:  # a CPU step is synchronous: time each, keep the median (robust to other processes' bursts)
        times = []
        for _ in range(settings.step_steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        step_s = float(np.median(times))
    del net, model, optimizer
    if use_compile:
        torch._dynamo.reset()
    return {"images_per_s": settings.step_batch / step_s,
            # the warm-up beyond what its steps would take at the measured speed: compiling, mostly
            "compile_s": max(0.0, warmup_s - step_s * settings.step_warmup) if use_compile else None}


def step_settings(device: torch.device, settings: Settings) -> dict:
    """What the step numbers were measured with, for the results file."""
    dtype = amp_dtype(device, True)
    return {"batch": settings.step_batch, "steps": settings.step_steps, "warmup_steps": settings.step_warmup,
            "amp_dtype": str(dtype).removeprefix("torch."),
            "amp_auto": precision_name(amp_dtype(device, "auto")),  # what train.amp=auto trains in here
            "peak_flops": peak_flops(device_name(device)) if device.type == "cuda" else None,
            "compile_backend": COMPILE_BACKEND}


EAGER_MODES = ("eager_fp32", "amp")


def _row(measured: dict, errors: dict, train_flops: float, peak: float | None) -> dict:
    """One architecture's row from the modes measured so far: a mode not (yet) measured is None, and
    so is every ratio or MFU that needs it; `modes_done` lists the modes whose numbers are in."""
    speed = {mode: measured[mode]["images_per_s"] if mode in measured else None for mode in MODES}
    base = speed["eager_fp32"]

    def ratio(mode: str) -> float | None:
        return speed[mode] / base if speed[mode] is not None and base else None

    compiled = measured.get("compiled_amp")
    return {
        **speed,
        "step_ratio_amp": ratio("amp"),
        "step_ratio_compiled_amp": ratio("compiled_amp"),
        "compile_s": compiled["compile_s"] if compiled else None,
        "train_gflops_per_image": train_flops / 1e9,
        # model FLOPs utilisation of the compiled AMP step; None off a GPU, on an unknown card, or not measured
        "mfu": train_flops * compiled["images_per_s"] / peak if peak and compiled else None,
        "modes_done": [mode for mode in MODES if mode in measured],
        "complete": all(mode in measured for mode in MODES),
        "errors": dict(errors),
    }


def bench_steps(device: torch.device, settings: Settings, threads: int,
                on_row: Callable[[dict], None] | None = None) -> dict:
    """Every architecture's eager fp32 and AMP steps first, then each one's compiled step: a compile
    that runs into a time limit (EfficientNet's cold compile is minutes) costs only compiled rows.
    `on_row(results)` is called after every measurement, so that the caller can write it out at once.
    A mode that raises (an out-of-memory, a compiler error) is recorded in the row's `errors`, and the
    others go on."""
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    measured: dict[str, dict] = {arch: {} for arch in settings.archs}
    errors: dict[str, dict] = {arch: {} for arch in settings.archs}
    results: dict[str, dict] = {}
    train_flops, layers = {}, {}
    for arch in settings.archs:
        model = models.build(arch)
        train_flops[arch] = 3 * forward_flops(model)  # per image: forward + backward (2x forward)
        layers[arch] = sum(1 for _ in model.modules())
    order = [(mode, arch) for mode in EAGER_MODES for arch in settings.archs]
    # the compiles with the fewest modules (the smallest graphs, the quickest compiles) first, so a
    # time limit leaves as many compiled rows as it can: EfficientNet's comes last
    order += [("compiled_amp", arch) for arch in sorted(settings.archs, key=lambda a: layers[a])]
    for mode, arch in order:
        torch.set_num_threads(threads)
        try:
            measured[arch][mode] = time_steps(arch, device, mode, settings)
        except Exception as e:  # noqa: BLE001 - one mode's failure must not cost the other rows
            errors[arch][mode] = described(e)
            print(f"  {arch} {mode}: failed: {errors[arch][mode]}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if mode == "compiled_amp":
                torch._dynamo.reset()
        else:
            print(f"  {arch} {mode}: {measured[arch][mode]['images_per_s']:,.0f} images/s", file=sys.stderr, flush=True)
        results[arch] = _row(measured[arch], errors[arch], train_flops[arch], peak)
        if on_row is not None:
            on_row(results)
    return results


def print_table(results: dict, device: torch.device, settings: Settings) -> None:
    amp = precision_name(amp_dtype(device, True))
    timing = "the block" if device.type == "cuda" else "the median step"
    print(f"\nstep: training images/s on {device_name(device)}, batch {settings.step_batch}, {timing} of "
          f"{settings.step_steps} after {settings.step_warmup} warm-up; AMP = {amp} autocast; ratios to eager fp32")
    print(f"  the trainer's precision here: {amp_choice(device, 'auto')}")
    print(f"  {'arch':<16}{'eager fp32':>11}{'AMP':>10}{'AMP x':>7}{'compiled':>10}{'comp. x':>8}{'compile s':>10}"
          f"{'MFU':>7}")

    def cell(value: float | None, fmt: str, width: int) -> str:
        return f"{'-' if value is None else format(value, fmt):>{width}}"

    for arch, x in results.items():
        mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "-"
        print(f"  {arch:<16}{cell(x['eager_fp32'], ',.0f', 11)}{cell(x['amp'], ',.0f', 10)}"
              f"{cell(x['step_ratio_amp'], '.2f', 6)}x{cell(x['compiled_amp'], ',.0f', 10)}"
              f"{cell(x['step_ratio_compiled_amp'], '.2f', 7)}x{cell(x['compile_s'], '.1f', 10)}{mfu:>7}")
        for mode, error in x["errors"].items():
            print(f"    {mode} failed: {error}")
