"""The value tests every argument check uses (torch-free: the Hydra launcher plugin, loaded at every
Hydra start-up, uses them too). A bool is an int in Python, but never a count or a number here."""

from __future__ import annotations

import math
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
