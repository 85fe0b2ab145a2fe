"""kopf handlers: decorators and one call each; every decision lives in pure functions."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import kopf

from kubeforge.api.kinds import GROUP, VERSION
from kubeforge.controller import metrics
from kubeforge.controller.kube import Kube
from kubeforge.controller.plancache import inventory_digest
from kubeforge.controller.progress_reader import (
    READS_PER_SECOND,
    ProgressCache,
    close_sessions,
    progress_url,
    read_progress,
)
from kubeforge.controller.reconcile import (
    inventory,
    lookup_in,
    reconcile_finetunejob,
    reconcile_modelservice,
    reconcile_quantizejob,
)
from kubeforge.controller.state import names_taken
from kubeforge.controller.wakeups import SeenInputs, Wakeups, inputs_digest, node_facts, sources_of
from kubeforge.render import labels as L

FINETUNEJOBS = (GROUP, VERSION, "finetunejobs")
QUANTIZEJOBS = (GROUP, VERSION, "quantizejobs")
MODELSERVICES = (GROUP, VERSION, "modelservices")
OURS = {L.MANAGED_BY: L.MANAGED_BY_VALUE}
# Passes are event-driven (controller/wakeups.py): the resync is a safety net for what no event
# reports, and a running FineTuneJob's progress is read every PROGRESS seconds.
RESYNC = float(os.environ.get("KUBEFORGE_RESYNC_SECONDS", "60"))
PROGRESS = float(os.environ.get("KUBEFORGE_PROGRESS_SECONDS", "30"))
RETRY_AFTER = max(1.0, min(RESYNC, 10.0))  # a failed pass is tried again this soon (kopf's handler backoff too)
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
    # A deletion waits for the object's loop (daemon) to exit; a pass caught mid-run ends within a second,
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
    settings.execution.default_backoff = RETRY_AFTER
    settings.execution.max_workers = 16  # passes wait on retries in threads; kopf's default is cores + 4
    memo.kube = kube
    memo.executor = settings.execution.executor  # the daemons' passes run in kopf's handler threads
    if METRICS_PORT:
        metrics.serve(METRICS_PORT)


@kopf.on.cleanup()
async def close_progress_sessions(**_: Any) -> None:
    await close_sessions()


def owner_key(body: kopf.Body) -> tuple[str | None, str | None, str | None]:
    """A child's index key, from its owner labels: the handlers look it up with L.owner_key()."""
    labels = body.get("metadata", {}).get("labels") or {}
    return body.get("metadata", {}).get("namespace"), labels.get(L.OWNER_KIND), labels.get(L.OWNER_NAME)


@kopf.index("", "v1", "nodes")
async def gpu_nodes(body: kopf.Body, **_: Any) -> dict[None, dict[str, Any]]:
    """Every Node, as the inventory reads it (labels, schedulability, capacity)."""
    return {None: {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}}


WAKEUPS = Wakeups()
PROGRESS_READ = ProgressCache(READS_PER_SECOND)
# A FineTuneJob's resync skips its pass while its inputs are unchanged, but runs a full one this often (0: always).
FULL_EVERY = float(os.environ.get("KUBEFORGE_FULL_PASS_SECONDS", str(10 * RESYNC)))
SEEN = SeenInputs(FULL_EVERY)


@kopf.on.event("", "v1", "nodes")
async def node_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """What the nodes offer changed (not a heartbeat): everyone may plan again."""
    gone = event.get("type") == "DELETED"
    WAKEUPS.node_changed(body.metadata.name or "", None if gone else node_facts(body))


@kopf.on.event("batch", "v1", "jobs", labels=OURS)
@kopf.on.event("jobset.x-k8s.io", "v1alpha2", "jobsets", labels=OURS)
@kopf.on.event("", "v1", "pods", labels=OURS)
@kopf.on.event("apps", "v1", "deployments", labels=OURS)
@kopf.on.event("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", labels=OURS)
async def child_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A child or pod changed: its owner's loop runs a pass (instead of polling for it)."""
    if _changed(event, body):
        WAKEUPS.wake(owner_key(body))


def _changed(event: kopf.RawEvent, body: kopf.Body) -> bool:
    return WAKEUPS.changed(body.metadata.uid or "", body.metadata.get("resourceVersion"),
                           deleted=event.get("type") == "DELETED")  # fmt: skip


