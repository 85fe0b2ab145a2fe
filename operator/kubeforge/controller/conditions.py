"""Conditions as the Kubernetes API conventions define them (metav1.Condition), pure."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]
MAX_MESSAGE = 32768


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, status: Status, reason: str, message: str, generation: int | None, now: str
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": now,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def set_condition(existing: Iterable[Mapping[str, Any]], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Replace the condition of the same type, or append it.

    lastTransitionTime moves only when the status changes; the order is kept.
    """
    out: list[dict[str, Any]] = []
    replaced = False
    for old in existing:
        if old.get("type") != new["type"]:
            out.append(dict(old))
            continue
        merged = dict(new)
        if old.get("status") == new["status"] and old.get("lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        out.append(merged)
        replaced = True
    if not replaced:
        out.append(dict(new))
    return out


def find(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)
