"""Well-known cloud GPU instance types, for nodes without GPU Feature Discovery labels.

Sources: the AWS EC2 accelerated-computing instance pages (p3, p4d, p4de, p5, p5e,
p5en, g4dn, g5, g6, g6e), Azure's ND/NC/NV series pages, and Google Cloud's
accelerator-optimized machine families (a2, a3, g2). ``network_gbps`` is the
instance's inter-node bandwidth (EFA / InfiniBand / GPUDirect-TCPX), used by the cost
model for traffic that leaves a node.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceType:
    gpu: str  # product string, resolved by kubeforge.inventory.gpus.lookup_gpu
    count: int
    host_memory_gib: int
    network_gbps: float


def _family(gpu: str, sizes: dict[str, tuple[int, int, float]]) -> dict[str, InstanceType]:
    return {name: InstanceType(gpu, count, mem, net) for name, (count, mem, net) in sizes.items()}


INSTANCE_TYPES: dict[str, InstanceType] = {
    # AWS
    **_family("V100-SXM2-16GB", {"p3.2xlarge": (1, 61, 10), "p3.8xlarge": (4, 244, 10), "p3.16xlarge": (8, 488, 25)}),
    "p3dn.24xlarge": InstanceType("V100-SXM2-32GB", 8, 768, 100),
    **_family("A100-SXM4-40GB", {"p4d.24xlarge": (8, 1152, 400)}),
    **_family("A100-SXM4-80GB", {"p4de.24xlarge": (8, 1152, 400)}),
    **_family("H100-80GB-HBM3", {"p5.48xlarge": (8, 2048, 3200), "p5.4xlarge": (1, 256, 100)}),
    **_family("H200", {"p5e.48xlarge": (8, 2048, 3200), "p5en.48xlarge": (8, 2048, 3200)}),
    **_family("B200", {"p6-b200.48xlarge": (8, 2048, 3200)}),
    **_family("T4", {"g4dn.xlarge": (1, 16, 25), "g4dn.12xlarge": (4, 192, 50), "g4dn.metal": (8, 384, 100)}),
    **_family(
        "A10G",
        {
            "g5.xlarge": (1, 16, 10),
            "g5.2xlarge": (1, 32, 10),
            "g5.4xlarge": (1, 64, 25),
            "g5.8xlarge": (1, 128, 25),
            "g5.12xlarge": (4, 192, 40),
            "g5.16xlarge": (1, 256, 25),
            "g5.24xlarge": (4, 384, 50),
            "g5.48xlarge": (8, 768, 100),
        },
    ),
    **_family("L4", {"g6.xlarge": (1, 16, 10), "g6.12xlarge": (4, 192, 40), "g6.48xlarge": (8, 768, 100)}),
    **_family("L40S", {"g6e.xlarge": (1, 32, 20), "g6e.12xlarge": (4, 384, 100), "g6e.48xlarge": (8, 1536, 400)}),
    # Azure
    "Standard_NC4as_T4_v3": InstanceType("T4", 1, 28, 8),
    "Standard_NC64as_T4_v3": InstanceType("T4", 4, 440, 32),
    "Standard_NV36ads_A10_v5": InstanceType("A10", 1, 440, 40),
    "Standard_NC24ads_A100_v4": InstanceType("A100-PCIE-80GB", 1, 220, 20),
    "Standard_NC96ads_A100_v4": InstanceType("A100-PCIE-80GB", 4, 880, 80),
    "Standard_ND96asr_v4": InstanceType("A100-SXM4-40GB", 8, 900, 1600),
    "Standard_ND96amsr_A100_v4": InstanceType("A100-SXM4-80GB", 8, 1900, 1600),
    "Standard_ND96isr_H100_v5": InstanceType("H100-80GB-HBM3", 8, 1900, 3200),
    "Standard_ND96isr_H200_v5": InstanceType("H200", 8, 1850, 3200),
    # Google Cloud
    **_family(
        "A100-SXM4-40GB",
        {
            "a2-highgpu-1g": (1, 85, 24),
            "a2-highgpu-2g": (2, 170, 32),
            "a2-highgpu-4g": (4, 340, 50),
            "a2-highgpu-8g": (8, 680, 100),
            "a2-megagpu-16g": (16, 1360, 100),
        },
    ),
    **_family("A100-SXM4-80GB", {"a2-ultragpu-1g": (1, 170, 24), "a2-ultragpu-8g": (8, 1360, 100)}),
    **_family("H100-80GB-HBM3", {"a3-highgpu-8g": (8, 1872, 1000), "a3-megagpu-8g": (8, 1872, 1800)}),
    **_family("H200", {"a3-ultragpu-8g": (8, 2952, 3200)}),
    **_family(
        "L4",
        {
            "g2-standard-4": (1, 16, 10),
            "g2-standard-8": (1, 32, 16),
            "g2-standard-24": (2, 96, 32),
            "g2-standard-48": (4, 192, 50),
            "g2-standard-96": (8, 384, 100),
        },
    ),
}

# GKE's cloud.google.com/gke-accelerator values.
GKE_ACCELERATORS: dict[str, str] = {
    "nvidia-tesla-t4": "T4",
    "nvidia-tesla-v100": "V100-SXM2-16GB",
    "nvidia-l4": "L4",
    "nvidia-tesla-a100": "A100-SXM4-40GB",
    "nvidia-a100-80gb": "A100-SXM4-80GB",
    "nvidia-h100-80gb": "H100-80GB-HBM3",
    "nvidia-h100-mega-80gb": "H100-80GB-HBM3",
    "nvidia-h200-141gb": "H200",
    "nvidia-b200": "B200",
}

DEFAULT_NETWORK_GBPS = 100.0  # assumed when nothing says otherwise (one 100 Gb/s NIC per node)
