"""ResNet-9 of the CIFAR-10 speed-training line (Myrtle.ai / David Page, "How to
train your ResNet", 2018; the DAWNBench entry): 6,573,120 parameters (10 classes).
`resnet9_tiny` is the same layout at a quarter of the width (16-32-64-128 channels,
412,944 parameters, 1/16 of the FLOPs): the network of jobs/configs/tiny.yaml, small
enough to train on a CPU (results/tiny-cpu/).

prep: conv 64 -> layer1: conv 128, max-pool 2, residual(2 x conv 128) ->
layer2: conv 256, max-pool 2 -> layer3: conv 512, max-pool 2, residual(2 x conv 512)
-> global max-pool (4x4 -> 1x1) -> linear 512->10 without bias -> logits x 0.125.
Every conv is 3x3 conv-BN-ReLU without conv bias. The fixed 0.125 scale on the
logits is Page's: it keeps the initial softmax soft, which the high learning rates
of his schedule need.

``whiten=True`` replaces the prep conv by a frozen 2x2 patch-whitening layer and a ReLU
(airbench, arXiv 2404.00498: its whitening layer stands where Page's prep layer stood), so
layer1's conv takes its 24 channels; `trainer.models.whitening.fit` sets the filters from
training images. The unpadded 2x2 conv gives 31x31 maps and the max-pools floor them
(31 -> 15 -> 7 -> 3) before the global max-pool, as in airbench: padding back to 32 would
add a border row of made-up values for no gain. It has 6,525,208 parameters (resnet9_tiny
414,808): the prep conv's go, layer1's first conv shrinks or grows to 24 inputs, and the
24 trainable whitening biases come in.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from trainer.models.whitening import PatchWhitening


def _conv(c_in: int, c_out: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(c_in, c_out, kernel_size=3)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels), _conv(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        logit_scale: float = 0.125,
        whiten: bool = False,
    ) -> None:
        super().__init__()
        prep, w1, w2, w3 = widths
        stem: list[nn.Module] = (
            [PatchWhitening(), nn.ReLU(inplace=True)] if whiten else [_conv(3, prep)]
        )
        stem_out = PatchWhitening.out_channels if whiten else prep
        self.features = nn.Sequential(
            *stem,  # prep
            _conv(stem_out, w1), nn.MaxPool2d(2), Residual(w1),  # layer1: 32 -> 16
            _conv(w1, w2), nn.MaxPool2d(2),  # layer2: 16 -> 8
            _conv(w2, w3), nn.MaxPool2d(2), Residual(w3),  # layer3: 8 -> 4
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1)) * self.logit_scale


def resnet9(num_classes: int = 10, whiten: bool = False) -> nn.Module:
    return ResNet9(num_classes, whiten=whiten)


def resnet9_tiny(num_classes: int = 10, whiten: bool = False) -> nn.Module:
    return ResNet9(num_classes, widths=(16, 32, 64, 128), whiten=whiten)
