"""The models' argument checks: one line naming the config key, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from optimlab.checks import finite_number, is_count
from optimlab.models.activations import ACTIVATIONS
from optimlab.models.init import INITS


def _widths(v: Any, empty: bool) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str) and (empty or len(v) > 0) and all(map(is_count, v))


def require(key: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    if not ok(value):
        raise ValueError(f"model.{key}: {value!r} is not allowed; expected {allowed}")


def check_common(activation: str, init: str, init_std: float, dropout: float) -> None:
    """The arguments both models take."""
    require("activation", activation, lambda v: v in ACTIVATIONS, "one of " + ", ".join(ACTIVATIONS))
    require("init", init, lambda v: v in INITS, "one of " + ", ".join(INITS))
    require("init_std", init_std, lambda v: finite_number(v) and v > 0, "a positive number")
    require("dropout", dropout, lambda v: finite_number(v) and 0 <= v < 1, "a number in [0, 1)")


def check_widths(key: str, value: Any, example: str, *, empty: bool = False) -> None:
    allowed = f"a list of positive integers{' (may be empty)' if empty else ''}, e.g. {example}"
    require(key, value, lambda v: _widths(v, empty), allowed)


def check_positive_int(key: str, value: Any) -> None:
    require(key, value, is_count, "an integer >= 1")
