"""The glue between kopf and the pure decisions: read indexes, decide, apply, write status once.

Nothing here decides anything: the decisions are controller/finetune.py (decide),
controller/quantize.py (decide_quantize) and controller/service.py (decide_service), the
validation of the objects api/validation.py (check), and every API call goes through
controller/kube.py. What the decisions need beyond the object (the GPU inventory, the model's
architecture, a ModelService's source lineage) is read here and handed to them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubeforge.api.finetune import FineTuneJob, ModelSource
from kubeforge.api.validation import check
from kubeforge.controller.conditions import now_rfc3339
from kubeforge.controller.diff import is_subset
from kubeforge.controller.finetune import Observed, decide
from kubeforge.controller.kube import Kube, event_object, object_path
from kubeforge.controller.metrics import APPLIES
from kubeforge.controller.quantize import QuantizeObserved, decide_quantize
from kubeforge.controller.service import ServiceObserved, decide_service, lineage
from kubeforge.controller.sources import Lookup
from kubeforge.controller.state import Decision, refuse_taken_names, taken_by
from kubeforge.inventory.pools import Inventory, pools_from_nodes
from kubeforge.planner import ArchitectureUnknown, resolve
from kubeforge.planner.architecture import Architecture
from kubeforge.render import autoscaling, routing

log = logging.getLogger("kubeforge.reconcile")
OFFLINE = os.environ.get("KUBEFORGE_OFFLINE", "") not in ("", "0", "false")

_inventory_cache: tuple[str, Inventory] | None = None
_architectures: dict[str, tuple[Architecture | None, str | None]] = {}


def inventory(nodes: Iterable[Mapping[str, Any]]) -> Inventory:
    """Pools from the Node index, recomputed only when a node's resourceVersion changes."""
    global _inventory_cache
    nodes = list(nodes)
    key = hashlib.sha256(
        "".join(sorted(f"{n['metadata'].get('name')}@{n['metadata'].get('resourceVersion')}" for n in nodes)).encode()
    ).hexdigest()
    if _inventory_cache is None or _inventory_cache[0] != key:
        _inventory_cache = (key, pools_from_nodes(nodes))
    return _inventory_cache[1]


def architecture(job: FineTuneJob) -> tuple[Architecture | None, str | None]:
    return architecture_of(job.spec.model)


def architecture_of(model: ModelSource) -> tuple[Architecture | None, str | None]:
    key = json.dumps(model.dump(), sort_keys=True)
    if key not in _architectures:
        try:
            _architectures[key] = (resolve(model, allow_network=not OFFLINE), None)
        except (ArchitectureUnknown, ValueError) as err:
            return None, f"spec.model: {err}"  # not cached: the user may add the architecture
    return _architectures[key]


