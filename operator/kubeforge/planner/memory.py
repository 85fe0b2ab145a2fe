"""Per-GPU memory of one training layout, broken down.

P = parameters, T = trainable parameters (P for full fine-tuning), N = GPUs sharding the states,
LL = the largest single module (DeepSpeed's "largest layer", usually the embedding),
t/p/d = tensor/pipeline/data parallel degrees. Bytes per element come from the runtime's one
precision policy (kubeforge.runtime.contract.precision_policy): c = the compute dtype (2 for
bf16/fp16, 4 for fp32), m = fp32 master weights (4), g = fp32 gradients (4), o = Adam's two
fp32 moments (8), f = frozen base weights (c, or NF4 for QLoRA); B = the frozen base's bytes
(0 for full fine-tuning). What each engine holds at its peak (after the backward pass, before
the optimizer step), as measured on the runtime itself (tests/runtime/test_precision_policy.py):

    ddp        weights B + mT       gradients gT       optimizer oT        torch AMP: fp32 weights, autocast
    fsdp       weights (B + mT)/N   gradients gT/N     optimizer oT/N      + gathered (below)
    zero1      weights B + cT       gradients cT       optimizer (m+o)T/N  DeepSpeed: a compute-dtype working
    zero2      weights B + cT       gradients cT/N     optimizer (m+o)T/N    copy, fp32 masters in its optimizer
    zero3      weights (B + cT)/N   gradients cT/N     optimizer (m+o)T/N    (+ 4LL gathered for zero3)
    megatron   weights cP/tp        gradients 4P/tp    optimizer (m+o)P/(tp d)  distributed optimizer, fp32 grads
    (tp here is tensor x pipeline parallel)

Offload (contract.STRATEGIES): "optimizer" moves the fp32 masters, the moments and the fp32
gradients the host's Adam reads to host memory: (m + o + g)T/N per GPU, times the GPUs of a
node and DeepSpeed's 1.5 buffer factor; "parameters" (zero3-offload) moves the working copy
there too, leaving only the in-flight modules on the GPU. fsdp-offload (FSDP2's CPUOffloadPolicy) keeps
every shard, its fp32 gradient and AdamW's moments on the host: (B + (m + g + o)T)/N per GPU, times the
GPUs of a node and the same 1.5 (FSDP2 pins the shards and gradients, and the CUDA host allocator rounds
each pinned block up to a power of two); the GPU holds only the gathered modules.

Gathered (FSDP, fsdp-offload): the root's parameters (embeddings, head, final norm) and two decoder layers
(the one computing and the one prefetched), all-gathered in the compute dtype: c x (root + 2 layers).
QLoRA gathers its NF4 base in 4 bits (torchao's NF4Tensor) and dequantizes one linear weight at a time
for its matmul: c x root + 2 x (NF4 x linear per layer + c x the rest of a layer) + c x the largest
linear weight (tests/runtime/test_qlora_fsdp.py measures the bytes each rank holds).

DeepSpeed's estimate_zero3_model_states_mem_needs counts 18P/N for ZeRO-3 (fp32 gradient
partitions); DeepSpeed 0.19.8 holds the gradient partitions in the compute dtype (measured:
16P/N in bf16), so the figures here are at most DeepSpeed's (tests/planner/test_memory.py).

LoRA/QLoRA: the base is frozen (no gradients, no optimizer states) in the compute dtype, or NF4
with double-quantized constants for the linear layers' weights (QLoRA); the adapters train like
any weight (fp32 masters, fp32 gradients, fp32 moments).

Pure bf16 (Layout.master_weights bf16, opt-in): m = g = 2 and o = 4, the same formulas (DDP and FSDP2 keep
no other copy: the bf16 weights are what the matmuls read; DeepSpeed keeps its bf16 working copy beside
bf16 master partitions), measured like the rest in tests/runtime/test_precision_policy.py.

Activations, bytes per token per layer in bf16 (flash attention: no s^2 scores), for a Llama-style
block with hidden h, kv width k and MLP width i: 12h (residual stream and the two RMSNorms, which
transformers computes in fp32; 6h in megatron-core's layers, after the paper, not counted here) + 8h
+ 4k (attention inputs and outputs) + 8i (SwiGLU), after Korthikanti et al. 2022 ("Reducing
Activation Recomputation") with the norms as transformers runs them; tensor parallelism divides all
but the 12h, sequence parallelism divides that too. DDP's full fine-tuning (fp32 weights under
autocast) keeps the residual stream in fp32 (12h more) and the bf16 copy autocast makes of every
weight until the backward pass (2 bytes per parameter). LoRA/QLoRA keep less: the frozen norms' weights
need no normalized input (4h), a frozen linear without an adapter needs no input (q/k/v: 2h, gate/up: 2h,
down: 2i when none of the group is adapted), and dropout adds 3 bytes per element of each adapted module's
input (lora_activations). With gradient checkpointing only each layer's input (2h, 4h under autocast)
is kept, plus one layer recomputed at a time; selective checkpointing (full fine-tuning,
runtime/selective.py, torchtitan's per-op policy) keeps besides it the attention kernel's output and every
second matmul's (selective_outputs: 4q + 2k + 2i + 2h bytes and the log-sum-exp) and recomputes the rest.
Every case is counted on the runtime's own modules (tests/planner/test_activations.py, within 10%).
Pipeline stages hold L/p layers for up to p micro-batches in flight (1F1B). The logits: the runtime computes
the loss (SFT, DPO's log-probs) in chunks of contract.loss_chunk_tokens tokens (runtime/chunked_loss.py: each
chunk's logits are recomputed in the backward pass), which holds 8 bytes per chunk token and vocabulary entry
at its peak (the fp32 logits and log-softmax of one chunk; measured), whatever the sequence length. Where
the model's own loss runs (megatron-core, a head that scales its logits: loss_chunk_tokens is 0) the whole
logits cost 10 bytes per
token and vocabulary entry (bf16 logits, their fp32 copy and the fp32 log-softmax; measured). DeepSpeed-Ulysses
(degree u) divides the activations and a loss's tokens by u (a chunk holds at most its 1/u slice): each GPU
holds 1/u of every sequence, and attention holds the whole sequence for 1/u of the heads. DPO runs each
pair's chosen and rejected sequences in one forward pass (twice the tokens of a micro-batch); its reference
model is the starting model's log-probabilities, computed once before training (8 bytes per pair), so it adds
no second model.

Overhead: CUDA context and library workspaces (1 GiB), NCCL buffers (0.5 GiB with >1 GPU),
DeepSpeed's communication buckets (h^2 elements in the compute dtype: two for ZeRO-1/2, one for
ZeRO-3), and the caching allocator's reserved-but-unused blocks: FRAGMENTATION of everything else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from kubeforge.planner.architecture import LINEAR_MODULES, Architecture
from kubeforge.runtime.contract import NF4_BYTES, STRATEGIES, loss_chunk_tokens, precision_policy

GIB = 1024**3
CUDA_CONTEXT = 1 * GIB
NCCL_BUFFERS = GIB // 2
# Peak reserved over peak active bytes of the same run, published, under expandable segments (the runtime's
# allocator setting, contract.CUDA_ALLOC_CONF, with those sources): medians 1.19, 1.15, 1.29, 1.04 and 1.12 over
# five sweeps (full fine-tuning, 1 and 8 GPUs, ZeRO-3 and ZeRO-2 with the optimizer offloaded, with and without
# checkpointing; the 1.12: Qwen1.5-0.5B with checkpointing, batch 1-3), median 1.15. Not yet measured on
# kubeforge's own runtime (bench/gpu reports reserved and allocated side by side).
FRAGMENTATION = 0.15
OFFLOAD_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor
LOGIT_BYTES = 10  # per token and vocabulary entry at the model's own loss's peak, measured (test_activations.py)
CHUNK_LOGIT_BYTES = 8  # per chunk token and vocabulary entry at the chunked loss's peak, measured (the same file)


@dataclass(frozen=True)
class Layout:
    """The choices of one candidate plan that memory and time depend on."""

    method: str  # full | lora | qlora
    strategy: str  # one of kubeforge.runtime.contract.STRATEGIES
    nodes: int
    gpus_per_node: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    precision: str = "bf16"
    master_weights: str = "fp32"  # bf16: pure bf16, whatever trains and its states in bf16 (precision_policy)
    micro_batch: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    checkpointing_policy: str = "full"  # with gradient_checkpointing: full | selective (runtime/selective.py)
    gradient_accumulation: int = 1
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    ulysses: int = 1  # DeepSpeed-Ulysses degree: GPUs sharing each sequence
    objective: str = "sft"  # dpo: each micro-batch element is a pair (chosen and rejected sequences)
    chunked_loss: bool = True  # the runtime's chunked loss where it applies (loss_chunk); False: the model's
    # own loss over its whole logits (what other frameworks' published runs do: bench/planner_vs_references.py)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def data_parallel(self) -> int:
        return self.world // (self.model_parallel * self.ulysses)

    @property
    def sequences_per_example(self) -> int:
        return 2 if self.objective == "dpo" else 1


def loss_chunk(arch: Architecture, layout: Layout) -> int:
    """Tokens per chunk of the loss (contract.loss_chunk_tokens), 0 where the whole logits exist at once (the
    model's own loss: under Megatron, for a model whose config asks for it, for layout.chunked_loss
    False)."""
    if not layout.chunked_loss or arch.own_loss:
        return 0
    return loss_chunk_tokens(arch.vocab_size, layout.strategy)


def layout_like(base: Layout, **changes: Any) -> Layout:
    """``dataclasses.replace(base, **changes)`` for the search, which builds a Layout per group: the same
    object (Layout has no __post_init__ and nothing cached in its __dict__), without the frozen
    dataclass's field-by-field __setattr__ (about 10x slower). ``changes`` must name fields."""
    layout = object.__new__(Layout)
    values = layout.__dict__
    values.update(base.__dict__)  # exactly the dataclass's fields
    values.update(changes)
    return layout


