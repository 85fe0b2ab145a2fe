"""Long FineTuneJob names, with the real operator against the emulator: the job gets its gang and follows
it, and a job named with its 63-character prefix gets a gang of its own instead of adopting the first's."""

from __future__ import annotations

import pytest

from kubeforge.render.names import owner_label
from kubeforge.runtime.contract import termination_message
from tests.builders import DELETE, finetune
from tests.harness.cluster import add_nodes, complete_job, finish_pods, owned, start_pods, wait_children
from tests.harness.waiters import wait_phase, wait_status

pytestmark = pytest.mark.operator

FTJ = "kubeforge.io/v1alpha1/finetunejobs"
FTJ_PATH = "/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs"
PREFIX = "support-bot-" + "x" * 51
LONG = PREFIX + "." + "y" * 189  # 253 characters, the longest name Kubernetes allows


async def create(api, name: str) -> None:
    doc = finetune(**{"resources.queue": DELETE})
    doc["metadata"]["name"] = name
    resp = await api.post(FTJ_PATH, json=doc)
    assert resp.status == 201, await resp.text()


async def test_a_long_named_job_runs_and_its_prefix_does_not_adopt_it(emulator, operator):
    assert len(LONG) == 253 and len(PREFIX) == 63
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, LONG)
    job = (await wait_children(emulator, "team-a", owner_label(LONG), ("ConfigMap", "Service", "Job")))["Job"]
    await start_pods(emulator, job)
    await wait_phase(emulator, FTJ, "team-a", LONG, "Running")
    summary = {"status": "succeeded", "uri": "pvc://models/long", "digest": "sha256:10"}
    await finish_pods(emulator, job, exit_code=0, message=termination_message(summary))
    await complete_job(emulator, job)
    done = await wait_phase(emulator, FTJ, "team-a", LONG, "Succeeded")
    assert done["status"]["artifact"]["uri"] == "pvc://models/long"

    await create(emulator, PREFIX)
    theirs = (await wait_children(emulator, "team-a", owner_label(PREFIX), ("Job",)))["Job"]
    assert theirs["metadata"]["name"] != job["metadata"]["name"]
    obj = await wait_status(emulator, FTJ, "team-a", PREFIX, lambda s: s.get("phase") == "Waiting", what="Waiting")
    assert "artifact" not in obj["status"]
    assert len(owned(emulator, "batch/v1/jobs", "team-a", owner_label(LONG))) == 1


async def test_a_child_name_held_by_another_object_is_refused_and_left_alone(emulator, operator):
    """A ConfigMap that is not the job's holds the name of the job's contract: server-side apply would take it
    over. The job says so (Accepted=False, NameTaken, naming the object), creates none of its children, and
    goes ahead once that object is gone."""
    await add_nodes(emulator, "h100-4x8.yaml")
    foreign = {"metadata": {"name": "taken-contract", "namespace": "team-a"}, "data": {"mine": "yes"}}
    resp = await emulator.post("/api/v1/namespaces/team-a/configmaps", json=foreign)
    assert resp.status == 201, await resp.text()
    await create(emulator, "taken")

    def refused(s: dict) -> bool:
        accepted = next((c for c in s.get("conditions") or [] if c["type"] == "Accepted"), {})
        return accepted.get("reason") == "NameTaken"

    obj = await wait_status(emulator, FTJ, "team-a", "taken", refused, what="Accepted=False NameTaken")
    accepted = next(c for c in obj["status"]["conditions"] if c["type"] == "Accepted")
    assert "ConfigMap team-a/taken-contract exists and is not created by kubeforge" in accepted["message"]
    stalled = next(c for c in obj["status"]["conditions"] if c["type"] == "Stalled")
    assert obj["status"]["phase"] == "Pending" and stalled["status"] == "True"
    stored = emulator.stored_all("v1/configmaps", "team-a")
    held = next(c for c in stored if c["metadata"]["name"] == "taken-contract")
    assert held["data"] == {"mine": "yes"} and not held["metadata"].get("ownerReferences")
    assert not owned(emulator, "batch/v1/jobs", "team-a", owner_label("taken"))  # nothing half-created

    resp = await emulator.delete("/api/v1/namespaces/team-a/configmaps/taken-contract")
    assert resp.status == 200, await resp.text()
    await wait_children(emulator, "team-a", owner_label("taken"), ("ConfigMap", "Service", "Job"))
