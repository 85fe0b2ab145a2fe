"""GPU inventory: Node objects -> GPU pools (what the cluster really has)."""

from kubeforge.inventory.gpus import GPU_FACTS, GPUFacts, lookup_gpu
from kubeforge.inventory.pools import Pool, pools_from_nodes

__all__ = ["GPU_FACTS", "GPUFacts", "Pool", "lookup_gpu", "pools_from_nodes"]
