"""The building blocks every resource model shares.

- ``KubeModel``: camelCase on the wire, snake_case in Python, unknown fields rejected.
- ``Rule``: a cross-field rule written once, in two forms that must agree: a CEL
  expression for the CRD (the API server evaluates it at admission) and a Python
  predicate over the validated model (``kubeforge validate`` and the operator
  evaluate it). ``tests/api/test_cel_rules.py`` checks both forms on the same objects.
- ``Immutable``: fields that may not change after creation (a CEL transition rule
  in the CRD, ``immutable_changes`` for the operator).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CONDITION_TYPE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


def checked_pattern(pattern: str, what: str) -> AfterValidator:
    """A regex the CRD enforces as ``pattern``; in Python it fails with a readable message."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


def crd_pattern(pattern: str) -> Any:
    return Field(json_schema_extra={"pattern": pattern})


DNSLabel = Annotated[
    str,
    Field(min_length=1, max_length=63),
    crd_pattern(DNS1123_LABEL),
    checked_pattern(DNS1123_LABEL, "a DNS-1123 label (lower-case letters, digits and '-', at most 63)"),
]
DNSSubdomain = Annotated[
    str,
    Field(min_length=1, max_length=253),
    crd_pattern(DNS1123_SUBDOMAIN),
    checked_pattern(DNS1123_SUBDOMAIN, "a DNS-1123 subdomain (lower-case letters, digits, '-' and '.')"),
]


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: ``cel`` for the API server, ``check`` for Python; same meaning.

    ``field`` is the path, relative to the model the rule sits on, that the problem is
    reported at (for example ``.lora``); it becomes the CEL rule's ``fieldPath``.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field: str = ""


@dataclass(frozen=True)
class Immutable:
    """Marks a field that may not change once the object exists."""

    reason: str = "is immutable once the object exists"


class KubeModel(BaseModel):
    """Base of every API model: camelCase aliases, strict about unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,  # like the API server: "5" is not an integer, "yes" is not a boolean
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    def dump(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, no unset optionals."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class LocalObjectRef(KubeModel):
    """A reference to another kubeforge object in the same namespace."""

    name: DNSSubdomain = Field(description="Name of the object in the same namespace.")


class SecretKeyRef(KubeModel):
    """One key of a Secret in the same namespace (never an inline value)."""

    name: DNSSubdomain = Field(description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret.")


class SecretRef(KubeModel):
    """A whole Secret in the same namespace, exposed to the pods as environment variables."""

    name: DNSSubdomain = Field(description="Name of the Secret.")


class Credentials(KubeModel):
    """Credentials, only ever as references to Secrets in the object's namespace."""

    hugging_face: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a Hugging Face token (becomes HF_TOKEN)."
    )
    s3: SecretRef | None = Field(
        default=None,
        description=(
            "Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally "
            "AWS_ENDPOINT_URL / AWS_REGION for s3:// URIs."
        ),
    )


class Toleration(KubeModel):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(
        default=None, max_length=316, description="Taint key to tolerate (empty: all, with Exists)."
    )
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Equal: key and value match; Exists: key."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate (empty: all)."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated (empty: forever)."
    )

    rules = (
        Rule(
            cel="!(self.operator == 'Exists' && has(self.value))",
            message="must not be set when operator is Exists",
            check=lambda t: not (t.operator == "Exists" and t.value is not None),
            field=".value",
        ),
        Rule(
            cel="has(self.key) || self.operator == 'Exists'",
            message="an empty key needs operator Exists",
            check=lambda t: t.key is not None or t.operator == "Exists",
            field=".key",
        ),
    )


class Placement(KubeModel):
    """Where pods may run: a GPU type and the usual scheduling knobs."""

    gpu_type: str = Field(
        default="auto",
        max_length=128,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_. ]*$",
        description=(
            "'auto' lets the planner pick among the GPU pools the cluster has; otherwise a GPU "
            "product (e.g. H100-80GB-HBM3, A100-SXM4-80GB, A10G) or a family (H100, A100, A10, cpu)."
        ),
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63, description="A label value.")]] = Field(
        default_factory=dict, description="Extra node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the pods tolerate (besides nvidia.com/gpu)."
    )


class Condition(KubeModel):
    """A condition, as the Kubernetes API conventions define it (metav1.Condition)."""

    type: str = Field(max_length=316, pattern=CONDITION_TYPE, description="What the condition is about (CamelCase).")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1, max_length=1024, pattern=CONDITION_REASON, description="Why, in one CamelCase word."
    )
    message: str = Field(default="", max_length=32768, description="Why, for people.")
    last_transition_time: str = Field(
        description="When the status last changed.", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the condition was computed from."
    )


class ArtifactStatus(KubeModel):
    """A model artifact as the runtime wrote it; ``digest`` is the sha256 of its manifest, the
    kubeforge-artifact.json that runtime/kubeforge/runtime/export.py writes beside the weights."""

    uri: str = Field(max_length=2048, description="Where the artifact is.")
    digest: str | None = Field(default=None, max_length=128, description="sha256 of the artifact's manifest file.")
    size_bytes: int | None = Field(default=None, ge=0, description="Bytes of its files.")
    created_at: str | None = Field(
        default=None, description="When it was written.", json_schema_extra={"format": "date-time"}
    )


class CommonStatus(KubeModel):
    """What every kind reports."""

    phase: str | None = Field(default=None, description="Where the object is in its life cycle.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Conditions: Ready (with Reconciling and Stalled as kstatus reads them) and the kind's own.",
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this status was computed from."
    )
