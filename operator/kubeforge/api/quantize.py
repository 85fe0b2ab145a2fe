"""QuantizeJob: turn an artifact into a quantized one, optionally gated by an accuracy check."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kubeforge.api.base import (
    ArtifactStatus,
    CommonStatus,
    Credentials,
    Immutable,
    KubeModel,
    LocalObjectRef,
    Placement,
    Rule,
)
from kubeforge.api.meta import ObjectMeta
from kubeforge.api.uris import OutputUri, Uri

QuantizeMethod = Literal["fp8", "w4a16-gptq", "w4a16-awq", "w8a8-int8"]
QuantizePhase = Literal["Pending", "Waiting", "Running", "Succeeded", "Failed"]
CALIBRATED_METHODS = ("w4a16-gptq", "w4a16-awq", "w8a8-int8")


def count_set(*values: object) -> int:
    return sum(v is not None for v in values)


class QuantizeSource(KubeModel):
    """What to quantize: a FineTuneJob's artifact or a location."""

    fine_tune_job_ref: LocalObjectRef | None = Field(
        default=None, description="Quantize what this FineTuneJob exported (waits until it succeeds)."
    )
    uri: Uri | None = Field(default=None, description="Or an artifact location: pvc://, s3://, hf://, local.")

    rules = (
        Rule(
            cel="(has(self.fineTuneJobRef) ? 1 : 0) + (has(self.uri) ? 1 : 0) == 1",
            message="set exactly one of fineTuneJobRef and uri",
            check=lambda s: count_set(s.fine_tune_job_ref, s.uri) == 1,
        ),
    )


class Calibration(KubeModel):
    """Data the calibrated methods (GPTQ, AWQ, int8) observe activations on."""

    dataset_uri: Uri | None = Field(
        default=None, description="JSON lines to calibrate on (default: the source FineTuneJob's dataset)."
    )
    samples: int = Field(default=256, gt=0, le=65536, description="Examples to calibrate on.")
    max_seq_length: int = Field(default=2048, gt=0, le=1048576, description="Tokens per calibration example.")


class EvaluationGate(KubeModel):
    """An accuracy check of the quantized model against the source: the job fails past maxDegradation."""

    metric: Literal["perplexity", "exact-match"] = Field(
        default="perplexity", description="perplexity on held-out text, or exact-match of greedy answers."
    )
    dataset_uri: Uri | None = Field(default=None, description="Held-out examples (default: calibration data).")
    samples: int = Field(default=128, gt=0, le=65536, description="Held-out examples to evaluate.")
    max_degradation: float = Field(
        ge=0,
        le=1,
        description=(
            "Largest allowed loss of quality as a fraction: relative perplexity increase, or absolute "
            "exact-match drop. The job fails, with both numbers, beyond it."
        ),
    )


class QuantizeOutput(KubeModel):
    """Where the quantized artifact goes."""

    uri: OutputUri = Field(description="pvc://claim/path, s3://bucket/prefix or a local path.")


class QuantizeJobSpec(KubeModel):
    """The source artifact, the method, and where the quantized artifact goes."""

    source: Annotated[QuantizeSource, Immutable()]
    method: Annotated[QuantizeMethod, Immutable()] = Field(
        description="fp8: dynamic FP8 (no calibration); w4a16-gptq / w4a16-awq: int4 weights; w8a8-int8."
    )
    calibration: Calibration | None = Field(default=None, description="Calibration data (calibrated methods).")
    evaluation: EvaluationGate | None = Field(default=None, description="Accuracy gate (default: none).")
    output: Annotated[QuantizeOutput, Immutable()]
    resources: Placement = Field(default_factory=Placement)
    image: str | None = Field(default=None, max_length=512, description="Quantizer image override.")
    credentials: Credentials | None = None

    rules = (
        Rule(
            cel="!has(self.calibration) || self.method != 'fp8'",
            message="fp8 is dynamic and takes no calibration",
            check=lambda s: s.calibration is None or s.method != "fp8",
            field=".calibration",
        ),
        Rule(
            cel="self.method == 'fp8' || !has(self.source.uri) || "
            "(has(self.calibration) && has(self.calibration.datasetUri))",
            message="is required when the source is a uri and the method needs calibration",
            check=lambda s: (
                s.method == "fp8"
                or s.source.uri is None
                or (s.calibration is not None and s.calibration.dataset_uri is not None)
            ),
            field=".calibration.datasetUri",
        ),
    )


