"""decide_quantize() and decide_service(): the QuantizeJob and ModelService decisions, without a cluster."""

from __future__ import annotations

import copy
import json

from kubeforge.controller.quantize import QuantizeObserved, decide_quantize
from kubeforge.controller.service import ServiceObserved, decide_service
from kubeforge.inventory.pools import Inventory
from kubeforge.planner.catalog import lookup as catalog
from kubeforge.render import labels as L
from kubeforge.runtime.contract import CONFIG_FILE, termination_message
from tests.builders import finetune, quantize, service
from tests.harness.manifests import validate_manifest as assert_valid
from tests.planner.nodes import example_cluster

NOW = "2026-11-22T10:00:00Z"
H100 = example_cluster("h100-4x8.yaml")
QWEN = catalog("Qwen/Qwen3-8B")


def live(doc: dict, generation: int = 1, status: dict | None = None) -> dict:
    doc = copy.deepcopy(doc)
    doc["metadata"].update(uid=f"uid-{doc['metadata']['name']}", generation=generation)
    if status is not None:
        doc["status"] = status
    return doc


def cond(status: dict, type_: str) -> dict | None:
    return next((c for c in status["conditions"] if c["type"] == type_), None)


def upstream(phase: str | None, artifact: dict | None = None, kind: str = "FineTuneJob") -> dict:
    doc = live(finetune() if kind == "FineTuneJob" else quantize())
    doc["status"] = {"phase": phase, "conditions": []} if phase else {}
    if artifact:
        doc["status"]["artifact"] = artifact
    return doc


def lookup_of(*objects: dict):
    table = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    return lambda kind, name: table.get((kind, name))


FTJ_DONE = upstream("Succeeded", {"uri": "pvc://models/support-bot", "digest": "sha256:aaa"})


def test_quantizejob_waits_for_its_finetunejob():
    d = decide_quantize(QuantizeObserved(live(quantize()), NOW, lookup_of(upstream("Running"))))
    assert d.apply == [] and d.status["phase"] == "Waiting"
    assert cond(d.status, "SourceReady")["reason"] == "WaitingForSource"
    missing = decide_quantize(QuantizeObserved(live(quantize()), NOW, lookup_of()))
    assert "does not exist" in cond(missing.status, "SourceReady")["message"]


def test_quantizejob_fails_when_its_source_failed():
    failed = upstream("Failed")
    failed["status"]["conditions"] = [{"type": "Failed", "status": "True", "message": "OOM on rank 3"}]
    d = decide_quantize(QuantizeObserved(live(quantize()), NOW, lookup_of(failed)))
    assert d.status["phase"] == "Failed" and d.apply == []
    assert (
        cond(d.status, "SourceReady")["reason"] == "SourceFailed"
        and "OOM on rank 3" in cond(d.status, "Failed")["message"]
    )


def test_quantizejob_renders_once_the_source_succeeded():
    d = decide_quantize(QuantizeObserved(live(quantize(method="w4a16-gptq")), NOW, lookup_of(FTJ_DONE)))
    assert [c["kind"] for c in d.apply] == ["ConfigMap", "Job"]
    for child in d.apply:
        assert_valid(child)
    contract = json.loads(d.apply[0]["data"][CONFIG_FILE])
    assert contract["source"] == {"uri": "pvc://models/support-bot", "local_path": "/mnt/pvc/models/support-bot",
                                  "revision": None}  # fmt: skip
    assert contract["calibration"]["location"]["uri"] == finetune()["spec"]["dataset"]["uri"]  # the training data
    pod = d.apply[1]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"][L.GPU_RESOURCE] == "1"  # GPTQ calibrates on a GPU
    assert d.status["source"] == {"uri": "pvc://models/support-bot", "digest": "sha256:aaa"}
    fp8 = decide_quantize(QuantizeObserved(live(quantize()), NOW, lookup_of(FTJ_DONE)))
    assert L.GPU_RESOURCE not in fp8.apply[1]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_quantizejob_success_carries_the_artifact_and_metrics():
    first = decide_quantize(QuantizeObserved(live(quantize()), NOW, lookup_of(FTJ_DONE)))
    job = copy.deepcopy(first.apply[1])
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "completionTime": NOW}
    summary = {"status": "succeeded", "uri": "pvc://models/support-bot-fp8", "digest": "sha256:bbb",
               "metrics": {"perplexity_before": 5.1, "perplexity_after": 5.2}}  # fmt: skip
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Succeeded", "containerStatuses": [
        {"state": {"terminated": {"exitCode": 0, "message": termination_message(summary)}}}]}}  # fmt: skip
    d = decide_quantize(QuantizeObserved(live(quantize(), status=first.status), NOW, lookup_of(FTJ_DONE),
                                         children=[first.apply[0], job], pods=[pod]))  # fmt: skip
    assert d.status["phase"] == "Succeeded"
    assert d.status["artifact"]["digest"] == "sha256:bbb" and d.status["metrics"]["perplexity_after"] == 5.2


