"""FineTuneJob + Plan -> its children: the contract ConfigMap, a headless Service, and the pod gang.

The gang is an Indexed Job (completions = parallelism = nodes) or a JobSet. Every pod runs
torchrun with the node rank from its completion index and rank 0's stable DNS name as the
rendezvous address, launching ``python -m kubeforge.runtime.train``. Commands are argument
lists: no user string reaches a shell.

Failure policy: an exit with EXIT_USER_ERROR (bad data or config) fails the Job at once; a
disruption (preemption, node drain) is ignored and the pod recreated; anything else (OOM,
NCCL, a lost node) counts against a backoff of GANG_RESTARTS per node.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any, Literal

from kubeforge.api.finetune import FineTuneJob
from kubeforge.planner.plan import Plan
from kubeforge.render import labels as L
from kubeforge.render.contract import finetune_contract
from kubeforge.render.images import TRAINER_UID, configured
from kubeforge.render.mounts import claim_mounts, claim_volume_mounts, claim_volumes
from kubeforge.render.names import JOB_NAME_MAX, child_name
from kubeforge.render.objects import (
    container_security,
    foreign_image_env,
    meta,
    node_affinity,
    non_root,
    owner_refs,
    pod_failure_policy,
    runtime_env,
    tolerations,
)
from kubeforge.runtime.contract import (
    CACHE_DIR,
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIG_PATH,
    CUDA_ALLOC_CONF,
    ENV_NODE_RANK,
    ENV_POD_IP,
    ENV_POD_NAME,
    ENV_TRACKING,
    PROGRESS_PORT,
    PROGRESS_PORT_NAME,
    RENDEZVOUS_PORT,
    SHM_DIR,
    TERMINATION_MESSAGE_PATH,
)

Gang = Literal["job", "jobset"]
CONTAINER = "trainer"
GANG_RESTARTS = 3
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "node"
GIB = 1024**3


def names(job_name: str) -> dict[str, str]:
    return {
        "configmap": child_name(job_name, "contract"),
        "service": child_name(job_name, "rdzv", letter_first=True),  # a Service's name is a DNS-1035 label
        "job": child_name(job_name, "", limit=JOB_NAME_MAX),
        # JobSet pods are <jobset>-node-0-<index>: keep that a DNS label too (JobSet wants DNS-1035)
        "jobset": child_name(job_name, "", limit=JOB_NAME_MAX - len(f"-{REPLICATED_JOB}-0"), letter_first=True),
    }


def rank0_address(job_name: str, gang: Gang) -> str:
    n = names(job_name)
    if gang == "jobset":
        return f"{n['jobset']}-{REPLICATED_JOB}-0-0.{n['service']}"
    return f"{n['job']}-0.{n['service']}"


_digests: dict[int, tuple[weakref.ref[Plan], str]] = {}  # id(plan) -> (the plan, its digest), while it lives


def plan_digest(plan: Plan) -> str:
    """16 hex digits of the plan's JSON; remembered per Plan (frozen, and shared by controller/plancache.py)."""
    key = id(plan)
    found = _digests.get(key)
    if found is not None and found[0]() is plan:
        return found[1]
    digest = hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode()).hexdigest()[:16]
    _digests[key] = (weakref.ref(plan, lambda _: _digests.pop(key, None)), digest)
    return digest


def render_finetune(
    job: FineTuneJob, plan: Plan, *, gang: Gang = "job", uid: str | None = None
) -> list[dict[str, Any]]:
    """The children of ``job`` for a feasible ``plan``, in apply order."""
    if not plan.feasible:
        raise ValueError("an infeasible plan has no children")
    name, namespace = job.metadata.name or "", job.metadata.namespace or "default"
    uid = uid or (job.metadata.model_extra or {}).get("uid")
    n = names(name)
    common = L.owner_labels("FineTuneJob", name, uid)
    owner = owner_refs("FineTuneJob", name, uid)
    contract = finetune_contract(job, plan)
    digest = plan_digest(plan)

    configmap = meta("v1", "ConfigMap", n["configmap"], namespace, common, "contract", owner)
    configmap["data"] = {CONFIG_FILE: contract.to_json()}

    pod_labels = {**common, L.COMPONENT: "trainer"}
    service = meta("v1", "Service", n["service"], namespace, common, "rendezvous", owner)
    service["spec"] = {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,  # rendezvous happens before any pod is ready
        "selector": {L.OWNER_NAME: common[L.OWNER_NAME], L.OWNER_KIND: "FineTuneJob", L.COMPONENT: "trainer"},
        "ports": [
            {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"},
            {"name": PROGRESS_PORT_NAME, "port": PROGRESS_PORT, "targetPort": PROGRESS_PORT, "protocol": "TCP"},
        ],
    }

    template = _pod_template(job, plan, pod_labels, digest, n, gang, name)
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": plan.nodes,
        "parallelism": plan.nodes,
        "backoffLimit": GANG_RESTARTS * plan.nodes,
        "podFailurePolicy": pod_failure_policy(CONTAINER),
        "template": template,
    }
    queue = job.spec.resources.queue
    if gang == "jobset":
        gang_obj = meta(JOBSET_API, "JobSet", n["jobset"], namespace, common, "trainer", owner)
        gang_obj["metadata"]["annotations"] = {L.PLAN_DIGEST: digest}
        if queue:
            gang_obj["metadata"]["labels"][L.KUEUE_QUEUE] = queue
        gang_obj["spec"] = {
            "network": {"enableDNSHostnames": True, "subdomain": n["service"], "publishNotReadyAddresses": True},
            "failurePolicy": {
                "maxRestarts": GANG_RESTARTS,
                "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "suspend": bool(queue),
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job_spec}}],
        }
        # JobSet makes the headless Service for its pods (network.subdomain); ours would clash
        return [configmap, gang_obj]
    gang_obj = meta("batch/v1", "Job", n["job"], namespace, common, "trainer", owner)
    gang_obj["metadata"]["annotations"] = {L.PLAN_DIGEST: digest}
    if queue:
        gang_obj["metadata"]["labels"][L.KUEUE_QUEUE] = queue
    gang_obj["spec"] = {**job_spec, "suspend": bool(queue)}  # Kueue unsuspends once it admits the whole gang
    return [configmap, service, gang_obj]


