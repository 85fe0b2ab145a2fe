"""Every label, annotation and field-manager name kubeforge puts on what it creates, defined once."""

from __future__ import annotations

from kubeforge.api.kinds import GROUP
from kubeforge.render.names import owner_label

FIELD_MANAGER = "kubeforge"
# Holds a field kubeforge stops applying until its new owner (an autoscaler) writes it: see controller/service.py
HANDOVER_FIELD_MANAGER = "kubeforge-handover"

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "kubeforge"
PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"  # trainer | rendezvous | contract

OWNER_KIND = f"{GROUP}/owner-kind"  # FineTuneJob | QuantizeJob | ModelService
OWNER_NAME = f"{GROUP}/owner-name"
OWNER_UID = f"{GROUP}/owner-uid"

PLAN_DIGEST = f"{GROUP}/plan-digest"  # annotation: which plan a child was rendered from
ARTIFACT_DIGEST = f"{GROUP}/artifact-digest"  # annotation: which artifact a serving pod template serves
ARTIFACT_URI = f"{GROUP}/artifact-uri"

KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"  # Kueue admits the whole gang at once
JOB_COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # set by the Job controller on pods
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = "nvidia.com/gpu"


def owner_labels(kind: str, name: str, uid: str | None) -> dict[str, str]:
    labels = {
        MANAGED_BY: MANAGED_BY_VALUE,
        PART_OF: "kubeforge",
        OWNER_KIND: kind,
        OWNER_NAME: owner_label(name),
    }
    if uid:
        labels[OWNER_UID] = uid
    return labels


def owner_key(namespace: str | None, kind: str, name: str) -> tuple[str | None, str, str]:
    """How the controller's child indexes are keyed: (namespace, OWNER_KIND, OWNER_NAME) as
    owner_labels() wrote them on the children of ``kind`` ``name``."""
    return namespace, kind, owner_label(name)
