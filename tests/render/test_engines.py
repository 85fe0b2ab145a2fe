"""The engines' command lines: the flags each pinned engine accepts, LoRA adapters, prefix caching; a
ModelService's adapters (list, sidecar, what changes the pod template); a replica across nodes as a
LeaderWorkerSet, checked against LWS's own CRD (vendored in tests/assets/lws/) and its pods as Pods."""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.api import parse
from kubeforge.inventory.pools import Inventory
from kubeforge.planner.serving import plan_serving
from kubeforge.render import engines
from kubeforge.render.adapters import LoraRollout, ServedLora
from kubeforge.render.engines import launch, lora_slots, multi_node, rank_from_file
from kubeforge.render.images import SGLANG_IMAGE, SGLANG_VERSION, VLLM_IMAGE, VLLM_VERSION
from kubeforge.render.service import render_service
from kubeforge.runtime.contract import ADAPTERS_CONFIG_FILE, AdapterSet
from tests.builders import service
from tests.harness.crdschema import apply_defaults, cel_violations, schema_errors
from tests.harness.manifests import validate_manifest
from tests.planner.nodes import example_cluster
from tests.render.rendering import QWEN, pod_templates, with_name

COMMON = {"model_path": "/m", "served_name": "bot", "tensor_parallel": 2, "max_model_len": 8192,
          "gpu_memory_utilization": 0.85}  # fmt: skip


def pairs(args: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(args, [*args[1:], ""], strict=True) if a.startswith("--")}


def test_vllm():
    e = launch("vllm", **COMMON, prefix_caching=False, adapters=[("a", "/x"), ("b", "/y")])
    assert e.image == VLLM_IMAGE and e.image.endswith(VLLM_VERSION) and e.command == ["vllm", "serve"]
    assert e.args[0] == "/m"
    p = pairs(e.args)
    assert (p["--tensor-parallel-size"], p["--max-model-len"], p["--gpu-memory-utilization"]) == ("2", "8192", "0.85")
    assert "--no-enable-prefix-caching" in e.args and p["--max-loras"] == "2"
    assert e.args[e.args.index("--lora-modules") + 1 :][:2] == ["a=/x", "b=/y"]


def test_sglang():
    e = launch("sglang", **COMMON, prefix_caching=True, adapters=[("a", "/x")])
    assert e.image == SGLANG_IMAGE and e.image.endswith(SGLANG_VERSION)
    assert e.command == ["python3", "-m", "sglang.launch_server"]
    p = pairs(e.args)
    assert (p["--model-path"], p["--tp-size"], p["--context-length"], p["--mem-fraction-static"]) == (
        "/m", "2", "8192", "0.85")  # fmt: skip
    assert "--disable-radix-cache" not in e.args and "--enable-lora" in e.args and p["--lora-paths"] == "a=/x"


def test_transformers():
    e = launch("transformers", **COMMON, prefix_caching=True, adapters=[])
    assert e.command == ["python", "-m", "kubeforge.runtime.serve"]
    assert pairs(e.args)["--served-model-name"] == "bot"


# ---------------------------------------------------------------- LoRA adapters loaded at run time (issue 14)

LWS_CRD = Path(__file__).resolve().parents[1] / "assets" / "lws" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"


def test_vllm_and_sglang_start_with_lora_capacity_and_the_rank_from_the_sidecars_file():
    vllm = launch("vllm", **COMMON, prefix_caching=True, runtime_lora=4)
    assert vllm.command[:2] == ["/bin/sh", "-c"] and vllm.command[3] == "vllm"
    assert "exec vllm serve \"$@\" --max-lora-rank \"$rank\"" in vllm.command[2] and "/mnt/adapters/max-lora-rank" in \
        vllm.command[2]  # fmt: skip
    p = pairs(vllm.args)
    assert "--enable-lora" in vllm.args and p["--max-loras"] == "4" and "--lora-modules" not in vllm.args
    assert dict(vllm.env) == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    sglang = launch("sglang", **COMMON, prefix_caching=True, runtime_lora=8)
    assert 'exec python3 -m sglang.launch_server "$@"' in sglang.command[2]
    p = pairs(sglang.args)
    assert (p["--max-loras-per-batch"], p["--lora-target-modules"]) == ("8", "all") and "--lora-paths" not in p
    cpu = launch("transformers", **COMMON, prefix_caching=True, runtime_lora=4)
    assert cpu.command == ["python", "-m", "kubeforge.runtime.serve"] and "--enable-lora" in cpu.args
    with pytest.raises(ValueError, match="not both"):
        launch("vllm", **COMMON, prefix_caching=True, adapters=[("a", "/x")], runtime_lora=4)


