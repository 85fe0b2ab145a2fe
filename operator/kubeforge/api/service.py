"""ModelService: serve an artifact with vLLM, SGLang or transformers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from kubeforge.api.base import (
    DNS1123_SUBDOMAIN,
    ArtifactStatus,
    CommonStatus,
    Credentials,
    DNSLabel,
    DNSSubdomain,
    KubeModel,
    LocalObjectRef,
    Placement,
    Rule,
    SecretKeyRef,
    checked_pattern,
    crd_pattern,
)
from kubeforge.api.meta import ObjectMeta
from kubeforge.api.quantize import count_set
from kubeforge.api.uris import Uri

Engine = Literal["auto", "vllm", "sglang", "transformers"]
ServicePhase = Literal["Pending", "Waiting", "Deploying", "Ready", "Failed"]
TENSOR_PARALLEL_MESSAGE = "must be 'auto' or a number >= 1"


def _tensor_parallel(value: object) -> object:
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    if not ok:
        raise ValueError(f"{TENSOR_PARALLEL_MESSAGE} (got {value!r})")
    return value


TensorParallel = Annotated[int | Literal["auto"], BeforeValidator(_tensor_parallel)]


class ServiceSource(KubeModel):
    """What to serve: a QuantizeJob's or FineTuneJob's artifact, or a location."""

    quantize_job_ref: LocalObjectRef | None = Field(default=None, description="Serve this QuantizeJob's artifact.")
    fine_tune_job_ref: LocalObjectRef | None = Field(default=None, description="Serve this FineTuneJob's artifact.")
    uri: Uri | None = Field(default=None, description="Or an artifact location: pvc://, s3://, hf://, local.")

    rules = (
        Rule(
            cel="(has(self.quantizeJobRef) ? 1 : 0) + (has(self.fineTuneJobRef) ? 1 : 0) "
            "+ (has(self.uri) ? 1 : 0) == 1",
            message="set exactly one of quantizeJobRef, fineTuneJobRef and uri",
            check=lambda s: count_set(s.quantize_job_ref, s.fine_tune_job_ref, s.uri) == 1,
        ),
    )


class EngineOptions(KubeModel):
    """Settings passed to the serving engine."""

    max_model_len: int | None = Field(default=None, gt=0, le=10485760, description="Context length to serve.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Fraction of GPU memory the engine may use (weights + KV cache)."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse the KV cache of shared prompt prefixes.")


# Adding, removing or updating an adapter does not restart the replicas: a sidecar fetches it and loads it
# into the running engine (render/adapters.py), unless it needs more LoRA capacity than the engine started
# with (a larger rank, more adapters per batch, a new PersistentVolumeClaim): then the pod template changes.
class Adapter(KubeModel):
    """A LoRA adapter (a PEFT folder: adapter_config.json and its weights) served under its own model name."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")] = Field(
        description=(
            "The model name clients ask for (vLLM and the transformers server: the name itself; SGLang: "
            "<servedModelName>:<name>; status.adapters[].model says which)."
        )
    )
    uri: Uri | None = Field(default=None, description="Where the adapter is: pvc://, s3://, hf:// or a local path.")
    fine_tune_job_ref: LocalObjectRef | None = Field(
        default=None,
        description=(
            "Or a FineTuneJob in this namespace whose output is an adapter (method lora or qlora with "
            "output.merge false): served once it succeeded; each new artifact of it is loaded in place."
        ),
    )
    rank: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            "The adapter's LoRA rank r (its adapter_config.json's r), when known: the engines need the largest "
            "rank before they start. A fineTuneJobRef's is its spec.lora.rank; otherwise the pods read it from "
            "the fetched adapter_config.json when they start."
        ),
    )

    rules = (
        Rule(
            cel="(has(self.uri) ? 1 : 0) + (has(self.fineTuneJobRef) ? 1 : 0) == 1",
            message="set exactly one of uri and fineTuneJobRef",
            check=lambda a: count_set(a.uri, a.fine_tune_job_ref) == 1,
        ),
    )


