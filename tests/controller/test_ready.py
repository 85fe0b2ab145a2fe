"""Ready, Reconciling and Stalled (controller/readiness.py) for every phase of every kind.

The statuses come from the decide functions themselves (tests/controller/scenarios.py): what is
checked is what the operator writes.
"""

from __future__ import annotations

import copy
import typing

import pytest

from kubeforge.api.finetune import FineTuneJobStatus, FineTunePhase
from kubeforge.api.kinds import KINDS
from kubeforge.api.quantize import QuantizeJobStatus, QuantizePhase
from kubeforge.api.service import ModelServiceStatus, ServicePhase
from kubeforge.controller.finetune import Observed, decide
from kubeforge.controller.readiness import RULES, SUMMARY, summarize
from kubeforge.controller.state import State
from tests.controller.scenarios import H100, NOW, QWEN, scenarios

T, F = "True", "False"
PHASES = {"FineTuneJob": FineTunePhase, "QuantizeJob": QuantizePhase, "ModelService": ServicePhase}
STATUS_MODELS = {"FineTuneJob": FineTuneJobStatus, "QuantizeJob": QuantizeJobStatus, "ModelService": ModelServiceStatus}

# (kind, scenario): phase, (Ready, its reason), Reconciling (status, reason), Stalled (status, reason)
TABLE = {
    ("FineTuneJob", "infeasible"): ("Pending", (F, "Infeasible"), (F, "Stalled"), (T, "Infeasible")),
    ("FineTuneJob", "architecture-unknown"): ("Pending", (F, "ArchitectureUnknown"), (F, "Stalled"),
                                              (T, "ArchitectureUnknown")),
    ("FineTuneJob", "invalid-spec"): ("Failed", (F, "InvalidSpec"), (F, "Stalled"), (T, "InvalidSpec")),
    ("FineTuneJob", "creating"): ("Waiting", (F, "Creating"), (T, "Creating"), (F, "Reconciling")),
    ("FineTuneJob", "queued"): ("Waiting", (F, "Queued"), (T, "Queued"), (F, "Reconciling")),
    ("FineTuneJob", "pods-pending"): ("Waiting", (F, "PodsPending"), (T, "PodsPending"), (F, "Reconciling")),
    ("FineTuneJob", "running"): ("Running", (F, "PodsRunning"), (T, "PodsRunning"), (F, "Reconciling")),
    ("FineTuneJob", "immutable-field-changed"): ("Running", (F, "ImmutableFieldChanged"), (F, "Stalled"),
                                                 (T, "ImmutableFieldChanged")),
    ("FineTuneJob", "succeeded"): ("Succeeded", (T, "Succeeded"), (F, "Reconciled"), (F, "Reconciled")),
    ("FineTuneJob", "succeeded-without-artifact"): ("Succeeded", (F, "NoArtifact"), (F, "Stalled"),
                                                    (T, "NoArtifact")),
    ("FineTuneJob", "failed"): ("Failed", (F, "BackoffLimitExceeded"), (F, "Stalled"), (T, "BackoffLimitExceeded")),
    ("QuantizeJob", "waiting-for-source"): ("Waiting", (F, "WaitingForSource"), (T, "WaitingForSource"),
                                            (F, "Reconciling")),
    ("QuantizeJob", "source-failed"): ("Failed", (F, "SourceFailed"), (F, "Stalled"), (T, "SourceFailed")),
    ("QuantizeJob", "invalid-spec"): ("Failed", (F, "InvalidSpec"), (F, "Stalled"), (T, "InvalidSpec")),
    ("QuantizeJob", "creating"): ("Pending", (F, "Creating"), (T, "Creating"), (F, "Reconciling")),
    ("QuantizeJob", "pod-pending"): ("Pending", (F, "PodPending"), (T, "PodPending"), (F, "Reconciling")),
    ("QuantizeJob", "running"): ("Running", (F, "PodRunning"), (T, "PodRunning"), (F, "Reconciling")),
    ("QuantizeJob", "succeeded"): ("Succeeded", (T, "Succeeded"), (F, "Reconciled"), (F, "Reconciled")),
    ("QuantizeJob", "succeeded-without-artifact"): ("Succeeded", (F, "NoArtifact"), (F, "Stalled"),
                                                    (T, "NoArtifact")),
    ("QuantizeJob", "failed"): ("Failed", (F, "BackoffLimitExceeded"), (F, "Stalled"), (T, "BackoffLimitExceeded")),
    ("ModelService", "waiting-for-source"): ("Waiting", (F, "WaitingForSource"), (T, "WaitingForSource"),
                                             (F, "Reconciling")),
    ("ModelService", "source-failed"): ("Failed", (F, "SourceFailed"), (F, "Stalled"), (T, "SourceFailed")),
    ("ModelService", "invalid-spec"): ("Failed", (F, "InvalidSpec"), (F, "Stalled"), (T, "InvalidSpec")),
    ("ModelService", "infeasible"): ("Pending", (F, "Infeasible"), (F, "Stalled"), (T, "Infeasible")),
    ("ModelService", "deploying"): ("Deploying", (F, "Deploying"), (T, "Deploying"), (F, "Reconciling")),
    ("ModelService", "no-replica-ready"): ("Deploying", (F, "NoReplicaReady"), (T, "NoReplicaReady"),
                                           (F, "Reconciling")),
    ("ModelService", "ready"): ("Ready", (T, "Serving"), (F, "Reconciled"), (F, "Reconciled")),
    ("ModelService", "applying-new-artifact"): ("Ready", (T, "Serving"), (T, "RollingOut"), (F, "Reconciling")),
    ("ModelService", "rolling-out"): ("Ready", (T, "Serving"), (T, "RollingOut"), (F, "Reconciling")),
    ("ModelService", "waiting-for-new-source"): ("Ready", (T, "Serving"), (T, "WaitingForSource"),
                                                 (F, "Reconciling")),
    ("ModelService", "serving-but-source-failed"): ("Ready", (T, "Serving"), (F, "Stalled"), (T, "SourceFailed")),
    ("ModelService", "serving-but-infeasible"): ("Ready", (T, "Serving"), (F, "Stalled"), (T, "Infeasible")),
}  # fmt: skip
SCENARIOS = scenarios()


def cond(status: dict, type_: str) -> dict:
    (found,) = [c for c in status["conditions"] if c["type"] == type_]
    return found


def said(status: dict, type_: str) -> tuple[str, str]:
    c = cond(status, type_)
    return c["status"], c["reason"]


def test_the_table_covers_every_scenario_and_every_phase_of_every_kind():
    assert set(TABLE) == set(SCENARIOS)
    for kind in PHASES:
        covered = {phase for (k, _), (phase, *_) in TABLE.items() if k == kind}
        assert covered == set(typing.get_args(PHASES[kind])), kind
    assert set(RULES) == {k.kind for k in KINDS} == set(PHASES)


@pytest.mark.parametrize("key", list(TABLE), ids="/".join)
def test_ready_reconciling_stalled(key):
    phase, ready, reconciling, stalled = TABLE[key]
    status = SCENARIOS[key]["status"]
    assert status["phase"] == phase
    assert (said(status, "Ready"), said(status, "Reconciling"), said(status, "Stalled")) == (
        ready,
        reconciling,
        stalled,
    )


@pytest.mark.parametrize("key", list(TABLE), ids="/".join)
def test_what_holds_for_every_written_status(key):
    kind, _ = key
    obj = SCENARIOS[key]
    status = obj["status"]
    generation = obj["metadata"]["generation"]
    assert status["observedGeneration"] == generation  # kstatus: reconciled
    assert [c["type"] for c in status["conditions"][:3]] == list(SUMMARY)  # first: what `kubectl describe` shows
    assert all(c["observedGeneration"] == generation for c in status["conditions"][:3])  # set on every pass
    ready, reconciling, stalled = (cond(status, t) for t in SUMMARY)
    assert not (reconciling["status"] == T and stalled["status"] == T)
    rules = RULES[kind]
    goal = status["phase"] == rules.goal and (not rules.needs_artifact or bool(status.get("artifact", {}).get("uri")))
    assert (ready["status"] == T) == goal  # Ready follows the phase, nothing else
    if ready["status"] == F:  # says why: the reason of whichever abnormal condition holds
        cause = stalled if stalled["status"] == T else reconciling
        assert cause["status"] == T and (ready["reason"], ready["message"]) == (cause["reason"], cause["message"])
    if status["phase"] == "Failed":
        assert stalled["status"] == T and ready["status"] == F
    STATUS_MODELS[kind].model_validate(status)  # reasons, messages and times fit the CRD


