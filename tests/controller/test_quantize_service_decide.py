"""decide_quantize() and decide_service(): the QuantizeJob and ModelService decisions, without a cluster."""

from __future__ import annotations

import copy
import json

from kubeforge.controller.kube import Kube
from kubeforge.controller.quantize import QuantizeObserved, decide_quantize
from kubeforge.controller.reconcile import run_pass
from kubeforge.controller.retry import ApiError, Policy
from kubeforge.controller.service import Lineage, ServiceObserved, decide_service, lineage
from kubeforge.controller.state import Decision
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


def service_observed(doc: dict, now: str, lookup, inventory: Inventory, arch, **kw) -> ServiceObserved:
    """As reconcile_modelservice observes: the source's lineage resolved once, through the same lookup."""
    return ServiceObserved(doc, now, lookup, inventory, arch, lineage=lineage(doc.get("spec") or {}, lookup), **kw)


def observe_service(doc: dict, *objects: dict, children=(), inventory=H100) -> ServiceObserved:
    return service_observed(doc, NOW, lookup_of(FTJ_DONE, *objects), inventory, QWEN, children=list(children))


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
    huge = service_observed(live(service(**{"engineOptions.maxModelLen": 131072})), NOW, lookup_of(FTJ_DONE, QJ_DONE),
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


def test_the_quantization_method_is_the_observed_lineages():
    """decide_service reads the source's lineage from what was observed; it does not follow the refs again."""
    lookup = lookup_of(FTJ_DONE, QJ_DONE)
    assert lineage(service()["spec"], lookup) == Lineage(finetune()["spec"]["model"], "fp8")
    cluster = example_cluster("a100-sxm4-80gb-2x8.yaml")

    def planned(source: Lineage) -> str:
        seen = ServiceObserved(live(service()), NOW, lookup, cluster, QWEN, lineage=source)
        return cond(decide_service(seen).status, "Planned")["message"]

    assert "has no FP8 tensor cores" in planned(lineage(service()["spec"], lookup))
    assert "FP8 tensor cores" not in planned(Lineage(finetune()["spec"]["model"], None))


def test_fp8_on_gpus_without_fp8_tensor_cores_is_flagged():
    cluster = example_cluster("a100-sxm4-80gb-2x8.yaml")
    a100 = service_observed(live(service()), NOW, lookup_of(FTJ_DONE, QJ_DONE), cluster, QWEN)
    planned = cond(decide_service(a100).status, "Planned")
    assert planned["status"] == "True" and "has no FP8 tensor cores" in planned["message"]
    assert (
        "FP8 tensor cores"
        not in cond(decide_service(observe_service(live(service()), QJ_DONE)).status, "Planned")["message"]
    )


def test_a_replica_larger_than_a_node_runs_as_a_leaderworkerset_where_installed():
    doc = live(service(source={"fineTuneJobRef": {"name": "support-bot"}}, **{"engineOptions.maxModelLen": 32768}))
    a10 = example_cluster("a10-4x1.yaml")  # one 24 GB GPU per node: bf16 Qwen3-8B + 32k of KV cache needs two
    without = decide_service(service_observed(doc, NOW, lookup_of(FTJ_DONE), a10, QWEN))
    assert without.apply == [] and "need LeaderWorkerSet installed" in cond(without.status, "Planned")["message"]
    d = decide_service(service_observed(doc, NOW, lookup_of(FTJ_DONE), a10, QWEN, leaderworkerset_available=True))
    lws, svc = d.apply
    assert lws["kind"] == "LeaderWorkerSet" and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    # vLLM's LWS recipe (multiprocessing): every pod runs vllm serve; the workers headless, ranked by LWS
    assert leader["command"] == worker["command"] == ["vllm", "serve"]
    for c, rank in ((leader, "0"), (worker, "$(LWS_WORKER_INDEX)")):
        flags = dict(zip(c["args"], c["args"][1:], strict=False))
        assert (flags["--pipeline-parallel-size"], flags["--nnodes"], flags["--node-rank"]) == ("2", "2", rank)
        assert flags["--master-addr"] == "$(LWS_LEADER_ADDRESS)" and flags["--distributed-executor-backend"] == "mp"
    assert "--headless" in worker["args"] and "--headless" not in leader["args"] and "readinessProbe" not in worker
    assert svc["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert d.status["gpus"] == 2
    assert_valid(svc)
    ready = copy.deepcopy(lws)
    ready["metadata"]["generation"] = 1
    ready["status"] = {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}
    after = decide_service(service_observed(live(doc, status=d.status), NOW, lookup_of(FTJ_DONE), a10, QWEN,
                                           children=[ready, svc], leaderworkerset_available=True))  # fmt: skip
    assert after.status["phase"] == "Ready" and after.status["servedArtifact"]["digest"] == "sha256:aaa"


def test_model_paths_reach_the_engine_as_one_argument():
    doc = live(service(source={"uri": "pvc://models/it's; rm -rf"}, **{"engineOptions.maxModelLen": 32768}))
    a10 = example_cluster("a10-4x1.yaml")
    d = decide_service(service_observed(doc, NOW, lookup_of(), a10, QWEN, leaderworkerset_available=True))
    if d.apply:  # the URI may be refused by validation; if it is accepted, no shell reads it
        for role in ("leaderTemplate", "workerTemplate"):
            engine = d.apply[0]["spec"]["leaderWorkerTemplate"][role]["spec"]["containers"][0]
            assert engine["command"] == ["vllm", "serve"] and engine["args"][0] == "/mnt/pvc/models/it's; rm -rf"
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


# ---------------------------------------------------------------- QuantizeJob sizing (planner/quantize_size.py)


def sized(method: str, *, architecture=QWEN, error: str | None = None, inventory=H100):
    doc = live(quantize(method=method))
    return decide_quantize(QuantizeObserved(doc, NOW, lookup_of(FTJ_DONE), architecture=architecture,
                                            architecture_error=error, inventory=inventory))  # fmt: skip


def test_quantizejob_is_sized_from_its_source_model_and_says_how():
    from kubeforge.api.quantize import QuantizeJobStatus

    d = sized("w4a16-gptq")  # Qwen3-8B, 256 x 2048 calibration (the defaults), on the H100 cluster
    resources = d.status["resources"]
    assert resources["sizedFrom"] == "model" and resources["memory"] == "34Gi" and resources["gpus"] == 1
    assert resources["gpuType"] == "H100-SXM-80GB" and resources["gpuMemory"] == "5.6Gi"
    assert cond(d.status, "Planned")["reason"] == "Sized"
    assert cond(d.status, "Planned")["message"] == resources["reason"] and "weights 15.3 GiB" in resources["reason"]
    pod = d.apply[1]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": "34Gi", L.GPU_RESOURCE: "1"},
        "limits": {"memory": "34Gi", L.GPU_RESOURCE: "1"},
    }
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]} in terms[0][
        "matchExpressions"
    ]
    for child in d.apply:
        assert_valid(child)
    assert QuantizeJobStatus.model_validate(d.status).model_dump(by_alias=True, exclude_none=True)["resources"] == (
        resources
    )
    fp8 = sized("fp8")  # on the CPU, float32: 4 bytes a parameter
    assert fp8.status["resources"]["memory"] == "52Gi" and fp8.status["gpus"] == 0
    assert "affinity" not in fp8.apply[1]["spec"]["template"]["spec"]
    assert json.loads(fp8.apply[0]["data"][CONFIG_FILE])["compute"]["device"] == "cpu"


