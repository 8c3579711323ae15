"""Size and cost of a network: parameter count and the FLOPs of one forward."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_size: int = 32) -> int:
    """FLOPs of one eval-mode forward of a single image, as FlopCounterMode counts them
    (a multiply-add is 2 FLOPs; only matmul/conv-like ops are counted)."""
    model.eval()
    x = torch.randn(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()