def _pod_template(
    job: FineTuneJob, plan: Plan, labels: dict, digest: str, n: dict[str, str], gang: Gang, name: str
) -> dict[str, Any]:
    spec = job.spec
    default_image = spec.image is None
    mounts = claim_mounts(read=[spec.model.uri, spec.dataset.uri], write=[spec.output.uri])
    volumes: list[dict[str, Any]] = [
        {"name": "contract", "configMap": {"name": n["configmap"]}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(plan)}},
        {"name": "cache", "emptyDir": {}},
        *claim_volumes(mounts),
    ]
    volume_mounts: list[dict[str, Any]] = [
        {"name": "contract", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "shm", "mountPath": SHM_DIR},
        {"name": "cache", "mountPath": CACHE_DIR},
        *claim_volume_mounts(mounts),
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or configured().trainer,
        "imagePullPolicy": "IfNotPresent",
        "command": ["torchrun"],
        "args": [
            f"--nnodes={plan.nodes}",
            f"--nproc-per-node={plan.gpus_per_node}",
            f"--node-rank=$({ENV_NODE_RANK})",
            f"--master-addr={rank0_address(name, gang)}",
            f"--master-port={RENDEZVOUS_PORT}",
            "-m",
            "kubeforge.runtime.train",
            "--config",
            CONFIG_PATH,
        ],
        "env": _env(job, plan) + ([] if default_image else foreign_image_env()),
        "ports": [
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
            {"name": PROGRESS_PORT_NAME, "containerPort": PROGRESS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(plan),
        "volumeMounts": volume_mounts,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
    }
    secrets = [spec.credentials.s3 if spec.credentials else None, spec.tracking.secret_ref if spec.tracking else None]
    if any(secrets):  # each Secret's keys as variables: S3 credentials, the tracking backend's key or URI
        container["envFrom"] = [{"secretRef": {"name": ref.name}} for ref in secrets if ref]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 120,  # time to write a checkpoint on SIGTERM
        "tolerations": tolerations(job.spec.resources.tolerations),
        "containers": [container],
        "volumes": volumes,
        "securityContext": non_root(TRAINER_UID),  # a custom image too (restricted Pod Security Standard)
    }
    affinity = node_affinity(plan.node_selector)
    if affinity:
        pod["affinity"] = affinity
    if gang == "job":
        pod["subdomain"] = n["service"]
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    return {"metadata": {"labels": labels, "annotations": {L.PLAN_DIGEST: digest}}, "spec": pod}


def _env(job: FineTuneJob, plan: Plan) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        *runtime_env(job.spec.credentials, job.spec.model.uri),
        {"name": ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # NCCL: surface errors instead of hanging, and say why a collective failed
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        # the allocator setting the planner's memory model is measured under (memory.FRAGMENTATION)
        {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": CUDA_ALLOC_CONF},
    ]
    if plan.nvlink_domain <= 1 and plan.gpus_per_node > 1:
        # PCIe-only nodes: peer-to-peer through the host bridge is often slower than via memory
        env.append({"name": "NCCL_P2P_LEVEL", "value": "PXB"})
    if plan.nodes > 1:
        env.append({"name": "NCCL_SOCKET_IFNAME", "value": "^lo,docker"})
    if job.spec.tracking:
        env.append({"name": ENV_TRACKING, "value": job.spec.tracking.backends()})
    return env


def _resources(plan: Plan) -> dict[str, Any]:
    gpus = plan.gpus_per_node
    cpu = max(4.0, 8.0 * gpus)
    if plan.node_cpus:
        cpu = min(cpu, 0.9 * plan.node_cpus)
    memory = 8 * GIB + 8 * GIB * gpus + plan.host_memory_per_node
    if plan.node_memory_bytes:
        memory = min(memory, int(0.9 * plan.node_memory_bytes))
    cpu_text = f"{int(cpu * 1000)}m"
    mem_text = f"{memory // (1024**2)}Mi"
    return {
        "requests": {"cpu": cpu_text, "memory": mem_text, L.GPU_RESOURCE: str(gpus)},
        "limits": {"memory": mem_text, L.GPU_RESOURCE: str(gpus)},
    }


def _shm_size(plan: Plan) -> str:
    return f"{min(64, 4 * plan.gpus_per_node + 4)}Gi"
