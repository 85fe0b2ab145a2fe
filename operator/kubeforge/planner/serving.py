"""How a ModelService replica is laid out: engine, GPU pool and tensor parallel size (pure).

Tensor parallel is the smallest power of two whose GPUs hold the weights plus the KV cache
for ``maxModelLen`` tokens (one full-length sequence) within the utilisation target, after
a fixed activation/CUDA-graph reserve; it must stay inside one NVLink domain (PCIe GPUs:
one GPU, unless asked explicitly) and one node. A vLLM or SGLang replica that needs more than
one node runs as a LeaderWorkerSet (where its CRD is installed): tensor parallel within each
node, pipeline parallel across the nodes. engine auto: vLLM where the cluster has GPUs, transformers on CPU.

LoRA adapters: vLLM and SGLang reserve GPU memory for ``lora_slots`` adapters of the engine's
--max-lora-rank on every linear module of every layer (A and B, in 16 bits), counted with the weights:
    lora = slots x rank x sum over layers and modules of (in + out) x 2 bytes
The rank is the largest the operator knows (a URI adapter's may be larger: the pods read it when they start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubeforge.inventory.pools import Inventory, Pool
from kubeforge.planner.architecture import Architecture
from kubeforge.runtime.contract import engine_lora_rank

GIB = 1024**3
RESERVE_BYTES = 2 * GIB  # activations, CUDA graphs, the engine's own buffers, per GPU
WEIGHT_BITS = {"fp8": 8, "w8a8-int8": 8, "w4a16-gptq": 4, "w4a16-awq": 4}  # by QuantizeJob method; else 16
GPU_ENGINES = ("vllm", "sglang")


@dataclass(frozen=True)
class ServingPlan:
    feasible: bool
    reason: str
    engine: str
    tensor_parallel: int = 1
    gpu_type: str = "cpu"
    node_selector: tuple[tuple[str, str], ...] = ()
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    gpu_memory_bytes: int = 0
    nodes: int = 1  # per replica: more than one runs as a LeaderWorkerSet (pipeline parallel over nodes)
    lora_bytes: int = 0  # what the engine reserves for LoRA adapters, per replica

    @property
    def gpus(self) -> int:
        """GPUs per pod."""
        return self.tensor_parallel if self.engine in GPU_ENGINES else 0

    @property
    def gpus_per_replica(self) -> int:
        return self.gpus * self.nodes


def weights_bytes(arch: Architecture, bits: int) -> int:
    """Quantized methods leave embeddings and lm_head in 16 bits."""
    embeddings = arch.embedding_params * (1 if arch.tie_word_embeddings else 2)  # + lm_head
    return int((arch.total_parameters - embeddings) * bits / 8 + embeddings * 2)


def kv_cache_bytes(arch: Architecture, tokens: int, dtype_bytes: int = 2) -> int:
    return 2 * arch.num_layers * arch.kv_dim * dtype_bytes * tokens


def lora_bytes(arch: Architecture, engine: str, slots: int, rank: int) -> int:
    """The engine's LoRA buffers: ``slots`` adapters of its start rank on every linear module, 16 bits."""
    started = engine_lora_rank(engine, rank) or rank
    return slots * arch.lora_parameters(started, ("all-linear",))[0] * 2 if slots else 0


