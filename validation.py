"""Checks of user-given numbers shared by the engine, the analysis, the robot and the page.

A leaf module (standard library only besides numpy's scalar types), so that any module may use it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """A Python or numpy integer, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _shown(value: Any) -> str:
    return repr(value)[:40]


def whole_number_rule(what: str, low: int, high: int | None = None) -> str:
    """The rule ``whole_number`` states when it refuses a value: "Frame index must be a whole
    number from 1 to 39" (or "... of at least 1" when ``high`` is None)."""
    return f"{what} must be a whole number " + (f"from {low} to {high}" if high is not None else f"of at least {low}")


def whole_number(value: Any, what: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (no upper bound when ``high`` is None); otherwise a
    ``ValueError`` naming ``what``, such as "Frame index must be a whole number from 1 to 39 (got 0)."

    Accepts ints and integral floats (a slider sends 12.0); refuses bools, None, strings, NaN,
    infinities, fractions and anything out of range.
    """
    rule = whole_number_rule(what, low, high)
    if is_int(value):
        number = int(value)
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not math.isfinite(float(value)) or float(value) != int(float(value)):
        raise ValueError(f"{rule} (got {_shown(value)}).")
    else:
        number = int(float(value))
    if number < low or (high is not None and number > high):
        raise ValueError(f"{rule} (got {number}).")
    return number