@dataclass(frozen=True)
class Memory:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    host_per_node: int = 0  # host memory offloading needs on each node
    gathered: int = 0  # unsharded copies of the modules in flight (FSDP, ZeRO-3): transient, at the peak

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.overhead

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class States:
    weights: float
    gradients: float
    optimizer: float
    host_per_node: float = 0.0
    gathered: float = 0.0


def trainable_parameters(arch: Architecture, layout: Layout) -> int:
    if layout.method == "full":
        return arch.total_parameters
    return arch.lora_parameters(layout.lora_rank, layout.lora_targets)[0]


def base_weight_bytes(arch: Architecture, method: str, precision: str = "bf16") -> float:
    """The frozen base of LoRA/QLoRA as the runtime stores it (full fine-tuning: the compute-dtype copy)."""
    policy = precision_policy(precision, method)
    if method == "qlora":
        linear = arch.linear_parameters
        return NF4_BYTES * linear + policy.bytes("compute") * (arch.total_parameters - linear)
    return policy.bytes("compute") * arch.total_parameters


@functools.cache
def _state_bytes(precision: str, method: str, master_weights: str = "fp32") -> tuple[float, float, float, float]:
    """Bytes per element of the compute copy, the masters, gradients and one optimizer moment."""
    policy = precision_policy(precision, method, master_weights)
    c, m, g, o = (policy.bytes(k) for k in ("compute", "master", "gradients", "optimizer"))
    return c, m, g, o


