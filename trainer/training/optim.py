"""The optimizer's parameter groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from trainer import UserError
from trainer.config import OptimConfig
from trainer.training import budget

# airbench94's schedule (airbench94.py): the factor on the peak lr at the start, where the peak is
# (a fraction of the total steps), and at the end; linear in between.
AIRBENCH_START, AIRBENCH_PEAK_AT, AIRBENCH_END = 0.2, 0.23, 0.07


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None, bias_lr_mult: float = 1.0) -> list[dict]:
    """Weight decay on weights of convolutions and linear layers only: decaying BatchNorm scales
    and biases only fights the normalisation and costs accuracy.

    With `bias_lr_mult` other than 1, the BatchNorm biases get a group of their own with `lr` times
    it (airbench trains them 64x faster); every other parameter, BatchNorm scales and other biases
    (the patch-whitening layer's, a conv's) included, keeps `lr`, as in airbench. BatchNorm biases
    are found by module type: a name ending in `bias` says nothing about the layer it belongs to.
    With 1 they stay in the no-decay group, so the groups (and checkpoints) are as they always were.
    Each group carries its `lr`, which LambdaLR takes as that group's base learning rate.
    Frozen parameters (requires_grad False: patch whitening, frozen BatchNorm scales) are left out:
    the optimizer has nothing to do with them."""
    if bias_lr_mult != 1.0 and lr is None:
        raise ValueError("param_groups: bias_lr_mult needs the base lr")
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._NormBase) and m.bias is not None}
    if bias_lr_mult != 1.0 and not norm_biases:
        # The option would change nothing: refused, as the model options refuse a network they cannot change.
        raise UserError(f"optim.bias_lr_mult: the network has no BatchNorm bias to apply it to; "
                        f"set optim.bias_lr_mult=1 (got {bias_lr_mult:g})")
    decay, no_decay, biases = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.ndim > 1:
            decay.append(p)
        elif bias_lr_mult != 1.0 and id(p) in norm_biases:
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
    """Per-iteration factor on the peak LR. cosine, triangle: linear warmup from ~0, then down to 0
    along a cosine or a straight line ("triangle": with the warmup the learning rate draws one).
    airbench: airbench94's own shape, its warmup built in (warmup_steps must be 0): linear from 0.2
    at step 0 to 1 at 23% of the steps, then linear to 0.07 at the last step, and 0.07 after it."""
    if schedule not in ("cosine", "triangle", "airbench"):
        raise ValueError(f"unknown schedule '{schedule}'")
    if schedule == "airbench":
        if warmup_steps:
            raise ValueError(f"schedule airbench has its own warmup; got warmup_steps={warmup_steps}")
        return _airbench(total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def _airbench(total_steps: int) -> Callable[[int], float]:
    total = max(1, total_steps)
    # np.interp holds the end value past the last point: steps beyond the plan stay at 0.07.
    points, values = (0.0, AIRBENCH_PEAK_AT * total, total), (AIRBENCH_START, 1.0, AIRBENCH_END)
    return lambda step: float(np.interp(step, points, values))


class Schedule:
    """The run's learning rate per step: lr_lambda's shape ending at `total_steps` (the budget's
    plan, else train.epochs), on each group's base lr (the biases' may be multiplied).

    LambdaLR keeps the step count in its state_dict (the checkpoint's "scheduler") but no function,
    so a resumed run sets its own end here too (set_total), and the config's learning rates apply
    from the current step on: the config is the recipe, the checkpoint the progress."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, steps_per_epoch: int, total_steps: int,
                 budgeted: bool) -> None:
        self.optimizer, self.cfg, self.steps_per_epoch, self.budgeted = optimizer, optim_cfg, steps_per_epoch, budgeted
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._factor(total_steps))

    def _factor(self, total_steps: int) -> Callable[[int], float]:
        warmup = round(self.cfg.warmup_epochs * self.steps_per_epoch)
        if self.budgeted:
            warmup = budget.warmup_steps(self.cfg.warmup_epochs, self.steps_per_epoch, total_steps)
        return lr_lambda(total_steps, warmup, self.cfg.schedule)

    def set_total(self, total_steps: int) -> None:
        """The schedule ending at `total_steps`, from the current step on."""
        self.scheduler.lr_lambdas = [self._factor(total_steps)] * len(self.optimizer.param_groups)
        self.apply_config_lr()

    def apply_config_lr(self) -> None:
        self.scheduler.base_lrs = list(self.base_lrs)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor
