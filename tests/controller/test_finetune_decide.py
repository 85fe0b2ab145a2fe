"""decide(): every FineTuneJob decision, without a cluster."""

from __future__ import annotations

import copy
import json

import pytest

from kubeforge.controller.finetune import Observed, decide
from kubeforge.planner.catalog import lookup
from kubeforge.runtime.contract import termination_message
from tests.builders import DELETE, finetune
from tests.planner.nodes import example_cluster

NOW = "2026-11-22T10:00:00Z"
H100 = example_cluster("h100-4x8.yaml")
A10 = example_cluster("a10-4x1.yaml")
QWEN = lookup("Qwen/Qwen3-8B")


def body(generation: int = 1, status: dict | None = None, **changes) -> dict:
    changes.setdefault("resources.queue", DELETE)
    doc = finetune(**changes)
    doc["metadata"].update(uid="uid-1", generation=generation, resourceVersion="5")
    if status is not None:
        doc["status"] = status
    return doc


def observe(doc: dict, inventory=H100, **kw) -> Observed:
    kw.setdefault("architecture", QWEN)
    kw.setdefault("now", NOW)
    return Observed(body=doc, inventory=inventory, **kw)


def cond(status: dict, type_: str) -> dict | None:
    return next((c for c in status["conditions"] if c["type"] == type_), None)


def first_pass(**changes):
    doc = body(**changes)
    decision = decide(observe(doc))
    return doc, decision


def with_children(doc: dict, decision, **job_status) -> list[dict]:
    """What exists after the first pass applied its children (the API server added status)."""
    children = copy.deepcopy(decision.apply)
    for child in children:
        if child["kind"] in ("Job", "JobSet"):
            child["status"] = job_status
    return children


def test_first_pass_plans_and_applies_the_gang():
    _, decision = first_pass()
    assert [c["kind"] for c in decision.apply] == ["ConfigMap", "Service", "Job"]
    status = decision.status
    assert status["phase"] == "Waiting" and status["observedGeneration"] == 1
    assert cond(status, "Accepted")["status"] == "True"
    assert cond(status, "Planned")["status"] == "True" and status["plan"]["feasible"]
    reasons = {e.reason for e in decision.events}
    assert {"SpecValid", "Planned", "PhaseWaiting"} <= reasons


def test_second_pass_changes_nothing():
    doc, decision = first_pass()
    children = with_children(doc, decision)
    second = decide(observe(body(status=decision.status), children=children))
    assert second.apply == []  # the gang exists: only its state is observed (Admitted, PodsPending)
    third = decide(observe(body(status=second.status), children=children))
    assert third.apply == [] and third.events == [] and third.status == second.status
    assert third.status["plan"] == decision.status["plan"]


def test_drifted_configmap_and_missing_service_are_reapplied_but_never_the_job():
    doc, decision = first_pass()
    children = with_children(doc, decision)
    children[0]["data"] = {"contract.json": "{}"}  # edited by someone
    children = [c for c in children if c["kind"] != "Service"]  # deleted by someone
    again = decide(observe(body(status=decision.status), children=children))
    assert [c["kind"] for c in again.apply] == ["ConfigMap", "Service"]


def test_infeasible_has_no_children_and_says_why():
    doc = body(model={"uri": "hf://meta-llama/Llama-3.1-70B"}, method="full", lora=DELETE)
    decision = decide(observe(doc, inventory=A10, architecture=lookup("meta-llama/Llama-3.1-70B")))
    assert decision.apply == []
    planned = cond(decision.status, "Planned")
    assert planned["status"] == "False" and planned["reason"] == "Infeasible" and "does not fit" in planned["message"]
    assert decision.status["phase"] == "Pending" and decision.status["plan"]["feasible"] is False
    assert any(e.type == "Warning" and e.reason == "Infeasible" for e in decision.events)


def test_invalid_spec_names_the_field_and_does_nothing_else():
    decision = decide(observe(body(**{"lora.rank": 0})))
    assert decision.apply == [] and decision.status["phase"] == "Failed"
    accepted = cond(decision.status, "Accepted")
    assert accepted["reason"] == "InvalidSpec" and "spec.lora.rank: must be > 0" in accepted["message"]


