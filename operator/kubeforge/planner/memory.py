"""Per-GPU memory of one training layout, broken down.

P = parameters, N = GPUs sharding the states, LL = the largest single module (DeepSpeed's
"largest layer", usually the embedding), t/p/d = tensor/pipeline/data parallel degrees.

Model states, bytes per GPU (full fine-tuning, Adam, mixed precision):

    ddp            weights 4P          gradients 4P             optimizer 8P       (fp32 params, grads, m, v)
    zero1          weights 2P          gradients 2P + 4P/N      optimizer 12P/N
    zero2          weights 2P          gradients 6P/N           optimizer 12P/N    = DeepSpeed's 2P + 18P/N
    zero3          weights 2P/N + 4LL  gradients 4P/N           optimizer 12P/N    = DeepSpeed's 4LL + 18P/N
    zero3-offload  weights 4LL         (gradients, optimizer and parameters in host memory: 18P x 1.5 per node)
    fsdp           weights 4P/N + 4LL  gradients 4P/N           optimizer 8P/N     (FSDP2: fp32 shards, bf16 compute)
    megatron       weights 2P/tp       gradients 4P/tp          optimizer 12P/tpd  (distributed optimizer)

The zero2/zero3/zero3-offload rows reproduce DeepSpeed's estimate_zero2/zero3_model_states_mem_needs
(tests/planner/test_memory.py checks them against DeepSpeed itself).

LoRA/QLoRA: the base weights are frozen (bf16: 2 bytes/param; QLoRA: NF4 4-bit with double-quantized
constants, 0.5 + 0.127/8 bytes/param for the layers' linear modules, bf16 elsewhere) and sharded only
by zero3/fsdp/megatron; the adapters train in fp32: 4 (weights) + 4 (gradients) + 8 (Adam) bytes per
trainable parameter.

Activations, bytes per token per layer in bf16 (flash attention: no s^2 scores), for a Llama-style
block with hidden h, kv width k and MLP width i: 6h (norms, residual) + 8h + 4k (attention inputs
and outputs) + 8i (SwiGLU), after Korthikanti et al. 2022 ("Reducing Activation Recomputation");
tensor parallelism divides all but the 6h, sequence parallelism divides that too. With gradient
checkpointing only each layer's input (2h) is kept, plus one layer recomputed at a time. Pipeline
stages hold L/p layers for up to p micro-batches in flight (1F1B). The logits add 6 bytes per token
per vocabulary entry (bf16 logits and their fp32 softmax).

Overhead: CUDA context and library workspaces (1 GiB), NCCL buffers (0.5 GiB with >1 GPU),
ZeRO-1/2 communication buckets (2 x h^2 elements in bf16, DeepSpeed's "auto" bucket sizes), and
8% fragmentation of everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.planner.architecture import Architecture

GIB = 1024**3
CUDA_CONTEXT = 1 * GIB
NCCL_BUFFERS = GIB // 2
FRAGMENTATION = 0.08
NF4_BYTES = 0.5 + 0.127 / 8  # 4-bit weights + double-quantized absmax constants (blocksize 64)
OFFLOAD_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor
LOGIT_BYTES = 6


@dataclass(frozen=True)
class Layout:
    """The choices of one candidate plan that memory and time depend on."""

    method: str  # full | lora | qlora
    strategy: str  # ddp | fsdp | zero1 | zero2 | zero3 | zero3-offload | megatron
    nodes: int
    gpus_per_node: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    precision: str = "bf16"
    micro_batch: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def data_parallel(self) -> int:
        return self.world // self.model_parallel


@dataclass(frozen=True)
class Memory:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    host_per_node: int = 0  # host memory offloading needs on each node

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class States:
    weights: float
    gradients: float
    optimizer: float
    host_per_node: float = 0.0


def trainable_parameters(arch: Architecture, layout: Layout) -> int:
    if layout.method == "full":
        return arch.total_parameters
    return arch.lora_parameters(layout.lora_rank, layout.lora_targets)[0]


def base_weight_bytes(arch: Architecture, method: str, precision: str = "bf16") -> float:
    if method == "qlora":
        linear = arch.linear_parameters
        return NF4_BYTES * linear + 2 * (arch.total_parameters - linear)
    return (4.0 if precision == "fp32" else 2.0) * arch.total_parameters


def model_states(arch: Architecture, layout: Layout) -> States:
    P, LL, n = arch.total_parameters, arch.largest_layer_parameters, layout.world
    s, tp = layout.strategy, layout.model_parallel
    if layout.method == "full":
        if s == "ddp":
            return States(4 * P, 4 * P, 8 * P)
        if s == "zero1":
            return States(2 * P, 2 * P + 4 * P / n, 12 * P / n)
        if s == "zero2":
            return States(2 * P, 6 * P / n, 12 * P / n)
        if s == "zero3":
            return States(2 * P / n + 4 * LL, 4 * P / n, 12 * P / n)
        if s == "zero3-offload":
            return States(4 * LL, 0, 0, 18 * P / layout.nodes * OFFLOAD_BUFFER_FACTOR)
        if s == "fsdp":
            return States(4 * P / n + 4 * LL, 4 * P / n, 8 * P / n)
        if s == "megatron":
            return States(2 * P / tp, 4 * P / tp, 12 * P / (tp * layout.data_parallel))
        raise ValueError(f"unknown strategy {s!r}")
    base, T = base_weight_bytes(arch, layout.method, layout.precision), trainable_parameters(arch, layout)
    if s == "ddp":
        return States(base + 4 * T, 4 * T, 8 * T)
    if s == "zero1":
        return States(base + 4 * T, 4 * T, 8 * T / n)
    if s == "zero2":
        return States(base + 4 * T, 4 * T / n, 8 * T / n)
    if s == "zero3":
        return States(base / n + 4 * LL + 4 * T / n, 4 * T / n, 8 * T / n)
    if s == "zero3-offload":
        return States(4 * LL, 0, 0, (base + 16 * T) / layout.nodes * OFFLOAD_BUFFER_FACTOR)
    if s == "fsdp":
        return States(base / n + 4 * LL + 4 * T / n, 4 * T / n, 8 * T / n)
    if s == "megatron":
        return States(base / tp + 4 * T / tp, 4 * T / tp, 8 * T / (tp * layout.data_parallel))
    raise ValueError(f"unknown strategy {s!r}")


def activation_bytes(arch: Architecture, layout: Layout) -> float:
    h, k, i = arch.hidden_size, arch.kv_dim, arch.intermediate_size * arch.num_experts_per_token
    t, p = layout.tensor_parallel, layout.pipeline_parallel
    tokens = layout.micro_batch * layout.seq_len
    shared = 6 * h / (t if layout.sequence_parallel else 1)
    split = (8 * h + 4 * k + 8 * i) / t
    per_layer = shared + split
    if layout.method != "full" and layout.lora_dropout > 0:
        # peft applies dropout to each adapted module's input (q, k, v, gate, up: h; o: q width;
        # down: i) and keeps the result (bf16) and its mask (1 byte) for the backward pass
        per_layer += 3 * (5 * h + arch.q_dim + arch.intermediate_size) / t
    layers = arch.num_layers / p
    in_flight = min(p, max(1, layout.gradient_accumulation))
    if layout.gradient_checkpointing:
        kept = layers * in_flight * 2 * h / (t if layout.sequence_parallel else 1)
        body = tokens * (kept + per_layer)
    else:
        body = tokens * layers * in_flight * per_layer
    logits = tokens * arch.vocab_size * LOGIT_BYTES / t
    scale = 2.0 if layout.precision == "fp32" else 1.0  # the formulas count 2-byte activations
    return (body + logits) * scale


def overhead_bytes(arch: Architecture, layout: Layout, subtotal: float) -> float:
    out = CUDA_CONTEXT + (NCCL_BUFFERS if layout.world > 1 else 0)
    if layout.strategy in ("zero1", "zero2"):
        out += 2 * arch.hidden_size**2 * 2
    return out + FRAGMENTATION * subtotal


def estimate(arch: Architecture, layout: Layout) -> Memory:
    states = model_states(arch, layout)
    acts = activation_bytes(arch, layout)
    subtotal = states.weights + states.gradients + states.optimizer + acts
    return Memory(
        weights=int(states.weights),
        gradients=int(states.gradients),
        optimizer=int(states.optimizer),
        activations=int(acts),
        overhead=int(overhead_bytes(arch, layout, subtotal)),
        host_per_node=int(states.host_per_node),
    )
