"""Typed config trees: nested dataclasses <-> dicts <-> YAML, with `a.b.c=value` overrides.

Every job (curation, training, generation) has one config tree made of nested dataclasses. This module
turns a YAML file plus command-line overrides into that tree, checking every key and value type, and
serialises it back to YAML so it can be written beside manifests and checkpoints and logged to MLflow.

Errors are raised early as `ConfigError`, naming the dotted field and what would fix it. A config class
checks what its field types cannot say (ranges, fields that depend on each other) in `__post_init__` with
`check_fields`, which names the field; `from_dict` then reports it by its dotted path (decode.detect_width),
whoever built the tree. Choice fields are `Literal`s: checked while loading, and by `check_fields` when code
builds a config directly.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the field and the fix."""


class FieldError(ConfigError):
    """A config class refused the value of one of its fields (raised by `check_fields`); `from_dict`
    reports it under the field's dotted path."""

    def __init__(self, obj: Any, name: str, why: str):
        self.field, self.value, self.why = name, getattr(obj, name), why
        super().__init__(f"{type(obj).__name__}.{name}={self.value!r}: {why}")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def literal_choices(tp: Any) -> tuple | None:
    """The values a `Literal[...]` annotation (or a union of Literals, optionally with None) allows, None
    among them when the union has it; None when the annotation is not such a choice."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        if literals and all(a is type(None) or a in literals for a in args):
            values = tuple(v for a in literals for v in typing.get_args(a))
            return values + ((None,) if type(None) in args else ())
    return None


def check_fields(obj: Any, *rules: tuple[str, bool, str]) -> None:
    """For a config dataclass's `__post_init__`: FieldError for the first `Literal` field whose value is
    not one of its choices, then for the first rule (field name, condition, what it must be) whose
    condition is False. from_dict turns it into a ConfigError naming the dotted path."""
    for name, tp in _field_types(type(obj)).items():
        choices = literal_choices(tp)
        if choices is not None and getattr(obj, name) not in choices:
            raise FieldError(obj, name, f"valid keys are {list(choices)}")
    for name, ok, why in rules:
        if not ok:
            raise FieldError(obj, name, why)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert `value` (from YAML or a CLI string) to annotation `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys raise ConfigError."""
    ftypes = _field_types(cls)
    unknown = sorted(set(data) - set(ftypes))
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(ftypes)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, ftypes[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except FieldError as exc:  # the class's own check (check_fields) refused a field: name it by its path
        where = f"{path or cls.__name__}.{exc.field}"
        raise ConfigError(f"{where}={exc.value!r}: {exc.why}") from None
    except ConfigError:
        raise  # names its field already (a nested section's error is raised by _coerce, before this call)
    except (TypeError, ValueError) as exc:  # a required field missing, or a plain ValueError of __post_init__
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict/list values (tuples become lists) for YAML/JSON/MLflow."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_yaml(obj: Any) -> str:
    """Serialise a config tree to YAML (stable key order = field order)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a.b.c": value}` view of a config tree, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    data = to_dict(obj)
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, updated by YAML file `path` (if given), then by `overrides`."""
    data: dict[str, Any] = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = _deep_update(data, loaded)
    data = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_update(dict(base[key]), value)
        else:
            base[key] = value
    return base
