"""Where a QuantizeJob's or ModelService's input comes from, and whether it is ready (pure).

A source is a reference to another kubeforge object in the same namespace (its artifact,
once it has succeeded) or a URI (ready at once). While a referenced object runs, the
dependant waits with SourceReady=False/WaitingForSource; when it failed, the dependant
reports SourceFailed (and fails, unless it already serves something).

A ModelService's LoRA adapters resolve the same way, one by one (``resolve_adapter``): a FineTuneJob
named by an adapter must export an adapter (method lora or qlora, output.merge false); while it runs
the adapter waits and the service serves the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeforge.api.finetune import LoRA
from kubeforge.api.service import Adapter

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


@dataclass(frozen=True)
class AdapterSource:
    """A spec.adapters entry resolved: a URI is ready at once; a FineTuneJob once it succeeded, if its
    output is an adapter. ``uri`` is also set while it is pending (the job's output location: its claim is
    mounted from the start, so the artifact's arrival restarts nothing); ``rank`` when known."""

    name: str
    ready: bool
    failed: bool = False
    uri: str | None = None
    digest: str | None = None
    rank: int | None = None
    reason: str = "AdapterReady"
    message: str = ""


ADAPTER_METHODS = ("lora", "qlora")


def resolve_adapter(adapter: Adapter, lookup: Lookup) -> AdapterSource:
    """Where ``adapter`` is, or why it is not served (yet)."""
    name, ref = adapter.name, adapter.fine_tune_job_ref
    if ref is None:
        return AdapterSource(name, True, uri=adapter.uri, rank=adapter.rank, message=adapter.uri or "")
    job = lookup("FineTuneJob", ref.name)
    if job is None:
        return AdapterSource(name, False, reason="WaitingForAdapter",
                             message=f"FineTuneJob {ref.name} does not exist (yet)")  # fmt: skip
    spec = job.get("spec") or {}
    method = spec.get("method") or "lora"
    output = spec.get("output") or {}
    if method not in ADAPTER_METHODS or output.get("merge", True):
        why = (f"its method is {method}" if method not in ADAPTER_METHODS
               else "it merges its adapter into the weights (spec.output.merge true)")  # fmt: skip
        return AdapterSource(name, False, failed=True, reason="NotAnAdapter",
                             message=f"FineTuneJob {ref.name} does not export an adapter: {why}; serve it as "
                             "spec.source, or train it with output.merge false")  # fmt: skip
    rank = adapter.rank or (spec.get("lora") or {}).get("rank") or LoRA().rank
    source = resolve({"FineTuneJob": ref.name}, None, lookup)
    if source.ready:
        return AdapterSource(name, True, uri=source.uri, digest=source.digest, rank=rank, message=source.message)
    reason = "AdapterFailed" if source.failed else "WaitingForAdapter"
    return AdapterSource(name, False, failed=source.failed, uri=output.get("uri"), rank=rank, reason=reason,
                         message=source.message)  # fmt: skip
