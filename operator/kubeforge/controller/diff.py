"""Does what exists already say everything we want? (Server-added fields do not count as drift.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def is_subset(want: Any, have: Any) -> bool:
    """True when every field of ``want`` is in ``have`` with the same value (lists item by item)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(is_subset(a, b) for a, b in zip(want, have, strict=True))
        )
    return want == have
