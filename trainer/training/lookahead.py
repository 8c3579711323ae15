"""Lookahead-style weight averaging on a schedule (airbench94's LookaheadState; Zhang et al. 2019).

A slow copy of the network's weights and buffers trails the trained ("fast") ones: every `every`
optimizer steps it moves towards them, slow <- d * slow + (1 - d) * fast, and the network is reset
to it, fast <- slow. The decay d = decay * (step / total_steps)^3 is near 0 early (the slow copy
follows the training closely) and rises to `decay` at the end of the plan, when averaging helps most;
the run ends on the slow weights (finish).

BatchNorm's running statistics are averaged with the weights, as airbench averages the whole
state_dict, so the slow network's statistics match its weights. Integer buffers (num_batches_tracked)
are a count, not a quantity to average: the slow copy takes the fast one's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn


class Lookahead:
    def __init__(self, model: nn.Module, every: int, decay: float) -> None:
        if every < 1:
            raise ValueError(f"lookahead_every: must be 1 or more, got {every}")
        if not 0 <= decay < 1:
            raise ValueError(f"lookahead_decay: must be in [0, 1), got {decay}")
        self.every = every
        self.decay = decay
        # clone() keeps each tensor's device, dtype and memory format (channels_last weights stay so).
        self.slow = {name: t.detach().clone() for name, t in model.state_dict().items()}

    def decay_at(self, step: int, total_steps: int) -> float:
        """d after `step` of `total_steps` optimizer steps: a Python float from ints, so no host sync."""
        if not 0 < step <= total_steps:
            raise ValueError(f"lookahead: step {step} is outside the plan of {total_steps} steps")
        return self.decay * (step / total_steps) ** 3

    @torch.no_grad()
    def step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after every optimizer step with the number of steps done; acts on every `every`-th."""
        if step % self.every:
            return
        d = self.decay_at(step, total_steps)
        slow, fast = self._pairs(model)
        floats = [i for i, t in enumerate(slow) if t.is_floating_point()]
        if floats:
            torch._foreach_lerp_([slow[i] for i in floats], [fast[i] for i in floats], 1 - d)
        for s, f in zip(slow, fast):
            if not s.is_floating_point():
                s.copy_(f)
        torch._foreach_copy_(fast, slow)

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """Puts the slow weights and buffers into `model` (the end of the plan)."""
        slow, fast = self._pairs(model)
        torch._foreach_copy_(fast, slow)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # state_dict()'s tensors share storage with the model's, so copying into them writes the model.
        current = model.state_dict()
        if current.keys() != self.slow.keys():
            raise ValueError(f"lookahead: the model's state_dict keys differ from the slow copy's "
                             f"({sorted(current.keys() ^ self.slow.keys())[:3]} ...)")
        return list(self.slow.values()), [current[name] for name in self.slow]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The slow tensors, keyed as the model's state_dict (settings come from the config)."""
        return dict(self.slow)

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        if state_dict.keys() != self.slow.keys():
            raise ValueError(f"lookahead: the checkpoint's slow weights have other keys than the model "
                             f"({sorted(state_dict.keys() ^ self.slow.keys())[:3]} ...)")
        for name, t in self.slow.items():
            t.copy_(state_dict[name])
