"""Node objects, read into typed values that carry only what the inventory uses.

A cluster file (``kubectl get nodes -o yaml``: a List, a NodeList, one Node, or a plain
list of Nodes) or a Node from the API is checked field by field; the first problem
raises ``NodeError`` naming its field path, for example
``items[3].metadata: must be a mapping (got 7)`` or
``items[0].status.allocatable["nvidia.com/gpu"]: 'abc' is not a quantity ...``.

What is checked is what the inventory reads: name, labels (strings; the numeric GPU
labels must be whole numbers in range), spec.unschedulable, spec.taints, the Ready
condition and the allocatable / capacity of nvidia.com/gpu, memory and cpu. Every
other field is left as the API server wrote it. Zero GPUs is a valid value (the node
contributes none); a negative or fractional GPU count is not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeforge.inventory import labels as L
from kubeforge.inventory.quantity import QuantityError, parse_quantity

MAX_GPUS_PER_NODE = 1024
MAX_GPU_MEMORY_MIB = 2**24  # 16 TiB per GPU
MAX_COMPUTE_CAPABILITY = 100
MAX_NETWORK_GBPS = 1_000_000

# label -> (smallest, largest) whole number it may hold
NUMERIC_LABELS = {
    L.GPU_COUNT: (0, MAX_GPUS_PER_NODE),
    L.GKE_ACCELERATOR_COUNT: (0, MAX_GPUS_PER_NODE),
    L.KARPENTER_GPU_COUNT: (0, MAX_GPUS_PER_NODE),
    L.GPU_MEMORY_MIB: (0, MAX_GPU_MEMORY_MIB),
    L.KARPENTER_GPU_MEMORY_MIB: (0, MAX_GPU_MEMORY_MIB),
    L.GPU_COMPUTE_MAJOR: (0, MAX_COMPUTE_CAPABILITY),
    L.GPU_COMPUTE_MINOR: (0, MAX_COMPUTE_CAPABILITY),
    L.NETWORK_GBPS: (1, MAX_NETWORK_GBPS),
}
NOT_NODES = "expected a List of Nodes (kubectl get nodes -o yaml), a NodeList or a Node"


class NodeError(ValueError):
    """A Node (or a cluster file) that cannot be read; ``path`` names the field."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


@dataclass(frozen=True)
class Taint:
    key: str | None
    effect: str | None


@dataclass(frozen=True)
class NodeCondition:
    type: str | None
    status: str | None
    reason: str | None


@dataclass(frozen=True)
class Resources:
    """The resources the inventory reads; None where the node does not say."""

    gpus: int | None = None
    memory_bytes: int | None = None
    cpus: float | None = None


@dataclass(frozen=True)
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    unschedulable: bool = False
    taints: tuple[Taint, ...] = ()
    conditions: tuple[NodeCondition, ...] = ()
    allocatable: Resources = Resources()
    capacity: Resources = Resources()

    def number(self, label: str) -> int | None:
        """A numeric GPU label (checked when the node was read); None when absent."""
        value = self.labels.get(label)
        return int(value) if value else None


# ---------------------------------------------------------------- reading


def parse_node(raw: Any, path: str = "") -> Node:
    """The typed Node; NodeError naming the first bad field."""
    node = _mapping(raw, path, "a Node")
    kind = node.get("kind")
    if kind is not None and kind != "Node":
        raise NodeError(_join(path, "kind"), f"must be Node (got {_show(kind)})")
    meta = _mapping(node.get("metadata"), _join(path, "metadata"), optional=True)
    spec = _mapping(node.get("spec"), _join(path, "spec"), optional=True)
    status = _mapping(node.get("status"), _join(path, "status"), optional=True)
    name = meta.get("name", "?")
    if not isinstance(name, str):
        raise NodeError(_join(path, "metadata.name"), f"must be a string (got {_show(name)})")
    return Node(
        name=name,
        labels=_labels(meta.get("labels"), _join(path, "metadata.labels")),
        unschedulable=_bool(spec.get("unschedulable"), _join(path, "spec.unschedulable")),
        taints=tuple(_taints(spec.get("taints"), _join(path, "spec.taints"))),
        conditions=tuple(_conditions(status.get("conditions"), _join(path, "status.conditions"))),
        allocatable=_resources(status.get("allocatable"), _join(path, "status.allocatable")),
        capacity=_resources(status.get("capacity"), _join(path, "status.capacity")),
    )