def model_states(arch: Architecture, layout: Layout) -> States:
    c, m, g, o = _state_bytes(layout.precision, layout.method, layout.master_weights)
    o *= 2  # Adam's two moments
    facts = STRATEGIES[layout.strategy]
    P, LL, n = arch.total_parameters, arch.largest_layer_parameters, layout.world
    T = trainable_parameters(arch, layout)
    B = 0.0 if layout.method == "full" else base_weight_bytes(arch, layout.method, layout.precision)
    if facts.engine == "ddp":
        states = States(B + m * T, g * T, o * T)
    elif facts.engine == "fsdp":
        gathered = fsdp_gathered(arch, layout.method, c)
        if facts.offload == "parameters":  # shards, gradients and AdamW's moments all in host memory
            host = (B + (m + g + o) * T) / n * layout.gpus_per_node * OFFLOAD_BUFFER_FACTOR
            return States(0.0, 0.0, 0.0, host, gathered)
        states = States((B + m * T) / n, g * T / n, o * T / n, gathered=gathered)
    elif facts.engine == "deepspeed":
        sharded = facts.zero_stage == 3
        weights = (B + c * T) / n if sharded else B + c * T
        # stage 1 reduces the whole compute-dtype gradients at the end of the backward pass, stages 2
        # and 3 reduce-scatter them bucket by bucket: only this rank's partition stays
        grads = c * T if facts.zero_stage == 1 else c * T / n
        states = States(weights, grads, (m + o) * T / n, gathered=4 * LL if sharded else 0.0)
    elif facts.engine == "megatron":
        mp = layout.model_parallel
        states = States(c * P / mp, 4 * P / mp, (m + o) * P / (mp * layout.data_parallel))
    else:
        raise ValueError(f"unknown strategy {layout.strategy!r}")
    return _offload(states, facts.offload, layout, (m + o + g) * T, n)