QJ_DONE = upstream("Succeeded", {"uri": "pvc://models/support-bot-fp8", "digest": "sha256:q1"}, kind="QuantizeJob")


def observe_service(doc: dict, *objects: dict, children=(), inventory=H100) -> ServiceObserved:
    return ServiceObserved(doc, NOW, lookup_of(FTJ_DONE, *objects), inventory, QWEN, children=list(children))


def test_modelservice_waits_then_deploys_the_quantized_artifact():
    waiting = decide_service(observe_service(live(service()), upstream("Running", kind="QuantizeJob")))
    assert waiting.status["phase"] == "Waiting" and waiting.apply == []
    d = decide_service(observe_service(live(service()), QJ_DONE))
    assert [c["kind"] for c in d.apply] == ["Deployment", "Service"]
    for child in d.apply:
        assert_valid(child)
    deployment = d.apply[0]
    engine = deployment["spec"]["template"]["spec"]["containers"][0]
    assert engine["command"] == ["vllm", "serve"] and engine["args"][0] == "/mnt/pvc/models/support-bot-fp8"
    tp = engine["args"][engine["args"].index("--tensor-parallel-size") + 1]
    assert tp == "1"  # Qwen3-8B in FP8 + an 8k KV cache fits one H100
    assert engine["readinessProbe"]["httpGet"]["path"] == "/health"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations[L.ARTIFACT_DIGEST] == "sha256:q1"
    assert d.status["endpoint"] == "http://support-bot.team-a.svc:8000/v1" and d.status["engine"] == "vllm"


def rolled(deployment: dict, generation: int, ready: int) -> dict:
    deployment = copy.deepcopy(deployment)
    deployment["metadata"]["generation"] = generation
    n = deployment["spec"]["replicas"]
    deployment["status"] = {"observedGeneration": generation, "replicas": n, "updatedReplicas": n,
                            "availableReplicas": ready, "readyReplicas": ready}  # fmt: skip
    return deployment


def test_modelservice_rolls_over_to_a_new_artifact_and_reports_what_is_served():
    first = decide_service(observe_service(live(service()), QJ_DONE))
    deployment, svc = first.apply
    ready = decide_service(observe_service(live(service(), status=first.status), QJ_DONE,
                                           children=[rolled(deployment, 1, 2), svc]))  # fmt: skip
    assert ready.apply == [] and ready.status["phase"] == "Ready" and ready.status["readyReplicas"] == 2
    assert ready.status["servedArtifact"]["digest"] == "sha256:q1"

    newer = copy.deepcopy(QJ_DONE)
    newer["status"]["artifact"]["digest"] = "sha256:q2"
    rolling = decide_service(observe_service(live(service(), status=ready.status), newer,
                                             children=[rolled(deployment, 1, 2), svc]))  # fmt: skip
    assert [c["kind"] for c in rolling.apply] == ["Deployment"]
    assert rolling.apply[0]["spec"]["template"]["metadata"]["annotations"][L.ARTIFACT_DIGEST] == "sha256:q2"
    assert rolling.status["servedArtifact"]["digest"] == "sha256:q1"  # the old one serves until the rollout ends
    midway = copy.deepcopy(rolling.apply[0])
    midway["metadata"]["generation"] = 2
    midway["status"] = {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2,
                        "readyReplicas": 2}  # fmt: skip
    during = decide_service(observe_service(live(service(), status=rolling.status), newer, children=[midway, svc]))
    assert during.status["servedArtifact"]["digest"] == "sha256:q1" and during.status["phase"] == "Ready"
    assert cond(during.status, "RolledOut")["status"] == "False"
    done = decide_service(observe_service(live(service(), status=during.status), newer,
                                          children=[rolled(rolling.apply[0], 2, 2), svc]))  # fmt: skip
    assert done.status["servedArtifact"]["digest"] == "sha256:q2"


def test_modelservice_on_cpu_uses_transformers_and_a_big_model_is_refused_with_sizes():
    cpu = decide_service(observe_service(live(service(engine="auto")), QJ_DONE, inventory=Inventory((), ())))
    engine = cpu.apply[0]["spec"]["template"]["spec"]["containers"][0]
    assert engine["command"] == ["python", "-m", "kubeforge.runtime.serve"] and cpu.status["gpus"] == 0
    huge = ServiceObserved(live(service(**{"engineOptions.maxModelLen": 131072})), NOW, lookup_of(FTJ_DONE, QJ_DONE),
                           example_cluster("a10-4x1.yaml"), catalog("meta-llama/Llama-3.1-70B"))  # fmt: skip
    refused = decide_service(huge)
    assert refused.apply == [] and cond(refused.status, "Planned")["reason"] == "Infeasible"
    assert "do not fit one node" in cond(refused.status, "Planned")["message"]


