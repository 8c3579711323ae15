"""MobileNet v1 (Howard et al. 2017): a full 3x3 conv followed by 13 depthwise-
separable blocks (3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU),
global average pooling and one linear layer.

CIFAR-10 adaptation, as in the common CIFAR port: the first conv has stride 1 instead
of 2, so the four stride-2 blocks take 32x32 to 2x2 (the ImageNet network's five
take 224x224 to 7x7).

``output_stride=8`` runs the last stride-2 block (the step to 1024 channels) at stride 1,
so the last two blocks see 4x4 maps instead of 2x2: a 2x2 map leaves the final layers
little spatial layout to work with, and strides change no parameter count. It is the
last stage that gives up its stride (as DeepLab's output stride does) because it is the
cheapest place to add resolution: only the final two blocks run at 4x larger maps.

- ``mobilenet_big``: width multiplier 1.0, 3,217,226 parameters (10 classes).
- ``mobilenet``: width multiplier 0.55, 984,346 parameters -- the multiplier
  that brings the same design closest to the seed's 1.0 M once widths are rounded to
  multiples of 8 (0.5 gives 823,722; 0.56 gives 1,036,506), channels 16-32-72-144-
  280-560 instead of 32-64-128-256-512-1024.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

# Output channels of the 13 separable blocks at width 1.0, and their strides.
_BLOCKS: list[tuple[int, int]] = [
    (64, 1),
    (128, 2), (128, 1),
    (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
]


def _scaled(channels: int, width: float) -> int:
    # The paper simply multiplies every layer's width by alpha; rounding to a multiple
    # of 8 keeps channel counts friendly to tensor cores and channels_last kernels.
    return max(8, int(channels * width + 4) // 8 * 8)


def check_output_stride(output_stride: int) -> None:
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride: must be 8 or 16, got {output_stride}")


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, output_stride: int = 16) -> None:
        super().__init__()
        check_output_stride(output_stride)
        blocks = list(_BLOCKS)
        if output_stride == 8:
            last = max(i for i, (_, stride) in enumerate(blocks) if stride == 2)
            blocks[last] = (blocks[last][0], 1)
        c_in = _scaled(32, width)
        layers: list[nn.Module] = [Conv2dNormActivation(3, c_in, kernel_size=3)]
        for channels, stride in blocks:
            c_out = _scaled(channels, width)
            layers += [
                Conv2dNormActivation(c_in, c_in, kernel_size=3, stride=stride, groups=c_in),
                Conv2dNormActivation(c_in, c_out, kernel_size=1),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def mobilenet(num_classes: int = 10, output_stride: int = 16) -> nn.Module:
    return MobileNetV1(num_classes, width=0.55, output_stride=output_stride)


def mobilenet_big(num_classes: int = 10, output_stride: int = 16) -> nn.Module:
    return MobileNetV1(num_classes, width=1.0, output_stride=output_stride)
