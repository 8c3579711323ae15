"""AlexNet sized for CIFAR-10 32x32 inputs: 3,243,850 parameters (10 classes).

Follows Krizhevsky et al. 2012 in shape -- five convolutions (a large-kernel first
layer, then 192/384/256/256 channels as in the single-tower variant torchvision uses),
overlapping 3x3/stride-2 max-pools after conv1, conv2 and conv5, and a three-layer
fully connected head with dropout -- but with stride-1 5x5 first layers instead of
the 11x11/stride-4 ImageNet stem, which would leave nothing of a 32x32 image.
There is no normalisation, as in the original (LRN is dropped: it adds nothing once
the learning rate is tuned), so this is the seed's "AlexNet" row, not a "+BN" row.

Weights are Kaiming-initialised (He et al. 2015: normal, std sqrt(2 / fan_in)) with zero
biases. Without normalisation the init alone sets the scale of every layer's output, and
torch's default (uniform with std sqrt(1 / (3 fan_in))) shrinks the signal about 2.4x per
ReLU layer, so eight layers deep the gradients start tiny; fan-in Kaiming keeps the
forward variance constant through the ReLUs.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation


def _conv(c_in: int, c_out: int, kernel_size: int) -> Conv2dNormActivation:
    # norm_layer=None makes Conv2dNormActivation keep the conv bias, as AlexNet has.
    return Conv2dNormActivation(c_in, c_out, kernel_size, norm_layer=None)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


class AlexNetCifar(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, 64, 5), _pool(),  # 32 -> 16
            _conv(64, 192, 5), _pool(),  # 16 -> 8
            _conv(192, 384, 3),
            _conv(384, 256, 3),
            _conv(256, 256, 3), _pool(),  # 8 -> 4
        )
        # 2x2 rather than 1x1 keeps some spatial layout for the FC head (AlexNet has no
        # global pooling), and makes the head carry a quarter of the parameters.
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 2 * 2, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def alexnet(num_classes: int = 10) -> nn.Module:
    return AlexNetCifar(num_classes)
