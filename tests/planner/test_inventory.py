"""Node labels -> GPU pools."""

from __future__ import annotations

import pytest

from kubeforge.inventory.gpus import GPU_FACTS, lookup_gpu
from kubeforge.inventory.pools import items_of, pools_from_nodes
from kubeforge.inventory.quantity import parse_cpu, parse_memory
from tests.planner.nodes import CLUSTERS, example_cluster, gfd_node

GIB = 1024**3


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # (gpu, gpus per node, nodes, NVLink domain)
        ("a10-4x1.yaml", [("A10", 1, 4, 1)]),
        ("a100-sxm4-80gb-2x8.yaml", [("A100-SXM4-80GB", 8, 2, 8)]),
        ("h100-4x8.yaml", [("H100-SXM-80GB", 8, 4, 8)]),
        ("a100-pcie-40gb-2x8.yaml", [("A100-PCIE-40GB", 8, 2, 1)]),
        ("mixed.yaml", [("H100-SXM-80GB", 8, 2, 8), ("L4", 1, 4, 1)]),
        ("cordoned.yaml", [("A100-SXM4-80GB", 8, 2, 8)]),
        ("unknown-gpu.yaml", [("NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", 4, 2, 1)]),
    ],
)
def test_example_clusters(name, expected):
    inv = example_cluster(name)
    got = [(p.gpu.name, p.gpus_per_node, p.nodes, p.nvlink_domain) for p in inv.pools]
    assert got == expected


def test_every_example_cluster_is_covered():
    assert len(list(CLUSTERS.glob("*.yaml"))) == 7


def test_cordoned_and_not_ready_nodes_do_not_count():
    inv = example_cluster("cordoned.yaml")
    reasons = dict(inv.excluded)
    assert reasons["dgx-a100-1"].startswith("cordoned")
    assert reasons["dgx-a100-2"].startswith("not Ready")
    assert inv.pools[0].node_names == ("dgx-a100-0", "dgx-a100-3")


def test_unknown_product_degrades_gracefully():
    inv = example_cluster("unknown-gpu.yaml")
    gpu = inv.pools[0].gpu
    assert not gpu.known and gpu.memory_mib == 97887
    assert gpu.compute_capability == (12, 0) and gpu.supports_bf16 and not gpu.supports_fp8
    assert inv.unknown_products == ("NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition",)


def test_cpu_nodes_are_not_pools():
    inv = example_cluster("mixed.yaml")
    assert inv.cpu_only_nodes == 2


def test_gke_labels_and_instance_type_supply_host_memory_and_network():
    pool = example_cluster("mixed.yaml").pools[0]
    assert pool.source == "gke" and pool.selector == (("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"),)
    assert pool.host_memory_bytes == (1872 - 8) * GIB
    assert pool.network_gbps == 1000


def test_network_label_sets_the_bandwidth_between_nodes():
    """kubeforge.io/network-gbps wins over the instance type's figure and the 100 Gb/s default; a value
    that is not a whole number of Gb/s excludes the node with the label named. The pool keeps the
    slowest node's figure, and multi-node step times follow it."""
    from kubeforge.planner.cost import step_time
    from kubeforge.planner.memory import Layout

    label = "kubeforge.io/network-gbps"
    fast = [gfd_node(f"f{i}", "NVIDIA-H100-80GB-HBM3", 8, labels={label: "3200"}) for i in range(2)]
    plain = [gfd_node(f"p{i}", "NVIDIA-H100-80GB-HBM3", 8) for i in range(2)]
    (pool_fast,) = pools_from_nodes(fast).pools
    (pool_plain,) = pools_from_nodes(plain).pools
    assert (pool_fast.network_gbps, pool_plain.network_gbps) == (3200, 100)
    mixed = [fast[0], gfd_node("slow", "NVIDIA-H100-80GB-HBM3", 8, labels={label: "400"})]
    assert pools_from_nodes(mixed).pools[0].network_gbps == 400
    bad = pools_from_nodes([gfd_node("b", "NVIDIA-H100-80GB-HBM3", 8, labels={label: "fast"})])
    assert not bad.pools and label in bad.excluded[0][1] and "whole number" in bad.excluded[0][1]

    from kubeforge.api.finetune import ModelSource
    from kubeforge.planner import resolve

    arch = resolve(ModelSource(uri="hf://meta-llama/Llama-3.1-8B"))
    layout = Layout("full", "fsdp", 2, 8, seq_len=8192, micro_batch=2, gradient_checkpointing=True)
    t_fast, t_plain = (step_time(arch, layout, pool, 32) for pool in (pool_fast, pool_plain))
    assert t_fast.data_parallel < t_plain.data_parallel / 20 and t_fast.total < t_plain.total


def test_allocatable_gpus_win_over_labels():
    node = gfd_node("n", "NVIDIA-A100-SXM4-80GB", 8)
    node["status"]["allocatable"]["nvidia.com/gpu"] = "6"  # two GPUs held by the device plugin
    (pool,) = pools_from_nodes([node]).pools
    assert pool.gpus_per_node == 6 and pool.nvlink_domain == 6


