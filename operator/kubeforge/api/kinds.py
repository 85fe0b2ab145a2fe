"""The three kinds: names, printer columns and models, defined once."""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.api.base import KubeModel
from kubeforge.api.finetune import FineTuneJob
from kubeforge.api.quantize import QuantizeJob
from kubeforge.api.service import ModelService

GROUP = "kubeforge.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubeforge"


@dataclass(frozen=True)
class Column:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0

    def dump(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


AGE = Column("Age", ".metadata.creationTimestamp", "date")
READY = Column(
    "Ready", '.status.conditions[?(@.type=="Ready")].status', description="Whether the object reached its goal"
)
REASON = Column("Reason", '.status.conditions[?(@.type=="Ready")].reason', description="Why it is (not) Ready")


@dataclass(frozen=True)
class Scale:
    """The scale subresource: where `kubectl scale`, an HPA or KEDA read and write the replica count."""

    spec_replicas: str
    status_replicas: str
    label_selector: str

    def dump(self) -> dict[str, str]:
        return {"specReplicasPath": self.spec_replicas, "statusReplicasPath": self.status_replicas,
                "labelSelectorPath": self.label_selector}  # fmt: skip


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    model: type[KubeModel]
    columns: tuple[Column, ...]
    scale: Scale | None = None

    @property
    def subresources(self) -> dict[str, object]:
        out: dict[str, object] = {"status": {}}
        if self.scale is not None:
            out["scale"] = self.scale.dump()
        return out

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


FINETUNEJOB = Kind(
    kind="FineTuneJob",
    plural="finetunejobs",
    singular="finetunejob",
    short_names=("ftj",),
    model=FineTuneJob,
    columns=(
        Column("Phase", ".status.phase"),
        READY,
        REASON,
        Column("Model", ".spec.model.uri"),
        Column("Method", ".spec.method"),
        Column("GPUs", ".status.plan.totalGPUs", "integer", "GPUs in the planned gang"),
        Column("Progress", ".status.progress.percent", "integer", "Percent of training steps done"),
        Column("Loss", ".status.progress.loss", "number", priority=1),
        AGE,
    ),
)

QUANTIZEJOB = Kind(
    kind="QuantizeJob",
    plural="quantizejobs",
    singular="quantizejob",
    short_names=("qj",),
    model=QuantizeJob,
    columns=(
        Column("Phase", ".status.phase"),
        READY,
        REASON,
        Column("Model", ".status.source.uri", description="The artifact being quantized"),
        Column("Method", ".spec.method"),
        Column("GPUs", ".status.gpus", "integer"),
        Column("Progress", ".status.progress.stage"),
        AGE,
    ),
)

MODELSERVICE = Kind(
    kind="ModelService",
    plural="modelservices",
    singular="modelservice",
    short_names=("msvc",),
    model=ModelService,
    columns=(
        Column("Phase", ".status.phase"),
        READY,
        REASON,
        Column("Model", ".status.servedArtifact.uri", description="The artifact being served"),
        Column("Engine", ".status.engine"),
        Column("GPUs", ".status.gpus", "integer", "GPUs per replica"),
        Column("Replicas", ".status.readyReplicas", "integer", "Replicas ready to serve"),
        Column("Endpoint", ".status.endpoint", priority=1),
        AGE,
    ),
    # .status.replicas is the workload's replica count as the operator last saw it, .status.selector its
    # pods' selector: an HPA on the ModelService reads both; `kubectl scale msvc` writes .spec.replicas.
    scale=Scale(".spec.replicas", ".status.replicas", ".status.selector"),
)

KINDS: tuple[Kind, ...] = (FINETUNEJOB, QUANTIZEJOB, MODELSERVICE)
BY_KIND: dict[str, Kind] = {k.kind: k for k in KINDS}
