"""EfficientNet (Tan & Le 2019) for CIFAR-10, built from torchvision's B0 and B4.

- ``efficientnet``: EfficientNet-B4 (width 1.4, depth 1.8; 1792 head features),
  17,566,546 parameters with a 10-class head -- the seed's "EfficientNet" row (17.4 M).
- ``efficientnet_b0``: EfficientNet-B0 (width 1.0, depth 1.0; 1280 head features),
  4,020,358 parameters with a 10-class head.

The only change to torchvision's networks is a stride-1 stem: its stride-2 stem plus
four stride-2 stages reduce 224x224 to 7x7 but would leave 32x32 at 1x1; with the stem
at stride 1 the last stages run at 2x2, as in the CIFAR ports of MobileNet. The head
(adaptive average pool, dropout, linear) is torchvision's with ``num_classes`` outputs.
Dropout (0.2 / 0.4) and stochastic depth (0.2) keep torchvision's defaults.

``output_stride=8`` runs the last stride-2 stage (stage 6, 5x5 depthwise) at stride 1, so
stages 6 and 7 and the head see 4x4 maps instead of 2x2, with the same parameters; the
last stage gives up its stride because that adds resolution where it costs the least.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import EfficientNet, efficientnet_b0 as tv_b0, efficientnet_b4 as tv_b4

from trainer.models.mobilenet import check_output_stride


def _cifar_stem(model: EfficientNet) -> EfficientNet:
    stem_conv = model.features[0][0]
    assert isinstance(stem_conv, nn.Conv2d) and stem_conv.stride == (2, 2)
    # Changing the stride in place keeps the kernel, padding and torchvision's init.
    stem_conv.stride = (1, 1)
    return model


def _output_stride_8(model: EfficientNet) -> EfficientNet:
    # torchvision's features: [0] stem, [1..7] the seven MBConv stages, [8] the 1x1 head conv;
    # stage 6 is the last with a stride-2 block, whose depthwise conv carries the stride. That
    # block has no residual (its channel count changes), so nothing else depends on the stride.
    strided = [m for m in model.features[6][0].modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 1, "torchvision's EfficientNet layout changed: stage 6 should hold one stride-2 conv"
    strided[0].stride = (1, 1)  # the 5x5 kernel's padding of 2 keeps the map size at stride 1
    return model


def _build(tv_constructor: Callable[..., EfficientNet], num_classes: int, output_stride: int) -> nn.Module:
    check_output_stride(output_stride)
    model = _cifar_stem(tv_constructor(weights=None, num_classes=num_classes))
    return _output_stride_8(model) if output_stride == 8 else model


def efficientnet(num_classes: int = 10, output_stride: int = 16) -> nn.Module:
    return _build(tv_b4, num_classes, output_stride)


def efficientnet_b0(num_classes: int = 10, output_stride: int = 16) -> nn.Module:
    return _build(tv_b0, num_classes, output_stride)