class ServiceAuth(KubeModel):
    """Who may use the OpenAI API: with a key, every /v1/* request must send ``Authorization: Bearer <key>``."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the API key clients must send as a bearer token (/health stays open).",
    )


class ScalingTarget(KubeModel):
    """The engine metric the autoscaler holds at its target: set exactly one."""

    waiting_requests_per_replica: float | None = Field(
        default=None,
        gt=0,
        le=10000,
        description=(
            "Requests queued in the engine, per replica (vllm:num_requests_waiting, sglang:num_queue_reqs): "
            "more replicas when the queue grows."
        ),
    )
    kv_cache_usage: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Mean KV-cache usage of the replicas, 0 to 1 (vllm:kv_cache_usage_perc, sglang:token_usage): "
            "more replicas before the cache is full and requests are preempted."
        ),
    )
    time_to_first_token_seconds: float | None = Field(
        default=None,
        gt=0,
        le=600,
        description=(
            "90th percentile of the time to first token over the last 2 minutes, in seconds "
            "(vllm:time_to_first_token_seconds, sglang:time_to_first_token_seconds histograms)."
        ),
    )

    rules = (
        Rule(
            cel="(has(self.waitingRequestsPerReplica) ? 1 : 0) + (has(self.kvCacheUsage) ? 1 : 0) "
            "+ (has(self.timeToFirstTokenSeconds) ? 1 : 0) == 1",
            message="set exactly one of waitingRequestsPerReplica, kvCacheUsage and timeToFirstTokenSeconds",
            check=lambda t: (
                count_set(t.waiting_requests_per_replica, t.kv_cache_usage, t.time_to_first_token_seconds) == 1
            ),
        ),
    )


class Autoscaling(KubeModel):
    """Scale the engine replicas on an engine metric: a KEDA ScaledObject where KEDA is installed, else a
    HorizontalPodAutoscaler on the metric as the Prometheus adapter serves it. While it is set the
    autoscaler owns the replica count and spec.replicas is not used."""

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest replicas (at least 1).")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    target: ScalingTarget = Field(description="The engine metric and its target value.")
    prometheus_address: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description=(
            "Prometheus that KEDA queries (default http://prometheus-operated.monitoring.svc:9090, the "
            "prometheus-operator's); not used with a HorizontalPodAutoscaler, whose metrics come from the "
            "Prometheus adapter."
        ),
    )

    rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not exceed maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
            field=".minReplicas",
        ),
    )


HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
PATH_PREFIX = r"^/$|^(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+$"
Hostname = Annotated[
    str,
    Field(min_length=1, max_length=253, description="A host name, or a wildcard (*.example.com)."),
    crd_pattern(HOSTNAME),
    checked_pattern(HOSTNAME, "a host name (lower-case DNS name, optionally starting with '*.')"),
]


class GatewayRef(KubeModel):
    """The Gateway (Gateway API) the route attaches to."""

    name: DNSSubdomain = Field(description="Name of the Gateway.")
    namespace: DNSLabel | None = Field(
        default=None, description="Namespace of the Gateway (default: the ModelService's; its listeners must allow it)."
    )
    section_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="One listener of the Gateway (default: every listener that allows the route).",
    )


class EndpointPicker(KubeModel):
    """The Gateway API Inference Extension's Endpoint Picker (EPP) Service that chooses a replica per request."""

    name: DNSLabel = Field(description="Name of the Endpoint Picker's Service in the ModelService's namespace.")
    port: int = Field(default=9002, ge=1, le=65535, description="Its Service port (the EPP's ext-proc port).")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailClose",
        description="When the picker does not answer: FailClose refuses the request, FailOpen sends it to any replica.",
    )


class Route(KubeModel):
    """Expose the OpenAI endpoint through a Gateway: an HTTPRoute to the Service, or to an InferencePool
    (Gateway API Inference Extension) where its CRD is installed and an Endpoint Picker is named."""

    gateway: GatewayRef = Field(description="The Gateway the HTTPRoute attaches to.")
    hostnames: list[Hostname] = Field(
        default_factory=list,
        max_length=16,
        description="Host names the route answers (default: those of the Gateway's listeners).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    path_prefix: str = Field(
        default="/",
        max_length=1024,
        pattern=PATH_PREFIX,
        description="Requests under this path go to the model (e.g. /support-bot; default /).",
    )
    strip_path_prefix: bool = Field(
        default=True,
        description="Remove pathPrefix before the request reaches the engine, whose API is under /v1.",
    )
    endpoint_picker: EndpointPicker | None = Field(
        default=None,
        description=(
            "Route through an InferencePool whose Endpoint Picker picks the replica (by queue and KV-cache "
            "load); used where the InferencePool CRD (inference.networking.k8s.io/v1) is installed."
        ),
    )


