"""What every reconcile shares: the decision it returns, the status it builds, its events,
and reading children and pods (pure)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubeforge.controller.conditions import condition, find, set_condition
from kubeforge.controller.diff import is_subset
from kubeforge.controller.readiness import SUMMARY, summarize
from kubeforge.runtime.contract import read_termination_message

ACCEPTED, PLANNED, FAILED = "Accepted", "Planned", "Failed"
TERMINAL = ("Succeeded", "Failed")
NAME_TAKEN = "NameTaken"  # Accepted=False: a child's name is held by an object that is not this one's


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    key: str = ""  # the transition: the same key is the same Event (posted once, see kube.event_object)


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    apply: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # children to remove (apiVersion, kind, metadata.name/namespace), before anything is applied
    delete: list[dict[str, Any]] = field(default_factory=list)
    # applied first, without force, under labels.HANDOVER_FIELD_MANAGER (see controller/service.py)
    handover: list[dict[str, Any]] = field(default_factory=list)


class State:
    """The status a pass builds: the kind's own conditions and phase, then (in ``decision``) the summary."""

    def __init__(self, old: dict[str, Any], generation: int | None, now: str, kind: str):
        self.kind = kind
        self.status: dict[str, Any] = {k: v for k, v in old.items() if k not in ("conditions", "phase")}
        self.conditions: list[dict[str, Any]] = list(old.get("conditions") or [])
        self.phase: str | None = old.get("phase")
        self.generation = generation
        self.now = now

    def set(self, type_: str, status: str, reason: str, message: str) -> None:
        self.conditions = set_condition(
            self.conditions,
            condition(type_, status, reason, message, self.generation, self.now),  # type: ignore[arg-type]
        )

    def decision(self, old: Mapping[str, Any], apply: list[dict[str, Any]] | None = None) -> Decision:
        status = dict(self.status)
        status["phase"] = self.phase or "Pending"
        status["conditions"] = self.summarized(status)
        status["observedGeneration"] = self.generation
        return Decision(status=status, apply=apply or [], events=events(old, status))

    def summarized(self, status: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Ready, Reconciling and Stalled from the phase just decided (readiness.py), first; then the kind's own."""
        own = [c for c in self.conditions if c.get("type") not in SUMMARY]
        summary = summarize(self.kind, status["phase"], own, status)
        derived = [c for c in self.conditions if c.get("type") in SUMMARY]
        for type_, v in summary.items():
            derived = set_condition(derived, condition(type_, v.status, v.reason, v.message, self.generation, self.now))
        return sorted(derived, key=lambda c: SUMMARY.index(c["type"])) + own


def events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """One Event per transition from the status as written (``old``) to the new one.

    Ready, Reconciling and Stalled post none: they restate the phase, which has its own.

    Each is keyed by the written status it starts from and where it goes: a pass that
    recomputes the same transition (its status write failed, the process restarted, two
    handlers raced) yields the same key, while a later real transition starts from a
    different written status and gets a new one.
    """
    out = []
    origin = written_state(old)
    before = {c["type"]: c for c in old.get("conditions") or []}
    for c in new["conditions"]:
        if c["type"] in SUMMARY:
            continue
        prior = before.get(c["type"])
        if prior is None or prior.get("status") != c["status"] or prior.get("reason") != c["reason"]:
            bad = (c["status"] == "False" and c["type"] in (ACCEPTED, PLANNED, "SourceReady")) or (
                c["type"] == FAILED and c["status"] == "True"
            )
            out.append(Event("Warning" if bad else "Normal", c["reason"], f"{c['type']}={c['status']}: {c['message']}",
                             f"{origin}|{c['type']}={c['status']}/{c['reason']}"))  # fmt: skip
    if old.get("phase") != new["phase"]:
        out.append(Event("Normal", f"Phase{new['phase']}", f"phase {old.get('phase') or 'None'} -> {new['phase']}",
                         f"{origin}|phase={new['phase']}"))  # fmt: skip
    return out


def written_state(status: Mapping[str, Any]) -> str:
    """A short fingerprint of a written status: its phase and each condition's type, status, reason, time."""
    conditions = sorted(
        f"{c.get('type')}={c.get('status')}/{c.get('reason')}@{c.get('lastTransitionTime')}"
        for c in status.get("conditions") or []
    )
    return hashlib.sha256("|".join([str(status.get("phase")), *conditions]).encode()).hexdigest()[:16]


def of_kind(children: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in children if c.get("kind") == kind), None)


