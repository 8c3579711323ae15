"""An exponential moving average of a model's weights and buffers, updated without host syncs.

torch.optim.swa_utils.AveragedModel does the same arithmetic (with get_ema_multi_avg_fn and
use_buffers=True) but reads its step counter on the host twice per update (`bool(n_averaged == 0)`,
`n_averaged > 0`): two blocking device-to-host copies every step on a GPU, or, with the counter
left on the CPU (its default without `device=`), a host-to-device copy per step and a CPU buffer
that NCCL refuses to broadcast. Here the counter lives on the training device and the host knows
from a Python flag whether the average has started. The state_dict has AveragedModel's keys
(`module.*`, `n_averaged`), so checkpoints of either kind load into the other.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float, device: torch.device) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).to(device)
        self.decay = decay
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long, device=device))
        self.started = False  # the host's copy of n_averaged > 0, so that updating never reads the device

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards `model`'s current weights and buffers (the first update copies them)."""
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if not self.started:
            torch._foreach_copy_(averaged, current)
            self.started = True
        else:
            floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - self.decay)
            for a, c in zip(averaged, current):
                if not a.is_floating_point():  # BatchNorm's num_batches_tracked, as AveragedModel averages it
                    a.copy_(a * self.decay + c * (1 - self.decay))
        self.n_averaged += 1

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict, assign)
        self.started = bool(self.n_averaged > 0)  # one host read, when resuming only
        return result
