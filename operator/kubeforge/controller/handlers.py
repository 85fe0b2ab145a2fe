"""kopf handlers: decorators and one call each; every decision lives in pure functions."""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from kubeforge.api.kinds import GROUP, VERSION
from kubeforge.controller import metrics
from kubeforge.controller.kube import Kube
from kubeforge.controller.reconcile import (
    lookup_in,
    reconcile_finetunejob,
    reconcile_modelservice,
    reconcile_quantizejob,
)
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
    # A deletion waits for the resync timer to exit; a pass caught mid-run ends within a second,
    # so wait for it briefly instead of kopf's default 60 s re-check (which held finalizers, and
    # deletions, for a minute about one time in ten).
    settings.background.instant_exit_timeout = 2.0
    settings.background.cancellation_polling = 1.0
    # kopf's own requests (watch lists, its annotations, finalizers) retry on the same schedule as ours
    # (controller/retry.py); a pass that still fails is retried after a resync, not kopf's default 60 s.
    kube = Kube()
    settings.networking.error_backoffs = kube.policy.backoffs()
    settings.networking.request_timeout = kube.timeout
    settings.networking.connect_timeout = kube.timeout
    settings.execution.default_backoff = max(1.0, min(RESYNC, 10.0))
    settings.execution.max_workers = 16  # passes wait on retries in threads; kopf's default is cores + 4
    memo.kube = kube
    if METRICS_PORT:
        metrics.serve(METRICS_PORT)


def owner_key(body: kopf.Body) -> tuple[str | None, str | None, str | None]:
    """A child's index key, from its owner labels: the handlers look it up with L.owner_key()."""
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
    key = L.owner_key(body.metadata.namespace, "FineTuneJob", body.metadata.name or "")
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
    _report("FineTuneJob", body, decision)


@kopf.on.delete(*FINETUNEJOBS, optional=True)
@kopf.on.delete(*QUANTIZEJOBS, optional=True)
@kopf.on.delete(*MODELSERVICES, optional=True)
def deleted(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (ownerReferences); only the metrics forget it."""
    metrics.forget(body.get("kind", ""), body.metadata.namespace or "", body.metadata.name or "")


@kopf.on.event(*FINETUNEJOBS)
@kopf.on.event(*QUANTIZEJOBS)
@kopf.on.event(*MODELSERVICES)
def gone(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A deletion kopf held no finalizer for still leaves the metrics."""
    metrics.forget_if_deleted(
        event.get("type"), body.get("kind", ""), body.metadata.namespace or "", body.metadata.name or ""
    )


@kopf.index(*FINETUNEJOBS)
@kopf.index(*QUANTIZEJOBS)
def kubeforge_objects(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    """FineTuneJobs and QuantizeJobs by (namespace, kind, name): the sources others wait for."""
    return {(body.metadata.namespace, body.get("kind"), body.metadata.name): dict(body)}


@kopf.index("apps", "v1", "deployments", labels=OURS)
def owned_deployments(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", labels=OURS)
def owned_leaderworkersets(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


# A ModelService's optional children: its autoscaler (KEDA's own HPA carries its ScaledObject's labels,
# so it shows here too: controller/service.py tells them apart by name) and its route.
@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=OURS)
def owned_horizontalpodautoscalers(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("keda.sh", "v1alpha1", "scaledobjects", labels=OURS)
def owned_scaledobjects(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("gateway.networking.k8s.io", "v1", "httproutes", labels=OURS)
def owned_httproutes(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("inference.networking.k8s.io", "v1", "inferencepools", labels=OURS)
def owned_inferencepools(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.on.resume(*QUANTIZEJOBS)
@kopf.on.create(*QUANTIZEJOBS)
@kopf.on.update(*QUANTIZEJOBS)
@kopf.timer(*QUANTIZEJOBS, interval=RESYNC)
def quantizejob(
    body: kopf.Body,
    memo: kopf.Memo,
    gpu_nodes: kopf.Index,
    kubeforge_objects: kopf.Index,
    owned_configmaps: kopf.Index,
    owned_jobs: kopf.Index,
    owned_pods: kopf.Index,
    **_: Any,
) -> None:
    """Wait for the source, size and run the quantizer, follow it (controller/quantize.py decides)."""
    key = L.owner_key(body.metadata.namespace, "QuantizeJob", body.metadata.name or "")
    with metrics.measured("QuantizeJob"):
        decision = reconcile_quantizejob(
            body,
            lookup=lookup_in(kubeforge_objects, body.metadata.namespace),
            children=[c for index in (owned_configmaps, owned_jobs) for c in index.get(key, [])],
            pods=owned_pods.get(key, []),
            kube=memo.kube,
            nodes=gpu_nodes.get(None, []),
        )
    _report("QuantizeJob", body, decision)


@kopf.on.resume(*MODELSERVICES)
@kopf.on.create(*MODELSERVICES)
@kopf.on.update(*MODELSERVICES)
@kopf.timer(*MODELSERVICES, interval=RESYNC)
def modelservice(
    body: kopf.Body,
    memo: kopf.Memo,
    gpu_nodes: kopf.Index,
    kubeforge_objects: kopf.Index,
    owned_configmaps: kopf.Index,
    owned_services: kopf.Index,
    owned_deployments: kopf.Index,
    owned_leaderworkersets: kopf.Index,
    owned_horizontalpodautoscalers: kopf.Index,
    owned_scaledobjects: kopf.Index,
    owned_httproutes: kopf.Index,
    owned_inferencepools: kopf.Index,
    **_: Any,
) -> None:
    """Wait for the artifact, plan, deploy, roll over to new artifacts (controller/service.py decides)."""
    key = L.owner_key(body.metadata.namespace, "ModelService", body.metadata.name or "")
    indexes = (owned_configmaps, owned_services, owned_deployments, owned_leaderworkersets,
               owned_horizontalpodautoscalers, owned_scaledobjects, owned_httproutes, owned_inferencepools)  # fmt: skip
    with metrics.measured("ModelService"):
        decision = reconcile_modelservice(
            body,
            lookup=lookup_in(kubeforge_objects, body.metadata.namespace),
            nodes=gpu_nodes.get(None, []),
            children=[c for index in indexes for c in index.get(key, [])],
            kube=memo.kube,
        )
    _report("ModelService", body, decision)


def _report(kind: str, body: kopf.Body, decision: Any) -> None:
    metrics.record_phase(kind, body.metadata.namespace or "", body.metadata.name or "", decision.status["phase"])