def test_a_quantizejob_of_unknown_size_gets_the_defaults_and_an_event_says_so():
    why = "pvc://models/support-bot is not in the planner's catalog and no config.json of it is reachable"
    d = sized("w4a16-gptq", architecture=None, error=why)
    reason = f"default resources (4 CPUs, 32 GiB, one GPU of any type): {why}"
    assert d.status["resources"] == {"sizedFrom": "defaults", "cpu": "4", "memory": "32Gi", "gpus": 1, "reason": reason}
    planned = cond(d.status, "Planned")
    assert (planned["status"], planned["reason"]) == ("True", "DefaultResources") and why in planned["message"]
    assert any(e.reason == "DefaultResources" and why in e.message for e in d.events)
    resources = d.apply[1]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"] == {"memory": "32Gi", L.GPU_RESOURCE: "1"}  # as before sizing


def test_a_quantizejob_no_pool_can_hold_waits_with_a_reason_and_creates_nothing():
    d = sized("w4a16-awq", inventory=example_cluster("a10-4x1.yaml"))  # AWQ caches 256 x 2048 tokens on the GPU
    assert d.apply == [] and d.status["phase"] == "Pending"
    planned = cond(d.status, "Planned")
    assert (planned["status"], planned["reason"]) == ("False", "Infeasible")
    assert "would fit" in planned["message"] and cond(d.status, "Stalled")["status"] == "True"
    assert any(e.type == "Warning" and e.reason == "Infeasible" for e in d.events)


