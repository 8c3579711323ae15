"""The optimizer's parameter groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None, bias_lr_mult: float = 1.0) -> list[dict]:
    """Weight decay on weights of convolutions and linear layers only: decaying BatchNorm scales
    and biases only fights the normalisation and costs accuracy.

    With `bias_lr_mult` other than 1, the biases (BatchNorm's included, by name: `*.bias`) get a
    group of their own with `lr` times it (airbench trains them 64x faster); BatchNorm scales keep
    `lr`. With 1 they stay in the no-decay group, so the groups (and checkpoints) are as they always
    were. Each group carries its `lr`, which LambdaLR takes as that group's base learning rate.
    Frozen parameters (requires_grad False: patch whitening, frozen BatchNorm scales) are left out:
    the optimizer has nothing to do with them."""
    if bias_lr_mult != 1.0 and lr is None:
        raise ValueError("param_groups: bias_lr_mult needs the base lr")
    decay, no_decay, biases = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim > 1:
            decay.append(p)
        elif bias_lr_mult != 1.0 and name.rsplit(".", 1)[-1] == "bias":
            biases.append(p)
        else:
            no_decay.append(p)
    base = {} if lr is None else {"lr": lr}
    groups = [{"params": decay, "weight_decay": weight_decay, **base}, {"params": no_decay, "weight_decay": 0.0, **base}]
    if bias_lr_mult != 1.0:
        groups.append({"params": biases, "weight_decay": 0.0,
                       **({} if lr is None else {"lr": lr * bias_lr_mult})})
    return groups


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
