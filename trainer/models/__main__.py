"""``python -m trainer.models``: parameter count and forward cost of every registered network.

Exits 1 if a network's parameter count has drifted outside +-5% of its target.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.models import REGISTRY

TOLERANCE = 0.05  # parameter counts must be within +-5% of the target


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


def within_target(params: int, target_millions: float) -> bool:
    return abs(params / 1e6 - target_millions) <= TOLERANCE * target_millions


def main() -> int:
    header = (
        f"{'name':<16} {'params':>11} {'params (M)':>10} {'GFLOPs (2 per MAC)':>18} "
        f"{'target (M)':>10} {'+-5%':>5}  seed row"
    )
    print(header)
    print("-" * len(header))
    all_ok = True
    for name, spec in REGISTRY.items():
        model = REGISTRY.build(name)
        params = count_params(model)
        ok = within_target(params, spec.params_target)
        all_ok &= ok
        print(
            f"{name:<16} {params:>11,} {params / 1e6:>10.3f} {forward_flops(model) / 1e9:>18.3f} "
            f"{spec.params_target:>10.1f} {'yes' if ok else 'NO':>5}  {spec.seed_row or '-'}"
        )
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