def test_unknown_architecture_is_a_planning_condition():
    doc = body(model={"uri": "pvc://models/mystery"})
    decision = decide(observe(doc, architecture=None, architecture_error="spec.model: set spec.model.architecture"))
    assert cond(decision.status, "Planned")["reason"] == "ArchitectureUnknown"
    assert decision.apply == []


@pytest.mark.parametrize(
    ("job_status", "pods_running", "phase", "condition", "reason"),
    [
        ({}, 0, "Waiting", "Running", "PodsPending"),
        ({"active": 2}, 1, "Waiting", "Running", "PodsPending"),
        ({"active": 2, "startTime": "2026-11-22T09:00:00Z"}, 2, "Running", "Running", "PodsRunning"),
    ],
)
def test_phase_follows_the_gang(job_status, pods_running, phase, condition, reason):
    doc, decision = first_pass()
    children = with_children(doc, decision, **job_status)
    pods = [
        {"metadata": {"labels": {"batch.kubernetes.io/job-completion-index": str(i)}}, "status": {"phase": "Running"}}
        for i in range(pods_running)
    ]
    again = decide(observe(body(status=decision.status), children=children, pods=pods))
    assert again.status["phase"] == phase
    assert cond(again.status, condition)["reason"] == reason
    if job_status.get("startTime"):
        assert again.status["startTime"] == job_status["startTime"]


def test_progress_is_reported_while_running():
    doc, decision = first_pass()
    children = with_children(doc, decision, active=2)
    pods = [
        {"metadata": {"labels": {"batch.kubernetes.io/job-completion-index": str(i)}}, "status": {"phase": "Running"}}
        for i in range(2)
    ]
    progress = {"step": 50, "totalSteps": 200, "loss": 1.5, "tokensPerSecond": 1000.0, "etaSeconds": 300, "epoch": 0.7}
    again = decide(observe(body(status=decision.status), children=children, pods=pods, progress=progress))
    assert again.status["progress"]["updatedAt"] == NOW  # no read time: the pass's
    read = {**progress, "readAt": "2026-11-22T09:59:30Z"}
    again = decide(observe(body(status=decision.status), children=children, pods=pods, progress=read))
    later = decide(
        observe(body(status=again.status), children=children, pods=pods, progress=read, now="2026-11-22T10:05:00Z")
    )
    assert later.status == again.status  # the same answer, the same status: no write
    assert again.status["progress"] == {
        "updatedAt": "2026-11-22T09:59:30Z",
        "step": 50,
        "totalSteps": 200,
        "percent": 25,
        "loss": 1.5,
        "tokensPerSecond": 1000.0,
        "epoch": 0.7,
        "etaSeconds": 300,
    }


def test_kueue_suspended_gang_is_queued():
    doc, decision = first_pass(**{"resources.queue": "q"})
    children = with_children(doc, decision)
    again = decide(observe(body(status=decision.status, **{"resources.queue": "q"}), children=children))
    assert again.status["phase"] == "Waiting" and cond(again.status, "Admitted")["reason"] == "Queued"


def test_success_copies_the_artifact_from_rank_0():
    doc, decision = first_pass()
    children = with_children(
        doc, decision, conditions=[{"type": "Complete", "status": "True"}], completionTime="2026-11-22T11:00:00Z"
    )
    summary = {
        "status": "succeeded",
        "uri": "pvc://models/support-bot",
        "digest": "sha256:abc",
        "sizeBytes": 42,
        "metrics": {"train_loss": 0.5, "note": "x"},
    }
    pods = [
        {"metadata": {"labels": {"batch.kubernetes.io/job-completion-index": "1"}}, "status": {}},
        {
            "metadata": {"labels": {"batch.kubernetes.io/job-completion-index": "0"}},
            "status": {
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 0, "message": termination_message(summary)}}}
                ]
            },
        },
    ]
    again = decide(observe(body(status=decision.status), children=children, pods=pods))
    assert again.status["phase"] == "Succeeded"
    assert again.status["artifact"] == {
        "uri": "pvc://models/support-bot",
        "digest": "sha256:abc",
        "sizeBytes": 42,
        "metrics": {"train_loss": 0.5},
        "createdAt": NOW,
    }
    assert again.status["completionTime"] == "2026-11-22T11:00:00Z"
    # terminal: later passes keep it, whatever the gang looks like
    later = decide(observe(body(status=again.status), children=[]))
    assert later.status["phase"] == "Succeeded" and later.apply == []