def fsdp_gathered(arch: Architecture, method: str, c: float) -> float:
    """Bytes of the unsharded modules in flight under FSDP2: the root and two decoder layers (QLoRA: their
    linear weights in NF4, plus one of them dequantized for its matmul)."""
    root = max(0, arch.total_parameters - arch.num_layers * arch.params_per_layer)  # embeddings, head, final norm
    layer = arch.params_per_layer
    if method != "qlora":
        return c * (root + 2 * layer)
    linear = arch.linear_parameters / arch.num_layers
    largest = max(a * b for a, b in arch.module_shapes().values())
    return c * root + 2 * (NF4_BYTES * linear + c * (layer - linear)) + c * largest


def _offload(states: States, offload: str, layout: Layout, optimizer_bytes: float, n: int) -> States:
    if offload == "none":
        return states
    per_gpu_host = optimizer_bytes / n
    if offload == "optimizer":
        host = per_gpu_host * layout.gpus_per_node * OFFLOAD_BUFFER_FACTOR
        return States(states.weights, 0.0, 0.0, host, states.gathered)
    host = (per_gpu_host + states.weights) * layout.gpus_per_node * OFFLOAD_BUFFER_FACTOR
    return States(0.0, 0.0, 0.0, host, states.gathered)


def activation_regime(strategy: str, method: str, precision: str) -> tuple[bool, bool]:
    """(autocast over fp32 weights, megatron-core's layers): what, besides the parallel degrees and the
    precision's width, decides which activations a layout keeps (Activations; the search's cache key)."""
    engine = STRATEGIES[strategy].engine
    return engine == "ddp" and method == "full" and precision != "fp32", engine == "megatron"


# Checkpointing as the search evaluates it, per candidate: none, full, selective (a bool reads as none or full)
NONE, FULL, SELECTIVE = 0, 1, 2


def checkpointing_mode(layout: Layout) -> int:
    if not layout.gradient_checkpointing:
        return NONE
    return SELECTIVE if layout.checkpointing_policy == "selective" else FULL


def checkpointing_fields(mode: int) -> dict[str, Any]:
    """Layout's fields for a checkpointing mode (checkpointing_mode's inverse)."""
    return {
        "gradient_checkpointing": mode != NONE,
        "checkpointing_policy": "selective" if mode == SELECTIVE else "full",
    }


def activation_bytes(arch: Architecture, layout: Layout) -> float:
    return Activations(arch, layout)(layout.micro_batch, checkpointing_mode(layout), layout.gradient_accumulation)