def test_ready_true_repeats_the_goals_message():
    assert cond(SCENARIOS["FineTuneJob", "succeeded"]["status"], "Ready")["message"].startswith(
        "artifact pvc://models/support-bot"
    )
    assert cond(SCENARIOS["ModelService", "ready"]["status"], "Ready")["message"] == "2 of 2 replica(s) ready"
    failed = SCENARIOS["FineTuneJob", "failed"]["status"]
    assert "CUDA out of memory" in cond(failed, "Ready")["message"] == cond(failed, "Failed")["message"]


@pytest.mark.parametrize("kind", list(PHASES))
def test_every_phase_without_any_condition_still_gets_a_summary(kind):
    """A status an older operator wrote (a phase, no conditions) is summed up from the phase alone."""
    for phase in typing.get_args(PHASES[kind]):
        summary = summarize(kind, phase, [], {})
        assert not (summary.reconciling.true and summary.stalled.true)
        if phase == "Failed":
            assert summary.stalled.true and summary.ready.reason == "Failed"
        elif phase == RULES[kind].goal:
            assert summary.ready.true != RULES[kind].needs_artifact  # a job's goal needs its artifact
        else:
            assert summary.reconciling.true and summary.ready.reason == phase


def test_a_stale_failed_condition_does_not_stall_a_service_that_recovered():
    """ModelService keeps Failed=True/SourceFailed once set; only the Failed phase makes it count."""
    conditions = [{"type": "Failed", "status": "True", "reason": "SourceFailed", "message": "x"},
                  {"type": "Available", "status": "False", "reason": "Deploying", "message": "creating"}]  # fmt: skip
    summary = summarize("ModelService", "Deploying", conditions, {})
    assert not summary.stalled.true and summary.reconciling.reason == "Deploying"


def test_summary_conditions_post_no_events_and_keep_their_transition_time():
    doc = copy.deepcopy(SCENARIOS["FineTuneJob", "creating"])
    del doc["status"]
    first = decide(Observed(body=doc, inventory=H100, now=NOW, architecture=QWEN))
    assert not {e.reason for e in first.events} & {"Stalled", "Reconciled", "Reconciling"}
    assert all(not e.message.startswith(tuple(f"{t}=" for t in SUMMARY)) for e in first.events)
    doc["status"] = first.status
    later = decide(Observed(body=doc, inventory=H100, now="2026-11-22T12:00:00Z", architecture=QWEN))
    assert cond(later.status, "Ready")["lastTransitionTime"] == NOW  # unchanged: Ready stayed False


def test_summary_moves_with_the_phase_in_one_pass():
    state = State({}, 3, NOW, "QuantizeJob")
    state.phase = "Running"
    state.set("Running", "True", "PodRunning", "the quantizer is running")
    status = state.decision({}).status
    assert said(status, "Reconciling") == (T, "PodRunning") and status["observedGeneration"] == 3
    state.phase = "Succeeded"
    state.status["artifact"] = {"uri": "pvc://m/q"}
    state.set("Succeeded", "True", "Completed", "artifact pvc://m/q")
    status = state.decision(status).status
    assert said(status, "Ready") == (T, "Succeeded") and said(status, "Reconciling") == (F, "Reconciled")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_ready_and_reason_printer_columns(kind):
    columns = {c.name: c for c in kind.columns}
    assert columns["Ready"].json_path == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Reason"].json_path == '.status.conditions[?(@.type=="Ready")].reason'
    names = [c.name for c in kind.columns]
    assert names.index("Ready") == names.index("Phase") + 1 and names.index("Reason") == names.index("Ready") + 1
    assert len(set(names)) == len(names)