def test_modelservice_downloads_s3_artifacts_in_an_init_container():
    doc = live(service(source={"uri": "s3://models/bot"}, credentials={"s3": {"name": "s3-creds"}}))
    d = decide_service(observe_service(doc))
    pod = d.apply[0]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"] == ["s3://models/bot", "/mnt/model"] and init["envFrom"] == [
        {"secretRef": {"name": "s3-creds"}}
    ]
    assert pod["containers"][0]["args"][0] == "/mnt/model"
    assert_valid(d.apply[0])


def test_fp8_on_gpus_without_fp8_tensor_cores_is_flagged():
    cluster = example_cluster("a100-sxm4-80gb-2x8.yaml")
    a100 = ServiceObserved(live(service()), NOW, lookup_of(FTJ_DONE, QJ_DONE), cluster, QWEN)
    planned = cond(decide_service(a100).status, "Planned")
    assert planned["status"] == "True" and "has no FP8 tensor cores" in planned["message"]
    assert (
        "FP8 tensor cores"
        not in cond(decide_service(observe_service(live(service()), QJ_DONE)).status, "Planned")["message"]
    )


def test_a_replica_larger_than_a_node_runs_as_a_leaderworkerset_where_installed():
    doc = live(service(source={"fineTuneJobRef": {"name": "support-bot"}}, **{"engineOptions.maxModelLen": 32768}))
    a10 = example_cluster("a10-4x1.yaml")  # one 24 GB GPU per node: bf16 Qwen3-8B + 32k of KV cache needs two
    without = decide_service(ServiceObserved(doc, NOW, lookup_of(FTJ_DONE), a10, QWEN))
    assert without.apply == [] and "need LeaderWorkerSet installed" in cond(without.status, "Planned")["message"]
    d = decide_service(ServiceObserved(doc, NOW, lookup_of(FTJ_DONE), a10, QWEN, leaderworkerset_available=True))
    lws, svc = d.apply
    assert lws["kind"] == "LeaderWorkerSet" and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    assert leader["command"] == ["/bin/sh", "-c"] and "--pipeline-parallel-size 2" in leader["args"][0]
    assert "ray start --address=$(LWS_LEADER_ADDRESS)" in worker["args"][0] and "readinessProbe" not in worker
    assert svc["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert d.status["gpus"] == 2
    assert_valid(svc)
    ready = copy.deepcopy(lws)
    ready["metadata"]["generation"] = 1
    ready["status"] = {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}
    after = decide_service(ServiceObserved(live(doc, status=d.status), NOW, lookup_of(FTJ_DONE), a10, QWEN,
                                           children=[ready, svc], leaderworkerset_available=True))  # fmt: skip
    assert after.status["phase"] == "Ready" and after.status["servedArtifact"]["digest"] == "sha256:aaa"


def test_model_paths_reach_the_shell_quoted():
    doc = live(service(source={"uri": "pvc://models/it's; rm -rf"}, **{"engineOptions.maxModelLen": 32768}))
    a10 = example_cluster("a10-4x1.yaml")
    d = decide_service(ServiceObserved(doc, NOW, lookup_of(), a10, QWEN, leaderworkerset_available=True))
    if d.apply:  # the URI may be refused by validation; if it is accepted it must be quoted
        script = d.apply[0]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["args"][0]
        assert "'/mnt/pvc/models/it'\"'\"'s; rm -rf'" in script
    else:
        assert cond(d.status, "Accepted")["status"] == "False"


def test_every_status_written_fits_the_crd_status_schema():
    """A real API server prunes what its structural schema lacks: what we write must fit the models."""
    from kubeforge.api.quantize import QuantizeJobStatus
    from kubeforge.api.service import ModelServiceStatus

    first = decide_quantize(QuantizeObserved(live(quantize()), NOW, lookup_of(FTJ_DONE)))
    job = copy.deepcopy(first.apply[1])
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "completionTime": NOW}
    summary = {"status": "succeeded", "uri": "pvc://m/q", "digest": "sha256:b", "sizeBytes": 10, "metrics": {"x": 1}}
    pod = {"metadata": {"name": "p"}, "status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": 0, "message": termination_message(summary)}}}]}}  # fmt: skip
    done = decide_quantize(QuantizeObserved(live(quantize(), status=first.status), NOW, lookup_of(FTJ_DONE),
                                            children=[first.apply[0], job], pods=[pod]))  # fmt: skip
    for status in (first.status, done.status):
        assert QuantizeJobStatus.model_validate(status).model_dump(by_alias=True, exclude_none=True)
    d = decide_service(observe_service(live(service()), QJ_DONE))
    deployment, svc = d.apply
    ready = decide_service(observe_service(live(service(), status=d.status), QJ_DONE,
                                           children=[rolled(deployment, 1, 2), svc]))  # fmt: skip
    for status in (d.status, ready.status):
        ModelServiceStatus.model_validate(status)
