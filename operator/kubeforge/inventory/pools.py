"""Node objects -> GPU pools.

A pool is a set of schedulable nodes with the same GPU product, GPU memory and GPU
count, told apart by the labels a pod's node affinity can select on. The planner
works on pools, never on nodes, so planning cost grows with the number of pools.

Where the GPU facts come from, in order: NVIDIA GPU Feature Discovery labels, GKE's
accelerator label, Karpenter's instance-gpu labels, the instance type. How many
GPUs: the node's allocatable nvidia.com/gpu (what the scheduler can hand out), else
the labels. Cordoned, NotReady and unreachable nodes do not count, nor do nodes that
cannot be read (see nodes.py: a malformed Node from the API is excluded with the field
path that is wrong; a cluster file is checked strictly before it gets here).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeforge.inventory import labels as L
from kubeforge.inventory.gpus import GPUFacts, lookup_gpu, unknown_gpu
from kubeforge.inventory.instances import DEFAULT_NETWORK_GBPS, GKE_ACCELERATORS, INSTANCE_TYPES
from kubeforge.inventory.nodes import Node, NodeError, nodes_in, parse_node


@dataclass(frozen=True)
class NodeGPUs:
    name: str
    gpu: GPUFacts
    gpus: int
    memory_mib: int
    host_memory_bytes: int
    cpus: float
    network_gbps: float
    selector: tuple[tuple[str, str], ...]
    source: str
    clique: str | None
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Pool:
    gpu: GPUFacts
    gpus_per_node: int
    node_names: tuple[str, ...]
    memory_mib: int  # per GPU, as the node reports it
    host_memory_bytes: int  # the smallest node's allocatable memory
    cpus_per_node: float
    network_gbps: float  # per node, for traffic between nodes
    nvlink_domain: int  # GPUs that share one NVLink domain (1: PCIe only)
    selector: tuple[tuple[str, str], ...]  # node labels that pick exactly this pool
    source: str  # gfd | gke | karpenter | instance-type
    common_labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def nodes(self) -> int:
        return len(self.node_names)

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024**2

    @property
    def name(self) -> str:
        return f"{self.gpu.name} ({self.nodes} node{'s' if self.nodes != 1 else ''} x {self.gpus_per_node} GPUs)"

    def matches(self, node_selector: Mapping[str, str]) -> bool:
        return all(self.common_labels.get(k) == v for k, v in node_selector.items())


@dataclass(frozen=True)
class Inventory:
    pools: tuple[Pool, ...]
    excluded: tuple[tuple[str, str], ...]  # (node, why it does not count)
    cpu_only_nodes: int = 0

    @property
    def unknown_products(self) -> tuple[str, ...]:
        return tuple(sorted({p.gpu.name for p in self.pools if not p.gpu.known}))


def items_of(doc: Any) -> list[Node]:
    """A List/NodeList, a single Node, or a plain list of Nodes -> the typed Nodes.

    Raises NodeError (a ValueError) naming the field path of the first problem.
    """
    return nodes_in(doc)


def pools_from_nodes(nodes: Iterable[Node | Mapping[str, Any]]) -> Inventory:
    """Typed Nodes, or Node objects as the API returns them (unreadable ones are excluded, with why)."""
    excluded: list[tuple[str, str]] = []
    groups: dict[tuple, list[NodeGPUs]] = defaultdict(list)
    cpu_only = 0
    for raw in nodes:
        try:
            node = raw if isinstance(raw, Node) else parse_node(raw)
        except NodeError as err:
            excluded.append((_raw_name(raw), f"unreadable: {err}"))
            continue
        why = unschedulable_reason(node)
        if why:
            excluded.append((node.name, why))
            continue
        info = node_gpus(node)
        if info is None:
            cpu_only += 1
            continue
        key = (info.gpu.name, info.memory_mib, info.gpus, info.selector)
        groups[key].append(info)
    pools = [_pool(members) for members in groups.values()]
    pools.sort(key=lambda p: (-p.gpu.bf16_tflops, -p.memory_mib, -p.gpus_per_node, p.gpu.name, p.selector))
    return Inventory(tuple(pools), tuple(excluded), cpu_only)


def _raw_name(raw: Any) -> str:
    meta = raw.get("metadata") if isinstance(raw, Mapping) else None
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) else "?"


def unschedulable_reason(node: Node) -> str | None:
    if node.unschedulable:
        return "cordoned (spec.unschedulable)"
    for taint in node.taints:
        if taint.key in L.UNSCHEDULABLE_TAINTS and taint.effect in ("NoSchedule", "NoExecute"):
            return f"tainted {taint.key}"
    ready = next((c for c in node.conditions if c.type == "Ready"), None)
    if ready is not None and ready.status != "True":
        return f"not Ready ({ready.reason or ready.status})"
    return None


def node_gpus(node: Node) -> NodeGPUs | None:
    labels = node.labels
    allocatable, capacity = node.allocatable, node.capacity
    instance_type = labels.get(L.INSTANCE_TYPE) or labels.get(L.INSTANCE_TYPE_BETA)
    instance = INSTANCE_TYPES.get(instance_type or "")

    product, selector, source = _product(labels, instance_type, instance)
    selector = selector + _count_label(labels, source)
    label_count = (
        node.number(L.GPU_COUNT)
        or node.number(L.GKE_ACCELERATOR_COUNT)
        or node.number(L.KARPENTER_GPU_COUNT)
        or (instance.count if instance else None)
    )
    resource_count = allocatable.gpus if allocatable.gpus is not None else capacity.gpus
    gpus = resource_count if resource_count is not None else label_count
    if not gpus or product is None:
        return None  # no GPUs the scheduler can hand out (0 allocatable included)

    label_memory = node.number(L.GPU_MEMORY_MIB) or node.number(L.KARPENTER_GPU_MEMORY_MIB)
    facts = lookup_gpu(product, label_memory)
    if facts is None:
        major, minor = node.number(L.GPU_COMPUTE_MAJOR), node.number(L.GPU_COMPUTE_MINOR)
        cc = (major, minor or 0) if major is not None else None
        facts = unknown_gpu(product, label_memory or 0, cc)
    if "MIG" in product.upper():
        facts = dataclasses.replace(
            facts, name=f"{facts.name} {_mig_profile(product)}", nvlink_gbps=0.0, nvswitch=False, nvlink_pairs=False
        )
    memory_mib = label_memory or facts.memory_mib
    host = allocatable.memory_bytes or capacity.memory_bytes or 0
    if not host and instance is not None:
        host = instance.host_memory_gib * 1024**3
    return NodeGPUs(
        name=node.name,
        gpu=facts,
        gpus=gpus,
        memory_mib=memory_mib,
        host_memory_bytes=host,
        cpus=allocatable.cpus or capacity.cpus or 0.0,
        network_gbps=node.number(L.NETWORK_GBPS) or (instance.network_gbps if instance else DEFAULT_NETWORK_GBPS),
        selector=selector,
        source=source,
        clique=labels.get(L.GPU_CLIQUE),
        labels=labels,
    )


def _product(labels: Mapping[str, str], instance_type: str | None, instance: Any) -> tuple[str | None, tuple, str]:
    if labels.get(L.GPU_PRODUCT):
        return labels[L.GPU_PRODUCT], ((L.GPU_PRODUCT, labels[L.GPU_PRODUCT]),), "gfd"
    if labels.get(L.GKE_ACCELERATOR):
        value = labels[L.GKE_ACCELERATOR]
        return GKE_ACCELERATORS.get(value, value), ((L.GKE_ACCELERATOR, value),), "gke"
    if labels.get(L.KARPENTER_GPU_NAME) and labels.get(L.KARPENTER_GPU_MANUFACTURER, "nvidia") == "nvidia":
        value = labels[L.KARPENTER_GPU_NAME]
        return value, ((L.KARPENTER_GPU_NAME, value),), "karpenter"
    if instance is not None and instance_type:
        return instance.gpu, ((L.INSTANCE_TYPE, instance_type),), "instance-type"
    return None, (), ""


def _count_label(labels: Mapping[str, str], source: str) -> tuple[tuple[str, str], ...]:
    """The label that tells nodes with the same GPU but different GPU counts apart, where there is one."""
    key = {"gfd": L.GPU_COUNT, "gke": L.GKE_ACCELERATOR_COUNT, "karpenter": L.KARPENTER_GPU_COUNT}.get(source)
    if key and labels.get(key):
        return ((key, labels[key]),)
    return ()


def _mig_profile(product: str) -> str:
    match = re.search(r"MIG[-_ ]?(\d+g\.\d+gb)", product, re.IGNORECASE)
    return f"MIG {match.group(1)}" if match else "MIG"


def _pool(members: list[NodeGPUs]) -> Pool:
    first = members[0]
    gpu = first.gpu
    if gpu.nvswitch:
        domain = first.gpus
    elif gpu.nvlink_pairs:
        domain = min(2, first.gpus)
    else:
        domain = 1
    cliques: dict[str, int] = defaultdict(int)
    for m in members:
        if m.clique:
            cliques[m.clique] += 1
    if cliques and all(m.clique for m in members) and gpu.nvlink_gbps > 0:  # a clique is an NVLink fabric
        domain = max(domain, first.gpus * min(cliques.values()))
    common = dict(first.labels)
    for m in members[1:]:
        common = {k: v for k, v in common.items() if m.labels.get(k) == v}
    return Pool(
        gpu=gpu,
        gpus_per_node=first.gpus,
        node_names=tuple(sorted(m.name for m in members)),
        memory_mib=first.memory_mib,
        host_memory_bytes=min(m.host_memory_bytes for m in members),
        cpus_per_node=min(m.cpus for m in members),
        network_gbps=min(m.network_gbps for m in members),
        nvlink_domain=domain,
        selector=first.selector,
        source=first.source,
        common_labels=common,
    )