def test_the_source_model_is_the_finetunejobs_base_model_or_the_uris():
    from kubeforge.controller.reconcile import source_architecture

    arch, why = source_architecture(quantize()["spec"], lookup_of(FTJ_DONE))  # its FineTuneJob trains Qwen3-8B
    assert arch is not None and arch.total_parameters == QWEN.total_parameters and why is None
    arch, why = source_architecture(quantize(source={"uri": "pvc://models/x"})["spec"], lookup_of())
    assert arch is None and why.startswith("pvc://models/x is not in the planner's catalog")
    assert source_architecture(quantize()["spec"], lookup_of()) == (None, None)  # no FineTuneJob (yet)


# ---------------------------------------------------------------- ModelService: autoscaling and routing

SCALING = {"minReplicas": 2, "maxReplicas": 8, "target": {"waitingRequestsPerReplica": 4}}
ROUTE = {"gateway": {"name": "gw"}, "endpointPicker": {"name": "epp"}}


def scaled(doc: dict, *, children=(), **apis: bool) -> ServiceObserved:
    return service_observed(doc, NOW, lookup_of(FTJ_DONE, QJ_DONE), H100, QWEN, children=list(children), **apis)


def kinds(objs: list[dict]) -> list[str]:
    return [o["kind"] for o in objs]


def serving_at(deployment: dict, replicas: int, managed: list | None = None) -> dict:
    """The Deployment as stored after an autoscaler set ``replicas``, rolled out and ready."""
    deployment = copy.deepcopy(deployment)
    deployment["metadata"].update(generation=1, managedFields=managed or [])
    deployment["spec"]["replicas"] = replicas
    deployment["status"] = {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                            "availableReplicas": replicas, "readyReplicas": replicas}  # fmt: skip
    return deployment


def test_with_autoscaling_the_operator_leaves_the_replica_count_to_the_autoscaler():
    doc = live(service(autoscaling=SCALING))
    first = decide_service(scaled(doc))
    deployment, svc, hpa = first.apply
    assert kinds(first.apply) == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert cond(first.status, "Autoscaling")["reason"] == "HorizontalPodAutoscaler"
    assert first.status["selector"] == ("app.kubernetes.io/component=engine,kubeforge.io/owner-kind=ModelService,"
                                        "kubeforge.io/owner-name=support-bot")  # fmt: skip
    for child in first.apply:
        assert_valid(child)
    # the HPA set 5 replicas: not drift, nothing applied; the status reports what the workload has
    after = decide_service(scaled(live(doc, status=first.status), children=[serving_at(deployment, 5), svc, hpa]))
    assert after.apply == [] and after.delete == [] and after.handover == []
    assert after.status["replicas"] == 5 and after.status["phase"] == "Ready"
    assert cond(after.status, "RolledOut")["status"] == "True"
    # a new artifact: the new pod template is applied, still without replicas
    newer = copy.deepcopy(QJ_DONE)
    newer["status"]["artifact"]["digest"] = "sha256:q2"
    rolling = decide_service(service_observed(live(doc, status=after.status), NOW, lookup_of(FTJ_DONE, newer), H100,
                                             QWEN, children=[serving_at(deployment, 5), svc, hpa]))  # fmt: skip
    assert kinds(rolling.apply) == ["Deployment"] and "replicas" not in rolling.apply[0]["spec"]
    assert cond(rolling.status, "RolledOut")["status"] == "False"


