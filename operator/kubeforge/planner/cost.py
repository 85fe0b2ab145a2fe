"""Estimated seconds per optimizer step of one layout on one pool.

    compute   = tokens x FLOPs/token / (GPUs x peak x efficiency)
      FLOPs/token = 6 x active params (full) or 4 x (LoRA/QLoRA: no weight gradients for
      frozen weights), + 2 x active params with gradient checkpointing (recomputed forward),
      + 6 x layers x seq x attention width (causal attention, forward and backward),
      + 2 x hidden x vocabulary where the loss runs in chunks (contract.loss_chunk_tokens: the head's
      forward is recomputed chunk by chunk in the backward pass);
      peak is the GPU's dense bf16/fp16 peak, or its fp8 peak x FP8_FRACTION;
      efficiency is a per-strategy model-FLOPs-utilisation (EFFICIENCY) scaled per GPU family
      (FAMILY_EFFICIENCY, calibrated on published runs), lowered for small micro-batches and by
      TP_GEMM_EFFICIENCY per doubling of TP (smaller GEMMs), and QLoRA pays QLORA_SLOWDOWN for
      dequantising weights.
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
                fsdp-offload: per micro-batch, each rank copies its shards (as stored: NF4 and
                compute-dtype base, fp32 trainable) to the GPU before each all-gather (forward,
                backward, and the recomputed forward with checkpointing) and its fp32 gradient
                shards back (the runtime reduce-scatters every micro-batch: unsharded gradients
                would pile up on the GPU); AdamW steps on the host (torch's fused CPU AdamW, about
                DeepSpeed's CPUAdam rate: 0.127 vs 0.137 G params/s measured on 2 cores).
    optimizer = the AdamW step on the GPU, which streams its tensors through the GPU's memory:
                OPTIMIZER_BYTES per trainable parameter this GPU updates (all of them under DDP, its
                shard under ZeRO, FSDP and Megatron's distributed optimizer) at the datasheet's memory
                bandwidth (a floor: real kernels reach less of it); none where Adam runs on the host.
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
from kubeforge.planner.memory import (
    FULL,
    NONE,
    SELECTIVE,
    Layout,
    base_weight_bytes,
    checkpointing_mode,
    loss_chunk,
    trainable_parameters,
)
from kubeforge.runtime.contract import STRATEGIES, precision_policy

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
    "fsdp-offload": 0.32,  # fsdp's 0.40 x zero3-offload's 0.30 / zero3's 0.38: each gather waits for its copy
}  # the offload's own cost is the `offload` term
# Achieved MFU relative to EFFICIENCY, per GPU family, from the published runs with a step time in
# tests/planner/references.yaml (one node, no memory savers kubeforge does not model): the median over
# each family's runs of the efficiency that reproduces the published step (bench/planner_vs_references.py
# prints it). A100: 8 runs (Qwen's LoRA/QLoRA/full/ZeRO-3 table on A100 80GB, Answer.AI's 70B QLoRA on
# 8 x A100 40GB, LLaMA-Factory's 7B QLoRA on A100 40GB), implied 0.97-1.66, median 1.30. H100: 6 runs
# (NeMo Automodel's 8B/7B/70B/32B LoRA, torchtitan's 8B FSDP on 8 GPUs, Answer.AI's 70B QLoRA on 4),
# implied 1.00-1.35, median 1.08; H200 (the same GH100 chip and peak, more memory) takes the H100's
# factor, with no run of its own. L4: 4 runs (Philipp Schmid's Llama-3.1-8B QLoRA notebooks: packed 1,024
# and 2,048 tokens on 1 and 4 L4s, two with Liger's kernels; times rounded by the source, embeddings and
# head trained too in three), implied 0.54-0.99, median 0.77: kubeforge's FLOPs run slower on the L4 than
# its peak and the per-strategy figures suggest (300 GB/s of memory for 121 TFLOPS). Other families (A10,
# L40S, B200): one published step each at most here, 1.0 (uncalibrated).
FAMILY_EFFICIENCY = {"A100": 1.30, "H100": 1.08, "H200": 1.08, "L4": 0.77}
TP_GEMM_EFFICIENCY = 0.93  # per doubling of TP: smaller matrix multiplies run less efficiently
FP8_FRACTION = 0.65  # of the fp8 peak reached, relative to bf16 (about 1.3x over bf16 on H100)
QLORA_SLOWDOWN = 1.3
OVERLAP = 0.5
HOST_ADAM_PARAMS_PER_SECOND = 2e9  # DeepSpeed CPUAdam on one node
LAYER_LAUNCH_SECONDS = 2e-4  # forward + backward kernels of one transformer layer
COLLECTIVE_LATENCY = 2e-5  # one NCCL collective inside a node
GRADIENT_BUCKET_BYTES = 25 * 1024**2


def optimizer_bytes(precision: str, method: str, master_weights: str = "fp32") -> float:
    """Bytes the optimizer step moves per trainable parameter, in contract.precision_policy's dtypes: gradient
    clipping reads every gradient for the norm, then reads and writes it to scale it (3g); AdamW reads the
    master weight, gradient and two moments and writes the weight and moments back (2m + g + 4o)."""
    policy = precision_policy(precision, method, master_weights)
    m, g, o = (policy.bytes(k) for k in ("master", "gradients", "optimizer"))
    return 3 * g + 2 * m + g + 4 * o


OPTIMIZER_BYTES = optimizer_bytes("bf16", "full")  # 40 with fp32 masters; 20 under pure bf16


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    data_parallel: float
    tensor_parallel: float
    offload: float
    latency: float = 0.0
    ulysses: float = 0.0
    optimizer: float = 0.0

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
            + self.optimizer
        )


def flops_per_token(arch: Architecture, layout: Layout) -> float:
    chunked = loss_chunk(arch, layout) > 0
    return _flops_per_token(arch, layout.method, layout.seq_len, checkpointing_mode(layout), chunked)


def selective_recompute(arch: Architecture) -> float:
    """Parameters whose matmuls selective checkpointing runs again in the backward pass (runtime/selective.py:
    every second matmul of a layer, k, o and up in a Llama layer); the attention kernel's output is kept. The
    element-wise operations it also recomputes (norms, rotary embeddings, SwiGLU) are not counted: no FLOPs of
    note, and not yet timed on a GPU."""
    q, k, h = arch.q_dim, arch.kv_dim, arch.hidden_size
    i = arch.intermediate_size * arch.num_experts_per_token
    return arch.num_layers * (h * k + q * h + h * i)


def recomputed_parameters(arch: Architecture, checkpointing: int) -> float:
    """Parameters whose forward matmuls a checkpointing mode (memory.NONE, FULL, SELECTIVE) runs again."""
    if checkpointing == NONE:
        return 0.0
    return arch.active_parameters if checkpointing == FULL else selective_recompute(arch)


def _flops_per_token(arch: Architecture, method: str, seq_len: int, checkpointing: int, chunked: bool) -> float:
    active = arch.active_parameters
    per_param = 6.0 if method == "full" else 4.0
    recomputed = recomputed_parameters(arch, checkpointing)
    attention = 6.0 * arch.num_layers * seq_len * arch.q_dim
    head = 2.0 * arch.hidden_size * arch.vocab_size if chunked else 0.0
    return per_param * active + 2.0 * recomputed + attention + head


def bandwidths(pool: Pool, layout: Layout) -> tuple[float, float]:
    """(bytes/s inside a node per GPU, bytes/s across the gang per GPU)."""
    nvlink = pool.nvlink_domain > 1 and pool.gpu.nvlink_gbps > 0
    intra = max(1.0, (pool.gpu.nvlink_gbps if nvlink else pool.gpu.pcie_gbps) * 1e9)  # never 0, even for unknown GPUs
    if layout.nodes == 1:
        return intra, intra
    inter = max(1.0, pool.network_gbps / 8 * 1e9 / layout.gpus_per_node)
    return intra, min(intra, inter)


def step_time(arch: Architecture, layout: Layout, pool: Pool, global_batch: int) -> StepTime:
    model = StepModel(arch, layout, pool, global_batch)
    return StepTime(*model.terms(layout.micro_batch, checkpointing_mode(layout), layout.gradient_accumulation))


@dataclass(frozen=True)
class JobTerms:
    """What step_time needs of the job alone (model, method, sequence, batch): the same for every layout
    a plan tries, so the search computes it once."""

    work: tuple[float, float, float]  # tokens per step x FLOPs per token per checkpointing mode (memory.NONE, ...)
    trainable: int
    base_bytes: float  # the weights' bytes as gathered (base_weight_bytes in bf16)
    stored_bytes: float = 0.0  # the frozen base as stored (0 for full fine-tuning: every weight trains, in fp32)


def job_terms(arch: Architecture, layout: Layout, global_batch: int) -> JobTerms:
    tokens = global_batch * layout.sequences_per_example * layout.seq_len
    chunked = loss_chunk(arch, layout) > 0
    work = tuple(
        tokens * _flops_per_token(arch, layout.method, layout.seq_len, m, chunked) for m in (NONE, FULL, SELECTIVE)
    )
    trainable = trainable_parameters(arch, layout)
    stored = 0.0 if layout.method == "full" else base_weight_bytes(arch, layout.method)
    return JobTerms(work, trainable, base_weight_bytes(arch, layout.method), stored)  # type: ignore[arg-type]


class StepShape:
    """The part of StepModel that does not depend on the pool: one layout's fixed choices (strategy, GPUs,
    parallel degrees, precision). The search shares it between pools with the same choices."""

    __slots__ = (
        "alpha",
        "bucket_collectives",
        "d",
        "dp_bytes",
        "efficiency",
        "examples",
        "hidden",
        "layers",
        "moved",
        "offload",
        "offload_micro",
        "optimizer_bytes",
        "p",
        "per_stage",
        "qlora",
        "seq_len",
        "sharded",
        "t",
        "tensor_share",
        "tp_efficiency",
        "trainable",
        "ulysses",
        "ulysses_share",
        "ulysses_width",
        "work",
    )  # fmt: skip

    def __init__(self, arch: Architecture, layout: Layout, job: JobTerms) -> None:
        self.examples, self.seq_len, self.ulysses = layout.sequences_per_example, layout.seq_len, layout.ulysses
        self.efficiency = EFFICIENCY[layout.strategy]
        self.tp_efficiency = TP_GEMM_EFFICIENCY ** math.log2(layout.tensor_parallel)
        self.work = job.work
        self.qlora = layout.method == "qlora"

        p, t, d = layout.pipeline_parallel, layout.tensor_parallel, layout.data_parallel
        self.p, self.t, self.d = p, t, d
        self.layers, self.hidden = arch.num_layers, arch.hidden_size
        self.per_stage = arch.num_layers / p

        trainable = self.trainable = job.trainable
        grad_bytes = (2.0 if layout.method == "full" or layout.master_weights == "bf16" else 4.0) * trainable
        ring = 2 * (d - 1) / d if d > 1 else 0.0
        facts = STRATEGIES[layout.strategy]
        sharded = self.sharded = facts.zero_stage == 3 or facts.engine == "fsdp"
        dp_bytes = []  # per checkpointing mode (none, full, selective), before the bandwidth
        for gc in (False, True, True):  # a selective layer is gathered again for its recomputation, as a full one
            dp = ring * grad_bytes / layout.model_parallel
            if sharded and d > 1:
                gathers = 3 if gc else 2
                dp += gathers * (d - 1) / d * job.base_bytes
            dp_bytes.append(dp)
        self.dp_bytes = tuple(dp_bytes)

        self.tensor_share = 4 * self.per_stage * 2 * (t - 1) / t
        u = self.ulysses  # forward, backward (and the recomputed forward with checkpointing)
        recomputed = 3 * arch.num_layers * (u - 1) / u  # selective recomputes the all-to-alls too
        self.ulysses_share = (2 * arch.num_layers * (u - 1) / u, recomputed, recomputed)
        self.ulysses_width = 2 * arch.q_dim + 2 * arch.kv_dim

        self.alpha = COLLECTIVE_LATENCY * (5 if layout.nodes > 1 else 1)
        self.bucket_collectives = (
            math.ceil(grad_bytes / layout.model_parallel / GRADIENT_BUCKET_BYTES) * math.log2(d) if d > 1 else 0.0
        )
        self.offload = facts.offload
        updated = trainable if facts.engine == "ddp" else trainable / layout.world  # parameters this GPU steps
        per_parameter = optimizer_bytes(layout.precision, layout.method, layout.master_weights)
        self.optimizer_bytes = per_parameter * updated if facts.offload == "none" else 0.0
        moved = 0.0
        if facts.offload != "none":  # fp32 gradients down and updated weights up over PCIe
            moved = (4.0 + 2.0) * trainable / layout.world
            if facts.offload == "parameters":  # every step gathers the weights from host memory, forward and backward
                moved += 2 * job.base_bytes / layout.world
        self.moved = moved
        self.offload_micro = (0.0, 0.0, 0.0)  # bytes over PCIe per micro-batch, per checkpointing mode
        if facts.engine == "fsdp" and facts.offload == "parameters":
            stored = (job.stored_bytes + 4.0 * trainable) / layout.world  # this rank's shards as kept on the host
            grads = 4.0 * trainable / layout.world
            self.moved = 0.0
            self.offload_micro = (2 * stored + grads, 3 * stored + grads, 3 * stored + grads)


class StepModel:
    """step_time for one layout's fixed choices on one pool, per micro-batch, gradient checkpointing and
    accumulation: what does not depend on those three is computed once (StepShape and the pool's terms
    here), the rest in ``terms`` (StepTime's fields, in order) or ``seconds`` (their total)."""

    __slots__ = ("data_parallel", "intra", "offload", "offload_micro", "optimizer", "shape", "world_peak")

    def __init__(
        self,
        arch: Architecture,
        layout: Layout,
        pool: Pool,
        global_batch: int,
        job: JobTerms | None = None,
        shape: StepShape | None = None,
    ) -> None:
        """``job``, ``shape``: job_terms(arch, layout, global_batch) and StepShape(arch, layout, job), when the
        caller already has them."""
        if shape is None:
            shape = StepShape(arch, layout, job if job is not None else job_terms(arch, layout, global_batch))
        self.shape = shape
        peak = pool.gpu.peak_tflops(layout.precision) * 1e12
        if layout.precision == "fp8":
            peak *= FP8_FRACTION
        self.world_peak = layout.world * peak * FAMILY_EFFICIENCY.get(pool.gpu.family, 1.0)
        intra, across = bandwidths(pool, layout)
        self.intra = intra
        share = (1 - OVERLAP) / across
        dp = shape.dp_bytes
        self.data_parallel = (dp[0] * share, dp[1] * share, dp[2] * share)
        offload = 0.0
        self.offload_micro: tuple[float, ...] = (0.0, 0.0, 0.0)
        if shape.offload != "none":  # Adam on the host's cores
            pcie = pool.gpu.pcie_gbps * 1e9
            offload = shape.moved / pcie + shape.trainable / layout.nodes / HOST_ADAM_PARAMS_PER_SECOND
            micro = shape.offload_micro
            self.offload_micro = (micro[0] / pcie, micro[1] / pcie, micro[2] / pcie)
        self.offload = offload
        self.optimizer = shape.optimizer_bytes / (pool.gpu.memory_gbps * 1e9)

    def terms(
        self, micro_batch: int, checkpointing: int, accumulation: int
    ) -> tuple[float, float, float, float, float, float, float, float]:
        """(compute, bubble, data_parallel, tensor_parallel, offload, latency, ulysses, optimizer): StepTime's
        fields."""
        s = self.shape
        micro_tokens = micro_batch * s.examples * s.seq_len / s.ulysses
        fill = 0.75 + 0.25 * micro_tokens / 8192  # small micro-batches leave the GPU partly idle
        efficiency = s.efficiency * (fill if fill < 1.0 else 1.0)
        efficiency *= s.tp_efficiency
        compute = s.work[checkpointing] / (self.world_peak * efficiency)
        if s.qlora:
            compute *= QLORA_SLOWDOWN

        p, t, d, u = s.p, s.t, s.d, s.ulysses
        micro_batches = accumulation if accumulation > 1 else 1
        launches = micro_batches * s.per_stage * LAYER_LAUNCH_SECONDS
        bubble = (compute + launches) * (p - 1) / micro_batches if p > 1 else 0.0

        tensor = 0.0
        if t > 1:
            per_microbatch = s.tensor_share * micro_tokens * s.hidden * 2
            tensor = per_microbatch * micro_batches / self.intra

        ulysses = 0.0
        if u > 1:
            per_microbatch = s.ulysses_share[checkpointing] * micro_tokens * s.ulysses_width * 2
            ulysses = per_microbatch * micro_batches / self.intra

        collectives = 0.0
        if u > 1:
            collectives += 8 * s.layers * micro_batches
        if d > 1:
            collectives += s.bucket_collectives
            if s.sharded:
                collectives += 3 * s.layers * micro_batches
        if t > 1:
            collectives += 4 * s.per_stage * micro_batches
        if p > 1:
            collectives += 2 * (micro_batches + p - 1)
        latency = launches + collectives * s.alpha
        offload = self.offload + micro_batches * self.offload_micro[checkpointing]
        return compute, bubble, self.data_parallel[checkpointing], tensor, offload, latency, ulysses, self.optimizer

    def seconds(self, micro_batch: int, checkpointing: int, accumulation: int) -> float:
        """StepTime.total of ``terms`` without building the StepTime."""
        compute, bubble, data_parallel, tensor, offload, latency, ulysses, optimizer = self.terms(
            micro_batch, checkpointing, accumulation
        )
        return compute + bubble + data_parallel + tensor + offload + latency + ulysses + optimizer


def reference_pass_seconds(arch: Architecture, layout: Layout, step: StepTime, steps_per_epoch: int | None) -> float:
    """DPO's reference log-probabilities: one forward pass over every pair before training, i.e. the
    forward share (2 of flops_per_token's 4 or 6 FLOPs per parameter) of one epoch's compute."""
    if layout.objective != "dpo" or not steps_per_epoch:
        return 0.0
    recomputed = recomputed_parameters(arch, checkpointing_mode(layout)) / arch.active_parameters
    per_param = (6.0 if layout.method == "full" else 4.0) + 2.0 * recomputed
    return steps_per_epoch * step.compute * 2.0 / per_param


def total_steps(epochs: float | None, max_steps: int | None, examples: int | None, global_batch: int) -> int | None:
    if max_steps:
        return max_steps
    if examples:
        return max(1, math.ceil((epochs or 1.0) * examples / global_batch))
    return None
