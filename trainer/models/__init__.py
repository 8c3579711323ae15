"""CIFAR-10 architectures, reachable by name.

    from trainer import models
    net = models.build("resnet", num_classes=10)
    models.names()        # every registered name, sorted
    models.seed_names()   # the networks of the seed's comparison table
    models.REGISTRY["resnet"].params_target  # 21.2 (millions)

The table below is the whole registry: adding a network means writing its
constructor ``f(num_classes: int = 10) -> nn.Module`` and one ``register`` line.
"""

from __future__ import annotations

from torch import nn

from trainer.models import alexnet, efficientnet, inception, mobilenet, resnet, resnet9, vgg
from trainer.models.registry import (
    DuplicateModelError,
    ModelSpec,
    Registry,
    UnknownModelError,
)

__all__ = [
    "REGISTRY",
    "DuplicateModelError",
    "ModelSpec",
    "Registry",
    "UnknownModelError",
    "build",
    "names",
    "seed_names",
    "spec",
]

REGISTRY = Registry()

# name, constructor, seed table row (None: beyond the seed), parameter target in millions.
REGISTRY.register("alexnet", alexnet.alexnet, seed_row="AlexNet", params_target=3.2)
REGISTRY.register("vgg_bn", vgg.vgg_bn, seed_row="VGG+BN", params_target=33.6)
REGISTRY.register("inception_bn", inception.inception_bn, seed_row="Inception+BN", params_target=1.6)
REGISTRY.register("resnet", resnet.resnet, seed_row="ResNet", params_target=21.2)
REGISTRY.register("mobilenet", mobilenet.mobilenet, seed_row="MobileNet", params_target=1.0)
REGISTRY.register("mobilenet_big", mobilenet.mobilenet_big, seed_row="MobileNetBig", params_target=3.2)
REGISTRY.register("efficientnet", efficientnet.efficientnet, seed_row="EfficientNet", params_target=17.4)
# Beyond the seed: its open question on parameter efficiency, and a speed-training profile.
REGISTRY.register("efficientnet_b0", efficientnet.efficientnet_b0, seed_row=None, params_target=4.0)
REGISTRY.register("resnet9", resnet9.resnet9, seed_row=None, params_target=6.5)
# For CPUs: the network of jobs/configs/tiny.yaml and of the tests that train.
REGISTRY.register("resnet9_tiny", resnet9.resnet9_tiny, seed_row=None, params_target=0.413)


def build(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised network (no pretrained weights); UnknownModelError lists valid names."""
    return REGISTRY.build(name, num_classes)


def names() -> list[str]:
    return REGISTRY.names()


def seed_names() -> list[str]:
    """Registered networks that reproduce a row of the seed's table, sorted by name."""
    return REGISTRY.seed_names()


def spec(name: str) -> ModelSpec:
    return REGISTRY.spec(name)