class Activations:
    """activation_bytes for one layout's fixed choices (parallel degrees, method, precision), evaluated per
    micro-batch, checkpointing mode (NONE, FULL, SELECTIVE) and accumulation: the search calls it once per
    candidate."""

    __slots__ = (
        "casts", "chunk", "divide", "examples", "h", "kept", "kept_selective", "layers", "p", "per_layer", "scale",
        "seq_len", "t", "u", "vocab",
    )  # fmt: skip

    def __init__(self, arch: Architecture, layout: Layout) -> None:
        h, k, i = arch.hidden_size, arch.kv_dim, arch.intermediate_size * arch.num_experts_per_token
        t = layout.tensor_parallel
        # Ulysses: each GPU keeps its slice of every sequence (attention sees the whole sequence for its
        # heads/ulysses, the same bytes); DPO: chosen and rejected run in one forward pass
        self.h, self.t, self.p, self.u = h, t, layout.pipeline_parallel, layout.ulysses
        self.examples, self.seq_len = layout.sequences_per_example, layout.seq_len
        self.divide = t if layout.sequence_parallel else 1
        # the residual stream and the two RMSNorms: transformers' LlamaRMSNorm computes in fp32 and keeps its
        # fp32 input and output for the backward pass (12h measured, tests/planner/test_activations.py);
        # megatron-core's own layers keep Korthikanti's 6h (the paper's figure; not counted here)
        amp, megatron = activation_regime(layout.strategy, layout.method, layout.precision)
        shared = (6 if megatron else 12) * h / self.divide
        split = (8 * h + 4 * k + 8 * i) / t
        per_layer = shared + split
        # DDP trains full fine-tuning with fp32 weights under autocast (torch AMP): the residual stream stays
        # fp32 (12h more per layer, 4h kept per layer with checkpointing), and autograd keeps the bf16 copy
        # autocast makes of every weight until the backward pass (one layer at a time with checkpointing)
        if amp:
            per_layer += 12 * h / self.divide
        self.kept = (4 if amp else 2) * h / self.divide  # each layer's input, with checkpointing
        # selective: and the attention kernel's and every second matmul's outputs
        self.kept_selective = self.kept + selective_outputs(arch) / t
        self.casts = 2.0 * arch.params_per_layer / t if amp else 0.0  # per layer, without checkpointing
        if layout.method != "full":
            per_layer += lora_activations(arch, layout.lora_targets, layout.lora_dropout) / t
        self.per_layer = per_layer
        self.layers = arch.num_layers / self.p
        self.vocab = arch.vocab_size
        self.chunk = loss_chunk(arch, layout)
        self.scale = 2.0 if layout.precision == "fp32" else 1.0  # the formulas count 2-byte activations

    def __call__(self, micro_batch: int, checkpointing: int, accumulation: int) -> float:
        tokens = micro_batch * self.examples * self.seq_len / self.u
        p = self.p
        in_flight = 1 if p == 1 else min(p, max(1, accumulation))
        if checkpointing:
            kept = self.layers * in_flight * (self.kept_selective if checkpointing == SELECTIVE else self.kept)
            body = tokens * (kept + self.per_layer) + self.casts
        else:
            body = tokens * self.layers * in_flight * self.per_layer + self.layers * self.casts
        if self.chunk:
            logits = min(tokens, self.chunk) * self.vocab * CHUNK_LOGIT_BYTES
        else:
            logits = tokens * self.vocab * LOGIT_BYTES / self.t
        return (body + logits) * self.scale


def selective_outputs(arch: Architecture) -> float:
    """Bytes per token and layer that selective checkpointing keeps beyond the layer's input (selective.py in the
    runtime): the bf16 outputs of every second matmul (q, v, gate and down in a Llama layer: q + k + i + h
    elements) and of the attention kernel (q elements and its fp32 log-sum-exp per head). Measured on the
    runtime's modules (tests/planner/test_activations.py)."""
    q, k, h = arch.q_dim, arch.kv_dim, arch.hidden_size
    i = arch.intermediate_size * arch.num_experts_per_token
    return 2.0 * (q + k + i + h + q) + 4.0 * arch.num_attention_heads


# The inputs a trained layer keeps for its weights' gradients and a frozen base keeps only where an adapter
# reads them (a frozen linear's backward needs its weight, not its input): q, k and v read one input, gate and
# up another, down its own. o_proj's input is kept either way (measured: the attention output it reads is).
FROZEN_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",))
DROPOUT_BYTES = 3  # per element of each adapted module's input with LoRA dropout: the bf16 dropped copy and its mask


@functools.cache
def lora_activations(arch: Architecture, targets: tuple[str, ...], dropout: float) -> float:
    """Bytes per token and layer a LoRA/QLoRA layer keeps beyond (negative: below) a trained layer's, before
    tensor parallelism: the frozen RMSNorm weights do not keep their normalized input (2h each); a group of
    frozen linears without an adapter does not keep its input (2 bytes per element); with dropout each
    adapted module keeps its dropped input. The adapters read their module's input as it is
    (loading.share_adapter_inputs), so the modules of a group keep one copy. Measured per target set, with
    fp32 (DDP) and bf16 (FSDP2, DeepSpeed) adapters: tests/planner/test_activations.py."""
    h, shapes = arch.hidden_size, arch.module_shapes()
    names = LINEAR_MODULES if "all-linear" in targets else targets
    known = [n for n in names if n in shapes]
    unknown = len(names) - len(known)  # modules the planner has no shape for: every input may be read

    def width(name: str) -> int:  # input elements per token (an MoE token's down input: one per expert)
        return shapes[name][0] * (arch.num_experts_per_token if name == "down_proj" else 1)

    kept = -4.0 * h
    if not unknown:
        kept -= sum(2 * width(group[0]) for group in FROZEN_INPUTS if not any(n in known for n in group))
    if dropout > 0:
        kept += DROPOUT_BYTES * (sum(width(n) for n in known) + unknown * h)
    return kept


