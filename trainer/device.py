"""What the rest of the code asks of the device: its name, the autocast precision it supports, and
how to wait for it."""

from __future__ import annotations

import os
import platform

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)"


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype: bf16 wherever it exists (CPUs included), fp16 on GPUs without it, None if off."""
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16  # needs a GradScaler: fp16 gradients underflow without one
    return torch.bfloat16


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work; timing a CUDA call without this measures only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
