"""The optimizer's parameter groups and the learning-rate schedules (trainer/training/optim.py), on the
registry's real networks and a real SGD + LambdaLR."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer import UserError
from trainer.config import ModelConfig
from trainer.models import options
from trainer.models.whitening import PatchWhitening
from trainer.training.optim import lr_lambda, param_groups

LR = 1.5
# The speed profile's model options: whitening, and BatchNorm scales frozen so that the BatchNorm
# biases are the only BatchNorm parameters left to train.
SPEED_OPTIONS = dict(whiten=True, activation="gelu", bn_momentum=0.4, bn_eps=1e-12, bn_frozen_scale=True,
                     dirac_init=True)


def _group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


@pytest.mark.parametrize("arch", ["airbench94", "resnet9_tiny"])
def test_only_batchnorm_biases_get_the_bias_lr_mult(arch: str) -> None:
    # airbench trains its whitening bias at the base rate; by its name (`bias`) it used to get 64x.
    net = options.build(ModelConfig(arch=arch, **SPEED_OPTIONS))
    groups = param_groups(net, 5e-4, LR, bias_lr_mult=64)
    group = _group_of(groups)
    (whitening,) = [m for m in net.modules() if isinstance(m, PatchWhitening)]
    assert group[id(whitening.bias)]["lr"] == LR and group[id(whitening.bias)]["weight_decay"] == 0.0
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(group[id(n.bias)]["lr"] == 64 * LR for n in norms)
    fast = [g for g in groups if g["lr"] == 64 * LR]
    assert len(fast) == 1 and len(fast[0]["params"]) == len(norms)  # nothing else is in it
    # Every trainable parameter is in exactly one group; the frozen ones (scales, filters) in none.
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(id(p) for g in groups for p in g["params"])


def test_bias_lr_mult_without_batchnorm_is_refused_by_name() -> None:
    with pytest.raises(UserError, match=r"^optim.bias_lr_mult: the network has no BatchNorm bias"):
        param_groups(options.build(ModelConfig(arch="alexnet")), 5e-4, LR, bias_lr_mult=64)
    assert len(param_groups(options.build(ModelConfig(arch="alexnet")), 5e-4, LR)) == 2  # 1: nothing to refuse


def test_airbench_schedule_shape() -> None:
    total = 1000
    factor = lr_lambda(total, 0, "airbench")
    assert factor(0) == pytest.approx(0.2)
    assert factor(230) == pytest.approx(1.0)  # the peak at 23% of the steps
    assert factor(total) == pytest.approx(0.07)
    assert factor(total + 50) == pytest.approx(0.07)  # held, not extrapolated below
    # Linear on each side of the peak: halfway up and halfway down.
    assert factor(115) == pytest.approx(0.6)
    assert factor(615) == pytest.approx((1.0 + 0.07) / 2)
    values = [factor(s) for s in range(total + 1)]
    assert values.index(max(values)) == 230
    assert all(a < b for a, b in zip(values[:230], values[1:231]))
    assert all(a > b for a, b in zip(values[230:], values[231:]))


def test_airbench_schedule_drives_every_group_through_lambdalr() -> None:
    net = options.build(ModelConfig(arch="resnet9_tiny", bn_frozen_scale=True))
    groups = param_groups(net, 5e-4, LR, bias_lr_mult=64)
    opt = torch.optim.SGD(groups, lr=LR, momentum=0.85, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(10, 0, "airbench"))
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    seen.append([g["lr"] for g in opt.param_groups])
    assert seen[0] == pytest.approx([0.2 * LR, 0.2 * LR, 0.2 * 64 * LR])
    assert seen[10] == pytest.approx([0.07 * LR, 0.07 * LR, 0.07 * 64 * LR])
    # The peak falls between steps 2 and 3 (at 2.3): step 3 is just past it, the highest step.
    assert max(s[0] for s in seen) == pytest.approx(LR * (1 + (0.07 - 1) * (3 - 2.3) / (10 - 2.3)))


def test_airbench_schedule_refuses_a_warmup() -> None:
    with pytest.raises(ValueError, match="own warmup"):
        lr_lambda(100, 5, "airbench")
