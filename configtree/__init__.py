"""Typed config trees from YAML: loading, overrides, type coercion and the one-line config error.

A config is a tree of dataclasses (a *section* per package: ``sharding.config``,
``launch.config``, ``pipeline.model.config``, ``pipeline.config``). This module knows none of
them; it imports nothing of the project, so every package can use it without importing another.

YAML only stores values: a file may name ``defaults: [other.yaml, ...]`` (paths relative to
itself) that are merged first, then its own keys, then ``key=value`` overrides from the command
line (values are YAML). Unknown keys, wrong types and impossible values fail at load time with one
line naming the key and where it was set (``ConfigError``). A section checks its own values in
``__post_init__`` with ``require`` / ``fraction``, naming the field; ``build`` adds the section's
path and the source.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "FieldError",
    "build",
    "dump_config",
    "flatten",
    "fraction",
    "from_dict",
    "load",
    "read_tree",
    "require",
    "to_dict",
]

Sources = dict[str, str]
"""Full key (``train.lr``) -> where its value was set (a file path, or "command line")."""


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible. The message names the key."""


class FieldError(ValueError):
    """A section's check failed for one of its fields (raised in ``__post_init__``).

    ``build`` turns it into a ``ConfigError`` naming the full key and where it was set."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``FieldError(key, message)`` unless ``ok``.

    Arguments:
      ok: the condition that must hold.
      key: the field (or ``section.field`` for a check on the root) it is reported under.
      message: what must hold, e.g. "must be >= 1, got 0"; a message starting with "=" is
        appended to the key without a space ("model.head=auto is ...").
    """
    if not ok:
        raise FieldError(key, message)


def fraction(value: float, key: str) -> None:
    """``value`` must be in [0, 1]."""
    require(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")


# --------------------------------------------------------------------------------------------
# Reading YAML and overrides into a plain tree
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path, sources: Sources, stack: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: defaults include themselves ({chain})")
    if not path.is_file():
        where = f" (named in defaults of {stack[-1]})" if stack else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    merged: dict = {}
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML paths")
    for name in defaults:
        base = _read_yaml(path.parent / str(name), sources, (*stack, path))
        _merge(merged, base, "", None, sources)
    _merge(merged, data, "", str(path), sources)
    return merged


def _merge(dst: dict, src: dict, prefix: str, source: str | None, sources: Sources) -> None:
    for key, value in src.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, f"{full}.", source, sources)
        else:
            dst[key] = value
            if source is not None:
                _mark(value, full, source, sources)


def _mark(value: Any, key: str, source: str, sources: Sources) -> None:
    sources[key] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(v, f"{key}.{k}", source, sources)


def _apply_override(tree: dict, item: str, sources: Sources) -> None:
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"command line: value of {key} is not valid YAML: {raw!r}") from exc
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    _mark(value, key, "command line", sources)


def read_tree(
    path: str | os.PathLike | None, overrides: list[str] | None = None
) -> tuple[dict, Sources]:
    """The raw tree of a YAML file (with its ``defaults``) <- ``key=value`` overrides.

    Arguments:
      path: a YAML file, or None for an empty tree (the built-in defaults).
      overrides: strings like ``train.steps=10`` or ``model.peft=[lora,fact]``.

    Returns:
      (tree, sources): nested dicts of plain values, and where each key was set.
    """
    sources: Sources = {}
    tree = _read_yaml(Path(path), sources, ()) if path else {}
    for item in overrides or []:
        _apply_override(tree, item, sources)
    return tree, sources


# --------------------------------------------------------------------------------------------
# Plain tree -> dataclasses
# --------------------------------------------------------------------------------------------


def _where(key: str, sources: Sources) -> str:
    return sources.get(key, "defaults")


def _coerce_scalar(value: Any, tp: Any, key: str, sources: Sources) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(key, sources)}: {key} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(key, sources)}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-3" (no dot) as a string; it is a number to anyone else.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def _coerce(value: Any, tp: Any, key: str, sources: Sources) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a section (mapping)")
        return build(tp, value, sources, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, sources)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{_where(key, sources)}: {key} must be one of {list(args)}, got {value!r}"
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", sources) for k, v in value.items()}
    return _coerce_scalar(value, tp, key, sources)


def build(cls: type, tree: dict, sources: Sources | None = None, *, prefix: str = "") -> Any:
    """A validated ``cls`` (a dataclass, sections nested) from a plain tree.

    Arguments:
      cls: the dataclass to build.
      tree: its values (missing keys keep the dataclass defaults).
      sources: where each full key was set (``read_tree``); None = nowhere ("defaults").
      prefix: the path of ``cls`` in the whole tree (``"model."``), for messages.

    Returns:
      The instance. Raises ``ConfigError`` naming the full key and where it was set, for an
      unknown key, a wrong type or a failed ``__post_init__`` check.
    """
    sources = {} if sources is None else sources
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"{_where(full, sources)}: unknown key '{full}' (known in this section: "
                f"{', '.join(sorted(names))})"
            )
        kwargs[key] = _coerce(value, hints[key], full, sources)
    try:
        return cls(**kwargs)
    except FieldError as err:
        full = f"{prefix}{err.key}"
        sep = "" if err.message.startswith("=") else " "  # "model.head=auto is ..."
        raise ConfigError(f"{_where(full, sources)}: {full}{sep}{err.message}") from None


def load(cls: type, path: str | os.PathLike | None = None, overrides: list[str] | None = None):
    """Load a ``cls`` tree: YAML file (with its ``defaults``) <- ``key=value`` overrides.

    Arguments:
      cls: the root dataclass.
      path: a YAML file, or None for the built-in defaults.
      overrides: strings like ``train.steps=10`` or ``model.peft=[lora,fact]``.

    Returns:
      The validated ``cls``. Raises ``ConfigError`` naming the key and the file.
    """
    tree, sources = read_tree(path, overrides)
    return build(cls, tree, sources)


def from_dict(cls: type, values: dict, *, prefix: str = "") -> Any:
    """Rebuild a ``cls`` from ``to_dict`` output (e.g. a saved resolved config or one section of
    it), with the same checks as loading."""
    return build(cls, values, {}, prefix=prefix)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict:
    """The tree as nested plain dicts (the YAML of ``dump_config``)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 1e-4, ...}``: for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text, in field order (``load`` reads it back). The run writes
    it with ``sharding.files.atomic_write_text``, the one temp-file-and-rename helper."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