def exists_equal(desired: Mapping[str, Any], children: Sequence[Mapping[str, Any]]) -> bool:
    name = desired["metadata"]["name"]
    current = next(
        (c for c in children if c.get("kind") == desired["kind"] and (c.get("metadata") or {}).get("name") == name),
        None,
    )
    return current is not None and is_subset(desired, current)


def termination(pod: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if pod is None:
        return None
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if terminated:
            return read_termination_message(terminated.get("message"))
    return None


def artifact(summary: Mapping[str, Any], now: str) -> dict[str, Any]:
    out: dict[str, Any] = {"uri": str(summary["uri"])}
    if summary.get("digest"):
        out["digest"] = str(summary["digest"])
    if isinstance(summary.get("sizeBytes"), int):
        out["sizeBytes"] = summary["sizeBytes"]
    metrics = summary.get("metrics") or {}
    out["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    out["createdAt"] = str(summary.get("createdAt") or now)
    return out


def artifact_message(summary: Mapping[str, Any] | None) -> str:
    if summary and summary.get("uri"):
        return f"artifact {summary['uri']}" + (f" ({summary['digest']})" if summary.get("digest") else "")
    return "the gang finished; rank 0 left no artifact summary"


def job_failed(state: State, failed: Mapping[str, Any], summary: Mapping[str, Any] | None, who: str, now: str) -> None:
    """A failed Job: its reason, with the error the pod left in its termination message."""
    detail = f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".strip(": ")
    if summary and summary.get("error"):
        detail += f"; {who}: {summary['error']}"
    state.status["completionTime"] = now
    state.set("Running", "False", "Failed", detail)
    state.set(FAILED, "True", str(failed.get("reason") or "JobFailed"), detail)
    state.phase = "Failed"


def taken_by(child: Mapping[str, Any], stored: Mapping[str, Any] | None, owner_uid: str | None) -> str | None:
    """Why the object the API server holds under ``child``'s name is not this owner's child (None: there is
    none, or it is this owner's, by its controller reference)."""
    if stored is None:
        return None
    refs = (stored.get("metadata") or {}).get("ownerReferences") or []
    controller = next((r for r in refs if isinstance(r, Mapping) and r.get("controller")), None)
    if controller is not None and controller.get("uid") == owner_uid:
        return None
    meta = child.get("metadata") or {}
    holder = f"{controller.get('kind')} {controller.get('name')}'s" if controller else "not created by kubeforge"
    return f"{child.get('kind')} {meta.get('namespace')}/{meta.get('name')} exists and is {holder}"


def refuse_taken_names(decision: Decision, old: Mapping[str, Any], taken: Sequence[str], kind: str,
                       generation: int | None, now: str) -> Decision:  # fmt: skip
    """The decision when some children it would create have names other objects hold: nothing is created,
    changed or deleted (no half-created set of children, nobody else's object overwritten), Accepted=False
    (so Stalled=True) names each object, and the phase is Pending until the name is free or this one renamed."""
    state = State(dict(old), generation, now, kind)  # the written conditions: transition times keep
    state.status = {k: v for k, v in decision.status.items() if k not in ("conditions", "phase")}
    advice = f"nothing was created; delete or rename that object, or rename this {kind}"
    state.set(ACCEPTED, "False", NAME_TAKEN, f"{'; '.join(taken)}: {advice}")
    state.phase = "Pending"
    return state.decision(old)


def names_taken(status: Mapping[str, Any]) -> bool:
    accepted = find(status.get("conditions") or [], ACCEPTED)
    return accepted is not None and accepted.get("reason") == NAME_TAKEN
