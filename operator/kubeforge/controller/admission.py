"""The first step of every reconcile: is the object's spec valid?

Pure: (object as the API server returns it, time) -> the status to write. The
operator re-validates what the CRD schema already checked (CEL cannot say
everything, and objects may predate a CRD upgrade) and reports problems as a
condition instead of crash-looping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubeforge.api.validation import check
from kubeforge.controller.conditions import condition, set_condition

ACCEPTED = "Accepted"
REASON_VALID = "SpecValid"
REASON_INVALID = "InvalidSpec"


def admission_status(body: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The status an object gets once the operator has looked at its spec."""
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    user_part = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
    _, problems = check(user_part)
    status = dict(body.get("status") or {})
    if problems:
        message = "; ".join(str(p) for p in problems)
        new = condition(ACCEPTED, "False", REASON_INVALID, message, generation, now)
        phase = "Failed"
    else:
        new = condition(ACCEPTED, "True", REASON_VALID, "the spec is valid", generation, now)
        phase = status.get("phase") if status.get("phase") not in (None, "Failed") else "Pending"
    return {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": set_condition(status.get("conditions") or [], new),
    }
