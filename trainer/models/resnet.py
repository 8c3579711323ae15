"""ResNet-34 (He et al. 2016, basic blocks [3, 4, 6, 3]) for CIFAR-10:
21,282,122 parameters (10 classes).

Built from torchvision's ``resnet34``; the 7x7/stride-2 stem and its max-pool
(a 4x reduction meant for 224x224 images) become one 3x3/stride-1 convolution, so
the four stages run at 32, 16, 8 and 4 pixels, as in the usual CIFAR port.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet34


def resnet(num_classes: int = 10) -> nn.Module:
    model = resnet34(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init torchvision gives every other conv of the network.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