def test_failure_carries_the_jobs_reason_and_rank_0_error():
    doc, decision = first_pass()
    children = with_children(
        doc,
        decision,
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        ],
    )
    pods = [
        {
            "metadata": {"labels": {"batch.kubernetes.io/job-completion-index": "0"}},
            "status": {
                "containerStatuses": [
                    {
                        "state": {
                            "terminated": {
                                "exitCode": 1,
                                "message": json.dumps({"status": "failed", "error": "CUDA out of memory"}),
                            }
                        }
                    }
                ]
            },
        }
    ]
    again = decide(observe(body(status=decision.status), children=children, pods=pods))
    failed = cond(again.status, "Failed")
    assert again.status["phase"] == "Failed" and failed["reason"] == "BackoffLimitExceeded"
    assert "CUDA out of memory" in failed["message"]
    assert any(e.type == "Warning" and e.reason == "BackoffLimitExceeded" for e in again.events)


def test_immutable_change_after_start_is_refused_and_the_gang_kept():
    doc, decision = first_pass()
    children = with_children(doc, decision)
    changed = body(status=decision.status, generation=2, model={"uri": "hf://Qwen/Qwen3-4B"})
    again = decide(observe(changed, children=children))
    accepted = cond(again.status, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "ImmutableFieldChanged"
    assert "spec.model.uri is immutable" in accepted["message"]
    assert again.apply == []
    assert any(e.reason == "ImmutableFieldChanged" and e.type == "Warning" for e in again.events)


def test_every_immutable_field_the_contract_carries_is_checked():
    """api.immutable_changes against the spec as the running gang's contract records it: any field of
    model, dataset and output it carries, not only the URIs; a mutable field (training) goes through."""
    doc, decision = first_pass()
    children = with_children(doc, decision)
    for change, path in (({"dataset.packing": False}, "spec.dataset.packing"),
                         ({"dataset.maxSeqLength": 2048}, "spec.dataset.maxSeqLength"),
                         ({"output.merge": False}, "spec.output.merge")):  # fmt: skip
        again = decide(observe(body(status=decision.status, generation=2, **change), children=children))
        accepted = cond(again.status, "Accepted")
        assert accepted["reason"] == "ImmutableFieldChanged" and f"{path} is immutable" in accepted["message"]
    same = decide(observe(body(status=decision.status, generation=2, **{"training.epochs": 1}), children=children))
    assert cond(same.status, "Accepted")["status"] == "True"


def test_jobset_when_available_or_asked():
    _, auto = first_pass()
    assert [c["kind"] for c in auto.apply] == ["ConfigMap", "Service", "Job"]
    doc = body()
    with_jobset = decide(observe(doc, jobset_available=True))
    assert [c["kind"] for c in with_jobset.apply] == ["ConfigMap", "JobSet"]
    forced_job = decide(observe(body(**{"resources.gang": "job"}), jobset_available=True))
    assert [c["kind"] for c in forced_job.apply][-1] == "Job"


def test_a_changed_inventory_does_not_touch_a_running_gang():
    doc, decision = first_pass()
    children = with_children(doc, decision, active=2)
    again = decide(
        observe(body(status=decision.status), inventory=example_cluster("a100-sxm4-80gb-2x8.yaml"), children=children)
    )
    assert again.apply == [] and again.status["plan"] == decision.status["plan"]


def test_condition_transition_times_only_move_on_change():
    doc, decision = first_pass()
    children = with_children(doc, decision)
    later = Observed(
        body=body(status=decision.status),
        inventory=H100,
        now="2026-11-22T12:00:00Z",
        children=children,
        architecture=QWEN,
    )
    again = decide(later)
    assert cond(again.status, "Accepted")["lastTransitionTime"] == NOW
