"""QuantizeJob -> its children: the contract ConfigMap and a one-pod Job running the quantizer.

The pod's requests come from planner/quantize_size.py: host memory for the weights as
llm-compressor holds them, the quantized copy and the calibration activations; calibrated
methods (GPTQ, AWQ, int8) on one GPU that holds one layer's calibration, placed on the pool
the sizing picked (llm-compressor's sequential pipeline onloads one layer at a time, so one
GPU calibrates large models; host memory holds the weights); fp8 is dynamic and runs on CPU.
A model of unknown size gets the fixed defaults (4 CPUs, 32 GiB). Exit EXIT_USER_ERROR (a
failed gate, a method that cannot fit the model, a missing source) fails the Job at once.
"""

from __future__ import annotations

import math
from typing import Any

from kubeforge.api.quantize import CALIBRATED_METHODS, QuantizeJob
from kubeforge.planner.quantize_size import GIB, QuantizeSizing, defaults
from kubeforge.render import labels as L
from kubeforge.render.contract import quantize_contract
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
    TERMINATION_MESSAGE_PATH,
)

CONTAINER = "quantizer"
RETRIES = 2


def quantize_names(name: str) -> dict[str, str]:
    return {"configmap": child_name(name, "qcontract"), "job": child_name(name, "quantize", limit=JOB_NAME_MAX)}


def needs_gpu(method: str) -> bool:
    return method in CALIBRATED_METHODS


def memory_quantity(n: int) -> str:
    """Bytes as a quantity in GiB, rounded up to a tenth (whole GiB stay whole: "33Gi")."""
    tenths = math.ceil(n * 10 / GIB)
    return f"{tenths // 10}Gi" if tenths % 10 == 0 else f"{tenths / 10}Gi"


def pod_resources(sizing: QuantizeSizing) -> dict[str, Any]:
    """The container's requests and limits: memory limited at its request (the estimate has its margin)."""
    memory = memory_quantity(sizing.memory_bytes)
    resources: dict[str, Any] = {"requests": {"cpu": sizing.cpu, "memory": memory}, "limits": {"memory": memory}}
    if sizing.gpus:
        resources["requests"][L.GPU_RESOURCE] = str(sizing.gpus)
        resources["limits"][L.GPU_RESOURCE] = str(sizing.gpus)
    return resources


def resources_status(sizing: QuantizeSizing) -> dict[str, Any]:
    """status.resources (api/quantize.py QuantizeResources) for a sizing."""
    out: dict[str, Any] = {
        "sizedFrom": sizing.sized_from,
        "cpu": sizing.cpu,
        "memory": memory_quantity(sizing.memory_bytes),
        "gpus": sizing.gpus,
        "reason": sizing.reason[:4096],
    }
    if sizing.gpu_type:
        out["gpuType"] = sizing.gpu_type
    if sizing.gpu_memory_bytes:
        out["gpuMemory"] = memory_quantity(sizing.gpu_memory_bytes)
    return out


def render_quantize(
    job: QuantizeJob,
    *,
    source_uri: str,
    default_data_uri: str | None = None,
    uid: str | None = None,
    sizing: QuantizeSizing | None = None,
) -> list[dict[str, Any]]:
    """The ConfigMap and Job; ``sizing`` from planner/quantize_size.py (default: the fixed defaults)."""
    name, namespace = job.metadata.name or "", job.metadata.namespace or "default"
    uid = uid or (job.metadata.model_extra or {}).get("uid")
    n = quantize_names(name)
    common = L.owner_labels("QuantizeJob", name, uid)
    owner = owner_refs("QuantizeJob", name, uid)
    sizing = sizing or defaults(job.spec.method, "the model's size was not looked up")
    gpu = sizing.gpus > 0
    contract = quantize_contract(job, source_uri, default_data_uri, device=sizing.device)

    configmap = meta("v1", "ConfigMap", n["configmap"], namespace, common, "contract", owner)
    configmap["data"] = {CONFIG_FILE: contract.to_json()}

    reads = [source_uri] + [c.location.uri for c in (contract.calibration, contract.evaluation) if c is not None]
    mounts = claim_mounts(read=reads, write=[job.spec.output.uri])
    spec = job.spec
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or configured().quantizer,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "kubeforge.runtime.quantize"],
        "args": ["--config", CONFIG_PATH],
        "env": runtime_env(spec.credentials, source_uri) + ([] if spec.image is None else foreign_image_env()),
        "resources": pod_resources(sizing),
        "volumeMounts": [
            {"name": "contract", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": CACHE_DIR},
            *claim_volume_mounts(mounts),
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
    }
    if spec.credentials and spec.credentials.s3:
        container["envFrom"] = [{"secretRef": {"name": spec.credentials.s3.name}}]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [
            {"name": "contract", "configMap": {"name": n["configmap"]}},
            {"name": "cache", "emptyDir": {}},
            *claim_volumes(mounts),
        ],
        "securityContext": non_root(TRAINER_UID),  # a custom image too (restricted Pod Security Standard)
    }
    if gpu:
        pod["tolerations"] = tolerations(spec.resources.tolerations)
        affinity = node_affinity(sizing.node_selector)
        if affinity:
            pod["affinity"] = affinity
    elif spec.resources.tolerations:
        pod["tolerations"] = [t.dump() for t in spec.resources.tolerations]
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    batch = meta("batch/v1", "Job", n["job"], namespace, common, "quantizer", owner)
    batch["spec"] = {
        "backoffLimit": RETRIES,
        "podFailurePolicy": pod_failure_policy(CONTAINER),
        "template": {"metadata": {"labels": {**common, L.COMPONENT: "quantizer"}}, "spec": pod},
    }  # fmt: skip
    return [configmap, batch]