def test_karpenter_labels():
    node = {
        "metadata": {
            "name": "k",
            "labels": {
                "karpenter.k8s.aws/instance-gpu-name": "a10g",
                "karpenter.k8s.aws/instance-gpu-count": "4",
                "karpenter.k8s.aws/instance-gpu-memory": "23028",
                "karpenter.k8s.aws/instance-gpu-manufacturer": "nvidia",
                "node.kubernetes.io/instance-type": "g5.12xlarge",
            },
        },
        "status": {"capacity": {"memory": "192Gi", "cpu": "48"}},
    }
    (pool,) = pools_from_nodes([node]).pools
    assert (pool.gpu.name, pool.gpus_per_node, pool.source) == ("A10G", 4, "karpenter")
    assert pool.network_gbps == 40


def test_instance_type_alone_is_enough():
    node = {"metadata": {"name": "p", "labels": {"node.kubernetes.io/instance-type": "p4d.24xlarge"}}, "status": {}}
    (pool,) = pools_from_nodes([node]).pools
    assert (pool.gpu.name, pool.gpus_per_node, pool.nvlink_domain) == ("A100-SXM4-40GB", 8, 8)
    assert pool.host_memory_bytes == 1152 * GIB


def test_multi_node_nvlink_clique_widens_the_domain():
    nodes = [gfd_node(f"gb-{i}", "NVIDIA-B200", 4, labels={"nvidia.com/gpu.clique": "cluster-1.0"}) for i in range(18)]
    (pool,) = pools_from_nodes(nodes).pools
    assert pool.nvlink_domain == 72


def test_mig_slices_are_their_own_pool_without_nvlink():
    node = gfd_node("mig", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", 7)
    node["metadata"]["labels"]["nvidia.com/gpu.memory"] = "4864"
    (pool,) = pools_from_nodes([node]).pools
    assert pool.gpu.name == "A100-SXM4-40GB MIG 1g.5gb" and pool.memory_mib == 4864 and pool.nvlink_domain == 1


def test_different_gpu_counts_are_different_pools():
    inv = pools_from_nodes(
        [gfd_node("a", "NVIDIA-L4", 1), gfd_node("b", "NVIDIA-L4", 4), gfd_node("c", "NVIDIA-L4", 4)]
    )
    assert sorted((p.gpus_per_node, p.nodes) for p in inv.pools) == [(1, 1), (4, 2)]


def test_pool_common_labels_drive_node_selector_matching():
    a = gfd_node("a", "NVIDIA-L4", 1, labels={"team": "x", "zone": "1"})
    b = gfd_node("b", "NVIDIA-L4", 1, labels={"team": "x", "zone": "2"})
    (pool,) = pools_from_nodes([a, b]).pools
    assert pool.matches({"team": "x"}) and not pool.matches({"zone": "1"})


@pytest.mark.parametrize(
    "required",
    ["T4", "A10", "A10G", "L4", "L40S", "A100-SXM4-40GB", "A100-SXM4-80GB", "A100-PCIE-40GB", "A100-PCIE-80GB",
     "H100-SXM-80GB", "H100-PCIE-80GB", "H100-NVL-94GB", "H200-SXM-141GB", "B200-180GB"],
)  # fmt: skip
def test_gpu_table_covers_the_required_products(required):
    assert required in GPU_FACTS


def test_gpu_facts_are_consistent():
    for gpu in GPU_FACTS.values():
        assert gpu.fp8_tflops == 0 or gpu.compute_capability >= (8, 9), gpu.name
        assert gpu.bf16_tflops == 0 or gpu.compute_capability >= (8, 0), gpu.name
        assert not (gpu.nvswitch and gpu.nvlink_pairs), gpu.name
        assert gpu.nvswitch <= (gpu.nvlink_gbps > 0), gpu.name
        assert gpu.memory_mib > 10_000


@pytest.mark.parametrize(
    ("label", "memory", "expected"),
    [
        ("NVIDIA-A100-80GB-PCIe", None, "A100-PCIE-80GB"),
        ("NVIDIA-A100-SXM4-40GB", None, "A100-SXM4-40GB"),
        ("a100", 81920, "A100-SXM4-80GB"),
        ("a100", None, "A100-SXM4-40GB"),
        ("NVIDIA-H100-NVL", None, "H100-NVL-94GB"),
        ("nvidia-l4", None, "L4"),
        ("NVIDIA-L40S", None, "L40S"),
        ("NVIDIA-RTX-6000-Ada", None, None),
    ],
)
def test_lookup_gpu(label, memory, expected):
    found = lookup_gpu(label, memory)
    assert (found.name if found else None) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("1056939484Ki", 1056939484 * 1024), ("2Ti", 2 * 1024**4), ("1e9", 10**9), ("512M", 512 * 10**6)],
)
def test_memory_quantities(text, value):
    assert parse_memory(text) == value


def test_cpu_quantities():
    assert parse_cpu("191500m") == 191.5 and parse_cpu("8") == 8


def test_items_of_rejects_other_documents():
    with pytest.raises(ValueError, match="List of Nodes"):
        items_of({"kind": "Pod"})
