"""Estimated seconds per optimizer step of one layout on one pool.

    compute   = tokens x FLOPs/token / (GPUs x peak x efficiency)
      FLOPs/token = 6 x active params (full) or 4 x (LoRA/QLoRA: no weight gradients for
      frozen weights), + 2 x active params with gradient checkpointing (recomputed forward),
      + 6 x layers x seq x attention width (causal attention, forward and backward);
      peak is the GPU's dense bf16/fp16 peak, or its fp8 peak x FP8_FRACTION;
      efficiency is a per-strategy model-FLOPs-utilisation (EFFICIENCY), lowered for small
      micro-batches and by TP_GEMM_EFFICIENCY per doubling of TP (smaller GEMMs), and QLoRA pays
      QLORA_SLOWDOWN for dequantising weights.
    bubble    = compute x (p - 1) / micro-batches      (pipeline fill and drain, 1F1B)
    data par. = ring all-reduce of gradients, 2 (d-1)/d x bytes / bandwidth; ZeRO-3/FSDP also
                all-gather parameters twice (three times with checkpointing); half of it hides
                behind the backward pass (OVERLAP).
    tensor    = 4 all-reduces of the activations per layer and micro-batch, never hidden, over
                NVLink (TP never leaves an NVLink domain).
    ulysses   = DeepSpeed-Ulysses (degree u): per layer and micro-batch, q, k, v and the attention
                output go all-to-all forward and again backward (and in the recomputed forward with
                checkpointing); each GPU sends (u-1)/u of its slice, (2 q width + 2 kv width) x 2
                bytes per token, never hidden, inside a node.
    offload   = parameters and gradients over PCIe, plus the host's Adam step (HOST_ADAM rate).
    latency   = kernel launches (LAYER_LAUNCH_SECONDS per layer and micro-batch, forward and
                backward; tensor parallelism does not reduce it) and collective latencies
                (COLLECTIVE_LATENCY inside a node, x5 across nodes): the floor that keeps tiny
                jobs from looking faster on many GPUs.

Bandwidth inside a node is NVLink where the GPUs have it, else PCIe; between nodes it is the
node's network bandwidth shared by its GPUs, and the slower of the two binds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubeforge.inventory.pools import Pool
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.memory import Layout, base_weight_bytes, trainable_parameters
from kubeforge.runtime.contract import STRATEGIES

EFFICIENCY = {
    "ddp": 0.45,
    "zero1": 0.44,
    "zero2": 0.43,
    "zero2-offload-optimizer": 0.43,
    "fsdp": 0.40,
    "zero3": 0.38,
    "zero3-offload-optimizer": 0.38,
    "megatron": 0.45,
    "megatron-offload-optimizer": 0.45,
    "zero3-offload": 0.30,
}  # the offload's own cost is the `offload` term
TP_GEMM_EFFICIENCY = 0.93  # per doubling of TP: smaller matrix multiplies run less efficiently
FP8_FRACTION = 0.65  # of the fp8 peak reached, relative to bf16 (about 1.3x over bf16 on H100)
QLORA_SLOWDOWN = 1.3
OVERLAP = 0.5
HOST_ADAM_PARAMS_PER_SECOND = 2e9  # DeepSpeed CPUAdam on one node
LAYER_LAUNCH_SECONDS = 2e-4  # forward + backward kernels of one transformer layer
COLLECTIVE_LATENCY = 2e-5  # one NCCL collective inside a node
GRADIENT_BUCKET_BYTES = 25 * 1024**2


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    data_parallel: float
    tensor_parallel: float
    offload: float
    latency: float = 0.0
    ulysses: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.bubble
            + self.data_parallel
            + self.tensor_parallel
            + self.offload
            + self.latency
            + self.ulysses
        )


def flops_per_token(arch: Architecture, layout: Layout) -> float:
    active = arch.active_parameters
    per_param = 6.0 if layout.method == "full" else 4.0
    if layout.gradient_checkpointing:
        per_param += 2.0
    attention = 6.0 * arch.num_layers * layout.seq_len * arch.q_dim
    return per_param * active + attention


def bandwidths(pool: Pool, layout: Layout) -> tuple[float, float]:
    """(bytes/s inside a node per GPU, bytes/s across the gang per GPU)."""
    nvlink = pool.nvlink_domain > 1 and pool.gpu.nvlink_gbps > 0
    intra = max(1.0, (pool.gpu.nvlink_gbps if nvlink else pool.gpu.pcie_gbps) * 1e9)  # never 0, even for unknown GPUs
    if layout.nodes == 1:
        return intra, intra
    inter = max(1.0, pool.network_gbps / 8 * 1e9 / layout.gpus_per_node)
    return intra, min(intra, inter)


def step_time(arch: Architecture, layout: Layout, pool: Pool, global_batch: int) -> StepTime:
    tokens = global_batch * layout.sequences_per_example * layout.seq_len
    peak = pool.gpu.peak_tflops(layout.precision) * 1e12
    if layout.precision == "fp8":
        peak *= FP8_FRACTION
    micro_tokens = layout.micro_batch * layout.sequences_per_example * layout.seq_len / layout.ulysses
    efficiency = EFFICIENCY[layout.strategy] * min(1.0, 0.75 + 0.25 * micro_tokens / 8192)
    efficiency *= TP_GEMM_EFFICIENCY ** math.log2(layout.tensor_parallel)
    compute = tokens * flops_per_token(arch, layout) / (layout.world * peak * efficiency)
    if layout.method == "qlora":
        compute *= QLORA_SLOWDOWN

    p, t, d = layout.pipeline_parallel, layout.tensor_parallel, layout.data_parallel
    micro_batches = max(1, layout.gradient_accumulation)
    launches = micro_batches * (arch.num_layers / p) * LAYER_LAUNCH_SECONDS
    bubble = (compute + launches) * (p - 1) / micro_batches if p > 1 else 0.0

    intra, across = bandwidths(pool, layout)
    trainable = trainable_parameters(arch, layout)
    grad_bytes = (2.0 if layout.method == "full" else 4.0) * trainable
    ring = 2 * (d - 1) / d if d > 1 else 0.0
    dp_bytes = ring * grad_bytes / layout.model_parallel
    sharded = STRATEGIES[layout.strategy].zero_stage == 3 or STRATEGIES[layout.strategy].engine == "fsdp"
    if sharded and d > 1:
        gathers = 3 if layout.gradient_checkpointing else 2
        dp_bytes += gathers * (d - 1) / d * base_weight_bytes(arch, layout.method)
    data_parallel = dp_bytes / across * (1 - OVERLAP)

    tensor = 0.0
    if t > 1:
        per_microbatch = 4 * (arch.num_layers / p) * 2 * (t - 1) / t * micro_tokens * arch.hidden_size * 2
        tensor = per_microbatch * micro_batches / intra

    u = layout.ulysses
    ulysses = 0.0
    if u > 1:
        passes = 3 if layout.gradient_checkpointing else 2  # forward, backward (and the recomputed forward)
        per_microbatch = passes * arch.num_layers * (u - 1) / u * micro_tokens * (2 * arch.q_dim + 2 * arch.kv_dim) * 2
        ulysses = per_microbatch * micro_batches / intra

    alpha = COLLECTIVE_LATENCY * (5 if layout.nodes > 1 else 1)
    collectives = 0.0
    if u > 1:
        collectives += 8 * arch.num_layers * micro_batches
    if d > 1:
        collectives += math.ceil(grad_bytes / layout.model_parallel / GRADIENT_BUCKET_BYTES) * math.log2(d)
        if sharded:
            collectives += 3 * arch.num_layers * micro_batches
    if t > 1:
        collectives += 4 * (arch.num_layers / p) * micro_batches
    if p > 1:
        collectives += 2 * (micro_batches + p - 1)
    latency = launches + collectives * alpha

    offload = 0.0
    where = STRATEGIES[layout.strategy].offload
    if where != "none":  # fp32 gradients down and updated weights up over PCIe, Adam on the host's cores
        pcie = pool.gpu.pcie_gbps * 1e9
        moved = (4.0 + 2.0) * trainable / layout.world
        if where == "parameters":  # every step gathers the weights from host memory, forward and backward
            moved += 2 * base_weight_bytes(arch, layout.method) / layout.world
        offload = moved / pcie + trainable / layout.nodes / HOST_ADAM_PARAMS_PER_SECOND
    return StepTime(compute, bubble, data_parallel, tensor, offload, latency, ulysses)


def reference_pass_seconds(arch: Architecture, layout: Layout, step: StepTime, steps_per_epoch: int | None) -> float:
    """DPO's reference log-probabilities: one forward pass over every pair before training, i.e. the
    forward share (2 of flops_per_token's 4 or 6 FLOPs per parameter) of one epoch's compute."""
    if layout.objective != "dpo" or not steps_per_epoch:
        return 0.0
    per_param = (6.0 if layout.method == "full" else 4.0) + (2.0 if layout.gradient_checkpointing else 0.0)
    return steps_per_epoch * step.compute * 2.0 / per_param


def total_steps(epochs: float | None, max_steps: int | None, examples: int | None, global_batch: int) -> int | None:
    if max_steps:
        return max_steps
    if examples:
        return max(1, math.ceil((epochs or 1.0) * examples / global_batch))
    return None