def test_without_autoscaling_spec_replicas_is_applied_again():
    """What `kubectl scale msvc` changes (spec.replicas) reaches the Deployment; a change made on the
    Deployment itself is drift, corrected."""
    first = decide_service(scaled(live(service(replicas=2))))
    deployment, svc = first.apply
    assert deployment["spec"]["replicas"] == 2
    drifted = decide_service(scaled(live(service(replicas=2), status=first.status),
                                    children=[serving_at(deployment, 5), svc]))  # fmt: skip
    assert kinds(drifted.apply) == ["Deployment"] and drifted.apply[0]["spec"]["replicas"] == 2
    assert cond(drifted.status, "RolledOut")["status"] == "True"  # the pod template did not change
    scaled_up = decide_service(scaled(live(service(replicas=3), generation=2, status=first.status),
                                      children=[serving_at(deployment, 2), svc]))  # fmt: skip
    assert kinds(scaled_up.apply) == ["Deployment"] and scaled_up.apply[0]["spec"]["replicas"] == 3


def test_switching_autoscaling_on_hands_the_replicas_over_first():
    """The live Deployment lists replicas among kubeforge's applied fields: the pass applies them (at the live
    value) as the handover manager, then the Deployment without them, so the count is not reset to 1."""
    plain = decide_service(scaled(live(service(replicas=6))))
    deployment, svc = plain.apply
    ours = [{"manager": "kubeforge", "operation": "Apply", "apiVersion": "apps/v1",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}}}]  # fmt: skip
    doc = live(service(replicas=6, autoscaling=SCALING), generation=2, status=plain.status)
    d = decide_service(scaled(doc, children=[serving_at(deployment, 6, ours), svc]))
    assert d.handover == [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": deployment["metadata"]["name"], "namespace": "team-a"}, "spec": {"replicas": 6}}]  # fmt: skip
    assert kinds(d.apply) == ["Deployment", "HorizontalPodAutoscaler"] and "replicas" not in d.apply[0]["spec"]
    assert cond(d.status, "RolledOut")["status"] == "True"  # an apply, but the same pod template
    # once kubeforge's apply no longer lists replicas (the handover manager, or the HPA, holds them): nothing more
    handover = {"manager": "kubeforge-handover", "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    theirs = [{**ours[0], "fieldsV1": {"f:spec": {"f:template": {}}}}, handover]
    later = decide_service(scaled(doc, children=[serving_at(deployment, 6, theirs), svc, d.apply[1]]))
    assert later.handover == [] and later.apply == []
    # without autoscaling there is never a handover
    fixed = decide_service(scaled(live(service(replicas=6)), children=[serving_at(deployment, 6, ours), svc]))
    assert fixed.handover == []


def test_keda_replaces_the_hpa_and_removing_autoscaling_deletes_the_autoscaler():
    doc = live(service(autoscaling=SCALING))
    hpa_pass = decide_service(scaled(doc))
    deployment, svc, hpa = hpa_pass.apply
    keda_hpa = copy.deepcopy(hpa)  # KEDA's own HPA: it carries its ScaledObject's labels, so ours
    keda_hpa["metadata"]["name"] = f"keda-hpa-{hpa['metadata']['name']}"
    kids = [serving_at(deployment, 3), svc, hpa, keda_hpa]
    keda = decide_service(scaled(live(doc, status=hpa_pass.status), children=kids, keda_available=True))
    assert kinds(keda.apply) == ["ScaledObject"] and cond(keda.status, "Autoscaling")["reason"] == "ScaledObject"
    assert keda.delete == [{"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                            "metadata": {"name": hpa["metadata"]["name"], "namespace": "team-a"}}]  # fmt: skip
    off = live(service(replicas=2), generation=2, status=keda.status)
    d = decide_service(scaled(off, children=[serving_at(deployment, 3), svc, keda.apply[0], keda_hpa],
                              keda_available=True))  # fmt: skip
    assert kinds(d.delete) == ["ScaledObject"]  # KEDA removes its HPA with it; that one is never ours to delete
    assert kinds(d.apply) == ["Deployment"] and d.apply[0]["spec"]["replicas"] == 2
    assert cond(d.status, "Autoscaling") is None


def test_autoscaling_on_a_cpu_cluster_falls_back_to_spec_replicas():
    doc = live(service(engine="auto", replicas=2, autoscaling=SCALING))
    d = decide_service(service_observed(doc, NOW, lookup_of(FTJ_DONE, QJ_DONE), Inventory((), ()), QWEN))
    assert kinds(d.apply) == ["Deployment", "Service"] and d.apply[0]["spec"]["replicas"] == 2
    assert cond(d.status, "Autoscaling")["status"] == "False"
    assert cond(d.status, "Autoscaling")["reason"] == "EngineHasNoMetrics"


def test_route_renders_where_the_apis_are_and_goes_with_the_spec():
    doc = live(service(route=ROUTE))
    nothing = decide_service(scaled(doc))
    assert kinds(nothing.apply) == ["Deployment", "Service"]
    assert cond(nothing.status, "Routed")["reason"] == "GatewayAPINotInstalled"
    plain = decide_service(scaled(doc, gateway_available=True))
    assert kinds(plain.apply) == ["Deployment", "Service", "HTTPRoute"]
    assert cond(plain.status, "Routed")["reason"] == "InferencePoolNotInstalled"
    pooled = decide_service(scaled(doc, gateway_available=True, inference_pool_available=True))
    deployment, svc, pool, route = pooled.apply
    assert kinds(pooled.apply) == ["Deployment", "Service", "InferencePool", "HTTPRoute"]
    assert route["spec"]["rules"][0]["backendRefs"][0]["kind"] == "InferencePool"
    assert cond(pooled.status, "Routed")["reason"] == "InferencePool"
    kids = [serving_at(deployment, 2), svc, pool, route]
    steady = decide_service(scaled(live(doc, status=pooled.status), children=kids, gateway_available=True,
                                   inference_pool_available=True))  # fmt: skip
    assert steady.apply == [] and steady.delete == []
    no_picker = live(service(route={"gateway": {"name": "gw"}}), generation=2, status=steady.status)
    d = decide_service(scaled(no_picker, children=kids, gateway_available=True, inference_pool_available=True))
    assert kinds(d.delete) == ["InferencePool"] and kinds(d.apply) == ["HTTPRoute"]
    assert d.apply[0]["spec"]["rules"][0]["backendRefs"][0]["kind"] == "Service"
    gone = decide_service(scaled(live(service(), generation=3, status=d.status), children=kids,
                                 gateway_available=True, inference_pool_available=True))  # fmt: skip
    assert kinds(gone.delete) == ["HTTPRoute", "InferencePool"] and gone.apply == []
    assert cond(gone.status, "Routed") is None


def test_statuses_with_autoscaling_and_routing_fit_the_crd_status_schema():
    from kubeforge.api.service import ModelServiceStatus

    doc = live(service(autoscaling=SCALING, route=ROUTE))
    d = decide_service(scaled(doc, keda_available=True, gateway_available=True, inference_pool_available=True))
    deployment, svc, *rest = d.apply
    everything = {"keda_available": True, "gateway_available": True, "inference_pool_available": True}
    after = decide_service(scaled(live(doc, status=d.status), children=[serving_at(deployment, 4), svc, *rest],
                                  **everything))  # fmt: skip
    for status in (d.status, after.status):
        ModelServiceStatus.model_validate(status)
    assert {c["type"] for c in after.status["conditions"]} >= {"Autoscaling", "Routed"}


class RecordingKube(Kube):
    """controller/kube.Kube with its one HTTP attempt replaced: records each request, answers from ``answers``."""

    def __init__(self, answers: dict[str, int] | None = None):
        super().__init__(api_client=object(), policy=Policy(base=0.001, cap=0.001, deadline=1.0), timeout=1.0)
        self.answers = answers or {}
        self.calls: list[tuple] = []

    def request(self, method, path, body=None, query=None, content_type="application/json"):
        self.calls.append((method, path, dict(query or []), content_type, body))
        status = self.answers.get(method, 200)
        if status >= 400:
            raise ApiError(status, "Conflict" if status == 409 else "NotFound", "{}")
        return body


def test_the_handover_applies_without_force_and_a_conflict_means_someone_owns_it():
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "team-a"},
           "spec": {"replicas": 6}}  # fmt: skip
    kube = RecordingKube()
    assert kube.hand_over(obj) is True
    ((method, path, query, content_type, body),) = kube.calls
    assert (method, path) == ("PATCH", "/apis/apps/v1/namespaces/team-a/deployments/d")
    assert query == {"fieldManager": "kubeforge-handover"} and content_type == "application/apply-patch+yaml"
    assert body == obj
    assert RecordingKube({"PATCH": 409}).hand_over(obj) is False  # an autoscaler holds another value already


def test_children_are_deleted_by_path_and_a_missing_one_is_no_error():
    obj = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "s", "namespace": "team-a"}}
    kube = RecordingKube()
    assert kube.delete(obj) is True
    assert kube.calls[0][:2] == ("DELETE", "/apis/keda.sh/v1alpha1/namespaces/team-a/scaledobjects/s")
    assert kube.calls[0][4] == {"propagationPolicy": "Background"}
    assert RecordingKube({"DELETE": 404}).delete(obj) is False


