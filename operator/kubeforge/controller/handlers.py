"""kopf handlers: decorators and one call each; every decision lives in pure functions."""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from kubeforge.api.kinds import GROUP, VERSION
from kubeforge.controller import metrics
from kubeforge.controller.admission import admission_status
from kubeforge.controller.conditions import now_rfc3339
from kubeforge.controller.kube import Kube
from kubeforge.controller.reconcile import reconcile_finetunejob, status_changed
from kubeforge.render import labels as L

FINETUNEJOBS = (GROUP, VERSION, "finetunejobs")
QUANTIZEJOBS = (GROUP, VERSION, "quantizejobs")
MODELSERVICES = (GROUP, VERSION, "modelservices")
OURS = {L.MANAGED_BY: L.MANAGED_BY_VALUE}
RESYNC = float(os.environ.get("KUBEFORGE_RESYNC_SECONDS", "10"))
METRICS_PORT = int(os.environ.get("KUBEFORGE_METRICS_PORT", "9102"))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's bookkeeping in annotations (our status schema is structural and would prune it)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    memo.kube = Kube()
    if METRICS_PORT:
        metrics.serve(METRICS_PORT)


def owner_key(body: kopf.Body) -> tuple[str | None, str | None, str | None]:
    labels = body.get("metadata", {}).get("labels") or {}
    return body.get("metadata", {}).get("namespace"), labels.get(L.OWNER_KIND), labels.get(L.OWNER_NAME)


@kopf.index("", "v1", "nodes")
def gpu_nodes(body: kopf.Body, **_: Any) -> dict[None, dict[str, Any]]:
    """Every Node, as the inventory reads it (labels, schedulability, capacity)."""
    return {None: {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}}


@kopf.index("", "v1", "configmaps", labels=OURS)
def owned_configmaps(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("", "v1", "services", labels=OURS)
def owned_services(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("batch", "v1", "jobs", labels=OURS)
def owned_jobs(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("jobset.x-k8s.io", "v1alpha2", "jobsets", labels=OURS)
def owned_jobsets(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("", "v1", "pods", labels=OURS)
def owned_pods(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.on.resume(*FINETUNEJOBS)
@kopf.on.create(*FINETUNEJOBS)
@kopf.on.update(*FINETUNEJOBS)
@kopf.timer(*FINETUNEJOBS, interval=RESYNC)
def finetunejob(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    gpu_nodes: kopf.Index,
    owned_configmaps: kopf.Index,
    owned_services: kopf.Index,
    owned_jobs: kopf.Index,
    owned_jobsets: kopf.Index,
    owned_pods: kopf.Index,
    **_: Any,
) -> None:
    """Plan, render, apply the gang, follow it: one level-triggered pass (controller/finetune.py decides)."""
    key = (body.metadata.namespace, "FineTuneJob", body.metadata.name)
    with metrics.measured("FineTuneJob"):
        decision = reconcile_finetunejob(
            body,
            nodes=gpu_nodes.get(None, []),
            children=[
                c for index in (owned_configmaps, owned_services, owned_jobs, owned_jobsets) for c in index.get(key, [])
            ],
            pods=owned_pods.get(key, []),
            kube=memo.kube,
        )
    if status_changed(decision, body):
        patch.status.update(decision.status)
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    metrics.record_phase(
        "FineTuneJob", body.metadata.namespace or "", body.metadata.name or "", decision.status["phase"]
    )


@kopf.on.delete(*FINETUNEJOBS, optional=True)
def finetunejob_deleted(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (ownerReferences); only the metrics forget it."""
    metrics.record_phase("FineTuneJob", body.metadata.namespace or "", body.metadata.name or "", None)


@kopf.on.resume(*QUANTIZEJOBS)
@kopf.on.create(*QUANTIZEJOBS)
@kopf.on.update(*QUANTIZEJOBS)
def quantizejob(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Validate and record what the operator saw."""
    with metrics.measured("QuantizeJob"):
        patch.status.update(admission_status(body, now_rfc3339()))


@kopf.on.resume(*MODELSERVICES)
@kopf.on.create(*MODELSERVICES)
@kopf.on.update(*MODELSERVICES)
def modelservice(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Validate and record what the operator saw."""
    with metrics.measured("ModelService"):
        patch.status.update(admission_status(body, now_rfc3339()))
