"""Rendering a FineTuneJob's children: shapes, and validity against the official Kubernetes schema."""

from __future__ import annotations

import copy
import json

import pytest

from kubeforge.api import parse
from kubeforge.planner import plan, resolve
from kubeforge.render import labels as L
from kubeforge.render.finetune import names, rank0_address, render_finetune
from kubeforge.render.names import child_name
from kubeforge.runtime.contract import CONFIG_FILE, EXIT_USER_ERROR
from kubeforge.runtime.contract import parse as parse_contract
from tests.builders import DELETE, finetune
from tests.harness.manifests import validate_manifest
from tests.planner.nodes import example_cluster

UID = "0b7c5d0e-9f8a-4c1e-8d7e-5a6b7c8d9e0f"


def rendered(cluster: str = "h100-4x8.yaml", gang: str = "job", **changes):
    changes.setdefault("resources.queue", DELETE)
    doc = finetune(**changes)
    doc["metadata"]["uid"] = UID
    job = parse(doc)
    result = plan(job.spec, example_cluster(cluster), resolve(job.spec.model))
    assert result.feasible, result.reason
    return job, result, render_finetune(job, result, gang=gang)


def by_kind(docs):
    return {d["kind"]: d for d in docs}


def validate_all(docs):
    for doc in docs:
        if doc["kind"] == "JobSet":
            # JobSet is not in the official schema: its replicated Job template is a batch/v1 JobSpec
            for rj in doc["spec"]["replicatedJobs"]:
                validate_manifest(
                    {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, **rj["template"]}
                )
        else:
            validate_manifest(doc)


