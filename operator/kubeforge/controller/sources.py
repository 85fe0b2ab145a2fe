"""Where a QuantizeJob's or ModelService's input comes from, and whether it is ready (pure).

A source is a reference to another kubeforge object in the same namespace (its artifact,
once it has succeeded) or a URI (ready at once). While a referenced object runs, the
dependant waits with SourceReady=False/WaitingForSource; when it failed, the dependant
reports SourceFailed (and fails, unless it already serves something).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

SOURCE_READY = "SourceReady"
Lookup = Callable[[str, str], Mapping[str, Any] | None]  # (kind, name) -> the object, or None


@dataclass(frozen=True)
class Source:
    ready: bool
    failed: bool = False
    uri: str | None = None
    digest: str | None = None
    reason: str = "SourceReady"
    message: str = ""

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.uri:
            out["uri"] = self.uri
        if self.digest:
            out["digest"] = self.digest
        return out


def resolve(refs: Mapping[str, str | None], uri: str | None, lookup: Lookup) -> Source:
    """``refs``: kind -> referenced name (at most one set); ``uri``: the alternative."""
    for kind, name in refs.items():
        if not name:
            continue
        obj = lookup(kind, name)
        if obj is None:
            return Source(False, reason="WaitingForSource", message=f"{kind} {name} does not exist (yet)")
        status = obj.get("status") or {}
        phase = status.get("phase")
        if phase == "Failed":
            why = next(
                (c.get("message") for c in status.get("conditions") or [] if c.get("type") in ("Failed", "Accepted")
                 and c.get("status") == ("True" if c.get("type") == "Failed" else "False")),
                "",
            )  # fmt: skip
            failed = f"{kind} {name} failed" + (f": {why}" if why else "")
            return Source(False, failed=True, reason="SourceFailed", message=failed)
        artifact = status.get("artifact") or {}
        if phase == "Succeeded" and artifact.get("uri"):
            where = artifact["uri"]
            return Source(True, uri=where, digest=artifact.get("digest"), message=f"{kind} {name}: {where}")
        waiting = f"waiting for {kind} {name} to succeed (phase {phase or 'Pending'})"
        return Source(False, reason="WaitingForSource", message=waiting)
    if uri:
        return Source(True, uri=uri, message=uri)
    return Source(False, failed=True, reason="NoSource", message="the spec names no source")