def test_a_pass_deletes_then_hands_over_then_applies():
    """KEDA refuses a ScaledObject for a workload an HPA scales: the HPA goes first; the handover must
    precede the apply that drops replicas."""
    body = live(service())
    body["metadata"]["resourceVersion"] = "1"
    workload = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "team-a"}}
    decision = Decision(status={}, apply=[workload],
                        delete=[{**workload, "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler"}],
                        handover=[{**workload, "spec": {"replicas": 3}}])  # fmt: skip
    kube = RecordingKube()
    run_pass(body, [workload], lambda obj, children: decision, kube)  # the Deployment is the service's already
    assert [(m, q.get("fieldManager"), p.rsplit("/", 2)[-2]) for m, p, q, _, _ in kube.calls] == [
        ("DELETE", None, "horizontalpodautoscalers"),
        ("PATCH", "kubeforge-handover", "deployments"),
        ("PATCH", "kubeforge", "deployments"),
    ]


# ---------------------------------------------------------------- ModelService: LoRA adapters (issue 14)


def adapter_job(phase: str | None, artifact: dict | None = None, *, name: str = "support-lora", **spec) -> dict:
    """A FineTuneJob that exports its adapter (output.merge false), rank 64, to pvc://adapters/<name>."""
    doc = live(finetune(output={"uri": f"pvc://adapters/{name}", "merge": False}, **spec))
    doc["metadata"]["name"] = name
    doc["status"] = {"phase": phase, "conditions": []} if phase else {}
    if artifact:
        doc["status"]["artifact"] = artifact
    return doc


