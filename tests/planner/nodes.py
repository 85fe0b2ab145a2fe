"""Builders for Node objects and inventories in planner tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubeforge.inventory.pools import Inventory, items_of, pools_from_nodes

CLUSTERS = Path(__file__).resolve().parents[2] / "examples" / "clusters"

# product label -> (memory MiB, compute capability)
GFD = {
    "Tesla-T4": (15360, (7, 5)),
    "Tesla-V100-SXM2-16GB": (16384, (7, 0)),
    "NVIDIA-A10": (23028, (8, 6)),
    "NVIDIA-A10G": (23028, (8, 6)),
    "NVIDIA-L4": (23034, (8, 9)),
    "NVIDIA-L40S": (46068, (8, 9)),
    "NVIDIA-A100-SXM4-40GB": (40960, (8, 0)),
    "NVIDIA-A100-SXM4-80GB": (81920, (8, 0)),
    "NVIDIA-A100-PCIE-40GB": (40960, (8, 0)),
    "NVIDIA-H100-80GB-HBM3": (81559, (9, 0)),
    "NVIDIA-H100-PCIe": (81559, (9, 0)),
    "NVIDIA-H100-NVL": (95830, (9, 0)),
    "NVIDIA-H200": (143771, (9, 0)),
    "NVIDIA-B200": (183359, (10, 0)),
}


def gfd_node(
    name: str,
    product: str,
    gpus: int,
    *,
    host_gib: int = 1024,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    cordoned: bool = False,
) -> dict[str, Any]:
    memory, (major, minor) = GFD.get(product, (49152, (8, 9)))
    node_labels = {
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.memory": str(memory),
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.compute.major": str(major),
        "nvidia.com/gpu.compute.minor": str(minor),
        **(labels or {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels},
        "spec": {"unschedulable": True} if cordoned else {},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus), "memory": f"{host_gib}Gi", "cpu": "64"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def cluster(*groups: tuple[str, int, int], host_gib: int = 1024) -> Inventory:
    """cluster(("NVIDIA-A10", 1, 4), ...) = 4 nodes with 1 A10 each, ..."""
    nodes = []
    for product, gpus, count in groups:
        slug = product.lower().replace("_", "-")
        nodes += [gfd_node(f"{slug}-{i}", product, gpus, host_gib=host_gib) for i in range(count)]
    return pools_from_nodes(nodes)


def example_cluster(name: str) -> Inventory:
    doc = yaml.safe_load((CLUSTERS / name).read_text())
    return pools_from_nodes(items_of(doc))
