"""ModelService: serve an artifact with vLLM, SGLang or transformers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from kubeforge.api.base import (
    ArtifactStatus,
    CommonStatus,
    Credentials,
    KubeModel,
    LocalObjectRef,
    Placement,
    Rule,
    SecretKeyRef,
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


class Adapter(KubeModel):
    """A LoRA adapter served next to the base model under its own name."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")] = Field(
        description="The model name clients ask for."
    )
    uri: Uri = Field(description="Where the adapter is: pvc://, s3://, hf:// or a local path.")


class ServiceAuth(KubeModel):
    """Who may use the OpenAI API: with a key, every /v1/* request must send ``Authorization: Bearer <key>``."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the API key clients must send as a bearer token (/health stays open).",
    )


class ModelServiceSpec(KubeModel):
    """The artifact to serve, the engine, and how many replicas of it."""

    source: ServiceSource = Field(description="The artifact to serve.")
    engine: Engine = Field(default="auto", description="auto: vLLM on GPUs, transformers on CPU.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Engine replicas behind the Service.")
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
        description="LoRA adapters served with the base (vllm, sglang).",
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    image: str | None = Field(default=None, max_length=512, description="Engine image override.")
    credentials: Credentials | None = None
    auth: ServiceAuth | None = Field(default=None, description="API key for the OpenAI endpoint (default: none).")

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
            cel="!has(self.adapters) || size(self.adapters) == 0 || self.engine != 'transformers'",
            message="LoRA adapters need engine vllm or sglang",
            check=lambda s: not s.adapters or s.engine != "transformers",
            field=".adapters",
        ),
        Rule(
            cel="!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            message="adapter names must be unique",
            check=lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
            field=".adapters",
        ),
    )


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


class ModelService(KubeModel):
    """Serve an artifact with vLLM, SGLang or transformers behind an OpenAI-compatible endpoint."""

    api_version: Literal["kubeforge.io/v1alpha1"] = "kubeforge.io/v1alpha1"
    kind: Literal["ModelService"] = "ModelService"
    metadata: ObjectMeta
    spec: ModelServiceSpec
    status: ModelServiceStatus | None = None
