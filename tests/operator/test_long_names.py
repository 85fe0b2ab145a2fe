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
