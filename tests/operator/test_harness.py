"""The operator harness itself: the real operator process against the emulator."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.harness.waiters import wait_for, wait_phase, wait_status

pytestmark = pytest.mark.operator

ROOT = Path(__file__).resolve().parents[2]
FTJ = "kubeforge.io/v1alpha1/finetunejobs"
FTJ_PATH = "/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs"


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def accepted(status: dict) -> dict | None:
    return next((c for c in status.get("conditions", []) if c["type"] == "Accepted"), None)


async def test_operator_sees_a_finetunejob_and_records_it(emulator, operator):
    job = example("finetunejob-qwen3-8b-lora.yaml")
    resp = await emulator.post(FTJ_PATH, json=job)
    assert resp.status == 201, await resp.text()

    obj = await wait_phase(emulator, FTJ, "team-a", "support-bot", "Pending")
    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 1
    cond = accepted(status)
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "SpecValid"
    assert cond["lastTransitionTime"].endswith("Z")
    assert operator.alive


async def test_invalid_spec_is_reported_not_crashed_and_fixing_it_recovers(emulator, operator):
    job = example("finetunejob-qwen3-8b-lora.yaml")
    job["spec"]["lora"]["rank"] = 0
    job["spec"]["method"] = "full"  # lora settings with method full: a cross-field problem
    resp = await emulator.post(FTJ_PATH, json=job)
    assert resp.status == 201

    obj = await wait_phase(emulator, FTJ, "team-a", "support-bot", "Failed")
    cond = accepted(obj["status"])
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "spec.lora.rank: must be > 0" in cond["message"]

    fixed = copy.deepcopy(job)
    fixed["spec"]["lora"]["rank"] = 8
    fixed["spec"]["method"] = "lora"
    patch = {"spec": {"lora": {"rank": 8}, "method": "lora"}}
    resp = await emulator.patch(
        f"{FTJ_PATH}/support-bot", json=patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert resp.status == 200, await resp.text()
    obj = await wait_status(
        emulator,
        FTJ,
        "team-a",
        "support-bot",
        lambda s: s.get("observedGeneration") == 2 and s.get("phase") == "Pending",
        what="the fixed spec to be accepted",
    )
    assert accepted(obj["status"])["reason"] == "SpecValid"
    assert operator.alive


async def test_a_restarted_operator_does_not_handle_the_same_object_twice(emulator, operator):
    resp = await emulator.post(FTJ_PATH, json=example("finetunejob-qwen3-8b-lora.yaml"))
    assert resp.status == 201
    obj = await wait_phase(emulator, FTJ, "team-a", "support-bot", "Pending")
    rv = obj["metadata"]["resourceVersion"]

    await operator.restart()
    # The restarted operator resumes the object (level-triggered): the same generation gives the
    # same status, so nothing about the object changes, not even lastTransitionTime.
    await wait_for(
        lambda: "Resuming is processed" in operator.logs().split("operator start #2")[-1],
        what="the restarted operator to resume support-bot",
    )
    after = emulator.stored(FTJ, "team-a", "support-bot")
    assert after["status"] == obj["status"]
    assert after["metadata"]["generation"] == 1
    assert int(after["metadata"]["resourceVersion"]) >= int(rv)
    assert "Creation is processed" not in operator.logs().split("operator start #2")[-1]