def pod_spec(docs):
    kinds = by_kind(docs)
    if "Job" in kinds:
        return kinds["Job"]["spec"]["template"]["spec"]
    return kinds["JobSet"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("cluster", "changes", "nodes"),
    [
        ("a10-4x1.yaml", {"model": {"uri": "hf://Qwen/Qwen3-0.6B"}, "resources.maxGPUs": 1}, 1),
        ("h100-4x8.yaml", {}, 2),
        ("mixed.yaml", {"model": {"uri": "hf://Qwen/Qwen3-0.6B"}, "resources.gpuType": "L4"}, None),
    ],
)
def test_single_and_multi_node_jobs_are_valid_kubernetes(cluster, changes, nodes):
    _job, result, docs = rendered(cluster, **changes)
    validate_all(docs)
    kinds = by_kind(docs)
    assert list(kinds) == ["ConfigMap", "Service", "Job"]
    spec = kinds["Job"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == result.nodes
    if nodes is not None:
        assert result.nodes == nodes
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == kinds["Service"]["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"
    args = pod["containers"][0]["args"]
    assert f"--nnodes={result.nodes}" in args and f"--nproc-per-node={result.gpus_per_node}" in args
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in args
    assert f"--master-addr={kinds['Job']['metadata']['name']}-0.{kinds['Service']['metadata']['name']}" in args
    assert pod["containers"][0]["command"] == ["torchrun"]
    assert args[-4:] == ["-m", "kubeforge.runtime.train", "--config", "/etc/kubeforge/contract.json"]


def test_the_contract_in_the_configmap_is_what_the_pods_read():
    _job, result, docs = rendered()
    contract = parse_contract(json.loads(by_kind(docs)["ConfigMap"]["data"][CONFIG_FILE]))
    assert contract.parallel.nodes == result.nodes and contract.parallel.gpus_per_node == result.gpus_per_node
    assert (
        contract.training.micro_batch_size
        * contract.training.gradient_accumulation_steps
        * (contract.parallel.data_parallel)
        == 128
    )
    assert contract.training.learning_rate == 2e-4 and contract.training.lora.rank == 64
    assert contract.model.uri == "hf://Qwen/Qwen3-8B" and contract.model.local_path is None
    assert contract.dataset.location.local_path == "/mnt/pvc/data/support/train.jsonl"
    assert contract.output.location.local_path == "/mnt/pvc/models/support-bot"
    assert contract.output.checkpoint_dir == "/mnt/pvc/models/support-bot/checkpoints"
    assert contract.compute.precision == result.precision
    assert contract.job.uid == UID


def test_pods_land_on_the_planned_pool_and_request_its_gpus():
    _job, result, docs = rendered()
    pod = pod_spec(docs)
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    expressions = {e["key"]: e["values"] for e in terms[0]["matchExpressions"]}
    assert expressions == {k: [v] for k, v in result.node_selector}
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == str(result.gpus_per_node)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert len(pod["tolerations"]) == len({json.dumps(t, sort_keys=True) for t in pod["tolerations"]})


def test_shm_volumes_and_credentials_come_from_secret_references_only():
    _, _, docs = rendered(**{"credentials.s3": {"name": "s3-creds"}})
    pod = pod_spec(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["pvc-models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": False}
    assert volumes["pvc-data"]["persistentVolumeClaim"] == {"claimName": "data", "readOnly": True}
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    hf = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert hf["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert all("value" not in e or e["name"] not in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY") for e in container["env"])


def test_failure_policy_fails_fast_on_user_errors_and_ignores_disruptions():
    _, result, docs = rendered()
    spec = by_kind(docs)["Job"]["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_USER_ERROR]},
    }
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert spec["backoffLimit"] >= result.nodes


def test_kueue_queue_label_and_suspended_gang():
    _, _, docs = rendered(**{"resources.queue": "team-a-gpu"})
    validate_all(docs)
    job = by_kind(docs)["Job"]
    assert job["metadata"]["labels"][L.KUEUE_QUEUE] == "team-a-gpu"
    assert job["spec"]["suspend"] is True
    _, _, unqueued = rendered()
    assert by_kind(unqueued)["Job"]["spec"]["suspend"] is False
    assert L.KUEUE_QUEUE not in by_kind(unqueued)["Job"]["metadata"]["labels"]


def test_jobset_gang():
    _job, result, docs = rendered(gang="jobset", **{"resources.queue": "q"})
    validate_all(docs)
    kinds = by_kind(docs)
    assert list(kinds) == ["ConfigMap", "JobSet"]
    jobset = kinds["JobSet"]
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    assert jobset["spec"]["suspend"] is True and jobset["metadata"]["labels"][L.KUEUE_QUEUE] == "q"
    rj = jobset["spec"]["replicatedJobs"][0]
    assert rj["replicas"] == 1 and rj["template"]["spec"]["completions"] == result.nodes
    args = rj["template"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--master-addr={rank0_address('support-bot', 'jobset')}" in args
    assert rank0_address("support-bot", "jobset") == "support-bot-node-0-0.support-bot-rdzv"


def test_every_child_is_owned_and_labelled():
    _, _, docs = rendered()
    for doc in docs:
        meta = doc["metadata"]
        assert meta["ownerReferences"] == [
            {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "name": "support-bot", "uid": UID,
             "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip
        assert meta["labels"][L.OWNER_NAME] == "support-bot" and meta["labels"][L.MANAGED_BY] == "kubeforge"
        assert meta["namespace"] == "team-a"


def test_long_names_fit_with_a_hash():
    long = "a" * 60 + "-finetune-" + "b" * 40
    doc = finetune(**{"resources.queue": DELETE})
    doc["metadata"]["name"] = long
    job = parse(doc)
    result = plan(job.spec, example_cluster("h100-4x8.yaml"), resolve(job.spec.model))
    docs = render_finetune(job, result)
    validate_all(docs)
    n = names(long)
    assert len(n["job"]) <= 57 and len(n["service"]) <= 63 and len(n["configmap"]) <= 63
    assert n["job"] != names(long + "x")["job"]
    assert len(rank0_address(long, "job").split(".")[0]) <= 63
    assert len(rank0_address(long, "jobset").split(".")[0]) <= 63


def test_child_name_is_stable_and_short_names_are_untouched():
    assert child_name("support-bot", "rdzv") == "support-bot-rdzv"
    assert child_name("x" * 80, "rdzv") == child_name("x" * 80, "rdzv")
    assert len(child_name("x" * 80, "rdzv")) == 63


def test_user_strings_never_reach_a_shell():
    _, _, docs = rendered(**{"lora.targetModules": ["q_proj; rm -rf /", "$(whoami)"]})
    container = pod_spec(docs)["containers"][0]
    assert container["command"] == ["torchrun"]
    assert not any(part == "sh" or part.startswith("-c") for part in container["command"] + container["args"])
    assert not any("rm -rf" in a or "whoami" in a for a in container["args"])


def test_custom_image_keeps_the_security_context_and_gets_a_home():
    _, _, docs = rendered(image="registry.local/my-trainer:1")
    pod = pod_spec(docs)
    assert pod["containers"][0]["image"] == "registry.local/my-trainer:1"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"name": "HOME", "value": "/mnt/cache"} in pod["containers"][0]["env"]
    _, _, default = rendered()
    assert pod_spec(default)["securityContext"]["runAsNonRoot"] is True
    assert all(e["name"] != "HOME" for e in pod_spec(default)["containers"][0]["env"])  # our image has a home


def test_offload_requests_host_memory():
    _job, result, docs = rendered(model={"uri": "hf://meta-llama/Llama-3.1-70B"}, method="full", lora=DELETE)
    assert result.offload
    memory = pod_spec(docs)["containers"][0]["resources"]["requests"]["memory"]
    assert int(memory.removesuffix("Mi")) * 1024**2 >= result.host_memory_per_node


def test_rendering_is_deterministic():
    _, _, first = rendered()
    _, _, second = rendered()
    assert first == second
    assert copy.deepcopy(first) == first


def test_the_trainer_runs_under_the_allocator_setting_the_memory_model_assumes():
    """contract.CUDA_ALLOC_CONF (expandable segments): the pod's env sets it, and train.main sets it for local
    runs unless the user already chose one (memory.FRAGMENTATION is measured under it)."""
    import os

    from kubeforge.runtime import train
    from kubeforge.runtime.contract import CUDA_ALLOC_CONF

    _, _, docs = rendered()
    assert {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": CUDA_ALLOC_CONF} in pod_spec(docs)["containers"][0]["env"]
    saved = os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    try:
        assert train.allocator_config() == CUDA_ALLOC_CONF == "expandable_segments:True"
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:512"
        assert train.allocator_config() == "max_split_size_mb:512"
    finally:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if saved is not None:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = saved