class QuantizeProgress(KubeModel):
    """What the quantizer reports."""

    stage: str | None = Field(
        default=None, max_length=64, description="fetch, calibrate, quantize, evaluate or publish."
    )
    percent: int | None = Field(default=None, ge=0, le=100, description="Of the whole job, roughly.")


class SourceStatus(KubeModel):
    """The artifact being quantized, resolved."""

    uri: str | None = Field(default=None, max_length=2048, description="Where the source artifact is.")
    digest: str | None = Field(default=None, max_length=128, description="Its manifest's sha256.")


class QuantizeResources(KubeModel):
    """What the quantizer pod requests, sized from the model (planner/quantize_size.py) or, where the
    model's architecture is unknown, the defaults."""

    sized_from: Literal["model", "defaults"] = Field(
        description="model: estimated from the architecture; defaults: the architecture is unknown (fixed request)."
    )
    cpu: str = Field(max_length=16, description="CPU cores requested.")
    memory: str = Field(
        max_length=32,
        description="Host memory requested and its limit (a quantity): the weights as loaded, the quantized copy, "
        "calibration activations, a margin and the runtime.",
    )
    gpus: int = Field(ge=0, description="GPUs requested: one for the calibrated methods, none for fp8.")
    gpu_type: str | None = Field(
        default=None, max_length=128, description="The GPU the pod is placed on (absent: any GPU, or none)."
    )
    gpu_memory: str | None = Field(
        default=None,
        max_length=32,
        description="GPU memory one layer's calibration needs (a quantity): the layer, GPTQ's Hessians or "
        "AWQ's activation cache, one sample's activations and the CUDA reserve.",
    )
    reason: str = Field(default="", max_length=4096, description="How the request was reached, term by term.")


class QuantizeJobStatus(CommonStatus):
    """What the operator observed: source, progress, artifact and metrics."""

    phase: QuantizePhase | None = Field(
        default=None, description="Pending, Waiting (for its source), Running, Succeeded or Failed."
    )
    source: SourceStatus | None = Field(default=None, description="The source artifact, once resolved.")
    gpus: int | None = Field(default=None, ge=0, description="GPUs the quantizer pod requests.")
    resources: QuantizeResources | None = Field(
        default=None, description="The quantizer pod's requests and how they were sized, once it is rendered."
    )
    progress: QuantizeProgress | None = Field(default=None, description="Progress while it runs.")
    artifact: ArtifactStatus | None = Field(default=None, description="The quantized artifact, once succeeded.")
    metrics: dict[str, Annotated[float, Field(description="A metric's value.")]] = Field(
        default_factory=dict, description="The evaluation gate's numbers (source and quantized)."
    )
    start_time: str | None = Field(
        default=None, description="When the quantizer started.", json_schema_extra={"format": "date-time"}
    )
    completion_time: str | None = Field(
        default=None, description="When it succeeded or failed.", json_schema_extra={"format": "date-time"}
    )


class QuantizeJob(KubeModel):
    """Quantize an artifact (FP8, GPTQ/AWQ int4, int8), optionally gated by an accuracy check."""

    api_version: Literal["kubeforge.io/v1alpha1"] = "kubeforge.io/v1alpha1"
    kind: Literal["QuantizeJob"] = "QuantizeJob"
    metadata: ObjectMeta
    spec: QuantizeJobSpec
    status: QuantizeJobStatus | None = None