def raw_nodes(doc: Any) -> list[tuple[str, Any]]:
    """(field path, raw Node) for every Node in one YAML document of a cluster file."""
    if isinstance(doc, list):
        return [(f"[{i}]", item) for i, item in enumerate(doc)]
    if not isinstance(doc, Mapping):
        raise NodeError("", f"{NOT_NODES}, not {_type(doc)}")
    kind = doc.get("kind")
    if kind in ("List", "NodeList") or (kind is None and "items" in doc):
        items = doc.get("items")
        if items is None:
            return []
        if not isinstance(items, list):
            raise NodeError("items", f"must be a list of Nodes (got {_show(items)})")
        return [(f"items[{i}]", item) for i, item in enumerate(items)]
    if kind == "Node":
        return [("", doc)]
    raise NodeError("kind", f"{NOT_NODES} (got {_show(kind)})")


def nodes_in(doc: Any) -> list[Node]:
    """The typed Nodes of one YAML document of a cluster file; NodeError naming the first bad field."""
    return [parse_node(raw, path) for path, raw in raw_nodes(doc)]


# ---------------------------------------------------------------- fields


def _labels(raw: Any, path: str) -> dict[str, str]:
    labels = _mapping(raw, path, optional=True)
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str):
            raise NodeError(path, f"label keys must be strings (got {_show(key)})")
        where = _key(path, key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a hand-written snapshot's `nvidia.com/gpu.count: 8`
        if not isinstance(value, str):
            raise NodeError(where, f"must be a string (got {_show(value)})")
        if key in NUMERIC_LABELS and value:
            low, high = NUMERIC_LABELS[key]
            if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
                raise NodeError(where, f"must be a whole number from {low} to {high} (got {_show(value)})")
        out[key] = value
    return out


def _taints(raw: Any, path: str) -> list[Taint]:
    out = []
    for i, item in enumerate(_list(raw, path)):
        taint = _mapping(item, f"{path}[{i}]")
        out.append(Taint(_str(taint.get("key"), f"{path}[{i}].key"), _str(taint.get("effect"), f"{path}[{i}].effect")))
    return out


def _conditions(raw: Any, path: str) -> list[NodeCondition]:
    out = []
    for i, item in enumerate(_list(raw, path)):
        cond = _mapping(item, f"{path}[{i}]")
        out.append(
            NodeCondition(
                _str(cond.get("type"), f"{path}[{i}].type"),
                _str(cond.get("status"), f"{path}[{i}].status"),
                _str(cond.get("reason"), f"{path}[{i}].reason"),
            )
        )
    return out


def _resources(raw: Any, path: str) -> Resources:
    resources = _mapping(raw, path, optional=True)
    gpus = memory = cpus = None
    if resources.get(L.GPU_RESOURCE) is not None:
        where = _key(path, L.GPU_RESOURCE)
        value = _quantity(resources[L.GPU_RESOURCE], where)
        if value < 0 or value != int(value) or value > MAX_GPUS_PER_NODE:
            given = _show(resources[L.GPU_RESOURCE])
            raise NodeError(where, f"must be a whole number of GPUs from 0 to {MAX_GPUS_PER_NODE} (got {given})")
        gpus = int(value)
    if resources.get("memory") is not None:
        memory = int(_quantity(resources["memory"], _key(path, "memory"), non_negative=True))
    if resources.get("cpu") is not None:
        cpus = _quantity(resources["cpu"], _key(path, "cpu"), non_negative=True)
    return Resources(gpus, memory, cpus)


def _quantity(value: Any, path: str, non_negative: bool = False) -> float:
    try:
        number = parse_quantity(value)
    except QuantityError as err:
        raise NodeError(path, str(err)) from None
    if non_negative and number < 0:
        raise NodeError(path, f"must not be negative (got {_show(value)})")
    return number


# ---------------------------------------------------------------- shapes


def _mapping(value: Any, path: str, what: str = "", optional: bool = False) -> Mapping[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping):
        described = f"a mapping ({what})" if what else "a mapping"
        raise NodeError(path, f"must be {described} (got {_show(value)})")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise NodeError(path, f"must be a list (got {_show(value)})")
    return value


def _str(value: Any, path: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise NodeError(path, f"must be a string (got {_show(value)})")
    return value


def _bool(value: Any, path: str) -> bool:
    if value is not None and not isinstance(value, bool):
        raise NodeError(path, f"must be true or false (got {_show(value)})")
    return bool(value)


def _join(path: str, suffix: str) -> str:
    return f"{path}.{suffix}" if path else suffix


def _key(path: str, key: str) -> str:
    """A map key in a field path: labels["nvidia.com/gpu.count"], as kubectl's JSONPath would quote it."""
    return f"{path}[{json.dumps(key)}]"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type(value: Any) -> str:
    return {list: "a list", str: "a string", type(None): "empty"}.get(type(value), f"a {type(value).__name__}")
