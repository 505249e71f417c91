"""Checking a loss's options: one error type that names the bad option, and the value rules.

The config layer turns a ``LossOptionError`` into its one-line error by prefixing the option with
its own key path (``train.loss.<option>``), so the message here says what is wrong without a path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LossOptionError", "check_options"]


class LossOptionError(ValueError):
    """An unknown loss name, an unknown option or a bad option value.

    Attributes:
      option (str): the offending option ("name" for the loss name itself).
      message (str): what is wrong, without the option's config path.
    """

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def non_negative(value: Any) -> str | None:
    """None when ``value`` is a finite number >= 0, else what is wrong."""
    if not _number(value):
        return f"must be a number, got {value!r}"
    return None if value >= 0 else f"must be >= 0, got {value!r}"


def positive(value: Any) -> str | None:
    """None when ``value`` is a finite number > 0, else what is wrong."""
    if not _number(value):
        return f"must be a number, got {value!r}"
    return None if value > 0 else f"must be > 0, got {value!r}"


def fraction(value: Any) -> str | None:
    """None when ``value`` is a number in [0, 1], else what is wrong."""
    if not _number(value):
        return f"must be a number, got {value!r}"
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value!r}"


def boolean(value: Any) -> str | None:
    """None when ``value`` is a bool, else what is wrong."""
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    """A rule accepting exactly the given strings."""

    def rule(value: Any) -> str | None:
        if value in choices:
            return None
        return f"must be one of {', '.join(choices)}; got {value!r}"

    return rule


def check_options(
    name: str,
    options: Mapping[str, Any],
    defaults: Mapping[str, Any],
    rules: Mapping[str, Callable[[Any], str | None]],
) -> dict[str, Any]:
    """Defaults overlaid with ``options``, every value checked by its rule.

    Arguments:
      name (str): the loss's name, quoted in messages.
      options (Mapping[str, Any]): the caller's options (a subset of ``defaults``' keys).
      defaults (Mapping[str, Any]): every option the loss takes, with its default.
      rules (Mapping[str, Callable]): option -> rule returning None or what is wrong.

    Returns:
      (dict[str, Any]): the resolved options, in ``defaults``' order.

    Raises:
      LossOptionError: naming the first unknown option or bad value.
    """
    for key in options:
        if key not in defaults:
            raise LossOptionError(
                key, f"unknown option of loss {name!r}; its options are {', '.join(defaults)}"
            )
    resolved = {**defaults, **options}
    for key, value in resolved.items():
        problem = rules[key](value)
        if problem is not None:
            raise LossOptionError(key, f"{problem} (loss {name!r})")
    return resolved
