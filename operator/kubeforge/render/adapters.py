"""A ModelService's LoRA adapters in its pods (pure): the list in a ConfigMap, the sidecar that serves it.

    ConfigMap <name>-adapters  adapters.json (kubeforge.runtime.contract.AdapterSet): the name, location
                               and digest of each adapter the replicas serve now; mounted as a whole
                               volume at ADAPTERS_CONFIG_DIR (no subPath: the kubelet updates it in place)
    sidecar "adapters"         kubeforge.runtime.adapters, a native sidecar (an init container with
                               restartPolicy Always, Kubernetes >= 1.29): fetches the adapters into the
                               emptyDir at ADAPTERS_DIR, writes the rank the engine starts with, loads them
                               into the running engine and follows the list; its startup probe holds the
                               engine back until the rank is written, its readiness the pod until the
                               adapters of the list are loaded
    engine                     started with LoRA capacity only (render/engines.py, runtime_lora)

The pod template holds the capacity, so a change of it rolls the replicas over: the adapters per batch
(lora_slots of how many spec.adapters there are: 4, 8 or 16), the floor of --max-lora-rank (the largest
rank the operator knows, as the engine takes it), the claims adapters live on, and whether there are
adapters at all. Which adapters, from where and in which version is only in the ConfigMap: adding,
removing or updating one within that capacity rewrites the ConfigMap, the kubelet updates it in the
running pods (about a minute) and the sidecar loads or unloads the adapter: no pod restarts. An adapter
whose rank the operator does not know (a URI without spec.adapters[].rank) and that is larger than what
the running engines started with cannot be loaded by them: the sidecar reports it (/status, its log)
and the replicas serve it from their next start, whose rank file counts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubeforge.api.base import Credentials, SecretKeyRef
from kubeforge.api.service import Adapter
from kubeforge.render.engines import API_KEY_ENV, SERVING_PORT
from kubeforge.render.images import configured
from kubeforge.render.mounts import ClaimMount, location
from kubeforge.render.names import child_name
from kubeforge.render.objects import container_security, hf_token_env, meta
from kubeforge.runtime.contract import (
    ADAPTERS_CONFIG_DIR,
    ADAPTERS_DIR,
    ADAPTERS_PORT,
    ADAPTERS_PORT_NAME,
    ADAPTERS_READY_PATH,
    ADAPTERS_STARTED_PATH,
    CACHE_DIR,
    ENV_HF_HOME,
    AdapterSet,
    ServedAdapter,
    engine_lora_rank,
)
from kubeforge.runtime.contract import ADAPTERS_CONFIG_FILE as CONFIG_FILE

CONTAINER = "adapters"
VOLUME, LIST_VOLUME = "adapters", "adapter-list"


@dataclass(frozen=True)
class ServedLora:
    """An adapter the replicas serve now: its name, where it is, and its artifact's digest when known."""

    name: str
    uri: str
    digest: str | None = None


@dataclass(frozen=True)
class LoraRollout:
    """What the replicas serve (``served``), and what every spec.adapters entry needs of the engine, those
    not served yet included (``count``, known ``ranks``, ``uris`` whose claims are mounted), so that their
    arrival restarts nothing."""

    served: tuple[ServedLora, ...] = ()
    count: int = 0
    ranks: tuple[int, ...] = ()
    uris: tuple[str, ...] = ()

    @classmethod
    def of(cls, adapters: Sequence[Adapter]) -> LoraRollout:
        """From spec.adapters alone: the uri entries are served; a fineTuneJobRef needs the controller."""
        served = tuple(ServedLora(a.name, a.uri) for a in adapters if a.uri)
        return cls(served, len(adapters), tuple(a.rank for a in adapters if a.rank), tuple(s.uri for s in served))

    def floor(self, engine: str) -> int:
        """The smallest --max-lora-rank the engine starts with: the largest known rank it can take."""
        fitting = [r for r in self.ranks if engine_lora_rank(engine, r) is not None]
        return engine_lora_rank(engine, max(fitting, default=1)) or 1


def list_name(service: str) -> str:
    """The adapter list's ConfigMap, named after the ModelService."""
    return child_name(service, "adapters")


def config_map(name: str, namespace: str, labels: dict, owner: list, served: Sequence[ServedLora]) -> dict[str, Any]:
    """The adapter list the sidecars follow (AdapterSet JSON, in spec order)."""
    listed = AdapterSet(adapters=tuple(ServedAdapter(name=s.name, location=location(s.uri), digest=s.digest)
                                       for s in served))  # fmt: skip
    cm = meta("v1", "ConfigMap", name, namespace, labels, "adapters", owner)
    cm["data"] = {CONFIG_FILE: listed.model_dump_json(indent=2)}
    return cm


def volumes(config_map_name: str) -> list[dict[str, Any]]:
    return [{"name": VOLUME, "emptyDir": {}}, {"name": LIST_VOLUME, "configMap": {"name": config_map_name}}]


def engine_mount() -> dict[str, Any]:
    """The engine reads the fetched adapters and the rank file; it writes nothing there."""
    return {"name": VOLUME, "mountPath": ADAPTERS_DIR, "readOnly": True}


def sidecar(engine: str, floor: int, claims: Sequence[ClaimMount], credentials: Credentials | None,
            api_key: SecretKeyRef | None) -> dict[str, Any]:  # fmt: skip
    """The adapter sidecar (a native sidecar: to go into initContainers). It gets the ModelService's Hub token
    and S3 Secret whatever the list holds now, so that the first hf:// or s3:// adapter restarts nothing."""
    started = {"httpGet": {"path": ADAPTERS_STARTED_PATH, "port": ADAPTERS_PORT_NAME}}
    ready = {"httpGet": {"path": ADAPTERS_READY_PATH, "port": ADAPTERS_PORT_NAME}}
    ref = {"secretKeyRef": {"name": api_key.name, "key": api_key.key}} if api_key else None
    key = [{"name": API_KEY_ENV, "valueFrom": ref}] if ref else []
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": configured().fetcher,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "command": ["python", "-m", "kubeforge.runtime.adapters"],
        "args": ["--engine", engine, "--engine-url", f"http://127.0.0.1:{SERVING_PORT}", "--min-rank", str(floor)],
        "env": [
            {"name": ENV_HF_HOME, "value": f"{CACHE_DIR}/hf"},
            *hf_token_env(credentials),
            *key,  # the engine's runtime LoRA API asks for the key like any /v1 request
        ],
        "ports": [{"name": ADAPTERS_PORT_NAME, "containerPort": ADAPTERS_PORT, "protocol": "TCP"}],
        # fetching the first list may take a while; then ready once its adapters are in the engine
        "startupProbe": {**started, "periodSeconds": 5, "failureThreshold": 360},
        "readinessProbe": {**ready, "periodSeconds": 5, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [
            {"name": VOLUME, "mountPath": ADAPTERS_DIR},
            {"name": LIST_VOLUME, "mountPath": ADAPTERS_CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": CACHE_DIR},
            *({"name": m.volume_name, "mountPath": m.mount_path, "readOnly": True} for m in claims),
        ],
        "securityContext": container_security(),
    }
    if credentials and credentials.s3:
        container["envFrom"] = [{"secretRef": {"name": credentials.s3.name}}]
    return container


def model_name(engine: str, served_name: str, adapter: str) -> str:
    """What a client sends as ``model`` to use ``adapter``: its name, or SGLang's <served name>:<adapter>."""
    return f"{served_name}:{adapter}" if engine == "sglang" else adapter
