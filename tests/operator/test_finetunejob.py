"""The FineTuneJob controller, as a real process against the emulator: plan, gang, status."""

from __future__ import annotations

import copy
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubeforge.runtime.contract import termination_message
from tests.builders import DELETE, finetune
from tests.harness.cluster import (
    add_nodes,
    complete_job,
    events_for,
    fail_job,
    finish_pods,
    kueue_admits,
    owned,
    start_pods,
    wait_children,
)
from tests.harness.manifests import validate_manifest
from tests.harness.waiters import wait_for, wait_phase, wait_status

pytestmark = pytest.mark.operator

FTJ = "kubeforge.io/v1alpha1/finetunejobs"
FTJ_PATH = "/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs"
MERGE = {"Content-Type": "application/merge-patch+json"}


def job_doc(**changes):
    changes.setdefault("resources.queue", DELETE)
    return finetune(**changes)


async def create(api, doc) -> dict:
    resp = await api.post(FTJ_PATH, json=doc)
    assert resp.status == 201, await resp.text()
    return await resp.json()


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def server_fields_removed(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    for key in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"):
        obj["metadata"].pop(key, None)
    obj.pop("status", None)
    return obj


async def test_create_plans_and_renders_the_gang(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    created = await create(emulator, job_doc())
    children = await wait_children(emulator, "team-a", "support-bot", ("ConfigMap", "Service", "Job"))
    for child in children.values():
        validate_manifest(server_fields_removed(child))
        refs = child["metadata"]["ownerReferences"]
        assert refs[0]["uid"] == created["metadata"]["uid"] and refs[0]["kind"] == "FineTuneJob"
    job = children["Job"]
    assert job["spec"]["completions"] == 2 and job["spec"]["template"]["spec"]["subdomain"] == "support-bot-rdzv"

    obj = await wait_status(
        emulator,
        FTJ,
        "team-a",
        "support-bot",
        lambda s: s.get("plan") and s.get("phase") == "Waiting",
        what="the plan in status",
    )
    assert obj["status"]["plan"]["feasible"] is True and obj["status"]["plan"]["totalGPUs"] == 16
    assert condition(obj, "Planned")["status"] == "True"
    assert obj["status"]["observedGeneration"] == 1


async def test_progress_then_success_with_the_artifact(emulator, operator):
    progress = {"step": 40, "totalSteps": 200, "loss": 1.25, "tokensPerSecond": 5120.0, "etaSeconds": 600}

    class Progress(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(progress).encode()
            self.send_response(200 if self.path == "/progress" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Progress)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        await add_nodes(emulator, "h100-4x8.yaml")
        await create(emulator, job_doc())
        job = (await wait_children(emulator, "team-a", "support-bot", ("Job",)))["Job"]
        await start_pods(emulator, job, progress_port=server.server_port)
        obj = await wait_status(
            emulator,
            FTJ,
            "team-a",
            "support-bot",
            lambda s: s.get("phase") == "Running" and s.get("progress"),
            what="Running with progress",
        )
        assert obj["status"]["progress"]["step"] == 40 and obj["status"]["progress"]["percent"] == 20
        assert obj["status"]["progress"]["loss"] == 1.25 and obj["status"]["startTime"] == "2026-11-22T10:00:00Z"
        assert condition(obj, "Running")["status"] == "True"

        summary = {
            "status": "succeeded",
            "uri": "pvc://models/support-bot",
            "digest": "sha256:ab12",
            "sizeBytes": 1234,
            "metrics": {"train_loss": 0.71, "eval_loss": 0.82},
        }
        await finish_pods(emulator, job, exit_code=0, message=termination_message(summary))
        await complete_job(emulator, job)
        obj = await wait_phase(emulator, FTJ, "team-a", "support-bot", "Succeeded")
        artifact = obj["status"]["artifact"]
        assert artifact["uri"] == "pvc://models/support-bot" and artifact["digest"] == "sha256:ab12"
        assert artifact["metrics"] == {"train_loss": 0.71, "eval_loss": 0.82}
        assert condition(obj, "Succeeded")["status"] == "True"
        assert obj["status"]["completionTime"] == "2026-11-22T11:00:00Z"
    finally:
        server.shutdown()


async def test_a_failing_job_fails_with_its_reason(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc())
    job = (await wait_children(emulator, "team-a", "support-bot", ("Job",)))["Job"]
    await start_pods(emulator, job)
    await wait_phase(emulator, FTJ, "team-a", "support-bot", "Running")
    message = termination_message({"status": "failed", "error": "train.jsonl line 17: not JSON"})
    await finish_pods(emulator, job, exit_code=3, message=message)
    await fail_job(emulator, job, "PodFailurePolicy", "Container trainer exited with 3, matching FailJob rule")
    obj = await wait_phase(emulator, FTJ, "team-a", "support-bot", "Failed")
    failed = condition(obj, "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert "train.jsonl line 17: not JSON" in failed["message"]
    # terminal: the operator never recreates the gang
    await operator.restart()
    await wait_for(lambda: "Resuming is processed" in operator.logs().split("operator start #2")[-1], what="resume")
    assert len(owned(emulator, "batch/v1/jobs", "team-a", "support-bot")) == 1
    assert emulator.stored(FTJ, "team-a", "support-bot")["status"]["phase"] == "Failed"


async def test_infeasible_makes_no_children_and_retries_when_nodes_change(emulator, operator):
    await add_nodes(emulator, "a10-4x1.yaml")
    await create(emulator, job_doc(model={"uri": "hf://meta-llama/Llama-3.1-70B"}, method="full", lora=DELETE))
    obj = await wait_status(
        emulator,
        FTJ,
        "team-a",
        "support-bot",
        lambda s: condition({"status": s}, "Planned"),
        what="a Planned condition",
    )
    planned = condition(obj, "Planned")
    assert planned["status"] == "False" and planned["reason"] == "Infeasible"
    assert "does not fit" in planned["message"]
    assert obj["status"]["phase"] == "Pending"
    assert owned(emulator, "batch/v1/jobs", "team-a", "support-bot") == []
    assert owned(emulator, "v1/configmaps", "team-a", "support-bot") == []
    warning = await wait_for(
        lambda: [e for e in events_for(emulator, "team-a", "support-bot") if e.get("reason") == "Infeasible"],
        what="an Infeasible event",
    )
    assert warning[0]["type"] == "Warning"

    await add_nodes(emulator, "h100-4x8.yaml")
    children = await wait_children(emulator, "team-a", "support-bot", ("Job",))
    assert children["Job"]["spec"]["completions"] >= 1
    await wait_status(
        emulator,
        FTJ,
        "team-a",
        "support-bot",
        lambda s: (condition({"status": s}, "Planned") or {}).get("status") == "True",
        what="Planned",
    )


async def test_bad_spec_is_invalid_not_a_crash(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc(**{"lora.rank": 0}))
    obj = await wait_phase(emulator, FTJ, "team-a", "support-bot", "Failed")
    accepted = condition(obj, "Accepted")
    assert accepted["reason"] == "InvalidSpec" and "spec.lora.rank: must be > 0" in accepted["message"]
    assert owned(emulator, "batch/v1/jobs", "team-a", "support-bot") == []
    assert operator.alive


async def test_restarts_make_no_duplicates_and_a_second_pass_changes_nothing(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc())
    await wait_children(emulator, "team-a", "support-bot", ("ConfigMap", "Service", "Job"))
    await wait_phase(emulator, FTJ, "team-a", "support-bot", "Waiting")
    await operator.stop()  # nothing in flight while we take the baseline
    before = {
        kind: [c["metadata"]["resourceVersion"] for c in owned(emulator, res, "team-a", "support-bot")]
        for kind, res in (("cm", "v1/configmaps"), ("svc", "v1/services"), ("job", "batch/v1/jobs"))
    }
    applies_before = sum(1 for r in emulator if "apply-patch" in r.headers.get("Content-Type", ""))

    await operator.start()
    await wait_for(lambda: "Resuming is processed" in operator.logs().split("operator start #2")[-1], what="resume")
    await wait_for(
        lambda: operator.logs().split("operator start #2")[-1].count("Loop 'finetunejob' pass succeeded") >= 3,
        what="a few resync passes after the restart",
    )
    after = {
        kind: [c["metadata"]["resourceVersion"] for c in owned(emulator, res, "team-a", "support-bot")]
        for kind, res in (("cm", "v1/configmaps"), ("svc", "v1/services"), ("job", "batch/v1/jobs"))
    }
    assert after == before  # same objects, untouched: no duplicates, no rewrites
    applies_after = sum(1 for r in emulator if "apply-patch" in r.headers.get("Content-Type", ""))
    assert applies_after == applies_before


async def test_drift_is_corrected(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc())
    children = await wait_children(emulator, "team-a", "support-bot", ("ConfigMap", "Service", "Job"))
    cm = children["ConfigMap"]
    resp = await emulator.patch(
        f"/api/v1/namespaces/team-a/configmaps/{cm['metadata']['name']}",
        json={"data": {"contract.json": "{}"}},
        headers=MERGE,
    )
    assert resp.status == 200
    resp = await emulator.delete(f"/api/v1/namespaces/team-a/services/{children['Service']['metadata']['name']}")
    assert resp.status == 200
    await wait_children(emulator, "team-a", "support-bot", ("Service",))
    await wait_for(
        lambda: emulator.stored("v1/configmaps", "team-a", cm["metadata"]["name"])["data"]["contract.json"] != "{}",
        what="the contract restored",
    )


async def test_immutable_change_after_start_is_refused_with_an_event(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc())
    job = (await wait_children(emulator, "team-a", "support-bot", ("Job",)))["Job"]
    resp = await emulator.patch(
        f"{FTJ_PATH}/support-bot", json={"spec": {"model": {"uri": "hf://Qwen/Qwen3-4B"}}}, headers=MERGE
    )
    assert resp.status == 200
    obj = await wait_status(
        emulator,
        FTJ,
        "team-a",
        "support-bot",
        lambda s: (condition({"status": s}, "Accepted") or {}).get("reason") == "ImmutableFieldChanged",
        what="the change refused",
    )
    assert "spec.model.uri is immutable" in condition(obj, "Accepted")["message"]
    await wait_for(
        lambda: [
            e for e in events_for(emulator, "team-a", "support-bot") if e.get("reason") == "ImmutableFieldChanged"
        ],
        what="an ImmutableFieldChanged event",
    )
    (still,) = owned(emulator, "batch/v1/jobs", "team-a", "support-bot")
    assert still["metadata"]["uid"] == job["metadata"]["uid"]
    cm = owned(emulator, "v1/configmaps", "team-a", "support-bot")[0]
    assert "hf://Qwen/Qwen3-8B" in cm["data"]["contract.json"]


async def test_kueue_queue_waits_for_admission(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc(**{"resources.queue": "team-a-gpu"}))
    job = (await wait_children(emulator, "team-a", "support-bot", ("Job",)))["Job"]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpu"
    obj = await wait_status(
        emulator,
        FTJ,
        "team-a",
        "support-bot",
        lambda s: (condition({"status": s}, "Admitted") or {}).get("reason") == "Queued",
        what="Queued",
    )
    assert obj["status"]["phase"] == "Waiting"
    await kueue_admits(emulator, job)
    await wait_status(
        emulator,
        FTJ,
        "team-a",
        "support-bot",
        lambda s: (condition({"status": s}, "Admitted") or {}).get("status") == "True",
        what="Admitted",
    )


async def test_jobset_is_used_when_its_crd_is_installed(emulator, operator):
    emulator.declare("jobset.x-k8s.io/v1alpha2", "jobsets", "JobSet")
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc())
    children = await wait_children(emulator, "team-a", "support-bot", ("ConfigMap", "JobSet"))
    assert children["JobSet"]["spec"]["replicatedJobs"][0]["template"]["spec"]["completions"] == 2
    assert owned(emulator, "batch/v1/jobs", "team-a", "support-bot") == []


async def test_deleting_the_job_takes_its_children(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc())
    await wait_children(emulator, "team-a", "support-bot", ("ConfigMap", "Service", "Job"))
    resp = await emulator.delete(f"{FTJ_PATH}/support-bot")
    assert resp.status == 200
    # kopf's finalizer holds the deletion until the resync timer has stopped: at most a few seconds
    # (handlers.configure: instant_exit_timeout; kopf's default re-check after 60 s made this hang)
    await wait_for(lambda: emulator.stored(FTJ, "team-a", "support-bot") is None, what="the FineTuneJob gone")
    assert owned(emulator, "batch/v1/jobs", "team-a", "support-bot") == []
    assert owned(emulator, "v1/configmaps", "team-a", "support-bot") == []


async def test_events_and_metrics(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, job_doc())
    await wait_phase(emulator, FTJ, "team-a", "support-bot", "Waiting")
    reasons = await wait_for(
        lambda: (
            {e["reason"] for e in events_for(emulator, "team-a", "support-bot")}
            >= {"SpecValid", "Planned", "PhaseWaiting"}
        ),
        what="transition events",
    )
    assert reasons
    port = operator.env["KUBEFORGE_METRICS_PORT"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'kubeforge_reconciles_total{kind="FineTuneJob"}' in text
    assert 'kubeforge_objects{kind="FineTuneJob",phase="Waiting"} 1.0' in text
    assert "kubeforge_reconcile_duration_seconds_bucket" in text