class ModelServiceSpec(KubeModel):
    """The artifact to serve, the engine, and how many replicas of it."""

    source: ServiceSource = Field(description="The artifact to serve.")
    engine: Engine = Field(default="auto", description="auto: vLLM on GPUs, transformers on CPU.")
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Engine replicas behind the Service (the scale subresource's; not used while autoscaling is set).",
    )
    served_model_name: str | None = Field(
        default=None, max_length=128, description="Model name in the OpenAI API (default: the object's name)."
    )
    resources: Placement = Field(default_factory=Placement)
    tensor_parallel: TensorParallel = Field(
        default="auto",
        description="GPUs per replica: 'auto' (the smallest power of two that holds weights and KV cache) or a number.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    engine_options: EngineOptions = Field(default_factory=EngineOptions, description="Engine settings.")
    adapters: list[Adapter] = Field(
        default_factory=list,
        description=(
            "LoRA adapters served with the base model, each under its own model name (vllm, sglang, transformers; "
            "replicas on one node). Adding, removing or updating one loads it into the running replicas without "
            "a restart, unless it needs a larger LoRA rank, more adapters per batch or a new claim than they "
            "started with."
        ),
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    image: str | None = Field(default=None, max_length=512, description="Engine image override.")
    credentials: Credentials | None = None
    auth: ServiceAuth | None = Field(default=None, description="API key for the OpenAI endpoint (default: none).")
    autoscaling: Autoscaling | None = Field(
        default=None, description="Scale the replicas on an engine metric (default: spec.replicas, fixed)."
    )
    route: Route | None = Field(default=None, description="Expose the endpoint through a Gateway (default: none).")

    rules = (
        Rule(
            cel="type(self.tensorParallel) == int ? self.tensorParallel >= 1 : self.tensorParallel == 'auto'",
            message=TENSOR_PARALLEL_MESSAGE,
            check=lambda s: (
                s.tensor_parallel == "auto" or (isinstance(s.tensor_parallel, int) and s.tensor_parallel >= 1)
            ),
            field=".tensorParallel",
        ),
        Rule(
            cel="!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            message="adapter names must be unique",
            check=lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
            field=".adapters",
        ),
        Rule(
            cel="!has(self.adapters) || !has(self.servedModelName) "
            "|| self.adapters.all(a, a.name != self.servedModelName)",
            message="an adapter cannot have the served model's name",
            check=lambda s: s.served_model_name is None or all(a.name != s.served_model_name for a in s.adapters),
            field=".adapters",
        ),
        Rule(
            cel="!has(self.autoscaling) || self.engine != 'transformers'",
            message="autoscaling needs engine vllm or sglang (the transformers server exports no engine metrics)",
            check=lambda s: s.autoscaling is None or s.engine != "transformers",
            field=".autoscaling",
        ),
        # A transition rule (the API server only): `kubectl scale` while the autoscaler owns the count fails
        # loudly rather than being ignored. Python sees one object, never the old one.
        Rule(
            cel="!has(self.autoscaling) || !has(oldSelf.autoscaling) || self.replicas == oldSelf.replicas",
            message="replicas cannot change while autoscaling is set: change autoscaling.minReplicas/maxReplicas",
            check=lambda s: True,
            field=".replicas",
        ),
    )


AdapterPhase = Literal["Pending", "Configured", "Failed"]


class AdapterStatus(KubeModel):
    """One of spec.adapters as the operator handed it to the replicas."""

    name: str = Field(max_length=128, description="The adapter's name (spec.adapters[].name).")
    model: str | None = Field(
        default=None, max_length=300, description="What a client sends as the request's model to use it."
    )
    phase: AdapterPhase = Field(
        description=(
            "Configured: in the list the replicas serve (each loads it within about a minute, without a "
            "restart); Pending: its FineTuneJob has not succeeded yet; Failed: it cannot be served (message)."
        )
    )
    uri: str | None = Field(default=None, max_length=2048, description="Where the replicas fetch it from.")
    digest: str | None = Field(default=None, max_length=128, description="The artifact's digest, when known.")
    rank: int | None = Field(default=None, ge=1, description="Its LoRA rank, when known to the operator.")
    message: str | None = Field(default=None, max_length=1024, description="Why it is Pending or Failed.")


class ModelServiceStatus(CommonStatus):
    """What the operator observed: the live artifact, its endpoint and ready replicas."""

    phase: ServicePhase | None = Field(
        default=None, description="Pending, Waiting (for its source), Deploying, Ready or Failed."
    )
    engine: str | None = Field(
        default=None, max_length=32, description="The engine chosen: vllm, sglang or transformers."
    )
    endpoint: str | None = Field(default=None, max_length=1024, description="In-cluster OpenAI base URL.")
    served_artifact: ArtifactStatus | None = Field(default=None, description="The artifact the replicas serve.")
    gpus: int | None = Field(default=None, ge=0, description="GPUs per replica.")
    replicas: int | None = Field(default=None, ge=0, description="Replicas asked for.")
    ready_replicas: int | None = Field(default=None, ge=0, description="Replicas answering.")
    selector: str | None = Field(
        default=None,
        max_length=4096,
        description="Label selector of the engine pods (the scale subresource's, for kubectl scale and autoscalers).",
    )
    adapters: list[AdapterStatus] = Field(
        default_factory=list,
        max_length=16,
        description="The LoRA adapters (spec.adapters): the model name each answers to, and whether it is served.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class ModelService(KubeModel):
    """Serve an artifact with vLLM, SGLang or transformers behind an OpenAI-compatible endpoint."""

    api_version: Literal["kubeforge.io/v1alpha1"] = "kubeforge.io/v1alpha1"
    kind: Literal["ModelService"] = "ModelService"
    metadata: ObjectMeta
    spec: ModelServiceSpec
    status: ModelServiceStatus | None = None
