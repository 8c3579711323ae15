"""CIFAR-10 architectures, reachable by name.

    from trainer import models
    net = models.build("resnet", num_classes=10)
    models.names()        # every registered name, sorted
    models.seed_names()   # the networks of the seed's comparison table
    models.REGISTRY["resnet"].params_target  # 21.2 (millions)
    models.parse_names("resnet,vgg_bn", "--arch")  # a command line's list, checked
    models.seed_row("resnet")  # ("ResNet", SeedRow(test_acc=93.19, ...))

The table below is the whole registry: adding a network means writing its
constructor ``f(num_classes: int = 10, **its_options) -> nn.Module`` and one ``register``
line naming it by path. Architecture options (``models.build("mobilenet", output_stride=8)``)
are the constructor's keyword arguments; options every network shares (GELU, BatchNorm
settings, dirac init) are applied after the build by ``trainer.models.options.apply``.

The networks' modules, and torch with them, are imported by the first ``build``, not here:
every command checks its input against the names, and a mistake is then one line at once
rather than after seconds of imports (issue #21).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainer import UserError
from trainer.models.seed_table import SEED, SeedRow
from trainer.models.registry import (
    DuplicateModelError,
    ModelSpec,
    Registry,
    UnknownModelError,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "REGISTRY",
    "SEED",
    "DuplicateModelError",
    "ModelSpec",
    "Registry",
    "SeedRow",
    "UnknownModelError",
    "build",
    "names",
    "parse_names",
    "seed_names",
    "seed_row",
    "spec",
]

REGISTRY = Registry()

# The seed's networks: name, constructor, the row of the seed's table (which gives the parameter
# target), and the recipe the launcher trains it with (a file under jobs/configs/).
REGISTRY.register("alexnet", "trainer.models.alexnet:alexnet", seed_row="AlexNet", recipe="alexnet.yaml")
REGISTRY.register("vgg_bn", "trainer.models.vgg:vgg_bn", seed_row="VGG+BN", recipe="vgg_bn.yaml")
REGISTRY.register("inception_bn", "trainer.models.inception:inception_bn", seed_row="Inception+BN",
                  recipe="inception_bn.yaml")
REGISTRY.register("resnet", "trainer.models.resnet:resnet", seed_row="ResNet", recipe="resnet.yaml")
REGISTRY.register("mobilenet", "trainer.models.mobilenet:mobilenet", seed_row="MobileNet", recipe="mobilenet.yaml")
REGISTRY.register("mobilenet_big", "trainer.models.mobilenet:mobilenet_big", seed_row="MobileNetBig",
                  recipe="mobilenet_big.yaml")
REGISTRY.register("efficientnet", "trainer.models.efficientnet:efficientnet", seed_row="EfficientNet",
                  recipe="efficientnet.yaml")
# Beyond the seed (parameter target in millions): its open question on parameter efficiency, and the
# speed-training profile's networks: airbench94's own (jobs/configs/speed.yaml), Page's ResNet-9
# (speed-resnet9.yaml) for comparison.
REGISTRY.register("efficientnet_b0", "trainer.models.efficientnet:efficientnet_b0", seed_row=None, params_target=4.0,
                  recipe="efficientnet_b0.yaml")
REGISTRY.register("airbench94", "trainer.models.airbench:airbench94", seed_row=None, params_target=1.97,
                  recipe="airbench94.yaml")
REGISTRY.register("resnet9", "trainer.models.resnet9:resnet9", seed_row=None, params_target=6.5, recipe="resnet9.yaml")
# For CPUs: the network of jobs/configs/tiny.yaml and of the tests that train.
REGISTRY.register("resnet9_tiny", "trainer.models.resnet9:resnet9_tiny", seed_row=None, params_target=0.413,
                  recipe="tiny.yaml")

# The networks' modules were once imported here, and so attributes of the package (`models.resnet`):
# they still are, imported when first asked for.
_NETWORK_MODULES = ("airbench", "alexnet", "efficientnet", "inception", "mobilenet", "resnet", "resnet9", "vgg")


def __getattr__(name: str) -> Any:
    if name in _NETWORK_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(name: str, num_classes: int = 10, **options: Any) -> nn.Module:
    """A freshly initialised network (no pretrained weights); UnknownModelError lists valid names.

    ``options`` go to the constructor (output_stride, whiten: trainer/models/options.py maps a
    config's model section onto them); one the architecture lacks is a UserError naming it."""
    return REGISTRY.build(name, num_classes, **options)


def names() -> list[str]:
    return REGISTRY.names()


def seed_names() -> list[str]:
    """Registered networks that reproduce a row of the seed's table, sorted by name."""
    return REGISTRY.seed_names()


def spec(name: str) -> ModelSpec:
    return REGISTRY.spec(name)


def seed_row(name: str) -> tuple[str, SeedRow] | None:
    """The seed's row this architecture reproduces, or None (an extra network, or an unknown name)."""
    row = REGISTRY.get(name)
    return None if row is None or row.seed_row is None else (row.seed_row, SEED[row.seed_row])


def parse_names(text: str, option: str) -> list[str]:
    """A comma-separated list of architectures from a command line, each checked against the registry."""
    chosen = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not chosen:
        raise UserError(f"{option}: name at least one architecture; valid: {', '.join(names())}")
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown:
        raise UserError(f"{option}: unknown architecture(s) {', '.join(unknown)}; valid: {', '.join(names())}")
    return chosen
