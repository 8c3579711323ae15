"""Strict YAML into dataclasses: the loader both schemas share (the run config, trainer/config/,
and the cluster settings, trainer/launch/cluster.py). It knows no schema of its own.

The input comes in layers, each a (source, mapping) pair: a file, then the `key=value` overrides
over it. Every layer is checked on its own against the dataclass, so an error names the file (or
the override) and the dotted key it is about. Mistakes that PyYAML lets through are errors here:
unknown keys (with a "did you mean" hint), duplicate keys (PyYAML silently keeps the last),
strings where numbers belong, nan and inf, and missing required values. `5e-4` is read as the
float it looks like (PyYAML's YAML 1.1 rules read it as a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer import UserError

REQUIRED: Any = dataclasses.MISSING  # a field's default that makes it required


class ConfigError(UserError):
    pass


@dataclass(frozen=True)
class Retired:
    """What an older version of a schema accepted, kept so that a file or an override written for
    it fails with one line naming what replaced it rather than "unknown key"."""

    # Dotted key -> what to use instead. The key still loads, and is dropped, where it holds its old
    # "off" value (0, false or null): the config.yaml of a run folder written before it left holds that.
    keys: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, str] = field(default_factory=dict)  # old name of a choice -> its new name


# ---------------------------------------------------------------------------------------------
# Parsing


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads YAML 1.2 floats such as 5e-4."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}'")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 needs a dot in a float ("5.0e-4"); 1.2 does not. Ints still match the int rule first.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{line}: {problem}") from None


def parse_override(text: str) -> dict:
    """`optim.lr=5e-4` -> {'optim': {'lr': 0.0005}}; the value is read as YAML (lists, null...)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected key=value with a dotted key, e.g. optim.lr=0.05")
    value = parse_yaml(raw, f"override '{text}'") if raw.strip() else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The layers of a config file: the files it `extends` (a name relative to itself), first."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    layers = []
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: expected a file name, got {parent!r}")
        layers = read_layers(path.parent / parent, seen + (path.resolve(),))
    layers.append((str(path), data))
    return layers


# ---------------------------------------------------------------------------------------------
# Checking one layer against the dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str, retired: Retired) -> Any:
    origin = typing.get_origin(tp)
    ok: bool
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, retired)
            except ConfigError:
                pass
        ok = False
    elif origin is Literal:
        ok = value in typing.get_args(tp)
        renamed = retired.values.get(value) if isinstance(value, str) else None
        if not ok and renamed in typing.get_args(tp):
            raise ConfigError(f"{key}: '{value}' is now called '{renamed}'")
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]", retired) for i, v in enumerate(value)]
        ok = False
    elif tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            # Every float is checked here, once: nan passes any range check (`nan <= 0` is False)
            # and inf every lower bound, so either would only fail once training is under way.
            try:
                value = float(value)
            except OverflowError:  # an int no float can hold
                raise ConfigError(f"{key}: expected a finite number, got an integer of {len(str(value))} digits") from None
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value}")
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field {key} has a type the loader does not handle: {tp}")
    if not ok:
        got = f"{type(value).__name__} {value!r}" if value is not None else "null"
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {got}")
    return value


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    prefix, _, name = key.rpartition(".")
    prefix = f"{prefix}." if prefix else ""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(f"unknown key '{key}'{hint}")


def _check_layer(data: Any, cls: type, retired: Retired, prefix: str = "") -> dict:
    """One layer (a file or the overrides) checked against `cls`: a dict of coerced values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in data.items():
        if f"{prefix}{key}" in retired.keys:
            if value in (0, None):  # also 0.0 and false
                continue
            raise ConfigError(f"{prefix}{key}: removed; {retired.keys[f'{prefix}{key}']}")
        if key not in hints:
            raise _unknown_key(f"{prefix}{key}", names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            checked[key] = _check_layer(value, tp, retired, f"{prefix}{key}.")
        else:
            checked[key] = _coerce(value, tp, f"{prefix}{key}", retired)
    return checked


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def _instantiate(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _instantiate(tp, values.get(f.name, {}), f"{prefix}{f.name}.")
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is REQUIRED and f.default_factory is REQUIRED:
            raise ConfigError(f"{prefix}{f.name}: required value missing")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ range checks name their own field
        raise ConfigError(f"{prefix}{e}") from None


def load_dataclass(cls: type, layers: list[tuple[str, Any]], retired: Retired = Retired()) -> Any:
    """Checks each (source, mapping) layer against `cls`, lays them over each other in order, and
    builds the dataclass; any error names the layer's source and the dotted key. A field's
    __post_init__ raises ValueError("field: why"), which comes out as one such line too."""
    merged: dict = {}
    for source, data in layers:
        try:
            merged = _merge(merged, _check_layer(data, cls, retired))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    try:
        return _instantiate(cls, merged)
    except ConfigError as e:
        raise ConfigError(f"{sources(layers)}: {e}") from None


def sources(layers: list[tuple[str, Any]]) -> str:
    """What a value built from all the layers came from, for an error about it."""
    return " + ".join(source for source, _ in layers) or "defaults"
