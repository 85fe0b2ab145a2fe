"""Kubernetes resource quantities ("1056939484Ki", "2Ti", "191500m", "1e9") as numbers.

The grammar is Kubernetes' own: a signed decimal number, then one binary suffix
(Ki..Ei), one decimal suffix (n..E) or one decimal exponent (e9), nothing around it.
Anything else, and any value that is not finite or beyond ``MAX_QUANTITY``, raises
``QuantityError`` (a ValueError) saying what was given.
"""

from __future__ import annotations

import math
import re
from typing import Any

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_QUANTITY = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?",
    re.ASCII,
)
MAX_QUANTITY = 2**63  # Kubernetes keeps quantities in an int64 of their smallest unit


class QuantityError(ValueError):
    """A value that is not a Kubernetes quantity, or not one we can use."""


def parse_quantity(value: str | int | float) -> float:
    """The quantity as a number; QuantityError for anything that is not a finite, in-range quantity."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise QuantityError(f"{_show(value)} is not a quantity (like 8, 500m, 64Gi or 1e9)")
    if isinstance(value, int):
        number = float(value) if abs(value) <= MAX_QUANTITY else math.inf
    elif isinstance(value, float):
        number = value
    else:
        match = _QUANTITY.fullmatch(value)
        if match is None:
            raise QuantityError(f"{_show(value)} is not a quantity (like 8, 500m, 64Gi or 1e9)")
        digits, exponent, suffix = match.groups()
        number = float(digits + (exponent or "")) * (_BINARY.get(suffix or "") or _DECIMAL[suffix or ""])
    if not math.isfinite(number) or abs(number) > MAX_QUANTITY:
        raise QuantityError(f"{_show(value)} is out of range (at most {MAX_QUANTITY:.3g})")
    return number


def parse_memory(value: str | int | float) -> int:
    return int(parse_quantity(value))


def parse_cpu(value: str | int | float) -> float:
    return parse_quantity(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
