"""``python -m trainer.models``: parameter count and forward cost of every registered network.

Exits 1 if a network's parameter count has drifted outside +-5% of its target.
"""

from __future__ import annotations

import argparse

from trainer.models import REGISTRY

TOLERANCE = 0.05  # parameter counts must be within +-5% of the target


def within_target(params: int, target_millions: float) -> bool:
    return abs(params / 1e6 - target_millions) <= TOLERANCE * target_millions


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m trainer.models", description=__doc__.split("\n\n")[0]).parse_args(argv)
    from trainer.models.flops import count_params, forward_flops  # torch: after the command line checked out

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
            f"{spec.params_target:>10g} {'yes' if ok else 'NO':>5}  {spec.seed_row or '-'}"
        )
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
