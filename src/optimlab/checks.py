"""The value tests every argument check uses, and the config rules built on them (a test and what it
allows, in words), torch-free: the Hydra launcher plugin, loaded at every Hydra start-up, uses them too.
A bool is an int in Python, but never a count or a number here."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def is_integer(v: Any) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_count(v: Any) -> bool:
    """An int >= 1, not a bool."""
    return is_integer(v) and v >= 1


def finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite: the type every numeric config value must have."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def settings_outside(entry: Mapping[str, Any], target: str, takes: Mapping[str, Callable[[Any], bool]],
                     free: Iterable[str] = ()) -> list[str]:
    """``key=value`` for each setting of a config entry (a callback's) that what follows it cannot take: a
    ``_target_`` other than ``target``, a key of ``takes`` whose value (None where absent) its test refuses,
    a key in neither ``takes`` nor ``free``; none: it takes them all."""
    out = [] if entry.get("_target_") == target else [f"_target_={entry.get('_target_')}"]
    out += [f"{key}={entry.get(key)}" for key, test in takes.items() if not test(entry.get(key))]
    return out + [f"{key}={entry[key]}" for key in entry if key not in ("_target_", *takes, *free)]


Rule = tuple[Callable[[Any], bool], str]  # a config value's test, and the values it allows in words

POSITIVE: Rule = (lambda v: finite_number(v) and v > 0, "a positive number")
NON_NEGATIVE: Rule = (lambda v: finite_number(v) and v >= 0, "a number >= 0")
UNIT_CLOSED: Rule = (lambda v: finite_number(v) and 0 <= v <= 1, "a number in [0, 1]")
INT_POSITIVE: Rule = (is_count, "an integer >= 1")
INT_NON_NEGATIVE: Rule = (lambda v: is_integer(v) and v >= 0, "an integer >= 0")
SEED: Rule = (lambda v: is_integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32)")
BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
NUMBER: Rule = (finite_number, "a finite number")
INTEGER: Rule = (is_integer, "an integer")


def one_of(*choices: Any) -> Rule:
    # of the same type too: 1 == 1.0 == True, but Lightning reads an int val_check_interval as batches
    return (lambda v: any(v == c and type(v) is type(c) for c in choices), "one of " + ", ".join(map(str, choices)))


def limit(low: int) -> Rule:
    """Lightning's batch limits: an integer count, or a fraction of the split (above 0 where a count
    must be at least 1: 0.0 is no batch too)."""
    def allowed(v: Any) -> bool:
        fraction = isinstance(v, float) and (0 < v <= 1 if low else 0 <= v <= 1)
        return (is_integer(v) and v >= low) or fraction

    return allowed, f"an integer >= {low} or a fraction in {'(0, 1]' if low else '[0, 1]'}"


def optional(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v), f"null or {rule[1]}")


def refusal(key: str, value: Any, allowed: str) -> str:
    """The one line that refuses ``value`` for ``key``."""
    return f"{key}: {value!r} is not allowed; expected {allowed}"
