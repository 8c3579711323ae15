"""VGG16 with BatchNorm (Simonyan & Zisserman 2015; BN after every conv), CIFAR-10
head: 33,646,666 parameters (10 classes).

torchvision's ``vgg16_bn`` features are used unchanged: five max-pools take 32x32
to 1x1x512. Its ImageNet classifier expects 512x7x7 (the adaptive pool would just
replicate the single pixel 49 times), so the pool is made 1x1 and the first linear
layer 512->4096, giving the 512->4096->4096->10 classifier of the usual CIFAR port.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import vgg16_bn


def vgg_bn(num_classes: int = 10) -> nn.Module:
    model = vgg16_bn(weights=None, num_classes=num_classes)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    fc = nn.Linear(512, 4096)
    # Same init torchvision gives the other linear layers of VGG.
    nn.init.normal_(fc.weight, 0, 0.01)
    nn.init.zeros_(fc.bias)
    model.classifier[0] = fc
    return model
