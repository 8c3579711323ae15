"""What the rest of the code asks of the device: its name, the autocast precision it supports, and
how to wait for it."""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Iterable

import torch

# x86 flags (the `flags` line of /proc/cpuinfo) of CPUs that compute in bf16 natively. Without them
# bf16 is emulated with fp32 instructions plus conversions, which costs more than it saves.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

# torch.compile's backend, for the trainer and the step bench alike. Tests of the compiled paths set
# aot_eager: the same dynamo graphs, DDP bucket split and AOT-autograd backward, without inductor's
# code generation (a minute on a small CPU, cold). The bench's results record it.
COMPILE_BACKEND = os.environ.get("TRAINER_COMPILE_BACKEND", "inductor")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo; empty where there is none (not Linux) or the file
    has no x86 `flags` line (e.g. ARM, whose bf16 is then not detected: fp32 under train.amp=auto)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu(flags: Iterable[str]) -> bool:
    """Whether a CPU with these /proc/cpuinfo flags computes in bf16 natively."""
    return not set(NATIVE_BF16_CPU_FLAGS).isdisjoint(flags)


def amp_dtype(device: torch.device, amp: bool | str, flags: Iterable[str] | None = None) -> torch.dtype | None:
    """The autocast dtype that train.amp asks for on `device`; None: no autocast (fp32).

    true: bf16 wherever it exists (CPUs included, emulated or not), fp16 on GPUs without bf16.
    false: None. "auto": as true on a GPU; on a CPU bf16 only where it is native (`flags`, default
    this CPU's), else None. `flags` lets tests decide for a CPU they do not run on.
    """
    if amp not in (True, False, "auto"):
        raise ValueError(f"train.amp: expected true, false or 'auto', got {amp!r}")
    if amp is False:
        return None
    if device.type == "cuda":
        # fp16 needs a GradScaler (the trainer makes one): fp16 gradients underflow without it.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "auto" and not native_bf16_cpu(cpu_flags() if flags is None else flags):
        return None
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """The precision's name in summary.json and the bench: bf16, fp16 or fp32 (no autocast)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def auto_reason(device: torch.device) -> str:
    """Why train.amp=auto picks what it picks on `device`, in words."""
    if device.type == "cuda":
        return "the GPU has bf16" if torch.cuda.is_bf16_supported() else "the GPU has no bf16: fp16 with a GradScaler"
    native = [f for f in NATIVE_BF16_CPU_FLAGS if f in cpu_flags()]
    return f"native bf16 on this CPU ({', '.join(native)})" if native else "no native bf16 on this CPU"


def amp_choice(device: torch.device, amp: bool | str) -> str:
    """The precision train.amp resolves to on `device`, and why, for logs: e.g. 'fp32 (train.amp=auto:
    no native bf16 on this CPU)'."""
    name = precision_name(amp_dtype(device, amp))
    if amp == "auto":
        return f"{name} (train.amp=auto: {auto_reason(device)})"
    return f"{name} (train.amp={str(amp).lower()})"


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work; timing a CUDA call without this measures only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_cuda_math() -> None:
    """The trainer's and the step bench's CUDA settings, set in one place so that their numbers compare.

    TF32 for float32 matrix products and convolutions (cuDNN's default already; matmuls' is off):
    the tensor cores at ~1e-3 relative rounding, far inside what SGD's noise tolerates, for the
    float32 parts of a run (fp32 runs, the non-autocast ops of AMP runs). `set_float32_matmul_precision`
    is the API that torch.compile's inductor reads; mixing it with the newer per-backend
    `fp32_precision` attributes makes torch refuse to answer which one holds, so only this one is used.
    cudnn.benchmark: every training batch has the same shape (drop_last) and so has every test
    batch (evaluation pads the last), so cuDNN's one-off search for the fastest algorithms pays off;
    it makes results differ from run to run in the last bits (see the resume note in run.py)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