LORA_REF = {"name": "support", "fineTuneJobRef": {"name": "support-lora"}}
LEGAL = {"name": "legal", "uri": "s3://bucket/legal-lora"}


def adapters_of(d) -> dict[str, dict]:
    return {a["name"]: a for a in d.status["adapters"]}


def pod_of(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def listed(configmap: dict) -> list[tuple[str, str, str | None]]:
    from kubeforge.runtime.contract import ADAPTERS_CONFIG_FILE, AdapterSet

    data = AdapterSet.model_validate_json(configmap["data"][ADAPTERS_CONFIG_FILE])
    return [(a.name, a.location.uri, a.digest) for a in data.adapters]


def sidecar_args(workload: dict) -> dict[str, str]:
    (sidecar,) = [c for c in pod_of(workload)["initContainers"] if c["name"] == "adapters"]
    return dict(zip(sidecar["args"][::2], sidecar["args"][1::2], strict=True))


def test_a_finetunejobs_adapter_is_served_once_it_succeeded_without_restarting_the_replicas():
    doc = live(service(adapters=[LORA_REF, LEGAL]))
    waiting = decide_service(observe_service(doc, QJ_DONE, adapter_job("Running")))
    deployment, svc, cm = waiting.apply
    assert listed(cm) == [("legal", "s3://bucket/legal-lora", None)]  # the URI at once; the job's adapter waits
    assert adapters_of(waiting)["support"]["phase"] == "Pending" and adapters_of(waiting)["legal"]["phase"] == \
        "Configured"  # fmt: skip
    assert cond(waiting.status, "AdaptersReady")["reason"] == "WaitingForAdapter"
    assert sidecar_args(deployment)["--min-rank"] == "64"  # the job's spec.lora.rank, known before it finishes
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_of(deployment)["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert "adapters" in claims  # its output's claim, mounted before the artifact is there
    for child in (deployment, svc, cm):
        assert_valid(child)

    done = adapter_job("Succeeded", {"uri": "pvc://adapters/support-lora", "digest": "sha256:l1"})
    kids = [rolled(deployment, 1, 2), svc, cm]
    served = decide_service(observe_service(live(doc, status=waiting.status), QJ_DONE, done, children=kids))
    assert [c["kind"] for c in served.apply] == ["ConfigMap"]  # the pod template is the same: no rollout
    assert listed(served.apply[0]) == [("support", "pvc://adapters/support-lora", "sha256:l1"),
                                       ("legal", "s3://bucket/legal-lora", None)]  # fmt: skip
    assert adapters_of(served)["support"] == {"name": "support", "model": "support", "phase": "Configured",
                                             "uri": "pvc://adapters/support-lora", "digest": "sha256:l1",
                                             "rank": 64}  # fmt: skip
    assert cond(served.status, "AdaptersReady")["status"] == "True"
    assert cond(served.status, "RolledOut")["status"] == "True"

    retrained = adapter_job("Succeeded", {"uri": "pvc://adapters/support-lora", "digest": "sha256:l2"})
    kids = [rolled(deployment, 1, 2), svc, served.apply[0]]
    again = decide_service(observe_service(live(doc, status=served.status), QJ_DONE, retrained, children=kids))
    assert [c["kind"] for c in again.apply] == ["ConfigMap"] and listed(again.apply[0])[0][2] == "sha256:l2"


def test_adding_and_removing_uri_adapters_changes_the_list_not_the_pods():
    legal = {**LEGAL, "rank": 16}
    first = decide_service(observe_service(live(service(adapters=[legal])), QJ_DONE))
    deployment, svc, cm = first.apply
    kids = [rolled(deployment, 1, 2), svc, cm]
    sql = {"name": "sql", "uri": "hf://acme/sql-lora", "rank": 8}  # within the rank the engines started with
    more = decide_service(observe_service(live(service(adapters=[legal, sql]), 2, first.status), QJ_DONE,
                                          children=kids))  # fmt: skip
    assert [c["kind"] for c in more.apply] == ["ConfigMap"] and [n for n, _, _ in listed(more.apply[0])] == [
        "legal", "sql"]  # fmt: skip
    fewer = decide_service(observe_service(live(service(adapters=[legal]), 3, more.status), QJ_DONE,
                                           children=[rolled(deployment, 1, 2), svc, more.apply[0]]))  # fmt: skip
    assert [c["kind"] for c in fewer.apply] == ["ConfigMap"] and list(adapters_of(fewer)) == ["legal"]
    # (removing legal instead would lower the engines' rank to sql's 8: a new template, less memory reserved)
    none = decide_service(observe_service(live(service(), 4, fewer.status), QJ_DONE,
                                          children=[rolled(deployment, 1, 2), svc, fewer.apply[0]]))  # fmt: skip
    assert [c["kind"] for c in none.apply] == ["Deployment"]  # no LoRA at all: a new template, without the sidecar
    assert "initContainers" not in pod_of(none.apply[0])
    assert none.delete == [{"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "support-bot-adapters", "namespace": "team-a"}}]  # fmt: skip
    assert none.status["adapters"] == [] and cond(none.status, "AdaptersReady") is None


def test_what_cannot_be_served_is_reported_and_the_rest_is_served():
    merged = adapter_job("Succeeded", {"uri": "pvc://models/merged", "digest": "sha256:m"}, name="merged")
    merged["spec"]["output"]["merge"] = True
    big = {"name": "big", "uri": "hf://acme/big-lora", "rank": 1024}
    doc = live(service(adapters=[{"name": "m", "fineTuneJobRef": {"name": "merged"}}, big, LEGAL]))
    d = decide_service(observe_service(doc, QJ_DONE, merged))
    status = adapters_of(d)
    assert status["m"]["phase"] == "Failed" and "does not export an adapter" in status["m"]["message"]
    assert status["big"]["phase"] == "Failed" and "vLLM serves LoRA ranks up to 512" in status["big"]["message"]
    assert listed(d.apply[2]) == [("legal", "s3://bucket/legal-lora", None)]
    assert cond(d.status, "AdaptersReady")["reason"] == "AdapterFailed" and d.status["phase"] == "Deploying"
    assert sidecar_args(d.apply[0])["--min-rank"] == "1"  # 1024 does not count: vLLM cannot start with it
    sglang = decide_service(observe_service(live(service(engine="sglang", adapters=[big])), QJ_DONE))
    assert adapters_of(sglang)["big"] == {"name": "big", "model": "support-bot:big", "phase": "Configured",
                                          "uri": "hf://acme/big-lora", "rank": 1024}  # fmt: skip
    assert sidecar_args(sglang.apply[0])["--min-rank"] == "1024"
    failed_job = adapter_job("Failed")
    failed_job["status"]["conditions"] = [{"type": "Failed", "status": "True", "message": "OOM"}]
    d = decide_service(observe_service(live(service(adapters=[LORA_REF])), QJ_DONE, failed_job))
    assert adapters_of(d)["support"]["phase"] == "Failed" and "OOM" in adapters_of(d)["support"]["message"]


def test_the_transformers_server_serves_adapters_on_cpu():
    doc = live(service(engine="auto", adapters=[LEGAL, LORA_REF]))
    done = adapter_job("Succeeded", {"uri": "pvc://adapters/support-lora", "digest": "sha256:l1"})
    d = decide_service(observe_service(doc, QJ_DONE, done, inventory=Inventory((), ())))
    assert d.status["engine"] == "transformers" and cond(d.status, "AdaptersReady")["status"] == "True"
    assert [a["model"] for a in d.status["adapters"]] == ["legal", "support"]
    engine = pod_of(d.apply[0])["containers"][0]
    assert engine["command"] == ["python", "-m", "kubeforge.runtime.serve"] and "--enable-lora" in engine["args"]
    assert sidecar_args(d.apply[0])["--engine"] == "transformers"
    for child in d.apply:
        assert_valid(child)


def test_adapter_memory_is_planned_and_adapters_keep_a_replica_on_one_node():
    a10 = example_cluster("a10-4x1.yaml")
    doc = live(service(source={"fineTuneJobRef": {"name": "support-bot"}}, adapters=[LEGAL],
                       **{"engineOptions.maxModelLen": 32768}))  # fmt: skip
    d = decide_service(
        service_observed(doc, NOW, lookup_of(FTJ_DONE, QJ_DONE), a10, QWEN, leaderworkerset_available=True)
    )
    assert d.apply == [] and "replicas with LoRA adapters stay on one node" in cond(d.status, "Planned")["message"]
    fits = decide_service(observe_service(live(service(adapters=[LEGAL])), QJ_DONE))
    assert "+ LoRA" in cond(fits.status, "Planned")["message"]


def test_sglang_runs_across_nodes_as_a_leaderworkerset():
    doc = live(service(engine="sglang", source={"fineTuneJobRef": {"name": "support-bot"}},
                       **{"engineOptions.maxModelLen": 32768}))  # fmt: skip
    a10 = example_cluster("a10-4x1.yaml")
    d = decide_service(service_observed(doc, NOW, lookup_of(FTJ_DONE), a10, QWEN, leaderworkerset_available=True))
    (lws, _) = d.apply
    group = lws["spec"]["leaderWorkerTemplate"]
    leader, worker = (group[r]["spec"]["containers"][0] for r in ("leaderTemplate", "workerTemplate"))
    assert leader["command"] == worker["command"] == ["python3", "-m", "sglang.launch_server"]
    for c, rank in ((leader, "0"), (worker, "$(LWS_WORKER_INDEX)")):
        flags = dict(zip(c["args"], c["args"][1:], strict=False))
        assert (flags["--tp-size"], flags["--pp-size"], flags["--nnodes"], flags["--node-rank"]) == (
            "1",
            "2",
            "2",
            rank,
        )
        assert flags["--dist-init-addr"] == "$(LWS_LEADER_ADDRESS):20000"
    assert d.status["engine"] == "sglang" and d.status["gpus"] == 2


def test_statuses_with_adapters_fit_the_crd_status_schema():
    from kubeforge.api.service import ModelServiceStatus

    big = {"name": "big", "uri": "hf://acme/big-lora", "rank": 1024}
    d = decide_service(observe_service(live(service(adapters=[LORA_REF, LEGAL, big])), QJ_DONE, adapter_job("Running")))
    ModelServiceStatus.model_validate(d.status)
    assert {a["phase"] for a in d.status["adapters"]} == {"Pending", "Configured", "Failed"}
