"""The small Inception of Zhang et al. 2017 ("Understanding deep learning requires
rethinking generalization", Appendix A / Fig. 3), with BatchNorm: 1,651,114
parameters (10 classes). The paper's Table 1 gives 1,649,402: exactly one parameter
per conv channel (1,712 channels) fewer, consistent with a BatchNorm without a learned
scale (the TF-slim default); here BN keeps both scale and shift, as PyTorch does.

Every convolution is a conv-BN-ReLU "Conv module". An Inception(c1, c3) module runs a
1x1 conv with c1 channels and a 3x3 conv with c3 channels side by side and
concatenates them; a Downsample(c3) module concatenates a 3x3/stride-2 conv with c3
channels and a 3x3/stride-2 max-pool. The paper feeds 28x28 crops and ends with a 7x7
mean pool; an adaptive average pool lets the same network take the 32x32 images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation


class Inception(nn.Module):
    def __init__(self, c_in: int, c1: int, c3: int) -> None:
        super().__init__()
        self.branch1 = Conv2dNormActivation(c_in, c1, kernel_size=1)
        self.branch3 = Conv2dNormActivation(c_in, c3, kernel_size=3)
        self.out_channels = c1 + c3

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch3(x)], dim=1)


class Downsample(nn.Module):
    def __init__(self, c_in: int, c3: int) -> None:
        super().__init__()
        self.conv = Conv2dNormActivation(c_in, c3, kernel_size=3, stride=2)
        # padding=1 on both branches so odd and even sizes halve the same way (ceil).
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.out_channels = c3 + c_in

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.pool(x)], dim=1)


class SmallInception(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, 96, kernel_size=3)]
        channels = 96
        # ("i", c1, c3) is Inception(c1, c3); ("d", c3) is Downsample(c3), as in the paper.
        plan: list[tuple[str, int] | tuple[str, int, int]] = [
            ("i", 32, 32), ("i", 32, 48), ("d", 80),  # 32x32 -> 16x16
            ("i", 112, 48), ("i", 96, 64), ("i", 80, 80), ("i", 48, 96), ("d", 96),  # -> 8x8
            ("i", 176, 160), ("i", 176, 160),
        ]
        for kind, *widths in plan:
            block = Inception(channels, *widths) if kind == "i" else Downsample(channels, *widths)
            layers.append(block)
            channels = block.out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def inception_bn(num_classes: int = 10) -> nn.Module:
    return SmallInception(num_classes)
