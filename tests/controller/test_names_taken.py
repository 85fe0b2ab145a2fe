"""A child whose name another object holds (controller/state.py taken_by, refuse_taken_names): derived child
names of two kinds can meet (a ModelService named "x-rdzv" serves under the Service that FineTuneJob "x"
rendezvouses on), and anyone can create an object first. Nothing is created then, and the status says who."""

from __future__ import annotations

from kubeforge.controller.readiness import STALLED
from kubeforge.controller.state import ACCEPTED, names_taken, refuse_taken_names, taken_by
from tests.controller.scenarios import NOW, _decide_ftj, _ftj, written

CHILD = {"kind": "Service", "metadata": {"name": "x-rdzv", "namespace": "ns"}}


def stored(controller: dict | None = None) -> dict:
    refs = [] if controller is None else [{"kind": controller["kind"], "name": controller["name"],
                                           "uid": controller["uid"], "controller": True}]  # fmt: skip
    return {"kind": "Service", "metadata": {"name": "x-rdzv", "namespace": "ns", "ownerReferences": refs}}


def test_only_an_object_controlled_by_this_owner_is_its_child():
    assert taken_by(CHILD, None, "uid-x") is None  # free
    assert taken_by(CHILD, stored({"kind": "FineTuneJob", "name": "x", "uid": "uid-x"}), "uid-x") is None
    other = taken_by(CHILD, stored({"kind": "ModelService", "name": "x-rdzv", "uid": "uid-m"}), "uid-x")
    assert other == "Service ns/x-rdzv exists and is ModelService x-rdzv's"
    assert taken_by(CHILD, stored(), "uid-x") == "Service ns/x-rdzv exists and is not created by kubeforge"
    # a non-controller reference (e.g. a garbage-collection link) does not make it ours
    loose = stored()
    loose["metadata"]["ownerReferences"] = [{"kind": "FineTuneJob", "name": "x", "uid": "uid-x"}]
    assert taken_by(CHILD, loose, "uid-x") is not None


def test_a_refused_creation_creates_nothing_stalls_and_is_stable_across_passes():
    doc = _ftj()
    decision = _decide_ftj(doc)
    assert decision.apply  # the first pass would create the gang
    why = ["Service team-a/x-rdzv exists and is ModelService x-rdzv's"]
    refused = refuse_taken_names(decision, doc.get("status") or {}, why, "FineTuneJob", 1, NOW)
    assert refused.apply == [] and refused.delete == [] and refused.handover == []
    assert refused.status["phase"] == "Pending" and names_taken(refused.status)
    conditions = {c["type"]: c for c in refused.status["conditions"]}
    assert conditions[ACCEPTED]["status"] == "False" and why[0] in conditions[ACCEPTED]["message"]
    assert conditions[STALLED]["status"] == "True"
    assert [e.reason for e in refused.events if e.type == "Warning"] == ["NameTaken"]

    again_doc = written(doc, refused)
    later = "2026-11-22T11:00:00Z"
    again = refuse_taken_names(_decide_ftj(again_doc), again_doc["status"], why, "FineTuneJob", 1, later)
    assert again.status == refused.status  # same refusal, later: no write, no new Event
    assert again.events == []
