"""Every node label and resource key the inventory reads, defined once."""

# NVIDIA GPU Feature Discovery (GFD), deployed by the GPU Operator.
GPU_PRODUCT = "nvidia.com/gpu.product"
GPU_MEMORY_MIB = "nvidia.com/gpu.memory"
GPU_COUNT = "nvidia.com/gpu.count"
GPU_FAMILY = "nvidia.com/gpu.family"
GPU_COMPUTE_MAJOR = "nvidia.com/gpu.compute.major"
GPU_COMPUTE_MINOR = "nvidia.com/gpu.compute.minor"
GPU_CLIQUE = "nvidia.com/gpu.clique"  # multi-node NVLink (GB200 NVL72 and the like)
MIG_CAPABLE = "nvidia.com/mig.capable"
MIG_STRATEGY = "nvidia.com/mig.strategy"

# Cloud fallbacks.
GKE_ACCELERATOR = "cloud.google.com/gke-accelerator"
GKE_ACCELERATOR_COUNT = "cloud.google.com/gke-accelerator-count"
KARPENTER_GPU_NAME = "karpenter.k8s.aws/instance-gpu-name"
KARPENTER_GPU_COUNT = "karpenter.k8s.aws/instance-gpu-count"
KARPENTER_GPU_MEMORY_MIB = "karpenter.k8s.aws/instance-gpu-memory"
KARPENTER_GPU_MANUFACTURER = "karpenter.k8s.aws/instance-gpu-manufacturer"
INSTANCE_TYPE = "node.kubernetes.io/instance-type"
INSTANCE_TYPE_BETA = "beta.kubernetes.io/instance-type"

# Set by the cluster's admins where nothing else tells it (on-premises fabrics, unlisted instance types):
# the node's network bandwidth to other nodes in Gb/s (e.g. 3200 for 8 x 400 Gb/s RDMA NICs).
NETWORK_GBPS = "kubeforge.io/network-gbps"

# Extended resource the NVIDIA device plugin advertises.
GPU_RESOURCE = "nvidia.com/gpu"

# Taints that mean "do not schedule here" regardless of tolerations for GPUs.
UNSCHEDULABLE_TAINTS = (
    "node.kubernetes.io/unschedulable",
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
)