@kopf.index("", "v1", "configmaps", labels=OURS)
async def owned_configmaps(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("", "v1", "services", labels=OURS)
async def owned_services(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("batch", "v1", "jobs", labels=OURS)
async def owned_jobs(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("jobset.x-k8s.io", "v1alpha2", "jobsets", labels=OURS)
async def owned_jobsets(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("", "v1", "pods", labels=OURS)
async def owned_pods(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.on.resume(*FINETUNEJOBS)
@kopf.on.create(*FINETUNEJOBS)
@kopf.on.update(*FINETUNEJOBS)
def finetunejob(**kwargs: Any) -> None:
    """Plan, render, apply the gang, follow it: one level-triggered pass (controller/finetune.py decides).
    (kopf keeps a handler's return value in the status: this one returns nothing.)"""
    finetunejob_pass(**kwargs)


def finetunejob_inputs(
    body: kopf.Body,
    gpu_nodes: kopf.Index,
    owned_configmaps: kopf.Index,
    owned_services: kopf.Index,
    owned_jobs: kopf.Index,
    owned_jobsets: kopf.Index,
    owned_pods: kopf.Index,
    **_: Any,
) -> tuple[Any, list[Any], list[Any], list[Any], dict[str, Any] | None, str]:
    """What a FineTuneJob's pass decides from (key, nodes, children, pods, progress), and its digest: the
    job, its children and pods at their versions, the progress, the GPU inventory."""
    key = L.owner_key(body.metadata.namespace, "FineTuneJob", body.metadata.name or "")
    nodes = gpu_nodes.get(None, [])
    children = [
        c for index in (owned_configmaps, owned_services, owned_jobs, owned_jobsets) for c in index.get(key, [])
    ]
    pods, progress = owned_pods.get(key, []), PROGRESS_READ.get(key)
    digest = inputs_digest(body, [*children, *pods], progress, inventory_digest(inventory(nodes)))
    return key, nodes, children, pods, progress, digest


def finetunejob_unchanged(**kwargs: Any) -> bool:
    """A resync of the job's loop finds the inputs of its last pass (and no full pass is due): the pass
    would decide the same, and that was applied. Runs on the event loop: a skipped check costs a digest."""
    key, *_, digest = finetunejob_inputs(**kwargs)
    return SEEN.unchanged(key, digest)


def finetunejob_pass(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """One pass of a FineTuneJob (in kopf's handler threads)."""
    key, nodes, children, pods, progress, digest = finetunejob_inputs(body=body, **kwargs)
    with metrics.measured("FineTuneJob"):
        decision = reconcile_finetunejob(body, nodes=nodes, children=children, pods=pods, kube=memo.kube,
                                         progress=progress)  # fmt: skip
    if not names_taken(decision.status):  # else the next check looks again: is the name free now?
        SEEN.record(key, digest)
    _report("FineTuneJob", body, decision)


@kopf.daemon(*FINETUNEJOBS, cancellation_timeout=5.0)
async def finetunejob_loop(body: kopf.Body, memo: kopf.Memo, stopped: Any, **kwargs: Any) -> None:
    """Passes woken by the gang's events; while running, rank 0's progress is read every PROGRESS seconds
    (longer with many running jobs: controller/progress_reader.py's budget)."""
    key = L.owner_key(body.metadata.namespace, "FineTuneJob", body.metadata.name or "")

    def running() -> bool:
        return (body.get("status") or {}).get("phase") == "Running"

    async def read_progress_if_due() -> None:
        if not running():
            PROGRESS_READ.forget(key)
        elif PROGRESS_READ.due(key, PROGRESS, time.monotonic()):
            url = progress_url(kwargs["owned_pods"].get(key, []))
            if url:
                PROGRESS_READ.put(key, await read_progress(url), time.monotonic())

    try:
        # A check is due when a progress read or a full pass is: every PROGRESS seconds, or as the reads'
        # budget spreads them over many running jobs, whatever this job's phase (the wait starts before the
        # job's own status write comes back as Running, so a phase-dependent interval could sleep a whole
        # resync). Between checks every change the pass reads wakes the loop; a check whose inputs are
        # unchanged costs a digest (finetunejob_unchanged).
        interval = lambda: min(FULL_EVERY if FULL_EVERY > 0 else RESYNC, PROGRESS_READ.interval(PROGRESS))  # noqa: E731
        await _follow(finetunejob_pass, key, body, memo, stopped, kwargs,
                      before=read_progress_if_due, interval=interval, unchanged=finetunejob_unchanged)  # fmt: skip
    finally:
        PROGRESS_READ.forget(key)
        SEEN.forget(key)


@kopf.on.delete(*FINETUNEJOBS, optional=True)
@kopf.on.delete(*QUANTIZEJOBS, optional=True)
@kopf.on.delete(*MODELSERVICES, optional=True)
def deleted(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (ownerReferences); only the metrics forget it."""
    metrics.forget(body.get("kind", ""), body.metadata.namespace or "", body.metadata.name or "")


@kopf.on.event(*FINETUNEJOBS)
@kopf.on.event(*QUANTIZEJOBS)
@kopf.on.event(*MODELSERVICES)
async def object_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Any change of one of ours: a FineTuneJob's or QuantizeJob's wakes the QuantizeJobs and ModelServices
    that use it; a deletion kopf held no finalizer for still leaves the metrics. (One handler for both: each
    handler costs every event an invocation and a log line.)"""
    kind, namespace, name = body.get("kind", ""), body.metadata.namespace, body.metadata.name or ""
    metrics.forget_if_deleted(event.get("type"), kind, namespace or "", name)
    if kind in ("FineTuneJob", "QuantizeJob") and _changed(event, body):
        WAKEUPS.wake_dependents((namespace, kind, name))


@kopf.index(*FINETUNEJOBS)
@kopf.index(*QUANTIZEJOBS)
async def kubeforge_objects(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    """FineTuneJobs and QuantizeJobs by (namespace, kind, name): the sources others wait for."""
    return {(body.metadata.namespace, body.get("kind"), body.metadata.name): dict(body)}


@kopf.index("apps", "v1", "deployments", labels=OURS)
async def owned_deployments(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", labels=OURS)
async def owned_leaderworkersets(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


# A ModelService's optional children: its autoscaler (KEDA's own HPA carries its ScaledObject's labels,
# so it shows here too: controller/service.py tells them apart by name) and its route.
@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=OURS)
async def owned_horizontalpodautoscalers(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("keda.sh", "v1alpha1", "scaledobjects", labels=OURS)
async def owned_scaledobjects(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("gateway.networking.k8s.io", "v1", "httproutes", labels=OURS)
async def owned_httproutes(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.index("inference.networking.k8s.io", "v1", "inferencepools", labels=OURS)
async def owned_inferencepools(body: kopf.Body, **_: Any) -> dict[tuple, dict[str, Any]]:
    return {owner_key(body): dict(body)}


@kopf.on.resume(*QUANTIZEJOBS)
@kopf.on.create(*QUANTIZEJOBS)
@kopf.on.update(*QUANTIZEJOBS)
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


@kopf.daemon(*QUANTIZEJOBS, cancellation_timeout=5.0)
async def quantizejob_loop(body: kopf.Body, memo: kopf.Memo, stopped: Any, **kwargs: Any) -> None:
    """Passes woken by the quantizer's events and by its source's changes; a slow resync besides."""
    key = L.owner_key(body.metadata.namespace, "QuantizeJob", body.metadata.name or "")
    await _follow(quantizejob, key, body, memo, stopped, kwargs)


@kopf.daemon(*MODELSERVICES, cancellation_timeout=5.0)
async def modelservice_loop(body: kopf.Body, memo: kopf.Memo, stopped: Any, **kwargs: Any) -> None:
    """Passes woken by the server's events and by its source's (and adapters') changes; a slow resync besides."""
    key = L.owner_key(body.metadata.namespace, "ModelService", body.metadata.name or "")
    await _follow(modelservice, key, body, memo, stopped, kwargs)


async def _follow(
    handler: Any, key: Any, body: kopf.Body, memo: kopf.Memo, stopped: Any, kwargs: dict[str, Any],
    before: Any = None, interval: Any = None, unchanged: Any = None,
) -> None:  # fmt: skip
    """An object's loop: a pass (in kopf's handler threads, like its create/update/resume handlers) each
    time the object is woken (controller/wakeups.py) or its resync comes due. A failed pass is logged and
    tried again after kopf's backoff, or sooner if an event comes. A resync for which ``unchanged`` (if
    given) says that the inputs of the last pass are unchanged is skipped, on the event loop."""
    logger, name = kwargs["logger"], handler.__name__.removesuffix("_pass")

    def refers() -> None:
        WAKEUPS.refers_to(key, sources_of(body.metadata.namespace, body.get("spec") or {}))

    async def one_pass(cause: str) -> None:
        refers()
        try:
            if before is not None:
                await before()
            if cause == "resync" and unchanged is not None and unchanged(body=body, **kwargs):
                return
            await asyncio.get_running_loop().run_in_executor(
                memo.executor, lambda: handler(body=body, memo=memo, **kwargs)
            )
        except Exception as err:  # the loop must outlive a failed pass, as kopf's timers did
            logger.exception(f"Loop '{name}' pass failed: {err}; retried")
            asyncio.get_running_loop().call_later(RETRY_AFTER, WAKEUPS.wake, key)
        else:
            logger.info(f"Loop '{name}' pass succeeded ({cause}: {body.metadata.name}).")

    refers()
    await WAKEUPS.loop(key, stopped, interval or (lambda: RESYNC), one_pass)


def _report(kind: str, body: kopf.Body, decision: Any) -> None:
    metrics.record_phase(kind, body.metadata.namespace or "", body.metadata.name or "", decision.status["phase"])
