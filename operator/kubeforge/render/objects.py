"""Object metadata every renderer shares: names, labels, owner references, GPU tolerations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kubeforge.api.kinds import API_VERSION
from kubeforge.render import labels as L


def owner_refs(kind: str, name: str, uid: str | None) -> list[dict[str, Any]]:
    """The controller reference that makes the children go with their owner (none without a uid)."""
    if not uid:
        return []
    return [{"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid, "controller": True,
             "blockOwnerDeletion": True}]  # fmt: skip


def meta(api: str, kind: str, name: str, ns: str, labels: dict, component: str, owner: list) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": ns, "labels": {**labels, L.COMPONENT: component}}
    if owner:
        metadata["ownerReferences"] = owner
    return {"apiVersion": api, "kind": kind, "metadata": metadata}


def tolerations(extra: Iterable[Any]) -> list[dict[str, Any]]:
    """The GPU taint the NVIDIA device plugin's nodes usually carry, then the spec's, without duplicates."""
    out: list[dict[str, Any]] = [{"key": L.GPU_TAINT, "operator": "Exists", "effect": "NoSchedule"}]
    for t in extra:
        item = t.dump()
        if item not in out:
            out.append(item)
    return out


def node_affinity(selector: Iterable[tuple[str, str]]) -> dict[str, Any] | None:
    terms = [{"key": k, "operator": "In", "values": [v]} for k, v in selector]
    if not terms:
        return None
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": terms}]}}}  # fmt: skip