def reconcile_finetunejob(
    body: Mapping[str, Any],
    *,
    nodes: Iterable[Mapping[str, Any]],
    children: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    kube: Kube,
    progress: Mapping[str, Any] | None = None,
) -> Decision:
    """One pass; ``progress`` is rank 0's last answer, read beforehand (controller/progress_reader.py)."""
    body = snapshot(body)
    pods, children = list(pods), list(children)
    pools = inventory(nodes)
    jobset_available = kube.serves("jobset.x-k8s.io/v1alpha2", "jobsets")

    def decide_from(obj: Mapping[str, Any], children: list[Mapping[str, Any]]) -> Decision:
        job, _ = check({k: obj[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in obj})
        arch, arch_error = architecture(job) if isinstance(job, FineTuneJob) else (None, None)
        return decide(
            Observed(
                body=obj,
                inventory=pools,
                now=now_rfc3339(),
                children=children,
                pods=pods,
                architecture=arch,
                architecture_error=arch_error,
                jobset_available=jobset_available,
                progress=progress,
            )
        )

    return run_pass(body, children, decide_from, kube)


def status_changed(decision: Decision, body: Mapping[str, Any]) -> bool:
    old = body.get("status") or {}
    return not is_subset(decision.status, old)


class _PassLock:
    """A lock per object, alive while some pass holds or waits for it (then dropped from the table)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


_locks: weakref.WeakValueDictionary[str, _PassLock] = weakref.WeakValueDictionary()
_locks_guard = threading.Lock()


def _lock_for(body: Mapping[str, Any]) -> _PassLock:
    meta = body.get("metadata") or {}
    key = str(meta.get("uid") or f"{body.get('kind')}/{meta.get('namespace')}/{meta.get('name')}")
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = _PassLock()
        return lock


Decider = Callable[[Mapping[str, Any], list[Mapping[str, Any]]], Decision]
_applied: dict[str, tuple[float, dict[tuple[str, str], Mapping[str, Any]]]] = {}  # owner uid -> children
APPLIED_TTL = 5.0  # the watches catch up well within this; a child deleted meanwhile is seen after it


def _with_applied(body: Mapping[str, Any], children: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The children from the indexes, plus what this process applied lately and they do not show yet.

    A pass that follows another sees its writes even when the watches lag behind (read-your-writes).
    """
    uid = str((body.get("metadata") or {}).get("uid"))
    now = time.monotonic()
    for key in [k for k, (at, _) in _applied.items() if now - at > APPLIED_TTL]:
        _applied.pop(key, None)
    recent = _applied.get(uid, (0.0, {}))[1]
    out = list(children)
    for (kind, name), obj in recent.items():
        index = next((i for i, c in enumerate(out) if c.get("kind") == kind
                      and (c.get("metadata") or {}).get("name") == name), None)  # fmt: skip
        if index is None:
            out.append(obj)
        elif int((out[index].get("metadata") or {}).get("resourceVersion") or 0) < int(
            (obj.get("metadata") or {}).get("resourceVersion") or 0
        ):
            out[index] = obj
    return out


def _remember(body: Mapping[str, Any], applied: list[Mapping[str, Any]]) -> None:
    if not applied:
        return
    uid = str((body.get("metadata") or {}).get("uid"))
    recent = dict(_applied.get(uid, (0.0, {}))[1])
    for obj in applied:
        recent[(obj.get("kind", ""), (obj.get("metadata") or {}).get("name", ""))] = obj
    _applied[uid] = (time.monotonic(), recent)


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A private, consistent copy of the object a pass decides from.

    kopf hands timers (and daemons), and every handler of an object that has one, a *live*
    body: it swaps in each new watch event, also while the pass runs in its thread. Read
    twice, such a body can give two versions; read field by field, a mix of them. So a pass
    copies it once, and retries the copy while the resourceVersion moves under it.
    """
    for _ in range(100):
        before = _version(body)
        copied = copy.deepcopy(dict(body))
        if _version(copied) == before == _version(body):
            return copied
    raise RuntimeError("the object changed while it was being read, 100 times over: the pass is retried")


def _version(obj: Mapping[str, Any]) -> Any:
    return (obj.get("metadata") or {}).get("resourceVersion")


def run_pass(body: Mapping[str, Any], children: list[Mapping[str, Any]], decide_from: Decider, kube: Kube) -> Decision:
    """Decide, post the Events, apply the children, write the status once: one pass at a time per object.

    kopf runs an object's create/update handler and its timer independently, and the body a
    handler gets may lag behind the status the previous pass wrote. Events are keyed by the
    written status a transition starts from (state.events), so passes are serialized, and a
    pass that would post Events first decides again from the stored object: two passes never
    take two different paths to the same state, and each transition is posted once.

    Everything a pass decides, keys and writes comes from one version of the object: a
    snapshot of kopf's body (which kopf replaces while the pass runs), or the re-read. The
    status write is conditional on that version (resourceVersion) and on the status it was
    decided from, so it cannot land on a newer status.

    Events go before the status: if the status write fails, or the process dies before it, the
    next pass posts the same Events again and gets AlreadyExists; the other order could lose them.
    """
    body = snapshot(body)
    held = _lock_for(body)
    with held.lock:
        children = _with_applied(body, children)
        decision = _guarded(decide_from(body, children), body, children, kube)
        if decision.events:
            fresh = kube.read(object_path(body))
            if fresh is None:
                return decision  # deleted meanwhile: nothing to do
            if _version(fresh) != _version(body) or not _same(fresh.get("status") or {}, body.get("status") or {}):
                body, decision = fresh, _guarded(decide_from(fresh, children), fresh, children, kube)
        for event in decision.events:
            posted = kube.post_event(event_object(body, event.type, event.reason, event.message, event.key,
                                                  kube.identity))  # fmt: skip
            log.info("event %s of %s %s (%s)", event.reason, (body.get("metadata") or {}).get("name"),
                     "posted" if posted else "was posted before", event.key)  # fmt: skip
        _delete(decision, kube)
        for obj in decision.handover:
            held = kube.hand_over(obj)
            log.info("handover of %s %s/%s: %s", obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"],
                     "held" if held else "owned by another manager already")  # fmt: skip
        _remember(body, _apply(decision, kube))
        if status_changed(decision, body):
            kube.patch_status(object_path(body), decision.status, _version(body), body.get("status") or {})
    return decision


def _guarded(decision: Decision, body: Mapping[str, Any], children: list[Mapping[str, Any]], kube: Kube) -> Decision:
    """The decision, unless a child it would create has a name another object holds (another kubeforge
    object's child, whose derived name can be spelled by another kind's name, or anything not ours): server-
    side apply under kubeforge's field manager would take that object over. Each new child is read first
    (one GET, only when a pass creates something); then nothing is created (state.refuse_taken_names)."""
    ours = {(c.get("kind"), (c.get("metadata") or {}).get("name")) for c in children}
    meta = body.get("metadata") or {}
    taken = [
        why
        for obj in decision.apply
        if (obj.get("kind"), obj["metadata"].get("name")) not in ours
        and (why := taken_by(obj, kube.read(object_path(obj)), meta.get("uid")))
    ]
    if not taken:
        return decision
    log.info("%s %s/%s: %s", body.get("kind"), meta.get("namespace"), meta.get("name"), "; ".join(taken))
    return refuse_taken_names(decision, body.get("status") or {}, taken, str(body.get("kind")),
                              meta.get("generation"), now_rfc3339())  # fmt: skip


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return is_subset(a, b) and is_subset(b, a)


def lookup_in(index: Mapping[Any, Iterable[Mapping[str, Any]]], namespace: str | None) -> Lookup:
    """Lookup (kind, name) -> object from the index of kubeforge objects, within one namespace."""

    def lookup(kind: str, name: str) -> Mapping[str, Any] | None:
        return next(iter(index.get((namespace, kind, name), [])), None)

    return lookup


def source_architecture(spec: Mapping[str, Any], lookup: Lookup) -> tuple[Architecture | None, str | None]:
    """The architecture of the model a QuantizeJob spec quantizes (its FineTuneJob's base model, or its URI's),
    or why it is unknown."""
    base = lineage(spec, lookup).base
    if not base:
        return None, None  # the source is not there yet: nothing is sized before it is
    try:
        model = ModelSource.model_validate(base)
    except ValueError:
        return None, f"the source model {base.get('uri')!r} is not a model location"
    arch, _ = architecture_of(model)
    if arch is None:
        return None, f"{model.uri} is not in the planner's catalog and no config.json of it is reachable"
    return arch, None


def reconcile_quantizejob(
    body: Mapping[str, Any], *, lookup: Lookup, children: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]], kube: Kube, nodes: Iterable[Mapping[str, Any]] | None = None,
) -> Decision:  # fmt: skip
    body = snapshot(body)
    children, pods = list(children), list(pods)
    arch, arch_error = source_architecture(body.get("spec") or {}, lookup)
    pools = inventory(nodes) if nodes is not None else None

    def decide_from(obj: Mapping[str, Any], children: list[Mapping[str, Any]]) -> Decision:
        seen = QuantizeObserved(obj, now_rfc3339(), lookup, children, pods, arch, arch_error, pools)
        return decide_quantize(seen)

    return run_pass(body, children, decide_from, kube)


def reconcile_modelservice(
    body: Mapping[str, Any], *, lookup: Lookup, nodes: Iterable[Mapping[str, Any]],
    children: Iterable[Mapping[str, Any]], kube: Kube,
) -> Decision:  # fmt: skip
    body = snapshot(body)
    lws_available = kube.serves("leaderworkerset.x-k8s.io/v1", "leaderworkersets")
    spec = body.get("spec") or {}  # the optional APIs are looked up only for the objects that use them
    keda = bool(spec.get("autoscaling")) and kube.serves(autoscaling.KEDA_API, "scaledobjects")
    gateway = bool(spec.get("route")) and kube.serves(routing.GATEWAY_API, "httproutes")
    picker = bool((spec.get("route") or {}).get("endpointPicker"))
    pool = picker and kube.serves(routing.INFERENCE_API, "inferencepools")
    pools, children = inventory(nodes), list(children)

    def decide_from(obj: Mapping[str, Any], children: list[Mapping[str, Any]]) -> Decision:
        source = lineage(obj.get("spec") or {}, lookup)  # once per decision, from the version decided on
        arch = None
        if source.base:
            try:
                arch, _ = architecture_of(ModelSource.model_validate(source.base))  # with its architecture overrides
            except ValueError:  # not a valid model source: the service is planned without the model's size
                arch = None
        return decide_service(
            ServiceObserved(
                leaderworkerset_available=lws_available,
                keda_available=keda,
                gateway_available=gateway,
                inference_pool_available=pool,
                body=obj,
                now=now_rfc3339(),
                lookup=lookup,
                inventory=pools,
                architecture=arch,
                lineage=source,
                children=children,
            )
        )

    return run_pass(body, children, decide_from, kube)


def _delete(decision: Decision, kube: Kube) -> None:
    for obj in decision.delete:
        gone = kube.delete(obj)
        log.info("deleted %s %s/%s%s", obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"],
                 "" if gone else " (it was gone)")  # fmt: skip
        forget(obj)


def forget(obj: Mapping[str, Any]) -> None:
    """Drop a deleted child from what this process remembers applying (read-your-writes)."""
    for _, recent in _applied.values():
        recent.pop((obj.get("kind", ""), (obj.get("metadata") or {}).get("name", "")), None)


def _apply(decision: Decision, kube: Kube) -> list[Mapping[str, Any]]:
    """Apply the decision's children; what the server answered (the children as stored)."""
    stored = []
    for obj in decision.apply:
        answer = kube.apply(obj)
        stored.append(answer if isinstance(answer, Mapping) and answer.get("kind") else obj)
        APPLIES.labels(obj["kind"]).inc()
        log.info("applied %s %s/%s", obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
    return stored
