"""ModelService + ServingPlan + artifact -> a Deployment running the engine and a Service for the OpenAI API.

The artifact is mounted read-only from its PVC, or downloaded by an init container
(s3:// or hf://, credentials from Secrets) into an emptyDir the engine reads. The pod
template carries the artifact's digest: a new artifact changes the template, and the
Deployment rolls the replicas over to it (maxUnavailable 0: the old ones serve until the
new ones are ready).

Optional children, where the spec asks and the cluster has the API (``ServingApis``):
- spec.adapters: a ConfigMap with the adapter list, followed by a sidecar in each pod that loads the
  adapters into the running engine (render/adapters.py: a new adapter restarts no pod);
- spec.autoscaling: a KEDA ScaledObject, else a HorizontalPodAutoscaler (render/autoscaling.py), and then
  no ``replicas`` in the workload's manifest (see ``render_service``);
- spec.route: an HTTPRoute, to the Service or to an InferencePool (render/routing.py).

A replica larger than one node is a LeaderWorkerSet (vLLM or SGLang, each engine's documented recipe:
render/engines.py ``multi_node``); its adapters are not supported (the adapter files would have to be on
every node of the group before the leader loads them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from kubeforge.api.service import ModelService, Route
from kubeforge.api.uris import parse_uri
from kubeforge.planner.serving import ServingPlan
from kubeforge.render import adapters as lora
from kubeforge.render import autoscaling, routing
from kubeforge.render import labels as L
from kubeforge.render.engines import HEALTH_PATH, SERVING_PORT, SERVING_PORT_NAME, launch, lora_slots, multi_node
from kubeforge.render.images import TRAINER_UID, configured
from kubeforge.render.mounts import claim_mounts, location
from kubeforge.render.names import child_name, owner_label
from kubeforge.render.objects import (
    container_security,
    foreign_image_env,
    hf_token_env,
    literal,
    meta,
    node_affinity,
    non_root,
    owner_refs,
    tolerations,
)
from kubeforge.runtime.contract import CACHE_DIR, ENV_HF_HOME, SHM_DIR

MODEL_DIR = "/mnt/model"
CONTAINER = "engine"


@dataclass(frozen=True)
class ServingApis:
    """Optional APIs the cluster serves (their CRDs installed) that change what a ModelService renders."""

    keda: bool = False  # keda.sh/v1alpha1 ScaledObject
    gateway: bool = False  # gateway.networking.k8s.io/v1 HTTPRoute
    inference_pool: bool = False  # inference.networking.k8s.io/v1 InferencePool


def service_names(name: str) -> dict[str, str]:
    return {"deployment": child_name(name, "engine"), "service": child_name(name, letter_first=True)}


def optional_children(name: str) -> dict[str, str]:
    """kind -> name of each child a ModelService has only when its spec (and the cluster) asks: the
    autoscaler is named after the workload it scales, the route and pool after the Service, the adapter
    list after the ModelService."""
    n = service_names(name)
    return {"ScaledObject": n["deployment"], "HorizontalPodAutoscaler": n["deployment"],
            "HTTPRoute": n["service"], "InferencePool": n["service"], "ConfigMap": lora.list_name(name)}  # fmt: skip


def autoscaled(svc: ModelService, engine: str) -> bool:
    """Whether an autoscaler owns the replica count: asked for, and the engine exports the metrics."""
    return svc.spec.autoscaling is not None and autoscaling.supports(engine)


def pod_selector(name: str, leaders_only: bool) -> dict[str, str]:
    """The labels that select the pods serving the OpenAI API (a LeaderWorkerSet's: its leaders)."""
    selector = {L.OWNER_KIND: "ModelService", L.OWNER_NAME: owner_label(name), L.COMPONENT: "engine"}
    if leaders_only:
        selector[LWS_WORKER_INDEX] = "0"
    return selector


def selector_string(selector: dict[str, str]) -> str:
    """A label selector in its string form, as the scale subresource reports it (status.selector)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def endpoint(name: str, namespace: str) -> str:
    return f"http://{service_names(name)['service']}.{namespace}.svc:{SERVING_PORT}/v1"


def render_service(
    svc: ModelService,
    plan: ServingPlan,
    *,
    artifact_uri: str,
    artifact_digest: str | None,
    uid: str | None = None,
    apis: ServingApis = ServingApis(),
    adapters: lora.LoraRollout | None = None,
) -> list[dict[str, Any]]:
    """The workload (Deployment, or LeaderWorkerSet when one replica spans nodes), its Service, then the
    optional adapter list (ConfigMap), autoscaler, InferencePool and HTTPRoute. ``adapters``: the adapters
    the controller resolved (fineTuneJobRefs to their artifacts); by default spec.adapters' URIs.

    Replicas and server-side apply: the operator applies with force as field manager ``kubeforge``, so
    whatever it applies it owns and resets on every apply. With an autoscaler the workload's manifest
    has no ``replicas`` at all: kubeforge then owns no opinion on the field, the HPA (or KEDA's HPA)
    writes it through the scale subresource and owns it, and neither an apply of a new pod template nor
    a resync pass puts it back to spec.replicas. (Were ``replicas`` applied, each pass would undo the
    autoscaler's choice: a tug of war every resync.) Dropping a field one used to own removes it when no
    other manager owns it, which for a Deployment means back to its default of 1: the controller hands
    the field over first, see controller/service.py. Without an autoscaler ``replicas`` is
    spec.replicas, which `kubectl scale msvc` sets through the ModelService's scale subresource.
    """
    if not plan.feasible:
        raise ValueError("an infeasible serving plan has no children")
    name, namespace = svc.metadata.name or "", svc.metadata.namespace or "default"
    uid = uid or (svc.metadata.model_extra or {}).get("uid")
    n = service_names(name)
    common = L.owner_labels("ModelService", name, uid)
    owner = owner_refs("ModelService", name, uid)
    spec = svc.spec
    selector = pod_selector(name, leaders_only=False)
    scaled = autoscaled(svc, plan.engine)
    route = spec.route if apis.gateway else None
    pooled = route is not None and route.endpoint_picker is not None and apis.inference_pool

    rollout = adapters if adapters is not None else lora.LoraRollout.of(spec.adapters)
    if rollout.count and plan.nodes > 1:
        raise ValueError("LoRA adapters are served by replicas of one node")
    loc = location(artifact_uri)
    scheme = parse_uri(artifact_uri).scheme
    mounts = claim_mounts(read=[artifact_uri, *rollout.uris], write=[])
    volumes: list[dict[str, Any]] = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{max(2, 2 * max(plan.gpus, 1))}Gi"}},
        {"name": "cache", "emptyDir": {}},
        *({"name": m.volume_name, "persistentVolumeClaim": {"claimName": m.claim, "readOnly": True}} for m in mounts),
    ]
    mounted = [{"name": m.volume_name, "mountPath": m.mount_path, "readOnly": True} for m in mounts]
    init: list[dict[str, Any]] = []
    model_path = loc.local_path or MODEL_DIR
    creds = spec.credentials
    secret_env = hf_token_env(creds)
    if loc.local_path is None:  # s3:// or hf://: an init container downloads it
        volumes.append({"name": "model", "emptyDir": {}})
        fetcher: dict[str, Any] = {
            "name": "fetch-model",
            "image": configured().fetcher,
            "command": ["python", "-m", "kubeforge.runtime.fetch"],
            "args": [literal(artifact_uri), MODEL_DIR],
            "env": [{"name": ENV_HF_HOME, "value": f"{CACHE_DIR}/hf"}, *secret_env],
            "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}, {"name": "cache", "mountPath": CACHE_DIR}],
            "securityContext": container_security(),
        }
        if scheme == "s3" and creds and creds.s3:
            fetcher["envFrom"] = [{"secretRef": {"name": creds.s3.name}}]
        init.append(fetcher)
        mounted.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})

    opts = spec.engine_options
    engine = launch(
        plan.engine,
        model_path=model_path,
        served_name=spec.served_model_name or name,
        tensor_parallel=plan.tensor_parallel,
        max_model_len=opts.max_model_len,
        gpu_memory_utilization=opts.gpu_memory_utilization,
        prefix_caching=opts.enable_prefix_caching,
        runtime_lora=lora_slots(rollout.count) if rollout.count else None,
        image=spec.image,
    )
    key_ref = spec.auth.api_key_secret_ref if spec.auth else None
    if rollout.count:  # the list in a ConfigMap; the sidecar fetches the adapters and loads them at run time
        volumes += lora.volumes(lora.list_name(name))
        mounted.append(lora.engine_mount())
        init.append(lora.sidecar(plan.engine, rollout.floor(plan.engine), mounts, creds, key_ref))
    key_env = [{"name": engine.api_key_env, "valueFrom": {"secretKeyRef": {"name": key_ref.name, "key": key_ref.key}}}
               ] if key_ref else []  # fmt: skip
    probe = {"httpGet": {"path": HEALTH_PATH, "port": SERVING_PORT_NAME}}
    resources: dict[str, Any]
    if plan.gpus:
        resources = {
            "requests": {"cpu": f"{4 * plan.gpus}", "memory": f"{16 * plan.gpus}Gi", L.GPU_RESOURCE: str(plan.gpus)},
            "limits": {"memory": f"{16 * plan.gpus}Gi", L.GPU_RESOURCE: str(plan.gpus)},
        }
    else:
        resources = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": engine.image,
        "imagePullPolicy": "IfNotPresent",
        "command": engine.command,
        # paths and names from the spec and the artifact's URI, then kubeforge's own API-key arguments
        "args": [
            *(literal(a) for a in engine.args),
            *(engine.api_key_args if key_env else ()),
            # SGLang exports its metrics only when told; the autoscaler and the Endpoint Picker read them
            *(["--enable-metrics"] if plan.engine == "sglang" and (scaled or pooled) else []),
        ],
        "env": [
            {"name": ENV_HF_HOME, "value": f"{CACHE_DIR}/hf"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            *([] if engine.image == configured().server else foreign_image_env()),
            *({"name": k, "value": v} for k, v in engine.env),
            *key_env,
        ],
        "ports": [{"name": SERVING_PORT_NAME, "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "resources": resources,
        # big models take minutes to load: up to 30 min to start, then readiness and liveness
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 3, "timeoutSeconds": 5},
        "volumeMounts": [{"name": "shm", "mountPath": SHM_DIR}, {"name": "cache", "mountPath": CACHE_DIR}, *mounted],
        "securityContext": container_security(),
    }
    pod: dict[str, Any] = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "containers": [container],
        "volumes": volumes,
        # restricted Pod Security Standard; vLLM's and SGLang's images run as root unless told (see non_root)
        "securityContext": non_root(TRAINER_UID),
    }
    if init:
        pod["initContainers"] = init
    if plan.gpus:
        pod["tolerations"] = tolerations(spec.resources.tolerations)
        affinity = node_affinity(plan.node_selector)
        if affinity:
            pod["affinity"] = affinity
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    annotations = {L.ARTIFACT_URI: artifact_uri}
    if artifact_digest:
        annotations[L.ARTIFACT_DIGEST] = artifact_digest

    if plan.nodes > 1:
        workload = _leader_worker_set(svc, plan, n["deployment"], namespace, common, owner, pod, annotations)
        serving = pod_selector(name, leaders_only=True)  # the OpenAI API is on the leaders
    else:
        workload = meta("apps/v1", "Deployment", n["deployment"], namespace, common, "engine", owner)
        workload["metadata"]["annotations"] = dict(annotations)
        workload["spec"] = {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": {**common, L.COMPONENT: "engine"}, "annotations": annotations},
                         "spec": pod},
        }  # fmt: skip
        serving = selector
    if scaled:
        del workload["spec"]["replicas"]  # the autoscaler's (see the docstring)
    out = [workload, _service(n["service"], namespace, common, owner, serving)]
    if rollout.count:
        out.append(lora.config_map(lora.list_name(name), namespace, common, owner, rollout.served))
    if scaled and spec.autoscaling is not None:
        metadata = meta("", "", n["deployment"], namespace, common, "autoscaler", owner)["metadata"]
        make = autoscaling.scaled_object if apis.keda else autoscaling.horizontal_pod_autoscaler
        out.append(make(spec.autoscaling, plan.engine, workload, metadata))
    if route is not None:
        out += _route(route, pooled, n["service"], namespace, common, owner, serving)
    return out


def _route(route: Route, pooled: bool, service: str, namespace: str, common: dict, owner: list,
           serving: dict[str, str]) -> list[dict[str, Any]]:  # fmt: skip
    """[InferencePool, HTTPRoute to it] or [HTTPRoute to the Service]; both named after the Service."""
    out, backend = [], routing.service_backend(service)
    if pooled:
        out.append(routing.inference_pool(route, meta("", "", service, namespace, common, "route", owner)["metadata"],
                                          serving))  # fmt: skip
        backend = routing.pool_backend(service)
    out.append(routing.http_route(route, meta("", "", service, namespace, common, "route", owner)["metadata"], backend))
    return out


def _service(name: str, namespace: str, common: dict, owner: list, selector: dict) -> dict[str, Any]:
    service = meta("v1", "Service", name, namespace, common, "engine", owner)
    service["spec"] = {
        "type": "ClusterIP",
        "selector": selector,
        "ports": [{"name": SERVING_PORT_NAME, "port": SERVING_PORT, "targetPort": SERVING_PORT_NAME,
                   "protocol": "TCP", "appProtocol": "http"}],
    }  # fmt: skip
    return service


LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"


def _leader_worker_set(svc: ModelService, plan: ServingPlan, name: str, namespace: str, common: dict, owner: list,
                       pod: dict[str, Any], annotations: dict) -> dict[str, Any]:  # fmt: skip
    """One replica = a leader and nodes-1 workers, each pod running the engine as its documented LWS
    recipe says (render/engines.py ``multi_node``: vLLM's multiprocessing example, SGLang's multi-node
    launch): the same arguments on every pod, plus the node's rank; the leader serves the OpenAI API, the
    workers (vLLM --headless) only compute, so they get no probes and no port. Any pod's restart
    recreates the group (RecreateGroupOnPodRestart), as the recipes do."""
    leader_args, worker_args = multi_node(plan.engine, plan.nodes)
    leader = copy.deepcopy(pod)
    leader["containers"][0]["args"] = [*leader["containers"][0]["args"], *leader_args]
    worker = copy.deepcopy(pod)
    engine = worker["containers"][0]
    engine["args"] = [*engine["args"], *worker_args]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        engine.pop(probe, None)  # workers run no HTTP server
    engine["ports"] = []
    labels = {**common, L.COMPONENT: "engine"}
    lws = meta(LWS_API, "LeaderWorkerSet", name, namespace, common, "engine", owner)
    lws["metadata"]["annotations"] = dict(annotations)
    lws["spec"] = {
        "replicas": svc.spec.replicas,
        "startupPolicy": "LeaderCreated",
        "rolloutStrategy": {"type": "RollingUpdate",
                            "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1}},
        "leaderWorkerTemplate": {
            "size": plan.nodes,
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": {"metadata": {"labels": labels, "annotations": annotations}, "spec": leader},
            "workerTemplate": {"metadata": {"labels": labels, "annotations": annotations}, "spec": worker},
        },
    }  # fmt: skip
    return lws
