"""The glue between kopf and the pure decisions: read indexes, decide, apply, write status once.

Nothing here decides anything; see finetune.py (decide) and admission.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from kubeforge.api.finetune import FineTuneJob, ModelSource
from kubeforge.api.validation import check
from kubeforge.controller.conditions import now_rfc3339
from kubeforge.controller.diff import is_subset
from kubeforge.controller.finetune import Observed, decide, rank0_pod
from kubeforge.controller.kube import Kube
from kubeforge.controller.metrics import APPLIES
from kubeforge.controller.quantize import QuantizeObserved, decide_quantize
from kubeforge.controller.service import ServiceObserved, decide_service, lineage
from kubeforge.controller.sources import Lookup
from kubeforge.controller.state import Decision
from kubeforge.inventory.pools import Inventory, pools_from_nodes
from kubeforge.planner import ArchitectureUnknown, resolve
from kubeforge.planner.architecture import Architecture
from kubeforge.runtime.contract import PROGRESS_PATH, PROGRESS_PORT, PROGRESS_PORT_NAME

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


def fetch_progress(pods: Iterable[Mapping[str, Any]], timeout: float = 1.0) -> dict[str, Any] | None:
    """Best effort: rank 0's progress endpoint, as named in the contract."""
    pod = rank0_pod(list(pods))
    ip = ((pod or {}).get("status") or {}).get("podIP")
    if not ip:
        return None
    port = PROGRESS_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == PROGRESS_PORT_NAME:
                port = int(p["containerPort"])
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}{PROGRESS_PATH}", timeout=timeout) as response:
            data = json.loads(response.read().decode())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def reconcile_finetunejob(
    body: Mapping[str, Any],
    *,
    nodes: Iterable[Mapping[str, Any]],
    children: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    kube: Kube,
) -> Decision:
    pods = list(pods)
    job, _ = check({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body})
    arch, arch_error = architecture(job) if isinstance(job, FineTuneJob) else (None, None)
    running = (body.get("status") or {}).get("phase") == "Running"
    observed = Observed(
        body=body,
        inventory=inventory(nodes),
        now=now_rfc3339(),
        children=list(children),
        pods=pods,
        architecture=arch,
        architecture_error=arch_error,
        jobset_available=kube.serves("jobset.x-k8s.io/v1alpha2", "jobsets"),
        progress=fetch_progress(pods) if running else None,
    )
    decision = decide(observed)
    _apply(decision, kube)
    return decision


def status_changed(decision: Decision, body: Mapping[str, Any]) -> bool:
    old = body.get("status") or {}
    return not is_subset(decision.status, old)


def lookup_in(index: Mapping[Any, Iterable[Mapping[str, Any]]], namespace: str | None) -> Lookup:
    """Lookup (kind, name) -> object from the index of kubeforge objects, within one namespace."""

    def lookup(kind: str, name: str) -> Mapping[str, Any] | None:
        return next(iter(index.get((namespace, kind, name), [])), None)

    return lookup


def reconcile_quantizejob(
    body: Mapping[str, Any], *, lookup: Lookup, children: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]], kube: Kube,
) -> Decision:  # fmt: skip
    decision = decide_quantize(
        QuantizeObserved(body=body, now=now_rfc3339(), lookup=lookup, children=list(children), pods=list(pods))
    )
    _apply(decision, kube)
    return decision


def reconcile_modelservice(
    body: Mapping[str, Any], *, lookup: Lookup, nodes: Iterable[Mapping[str, Any]],
    children: Iterable[Mapping[str, Any]], kube: Kube,
) -> Decision:  # fmt: skip
    base, _ = lineage(body.get("spec") or {}, lookup)
    arch = None
    if base:
        try:
            arch, _ = architecture_of(ModelSource.model_validate(base))  # with its architecture overrides
        except ValueError:  # not a valid model source: the service is planned without the model's size
            arch = None
    decision = decide_service(
        ServiceObserved(
            leaderworkerset_available=kube.serves("leaderworkerset.x-k8s.io/v1", "leaderworkersets"),
            body=body,
            now=now_rfc3339(),
            lookup=lookup,
            inventory=inventory(nodes),
            architecture=arch,
            children=list(children),
        )
    )
    _apply(decision, kube)
    return decision


def _apply(decision: Decision, kube: Kube) -> None:
    for obj in decision.apply:
        kube.apply(obj)
        APPLIES.labels(obj["kind"]).inc()
        log.info("applied %s %s/%s", obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
