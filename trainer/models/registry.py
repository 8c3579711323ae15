"""Name -> constructor registry for the CIFAR-10 architectures.

The registry itself knows nothing about the networks; ``trainer/models/__init__.py``
fills the package-wide instance with explicit ``register`` calls, so the set of
models is visible in one place and does not depend on which script imported what.

A constructor is registered by its path, ``"trainer.models.resnet:resnet"``, and imported when
a network is first built: names, seed rows, parameter targets and recipes are known without
torch, so a command refuses a mistaken name or config in a blink (issue #21).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer import UserError
from trainer.models.seed_table import SEED

if TYPE_CHECKING:
    from torch import nn

Constructor = Callable[..., "nn.Module"]


class UnknownModelError(KeyError, ValueError):
    """Raised by ``Registry.build``/``Registry.spec`` for a name that was never registered.

    A KeyError so the Mapping protocol (``in``, ``get``) works, and a ValueError because
    to a command line the name is a bad argument value; callers may catch either.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message, wrapping it in quotes.
        return str(self.args[0]) if self.args else ""


class DuplicateModelError(ValueError):
    """Raised when a name is registered twice (a silent overwrite would hide a typo)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the launcher needs to know about an architecture without building it.

    ``seed_row`` is the row of the seed's comparison table this network reproduces
    (None for the extra networks beyond the seed); ``params_target`` is the parameter
    count, in millions, the implementation is sized to (10 classes, within +-5%): the
    seed's own count for its networks. ``recipe`` is the config file under jobs/configs/
    the launcher trains it with; None: the launcher refuses it rather than lend it another
    network's recipe. ``source`` is the constructor, or its ``"module:function"`` path, imported
    by ``constructor`` when first asked for (with torch).
    """

    name: str
    source: str | Constructor
    seed_row: str | None
    params_target: float
    recipe: str | None = None

    @property
    def is_seed(self) -> bool:
        return self.seed_row is not None

    @property
    def constructor(self) -> Constructor:
        if callable(self.source):
            return self.source
        module, function = self.source.split(":")
        return getattr(importlib.import_module(module), function)


class Registry(Mapping[str, ModelSpec]):
    """A read-only mapping name -> ModelSpec, plus ``register`` and ``build``."""

    def __init__(self) -> None:
        self._specs: dict[str, ModelSpec] = {}

    def register(
        self,
        name: str,
        constructor: str | Constructor,
        *,
        seed_row: str | None = None,
        params_target: float | None = None,
        recipe: str | None = None,
    ) -> ModelSpec:
        """``constructor``: the function, or its path ``"package.module:function"`` (imported on
        the first build). A seed network (``seed_row`` given) is sized to the seed table's count;
        any other network states its ``params_target``."""
        if name in self._specs:
            raise DuplicateModelError(f"model {name!r} is already registered")
        if not callable(constructor) and len(constructor.split(":")) != 2:
            raise ValueError(f"model {name!r}: constructor {constructor!r} is not a 'package.module:function' path")
        if (seed_row is None) == (params_target is None):
            raise ValueError(f"model {name!r}: give seed_row (a row of the seed's table) or params_target, not both")
        if seed_row is not None:
            if seed_row not in SEED:
                raise ValueError(f"model {name!r}: seed_row {seed_row!r} is not a row of the seed's table")
            params_target = SEED[seed_row].params_m
        spec = ModelSpec(name, constructor, seed_row, float(params_target), recipe)
        self._specs[name] = spec
        return spec

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown model {name!r}; valid names: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, num_classes: int = 10, **options: Any) -> nn.Module:
        """``options`` are keyword arguments of the constructor (the model.* keys of a config); an
        option the architecture does not have is refused by name rather than ignored, so a config
        never silently trains a different network than it says."""
        constructor = self.spec(name).constructor
        accepted = [p for p in inspect.signature(constructor).parameters if p != "num_classes"]
        for option in options:
            if option not in accepted:
                raise UserError(
                    f"model.{option}: architecture '{name}' has no such option "
                    f"(its options: {', '.join(accepted) or 'none'})"
                )
        return constructor(num_classes=num_classes, **options)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def seed_names(self) -> list[str]:
        return [n for n in self.names() if self._specs[n].is_seed]

    def __getitem__(self, name: str) -> ModelSpec:
        return self.spec(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._specs)