def deepspeed_buckets(arch: Architecture, layout: Layout) -> float:
    """DeepSpeed's communication buckets (h^2 elements each, the runtime's reduce/allgather bucket size):
    ZeRO-1/2 keep a reduce and an allgather bucket, ZeRO-3 a reduce bucket, in the compute dtype."""
    facts = STRATEGIES[layout.strategy]
    if facts.engine != "deepspeed":
        return 0.0
    c = _state_bytes(layout.precision, layout.method)[0]  # the compute dtype
    return (1 if facts.zero_stage == 3 else 2) * arch.hidden_size**2 * c


def overhead_bytes(arch: Architecture, layout: Layout, subtotal: float) -> float:
    return _fixed_overhead(arch, layout) + FRAGMENTATION * subtotal


def _fixed_overhead(arch: Architecture, layout: Layout) -> float:
    return CUDA_CONTEXT + (NCCL_BUFFERS if layout.world > 1 else 0) + deepspeed_buckets(arch, layout)


# What a reading of a GPU's memory shows of an estimate: "device" (nvidia-smi, NVML) everything; "reserved"
# (torch.cuda.max_memory_reserved) not the CUDA context and NCCL's buffers, which are allocated outside torch's
# caching allocator; "allocated" (torch.cuda.max_memory_allocated) not the allocator's cached, unused blocks
# (the fragmentation term) either. The planner plans for the device; published runs report any of the three.
READINGS = ("device", "reserved", "allocated")


def shown_by(reading: str, arch: Architecture, layout: Layout, memory: Memory) -> int:
    """The bytes of ``memory`` (estimate(arch, layout)) that ``reading`` (one of READINGS) shows."""
    if reading not in READINGS:
        raise ValueError(f"reading {reading!r}: one of {', '.join(READINGS)}")
    shown = memory.total
    if reading != "device":
        shown -= CUDA_CONTEXT + (NCCL_BUFFERS if layout.world > 1 else 0)
    if reading == "allocated":
        shown -= memory.overhead - int(_fixed_overhead(arch, layout))
    return shown


def estimate(arch: Architecture, layout: Layout, states: States | None = None) -> Memory:
    """``states``: model_states(arch, layout), when the caller already has it (it does not depend on the
    micro-batch or on gradient checkpointing)."""
    model = MemoryModel(arch, layout, states)
    return model.at(layout.micro_batch, checkpointing_mode(layout), layout.gradient_accumulation)


class MemoryModel:
    """estimate() for one layout's fixed choices, per micro-batch, checkpointing and accumulation. ``total``
    is ``at(...).total`` without building the Memory (the search asks it of every candidate)."""

    __slots__ = ("_totals", "activations", "fixed_overhead", "states", "states_ints", "states_sum")

    def __init__(
        self,
        arch: Architecture,
        layout: Layout,
        states: States | None = None,
        activations: Activations | None = None,
    ) -> None:
        states = states if states is not None else model_states(arch, layout)
        self.states = states
        self.activations = activations if activations is not None else Activations(arch, layout)
        self.fixed_overhead = _fixed_overhead(arch, layout)
        self.states_sum = states.weights + states.gradients + states.optimizer + states.gathered
        self.states_ints = int(states.weights) + int(states.gradients) + int(states.optimizer) + int(states.gathered)
        self._totals: dict[tuple[int, int, int], int] = {}  # pools with the same layouts ask the same totals

    def at(self, micro_batch: int, checkpointing: int, accumulation: int) -> Memory:
        states = self.states
        acts = self.activations(micro_batch, checkpointing, accumulation)
        return Memory(
            weights=int(states.weights),
            gradients=int(states.gradients),
            optimizer=int(states.optimizer),
            activations=int(acts),
            overhead=int(self.fixed_overhead + FRAGMENTATION * (self.states_sum + acts)),
            host_per_node=int(states.host_per_node),
            gathered=int(states.gathered),
        )

    def total(self, micro_batch: int, checkpointing: int, accumulation: int) -> int:
        key = (micro_batch, checkpointing, accumulation)
        total = self._totals.get(key)
        if total is None:
            acts = self.activations(micro_batch, checkpointing, accumulation)
            total = self.states_ints + int(acts) + int(self.fixed_overhead + FRAGMENTATION * (self.states_sum + acts))
            self._totals[key] = total
        return total
