from __future__ import annotations

from kubeforge.controller.admission import admission_status
from tests.builders import FINETUNE, QUANTIZE, SERVICE, example, finetune

NOW = "2026-11-22T10:00:00Z"


def live(doc: dict, generation: int = 1, status: dict | None = None) -> dict:
    doc = dict(doc, metadata=dict(doc["metadata"], generation=generation, uid="u", resourceVersion="7"))
    if status is not None:
        doc["status"] = status
    return doc


def test_valid_objects_are_accepted_and_pending():
    for name in (FINETUNE, QUANTIZE, SERVICE):
        status = admission_status(live(example(name)), NOW)
        assert status["phase"] == "Pending" and status["observedGeneration"] == 1
        (cond,) = status["conditions"]
        assert (cond["type"], cond["status"], cond["reason"]) == ("Accepted", "True", "SpecValid")


def test_invalid_spec_names_every_field():
    status = admission_status(live(finetune(**{"lora.rank": 0, "resources.maxGPUs": 0})), NOW)
    assert status["phase"] == "Failed"
    (cond,) = status["conditions"]
    assert cond["reason"] == "InvalidSpec"
    assert "spec.lora.rank: must be > 0" in cond["message"]
    assert "spec.resources.maxGPUs: must be > 0" in cond["message"]


def test_status_written_by_the_operator_is_not_judged_as_user_input():
    status = {"phase": "Running", "conditions": [], "somethingNew": {"x": 1}}
    out = admission_status(live(example(FINETUNE), status=status), NOW)
    assert out["phase"] == "Running"  # a valid spec keeps the phase later steps set


def test_fixing_a_spec_leaves_failed_and_moves_the_transition_time():
    bad = admission_status(live(finetune(**{"lora.rank": 0})), "2026-11-22T09:00:00Z")
    good = admission_status(live(example(FINETUNE), generation=2, status=bad), NOW)
    assert good["phase"] == "Pending" and good["observedGeneration"] == 2
    assert good["conditions"][0]["lastTransitionTime"] == NOW
