"""Ready, Reconciling and Stalled: each kind's phase and conditions summed up in three conditions (pure).

kstatus (sigs.k8s.io/cli-utils/pkg/kstatus) reads an object from its observed generation and
two abnormal-true conditions: status.observedGeneration != metadata.generation or
Reconciling=True is InProgress, Stalled=True is Failed, neither is Current. Ready is what a
person, ``kubectl wait --for=condition=Ready`` and the Argo CD health checks
(charts/kubeforge/argocd/) read. summarize() derives all three from the phase that the pass
has just decided and the kind's own conditions; State.decision() calls it on every pass, so
they cannot disagree with the phase. The rules, in order:

1. Stalled=True when nothing more happens without a change by someone: the spec was refused
   (Accepted=False), the phase is Failed, the source failed or names nothing, no plan fits
   (Planned=False), or a job succeeded without an artifact. Its reason and message are those
   of the condition that says so.
2. Reconciling=True, unless stalled, while the phase is not the kind's goal, and while a
   service that serves waits for a new artifact or rolls it out: the reason is that of the
   first condition the kind's table (RULES) names for the phase, else the phase itself.
3. Ready=True exactly in the goal phase (a job Succeeded with an artifact; a service Ready,
   i.e. serving from ready replicas), else Ready=False with the stalled or reconciling reason.

Reconciling and Stalled are never both True. Ready=True may come with Reconciling=True (a
service rolling out: its old replicas serve) or Stalled=True (its new spec cannot be served;
the old artifact still is); kstatus and the Argo CD checks read those before Ready.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeforge.controller.conditions import Status

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"
SUMMARY = (READY, RECONCILING, STALLED)
ACCEPTED, PLANNED, SOURCE_READY, FAILED = "Accepted", "Planned", "SourceReady", "Failed"
STALLED_SOURCE = ("SourceFailed", "NoSource")  # SourceReady=False reasons that wait for nobody


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str
    message: str = ""

    @property
    def true(self) -> bool:
        return self.status == "True"


@dataclass(frozen=True)
class Summary:
    ready: Verdict
    reconciling: Verdict
    stalled: Verdict

    def items(self) -> tuple[tuple[str, Verdict], ...]:
        return ((READY, self.ready), (RECONCILING, self.reconciling), (STALLED, self.stalled))


@dataclass(frozen=True)
class Rules:
    goal: str  # the phase in which the object did what it was asked
    ready_reason: str  # Ready=True's reason
    ready_from: str  # the condition whose message Ready=True repeats
    needs_artifact: bool  # the goal counts only with status.artifact.uri
    waits: Mapping[str, tuple[tuple[str, str], ...]]  # phase -> (condition type, status) saying what it waits for


RULES: dict[str, Rules] = {
    "FineTuneJob": Rules(
        goal="Succeeded",
        ready_reason="Succeeded",
        ready_from="Succeeded",
        needs_artifact=True,
        waits={
            "Waiting": (("Admitted", "False"), ("Running", "False")),  # Creating, Queued (Kueue); PodsPending
            "Running": (("Running", "True"),),  # PodsRunning
        },
    ),
    "QuantizeJob": Rules(
        goal="Succeeded",
        ready_reason="Succeeded",
        ready_from="Succeeded",
        needs_artifact=True,
        waits={
            "Waiting": ((SOURCE_READY, "False"),),  # WaitingForSource
            "Pending": (("Running", "False"),),  # Creating, PodPending
            "Running": (("Running", "True"),),  # PodRunning
        },
    ),
    "ModelService": Rules(
        goal="Ready",
        ready_reason="Serving",
        ready_from="Available",
        needs_artifact=False,
        waits={
            "Waiting": ((SOURCE_READY, "False"),),  # WaitingForSource
            "Deploying": ((SOURCE_READY, "False"), ("Available", "False")),  # Deploying, NoReplicaReady
            "Ready": ((SOURCE_READY, "False"), ("RolledOut", "False")),  # a new artifact: coming, rolling out
        },
    ),
}
TERMINAL = ("Succeeded", "Failed")


def summarize(kind: str, phase: str, conditions: Iterable[Mapping[str, Any]], status: Mapping[str, Any]) -> Summary:
    """Ready, Reconciling and Stalled of a ``kind`` object in ``phase`` with these ``conditions`` and ``status``."""
    rules = RULES[kind]
    by_type = {c.get("type"): c for c in conditions if c.get("type") not in SUMMARY}
    at_goal = phase == rules.goal
    has_artifact = bool((status.get("artifact") or {}).get("uri"))

    stalled = _stalled(phase, by_type, at_goal and rules.needs_artifact and not has_artifact)
    reconciling = None if stalled else _reconciling(rules, phase, by_type, at_goal)
    if at_goal and not (rules.needs_artifact and not has_artifact):
        ready = Verdict("True", rules.ready_reason, _message(by_type.get(rules.ready_from)))
    else:
        cause = stalled or reconciling or Verdict("False", phase, f"phase {phase}")
        ready = Verdict("False", cause.reason, cause.message)
    return Summary(
        ready=ready,
        reconciling=reconciling or Verdict("False", "Stalled" if stalled else "Reconciled"),
        stalled=stalled or Verdict("False", "Reconciling" if reconciling else "Reconciled"),
    )


def _stalled(phase: str, by_type: Mapping[Any, Mapping[str, Any]], no_artifact: bool) -> Verdict | None:
    def said(type_: str, status: str, reasons: tuple[str, ...] = ()) -> Verdict | None:
        c = by_type.get(type_)
        if c is None or c.get("status") != status or (reasons and c.get("reason") not in reasons):
            return None
        return Verdict("True", str(c.get("reason") or type_), _message(c))

    found = (
        said(ACCEPTED, "False")  # InvalidSpec, ImmutableFieldChanged
        or (said(FAILED, "True") if phase == "Failed" else None)  # the Job's reason, SourceFailed
        or said(SOURCE_READY, "False", STALLED_SOURCE)  # a serving ModelService whose source failed
        or said(PLANNED, "False")  # Infeasible, ArchitectureUnknown
    )
    if found:
        return found
    if phase == "Failed":
        return Verdict("True", "Failed", "phase Failed")
    if no_artifact:
        return Verdict("True", "NoArtifact", _message(by_type.get("Succeeded")) or "succeeded without an artifact")
    return None


def _reconciling(rules: Rules, phase: str, by_type: Mapping[Any, Mapping[str, Any]], at_goal: bool) -> Verdict | None:
    for type_, status in rules.waits.get(phase, ()):
        c = by_type.get(type_)
        if c is not None and c.get("status") == status:
            return Verdict("True", str(c.get("reason") or type_), _message(c))
    if at_goal or phase in TERMINAL:
        return None
    return Verdict("True", phase, f"phase {phase}")


def _message(c: Mapping[str, Any] | None) -> str:
    return str((c or {}).get("message") or "")