def test_adapters_given_at_start_get_the_rank_the_engine_accepts():
    assert pairs(launch("vllm", **COMMON, prefix_caching=True, adapters=[("a", "/x")], max_lora_rank=100).args)[
        "--max-lora-rank"] == "128"  # fmt: skip
    assert pairs(launch("vllm", **COMMON, prefix_caching=True, adapters=[("a", "/x")]).args)["--max-lora-rank"] == "64"
    sglang = launch("sglang", **COMMON, prefix_caching=True, adapters=[("a", "/x")])
    assert "--max-lora-rank" not in sglang.args  # SGLang reads it from the adapters it is given
    cpu = launch("transformers", **COMMON, prefix_caching=True, adapters=[("a", "/x"), ("b", "/y")])
    assert cpu.args[cpu.args.index("--lora-modules") + 1 :] == ["a=/x", "b=/y"]


def test_the_rank_is_read_by_the_shell_and_the_arguments_pass_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "ADAPTERS_DIR", str(tmp_path))
    (tmp_path / "max-lora-rank").write_text("320\n")
    command = rank_from_file(["printf", "%s\\n"])
    hostile = ["it's; rm -rf /", "$(id)", "`id`", "a b", "*"]
    out = subprocess.run([*command, *hostile], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.splitlines() == [*hostile, "--max-lora-rank", "320"]


def test_adapters_per_batch_come_in_steps():
    assert [lora_slots(n) for n in (1, 4, 5, 8, 9, 16)] == [4, 4, 8, 8, 16, 16]


def render_ms(spec: dict[str, Any], rollout: LoraRollout | None = None, cluster: str | None = "h100-4x8.yaml"):
    svc = parse(with_name(service(**spec), None))
    inventory = example_cluster(cluster) if cluster else Inventory((), ())
    plan = plan_serving(engine=svc.spec.engine, inventory=inventory, arch=QWEN, max_model_len=8192,
                        lora_slots=lora_slots(rollout.count) if rollout and rollout.count else 0)  # fmt: skip
    assert plan.feasible, plan.reason
    return render_service(svc, plan, artifact_uri="pvc://models/base", artifact_digest="sha256:b", adapters=rollout)


def rollout(*served: ServedLora, count: int | None = None, ranks: tuple[int, ...] = (16,)) -> LoraRollout:
    return LoraRollout(served, count or len(served), ranks, tuple(s.uri for s in served))


A = ServedLora("support", "pvc://adapters/support", "sha256:a1")
B = ServedLora("legal", "s3://bucket/legal", None)
C = ServedLora("sql", "hf://acme/sql-lora", None)


def test_a_modelservice_with_adapters_renders_the_list_and_the_sidecar():
    spec = {"credentials": {"s3": {"name": "s3-creds"}, "huggingFace": {"name": "hf", "key": "token"}},
            "auth": {"apiKeySecretRef": {"name": "keys", "key": "api"}}}  # fmt: skip
    deployment, svc, cm = render_ms(spec, rollout(A, B))
    for doc in (deployment, svc, cm):
        validate_manifest(doc)
    listed = AdapterSet.model_validate_json(cm["data"][ADAPTERS_CONFIG_FILE])
    assert [(a.name, a.location.uri, a.location.local_path, a.digest) for a in listed.adapters] == [
        ("support", A.uri, "/mnt/pvc/adapters/support", "sha256:a1"), ("legal", B.uri, None, None)]  # fmt: skip
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "adapters"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["command"] == ["python", "-m", "kubeforge.runtime.adapters"]
    assert pairs(sidecar["args"]) == {"--engine": "vllm", "--engine-url": "http://127.0.0.1:8000", "--min-rank": "16"}
    assert sidecar["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["KUBEFORGE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "api"} and "HF_TOKEN" in env
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert "/etc/kubeforge/adapters" in mounts and "/mnt/pvc/adapters" in mounts and not mounts["/mnt/adapters"].get(
        "readOnly")  # fmt: skip
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/started" and sidecar["readinessProbe"]["httpGet"]["path"] \
        == "/ready"  # fmt: skip
    engine = pod["containers"][0]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in engine["env"]
    engine_mounts = {m["mountPath"]: m for m in engine["volumeMounts"]}
    assert engine_mounts["/mnt/adapters"]["readOnly"] and "/mnt/pvc/adapters" in engine_mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["adapter-list"]["configMap"]["name"] == cm["metadata"]["name"] == "support-bot-adapters"
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "ModelService"
    assert "s3://bucket/legal" not in json.dumps(deployment)  # where adapters come from is the ConfigMap's only


def template(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return docs[0]["spec"]["template"]


def test_adding_or_updating_an_adapter_within_the_capacity_leaves_the_pod_template_alone():
    one = render_ms({}, rollout(A, count=3))
    two = render_ms({}, rollout(A, ServedLora("legal", "pvc://adapters/legal"), count=3))
    newer = render_ms({}, rollout(ServedLora(A.name, A.uri, "sha256:a2"), count=3))
    assert template(one) == template(two) == template(newer)  # no rollout: the sidecars load the change
    assert one[2]["data"] != two[2]["data"] != newer[2]["data"]
    # what the engine started with changes: the replicas roll over to a template with more capacity
    assert template(render_ms({}, rollout(A, count=5))) != template(one)  # 8 adapters per batch instead of 4
    assert template(render_ms({}, rollout(A, count=3, ranks=(100,)))) != template(one)  # --min-rank 128
    assert template(render_ms({}, rollout(A, B, count=3))) == template(one)  # an s3 adapter: fetched, no mount
    creds = {"credentials": {"s3": {"name": "s3-creds"}}}  # the first s3 adapter: the Secret was there already
    assert template(render_ms(creds, rollout(A, count=3))) == template(render_ms(creds, rollout(A, B, count=3)))
    assert template(render_ms({}, rollout(A, ServedLora("x", "pvc://other/x"), count=3))) != template(one)  # a claim


def test_a_modelservice_without_adapters_has_no_lora_and_no_list():
    docs = render_ms({})
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    pod = template(docs)["spec"]
    assert "initContainers" not in pod and "--enable-lora" not in pod["containers"][0]["args"]


def test_sglang_and_the_transformers_server_get_the_sidecar_for_their_own_api():
    sglang = template(render_ms({"engine": "sglang"}, rollout(C)))["spec"]
    assert pairs(sglang["initContainers"][0]["args"])["--engine"] == "sglang"
    assert sglang["containers"][0]["command"][:2] == ["/bin/sh", "-c"]
    cpu = template(render_ms({"engine": "transformers"}, rollout(C), cluster=None))["spec"]
    assert pairs(cpu["initContainers"][0]["args"])["--engine"] == "transformers"
    assert "--enable-lora" in cpu["containers"][0]["args"] and "envFrom" not in cpu["initContainers"][0]


def test_spec_adapters_uris_are_served_when_the_controller_resolved_nothing():
    docs = render_ms(
        {"adapters": [{"name": "a", "uri": "s3://bucket/a"}, {"name": "b", "fineTuneJobRef": {"name": "j"}}]}
    )
    listed = AdapterSet.model_validate_json(docs[2]["data"][ADAPTERS_CONFIG_FILE])
    assert [a.name for a in listed.adapters] == ["a"]  # b waits for the controller to resolve its FineTuneJob
    assert pairs(template(docs)["spec"]["containers"][0]["args"])["--max-loras"] == "4"


# ---------------------------------------------------------------- a replica across nodes: LeaderWorkerSet


def test_multi_node_arguments_follow_each_engines_recipe():
    leader, worker = multi_node("vllm", 2)
    assert pairs(leader) == {"--pipeline-parallel-size": "2", "--distributed-executor-backend": "mp", "--nnodes": "2",
                             "--master-addr": "$(LWS_LEADER_ADDRESS)", "--node-rank": "0"}  # fmt: skip
    assert pairs(worker)["--node-rank"] == "$(LWS_WORKER_INDEX)" and worker[-1] == "--headless"
    leader, worker = multi_node("sglang", 3)
    assert pairs(leader) == {"--pp-size": "3", "--nnodes": "3", "--dist-init-addr": "$(LWS_LEADER_ADDRESS):20000",
                             "--node-rank": "0"}  # fmt: skip
    assert pairs(worker)["--node-rank"] == "$(LWS_WORKER_INDEX)" and "--headless" not in worker
    with pytest.raises(ValueError, match="does not run across nodes"):
        multi_node("transformers", 2)


@cache
def lws_schema() -> dict[str, Any]:
    doc = next(d for d in yaml.safe_load_all(LWS_CRD.read_text()) if d)
    (version,) = doc["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def lws_problems(lws: dict[str, Any]) -> list[Any]:
    """What the API server would refuse: the vendored LWS CRD (jsonschema + CEL), and each pod template as a Pod."""
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    defaulted = apply_defaults(lws_schema(), lws)
    for _, pod in pod_templates([lws]):
        validate_manifest({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod})
    return schema_errors(lws_schema(), defaulted) + cel_violations(lws_schema(), defaulted)


def across_nodes(engine: str) -> list[dict[str, Any]]:
    svc = parse(with_name(service(engine=engine), None))
    plan = plan_serving(engine=engine, inventory=example_cluster("a10-4x1.yaml"), arch=QWEN, max_model_len=32768,
                        multi_node=True)  # fmt: skip
    assert plan.feasible and plan.nodes == 2, plan.reason
    return render_service(svc, plan, artifact_uri="s3://bucket/support-bot", artifact_digest="sha256:b")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_leaderworkerset_is_valid_against_its_crd_and_runs_the_recipe(engine):
    lws, svc = across_nodes(engine)
    assert lws["kind"] == "LeaderWorkerSet" and lws_problems(lws) == []
    validate_manifest(svc)
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = group["leaderTemplate"]["spec"], group["workerTemplate"]["spec"]
    expected_leader, expected_worker = multi_node(engine, 2)
    lc, wc = leader["containers"][0], worker["containers"][0]
    assert lc["command"] == wc["command"] == launch(engine, **COMMON, prefix_caching=True).command  # no shell, no Ray
    assert lc["args"][-len(expected_leader) :] == expected_leader and wc["args"][-len(expected_worker) :] == \
        expected_worker  # fmt: skip
    assert lc["readinessProbe"] and "readinessProbe" not in wc and wc["ports"] == []
    assert [c["name"] for c in leader["initContainers"]] == [c["name"] for c in worker["initContainers"]] == [
        "fetch-model"]  # every node fetches the model it serves a part of  # fmt: skip
    assert svc["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"


def test_the_vendored_lws_crd_refuses_what_the_api_server_refuses():
    lws, _ = across_nodes("vllm")
    bad = json.loads(json.dumps(lws))
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
    bad["spec"]["replicas"] = "two"
    problems = lws_problems(bad)
    assert any("restartPolicy" in p for p in problems) and any("replicas" in p for p in problems)


def test_adapters_are_not_rendered_across_nodes():
    svc = parse(with_name(service(adapters=[{"name": "a", "uri": "s3://bucket/a"}]), None))
    plan = plan_serving(engine="vllm", inventory=example_cluster("a10-4x1.yaml"), arch=QWEN, max_model_len=32768,
                        multi_node=True, lora_slots=4)  # fmt: skip
    assert not plan.feasible and "replicas with LoRA adapters stay on one node" in plan.reason
    multi = plan_serving(engine="vllm", inventory=example_cluster("a10-4x1.yaml"), arch=QWEN, max_model_len=32768,
                         multi_node=True)  # fmt: skip
    with pytest.raises(ValueError, match="one node"):
        render_service(svc, multi, artifact_uri="s3://bucket/m", artifact_digest=None)


def test_the_plan_counts_the_engines_lora_memory():
    plain = plan_serving(engine="vllm", inventory=example_cluster("h100-4x8.yaml"), arch=QWEN, max_model_len=8192)
    lora = plan_serving(engine="vllm", inventory=example_cluster("h100-4x8.yaml"), arch=QWEN, max_model_len=8192,
                        lora_slots=4, lora_rank=100)  # fmt: skip
    per_adapter = QWEN.lora_parameters(128, ("all-linear",))[0] * 2  # vLLM starts with rank 128 for 100
    assert plain.lora_bytes == 0 and lora.lora_bytes == 4 * per_adapter
    assert "LoRA" in lora.reason and "4 adapters per batch, rank 128" in lora.reason
