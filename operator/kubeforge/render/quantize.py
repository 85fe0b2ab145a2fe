"""QuantizeJob -> its children: the contract ConfigMap and a one-pod Job running the quantizer.

Calibrated methods (GPTQ, AWQ, int8) run on one GPU (llm-compressor's sequential pipeline
onloads one layer at a time, so one GPU calibrates large models; host memory holds the
weights); fp8 is dynamic and runs on CPU. Exit EXIT_USER_ERROR (a failed gate, a method
that cannot fit the model, a missing source) fails the Job at once.
"""

from __future__ import annotations

from typing import Any

from kubeforge.api.quantize import CALIBRATED_METHODS, QuantizeJob
from kubeforge.api.uris import parse_uri
from kubeforge.render import labels as L
from kubeforge.render.contract import quantize_contract
from kubeforge.render.images import QUANTIZER_IMAGE, TRAINER_UID
from kubeforge.render.mounts import claim_mounts
from kubeforge.render.names import JOB_NAME_MAX, child_name
from kubeforge.render.objects import meta, owner_refs, tolerations
from kubeforge.runtime.contract import (
    CACHE_DIR,
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIG_PATH,
    ENV_CONFIG,
    ENV_HF_HOME,
    ENV_HF_TOKEN,
    EXIT_USER_ERROR,
    TERMINATION_MESSAGE_PATH,
)

CONTAINER = "quantizer"
RETRIES = 2


def quantize_names(name: str) -> dict[str, str]:
    return {"configmap": child_name(name, "qcontract"), "job": child_name(name, "quantize", limit=JOB_NAME_MAX)}


def needs_gpu(method: str) -> bool:
    return method in CALIBRATED_METHODS


def render_quantize(
    job: QuantizeJob, *, source_uri: str, default_data_uri: str | None = None, uid: str | None = None
) -> list[dict[str, Any]]:
    name, namespace = job.metadata.name or "", job.metadata.namespace or "default"
    uid = uid or (job.metadata.model_extra or {}).get("uid")
    n = quantize_names(name)
    common = L.owner_labels("QuantizeJob", name, uid)
    owner = owner_refs("QuantizeJob", name, uid)
    gpu = needs_gpu(job.spec.method)
    contract = quantize_contract(job, source_uri, default_data_uri, device="cuda" if gpu else "cpu")

    configmap = meta("v1", "ConfigMap", n["configmap"], namespace, common, "contract", owner)
    configmap["data"] = {CONFIG_FILE: contract.to_json()}

    reads = [source_uri] + [c.location.uri for c in (contract.calibration, contract.evaluation) if c is not None]
    mounts = claim_mounts(read=reads, write=[job.spec.output.uri])
    spec = job.spec
    env: list[dict[str, Any]] = [
        {"name": ENV_CONFIG, "value": CONFIG_PATH},
        {"name": ENV_HF_HOME, "value": f"{CACHE_DIR}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.credentials and spec.credentials.hugging_face:
        ref = spec.credentials.hugging_face
        env.append({"name": ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if parse_uri(source_uri).scheme != "hf":
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    resources: dict[str, Any] = {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "32Gi"}}
    if gpu:
        resources["requests"][L.GPU_RESOURCE] = "1"
        resources["limits"][L.GPU_RESOURCE] = "1"
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or QUANTIZER_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "kubeforge.runtime.quantize"],
        "args": ["--config", CONFIG_PATH],
        "env": env,
        "resources": resources,
        "volumeMounts": [
            {"name": "contract", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": CACHE_DIR},
            *({"name": m.volume_name, "mountPath": m.mount_path, "readOnly": m.read_only} for m in mounts),
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
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
            *(
                {"name": m.volume_name, "persistentVolumeClaim": {"claimName": m.claim, "readOnly": m.read_only}}
                for m in mounts
            ),
        ],
    }
    if gpu:
        pod["tolerations"] = tolerations(spec.resources.tolerations)
    elif spec.resources.tolerations:
        pod["tolerations"] = [t.dump() for t in spec.resources.tolerations]
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.image is None:
        pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID,
                                  "fsGroup": TRAINER_UID, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    batch = meta("batch/v1", "Job", n["job"], namespace, common, "quantizer", owner)
    batch["spec"] = {
        "backoffLimit": RETRIES,
        "podFailurePolicy": {
            "rules": [
                {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_USER_ERROR]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {"metadata": {"labels": {**common, L.COMPONENT: "quantizer"}}, "spec": pod},
    }  # fmt: skip
    return [configmap, batch]
