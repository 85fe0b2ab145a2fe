"""FineTuneJob -> QuantizeJob -> ModelService applied at once, as a real operator process against the emulator."""

from __future__ import annotations

import pytest

from kubeforge.runtime.contract import termination_message
from tests.builders import DELETE, finetune, quantize, service
from tests.harness.cluster import (
    STATUS,
    add_nodes,
    complete_job,
    events_for,
    fail_job,
    finish_pods,
    roll_out,
    start_pods,
    wait_children,
)
from tests.harness.manifests import validate_manifest
from tests.harness.waiters import wait_for, wait_phase, wait_status
from tests.operator.test_finetunejob import condition
from tests.operator.test_finetunejob import server_fields_removed as clean

pytestmark = pytest.mark.operator

BASE = "/apis/kubeforge.io/v1alpha1/namespaces/team-a"
FTJ, QJ, MSVC = (f"kubeforge.io/v1alpha1/{r}" for r in ("finetunejobs", "quantizejobs", "modelservices"))


async def finish(api, job: dict, summary: dict) -> None:
    await start_pods(api, job)
    await finish_pods(api, job, exit_code=0, message=termination_message(summary))
    await complete_job(api, job)


async def test_the_whole_chain_applied_at_once(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    for path, doc in (("modelservices", service()), ("quantizejobs", quantize()),
                      ("finetunejobs", finetune(**{"resources.queue": DELETE}))):  # fmt: skip
        resp = await emulator.post(f"{BASE}/{path}", json=doc)
        assert resp.status == 201, await resp.text()

    qj = await wait_phase(emulator, QJ, "team-a", "support-bot-fp8", "Waiting")
    assert condition(qj, "SourceReady")["reason"] == "WaitingForSource"
    svc = await wait_phase(emulator, MSVC, "team-a", "support-bot", "Waiting")
    assert condition(svc, "SourceReady")["status"] == "False"

    gang = (await wait_children(emulator, "team-a", "support-bot", ("Job",)))["Job"]
    await finish(emulator, gang, {"status": "succeeded", "uri": "pvc://models/support-bot", "digest": "sha256:ft1"})
    await wait_phase(emulator, FTJ, "team-a", "support-bot", "Succeeded")

    children = await wait_children(emulator, "team-a", "support-bot-fp8", ("ConfigMap", "Job"))
    for child in children.values():
        validate_manifest(clean(child))
    assert children["Job"]["metadata"]["ownerReferences"][0]["kind"] == "QuantizeJob"
    qj = await wait_status(emulator, QJ, "team-a", "support-bot-fp8", lambda s: s.get("source"), what="the source")
    assert qj["status"]["source"] == {"uri": "pvc://models/support-bot", "digest": "sha256:ft1"}
    await finish(emulator, children["Job"], {"status": "succeeded", "uri": "pvc://models/support-bot-fp8",
                                             "digest": "sha256:q1", "metrics": {"perplexity_after": 5.2}})  # fmt: skip
    qj = await wait_phase(emulator, QJ, "team-a", "support-bot-fp8", "Succeeded")
    assert qj["status"]["artifact"]["digest"] == "sha256:q1" and qj["status"]["metrics"]["perplexity_after"] == 5.2

    served = await wait_children(emulator, "team-a", "support-bot", ("Deployment",))
    deployment = served["Deployment"]
    validate_manifest(clean(deployment))
    engine = deployment["spec"]["template"]["spec"]["containers"][0]
    assert engine["command"] == ["vllm", "serve"] and engine["args"][0] == "/mnt/pvc/models/support-bot-fp8"
    await roll_out(emulator, deployment)
    svc = await wait_phase(emulator, MSVC, "team-a", "support-bot", "Ready")
    assert svc["status"]["servedArtifact"] == {"uri": "pvc://models/support-bot-fp8", "digest": "sha256:q1"}
    assert svc["status"]["endpoint"] == "http://support-bot.team-a.svc:8000/v1"
    assert svc["status"]["readyReplicas"] == 2 and svc["status"]["engine"] == "vllm"
    await wait_for(lambda: any(e["reason"] == "PhaseReady" and e["involvedObject"]["kind"] == "ModelService"
                               for e in events_for(emulator, "team-a", "support-bot")) or None,
                   what="the PhaseReady event")  # fmt: skip

    # a new artifact (the QuantizeJob re-run by its owner): the Deployment rolls over, status follows the rollout
    resp = await emulator.patch(f"{BASE}/quantizejobs/support-bot-fp8/status", headers=STATUS,
                                json={"status": {"artifact": {"uri": "pvc://models/support-bot-fp8",
                                                              "digest": "sha256:q2"}}})  # fmt: skip
    assert resp.status == 200

    def template_digest() -> str | None:
        current = next(d for d in emulator.stored_all("apps/v1/deployments", "team-a")
                       if d["metadata"]["name"] == deployment["metadata"]["name"])  # fmt: skip
        return current["spec"]["template"]["metadata"]["annotations"].get("kubeforge.io/artifact-digest")

    await wait_for(lambda: template_digest() == "sha256:q2" or None, what="the Deployment on the new digest")
    svc = await wait_status(emulator, MSVC, "team-a", "support-bot",
                            lambda s: (condition({"status": s}, "RolledOut") or {}).get("status") == "False",
                            what="a rollout in progress")  # fmt: skip
    assert svc["status"]["servedArtifact"]["digest"] == "sha256:q1"
    await roll_out(emulator, deployment)
    await wait_status(emulator, MSVC, "team-a", "support-bot",
                      lambda s: (s.get("servedArtifact") or {}).get("digest") == "sha256:q2",
                      what="servedArtifact on the new digest")  # fmt: skip


async def test_a_failed_finetunejob_fails_its_quantizejob(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    resp = await emulator.post(f"{BASE}/quantizejobs", json=quantize())
    assert resp.status == 201
    resp = await emulator.post(f"{BASE}/finetunejobs", json=finetune(**{"resources.queue": DELETE}))
    assert resp.status == 201
    waiting = "waiting for FineTuneJob support-bot"
    await wait_status(emulator, QJ, "team-a", "support-bot-fp8", lambda s: waiting in str(s.get("conditions")),
                      what="waiting")  # fmt: skip
    gang = (await wait_children(emulator, "team-a", "support-bot", ("Job",)))["Job"]
    await start_pods(emulator, gang)
    await finish_pods(emulator, gang, exit_code=1,
                      message=termination_message({"status": "failed", "error": "CUDA out of memory"}))  # fmt: skip
    await fail_job(emulator, gang, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    await wait_phase(emulator, FTJ, "team-a", "support-bot", "Failed")
    qj = await wait_phase(emulator, QJ, "team-a", "support-bot-fp8", "Failed")
    assert condition(qj, "SourceReady")["reason"] == "SourceFailed"
    assert "CUDA out of memory" in condition(qj, "Failed")["message"]
    assert not [j for j in emulator.stored_all("batch/v1/jobs", "team-a") if "support-bot-fp8" in j["metadata"]["name"]]