def plan_serving(
    *,
    engine: str,
    inventory: Inventory,
    arch: Architecture | None,
    weight_bits: int = 16,
    max_model_len: int | None = None,
    utilization: float = 0.9,
    tensor_parallel: int | str = "auto",
    gpu_type: str = "auto",
    method: str | None = None,
    multi_node: bool = False,  # LeaderWorkerSet is installed: a replica may span nodes
    lora_slots: int = 0,  # LoRA adapters per batch the engine reserves memory for (0: no adapters)
    lora_rank: int = 1,  # the largest rank known of them
) -> ServingPlan:
    pools = [p for p in inventory.pools if _matches(p, gpu_type)]
    if engine == "auto":
        engine = "vllm" if pools else "transformers"
    if engine == "transformers":
        return ServingPlan(True, "transformers on CPU: the small OpenAI-compatible server", "transformers")
    if not pools:
        return ServingPlan(False, f"engine {engine} needs GPUs and the cluster has none matching gpuType {gpu_type}",
                           engine)  # fmt: skip
    if arch is None:
        tp = 1 if tensor_parallel == "auto" else int(tensor_parallel)
        pool = next((p for p in sorted(pools, key=_cost) if p.gpus_per_node >= tp), None)
        if pool is None:
            return ServingPlan(False, f"no node has {tp} GPUs for tensorParallel {tp}", engine)
        return ServingPlan(True, f"{tp} x {pool.gpu.name} (model size unknown: set tensorParallel to size it)",
                           engine, tp, pool.gpu.name, pool.selector)  # fmt: skip
    length = max_model_len or arch.max_position_embeddings or 4096
    weights, kv = weights_bytes(arch, weight_bits), kv_cache_bytes(arch, length)
    lora = lora_bytes(arch, engine, lora_slots, lora_rank)
    adapters = (f" + LoRA {lora / GIB:.1f} GiB ({lora_slots} adapters per batch, rank "
                f"{engine_lora_rank(engine, lora_rank) or lora_rank})") if lora else ""  # fmt: skip
    tried = []
    for pool in sorted(pools, key=_cost):
        usable = pool.memory_bytes * utilization - RESERVE_BYTES
        limit = pool.gpus_per_node if tensor_parallel != "auto" else min(pool.gpus_per_node, pool.nvlink_domain)
        candidates = [int(tensor_parallel)] if tensor_parallel != "auto" else [2**k for k in range(8)]
        for tp in candidates:
            if tp > limit:
                break
            if arch.num_attention_heads % tp or usable <= 0:
                continue
            if (weights + kv + lora) / tp <= usable:
                return ServingPlan(
                    True,
                    f"{tp} x {pool.gpu.name}: weights {weights / GIB:.1f} GiB + KV cache {kv / GIB:.1f} GiB "
                    f"({length} tokens){adapters} within {utilization:.0%} of {pool.memory_bytes / GIB:.0f} GiB "
                    "per GPU" + fp8_note(method, pool),
                    engine, tp, pool.gpu.name, pool.selector, weights, kv, pool.memory_bytes, lora_bytes=lora,
                )  # fmt: skip
        need = math.ceil((weights + kv + lora) / max(usable, 1))
        if engine in GPU_ENGINES and tensor_parallel == "auto" and usable > 0 and not lora_slots:
            tp = max((2**k for k in range(8) if 2**k <= limit and arch.num_attention_heads % 2**k == 0), default=1)
            nodes = math.ceil(need / tp)
            if multi_node and 1 < nodes <= pool.nodes and nodes <= arch.num_layers:
                return ServingPlan(
                    True,
                    f"{nodes} nodes x {tp} x {pool.gpu.name} per replica (LeaderWorkerSet: tensor parallel {tp} "
                    f"in a node, pipeline parallel {nodes} across nodes): weights {weights / GIB:.1f} GiB + KV "
                    f"cache {kv / GIB:.1f} GiB ({length} tokens)" + fp8_note(method, pool),
                    engine, tp, pool.gpu.name, pool.selector, weights, kv, pool.memory_bytes, nodes,
                )  # fmt: skip
        tried.append(f"{pool.gpu.name} would need {2 ** math.ceil(math.log2(max(need, 1)))} GPUs (has {limit} "
                     "in one node/NVLink domain)")  # fmt: skip
    return ServingPlan(
        False,
        f"weights {weights / GIB:.1f} GiB + KV cache {kv / GIB:.1f} GiB{adapters} do not fit one node: "
        + "; ".join(tried) + ". Lower maxModelLen, quantize, or use bigger GPUs"
        + ("; replicas with LoRA adapters stay on one node" if lora_slots else
           "" if multi_node else "; replicas across nodes need LeaderWorkerSet installed (engine vllm or sglang)"),
        engine, weights_bytes=weights, kv_cache_bytes=kv, lora_bytes=lora,
    )  # fmt: skip


FP8_NATIVE = (8, 9)  # Ada (L4, L40S) and Hopper/Blackwell have FP8 tensor cores


def fp8_note(method: str | None, pool: Pool) -> str:
    """FP8 artifacts run everywhere vLLM runs, but only fast where the GPU has FP8 tensor cores."""
    if method not in ("fp8",) or pool.gpu.compute_capability >= FP8_NATIVE:
        return ""
    cc = ".".join(map(str, pool.gpu.compute_capability))
    return (
        f". Note: {pool.gpu.name} (compute capability {cc}) has no FP8 tensor cores: vLLM runs this FP8 "
        "artifact weight-only (Marlin), slower than on L4/L40S/H100/H200/B200; w4a16 or w8a8-int8 suit it better"
    )


def _cost(pool: Pool) -> tuple[float, str]:
    """Cheapest first: less memory per GPU is usually the cheaper pool."""
    return (pool.memory_bytes, pool.gpu.name)


def _matches(pool: Pool, gpu_type: str) -> bool:
    wanted = gpu_type.lower()
    return wanted == "auto" or wanted in (pool.gpu.name.lower(), pool.gpu.family.lower())
