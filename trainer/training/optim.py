"""The optimizer's parameter groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights of convolutions and linear layers only: decaying BatchNorm scales
    and biases only fights the normalisation and costs accuracy."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Per-iteration factor on the peak LR: linear warmup from ~0, then down to 0 along a cosine or
    a straight line ("triangle": with the warmup the learning rate draws one)."""
    if schedule not in ("cosine", "triangle"):
        raise ValueError(f"unknown schedule '{schedule}'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor
