"""How big a QuantizeJob's pod must be: host memory, and for calibrated methods one GPU (pure).

P = parameters, h = hidden size, q = attention width (heads x head size), i = MLP width,
E = experts per layer (1 for dense models), V·h = the embedding; n = calibration samples,
s = calibration maxSeqLength; b = bytes per weight as the runtime loads the source: 4 on CPU
(runtime/quantize.py loads float32 there), 2 on a GPU (dtype "auto": a bf16/fp16 checkpoint;
an fp32 checkpoint needs twice the weights term).

Host memory, the peak of runtime/quantize.py (llm-compressor 0.14's ``oneshot`` then
``save_pretrained(save_compressed=True)``; the evaluation gate loads one model at a time, never
more than the weights term, after the calibrated model is freed):

    weights      P·b            the whole model stays in host memory; the sequential pipeline
                                onloads one decoder layer at a time to the GPU
                                (pipelines/sequential/pipeline.py: set_onload_device)
    quantized    serving.weights_bytes(P, bits)   the compressed copy being written (embeddings and
                                lm_head stay 16-bit; group scales, < 1 %, are in the margin)
    activations  n·s·h·b        calibrated methods: the sequential pipeline caches every sample's
                                hidden states at the current layer boundary (one layer in flight),
                                offloaded to sequential_offload_device, "cpu" by default
                                (pipelines/cache.py IntermediatesCache, args/dataset_arguments.py)
    awq cache    n·s·(2h+q+i)·b AWQ on a mixture-of-experts model only: AWQModifier offloads its
                                parent-args cache to the CPU there (modifiers/transform/awq/base.py)

    request = (sum) x (1 + MARGIN) + RUNTIME, rounded up to a GiB, as request and limit.

GPU memory of one calibration step (GPTQ, AWQ, SmoothQuant+GPTQ), bf16 weights, batch size 1
(oneshot's default), flash/SDPA attention (no s^2 scores):

    layer        (P_layer + V·h)·2      one decoder layer; the first subgraph also holds the
                                        embedding, the last lm_head
    hessians     4·(3h² + q² + E·(2h² + i²))   GPTQ: an fp32 in x in Hessian per Linear of the
                                        layer, on the execution device (modifiers/gptq/helpers.py)
    gptq work    4·(2·max(out·in) + max(in)²)  quantize_weight: fp32 weight, its reordered copy,
                                        and the inverse Hessian of the module being quantized
    sample       s·(4h + 3i)·2          one sample's activations through the layer
    awq          n·s·(2h+q+i)·2 + 2·n·s·h·2   AWQ on a dense model: the inputs of every smoothed
                                        parent for all samples stay on the GPU (offload_device None),
                                        plus the reference and candidate outputs of one mapping

    a GPU fits when need <= memory x GPU_UTILIZATION - serving.RESERVE_BYTES (CUDA context,
    allocator). The cheapest pool (least memory per GPU, as the serving planner orders them)
    that fits, whose nodes also hold the host request, gets the pod; with no GPU pools known
    (no labels), one GPU of any type, as before.

fp8 is dynamic (no calibration data) and runs on the CPU: host memory only. A model whose
architecture is unknown (no catalog entry, no reachable config.json) gets the old fixed
request (4 CPUs, 32 GiB, one GPU for calibrated methods), and the reason says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from kubeforge.inventory.pools import Inventory, Pool
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.serving import RESERVE_BYTES, WEIGHT_BITS, weights_bytes

GIB = 1024**3
CALIBRATED = ("w4a16-gptq", "w4a16-awq", "w8a8-int8")
HESSIAN_METHODS = ("w4a16-gptq", "w8a8-int8")  # GPTQ (int8: SmoothQuant then GPTQ)
DEFAULT_CPU = "4"
DEFAULT_MEMORY_BYTES = 32 * GIB  # the fixed request before sizing, kept where the model is unknown
MARGIN = 0.20  # allocator fragmentation, safetensors read buffers, per-op temporaries
RUNTIME_BYTES = 4 * GIB  # Python, torch, transformers and llm-compressor, tokenizer, dataset, CUDA host context
GPU_UTILIZATION = 0.9  # of a GPU's memory, the rest for fragmentation


@dataclass(frozen=True)
class QuantizeSizing:
    """What the quantizer pod requests, and why."""

    feasible: bool
    reason: str
    sized_from: str  # "model" or "defaults" (the architecture is unknown)
    cpu: str = DEFAULT_CPU
    memory_bytes: int = DEFAULT_MEMORY_BYTES  # host memory: request and limit
    gpus: int = 0
    gpu_type: str | None = None  # the pool's GPU; None: any
    node_selector: tuple[tuple[str, str], ...] = ()
    gpu_memory_bytes: int = 0  # one calibration step's need on the GPU (0: none, or unknown)
    host: tuple[tuple[str, int], ...] = ()  # the host estimate, term by term (before margin and runtime)
    gpu: tuple[tuple[str, int], ...] = ()  # the GPU estimate, term by term (before the reserve)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"


def device_of(method: str) -> str:
    """Calibrated methods run on a GPU; fp8 (dynamic) on the CPU."""
    return "cuda" if method in CALIBRATED else "cpu"


def host_terms(method: str, arch: Architecture, samples: int, max_seq_length: int) -> dict[str, int]:
    """Host memory at the quantizer's peak, term by term (see the module doc)."""
    b = 4 if device_of(method) == "cpu" else 2
    terms = {
        "weights": arch.total_parameters * b,
        "quantized": weights_bytes(arch, WEIGHT_BITS[method]),
    }
    if method in CALIBRATED:
        terms["activations"] = samples * max_seq_length * arch.hidden_size * b
        if method == "w4a16-awq" and arch.num_experts > 1:
            terms["awq cache"] = samples * max_seq_length * _awq_width(arch) * b
    return terms


def gpu_terms(method: str, arch: Architecture, samples: int, max_seq_length: int) -> dict[str, int]:
    """GPU memory of one calibration step, term by term (see the module doc); {} for fp8."""
    if method not in CALIBRATED:
        return {}
    h, q, i, e = arch.hidden_size, arch.q_dim, arch.intermediate_size, arch.num_experts
    terms = {"layer": (arch.params_per_layer + arch.embedding_params) * 2}
    if method in HESSIAN_METHODS:
        terms["hessians"] = 4 * (3 * h * h + q * q + e * (2 * h * h + i * i))
        shapes = arch.module_shapes().values()
        terms["gptq work"] = 4 * (2 * max(a * b for a, b in shapes) + max(a for a, _ in shapes) ** 2)
    terms["sample"] = max_seq_length * (4 * h + 3 * i) * 2
    if method == "w4a16-awq" and e == 1:
        terms["awq"] = samples * max_seq_length * (_awq_width(arch) + 2 * h) * 2
    return terms


def _awq_width(arch: Architecture) -> int:
    """Per token, the inputs of AWQ's smoothed parents in a Llama-style layer: self_attn and mlp (h each),
    o_proj (q), down_proj (i)."""
    return 2 * arch.hidden_size + arch.q_dim + arch.intermediate_size


def usable_gpu_bytes(pool: Pool) -> float:
    return pool.memory_bytes * GPU_UTILIZATION - RESERVE_BYTES


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def defaults(method: str, why: str) -> QuantizeSizing:
    """The fixed request from before sizing, for a model whose size is unknown."""
    gpus = 1 if method in CALIBRATED else 0
    return QuantizeSizing(
        True,
        f"default resources ({DEFAULT_CPU} CPUs, {DEFAULT_MEMORY_BYTES // GIB} GiB"
        + (", one GPU of any type" if gpus else "")
        + f"): {why}",
        "defaults",
        gpus=gpus,
    )


def size_quantize(
    method: str,
    arch: Architecture | None,
    *,
    samples: int = 256,
    max_seq_length: int = 2048,
    inventory: Inventory | None = None,
    gpu_type: str = "auto",
    node_selector: Mapping[str, str] | None = None,
    unknown: str = "the model's architecture is unknown",
) -> QuantizeSizing:
    """The quantizer pod's resources for ``method`` on ``arch`` (see the module doc)."""
    if arch is None:
        return defaults(method, unknown)
    if method not in CALIBRATED:
        samples = max_seq_length = 0  # fp8 reads no calibration data
    host = host_terms(method, arch, samples, max_seq_length)
    memory = math.ceil((sum(host.values()) * (1 + MARGIN) + RUNTIME_BYTES) / GIB) * GIB
    host_text = " + ".join(f"{k} {gib(v)}" for k, v in host.items())
    memory_text = f"host {memory // GIB} GiB = {host_text}, + {MARGIN:.0%} + {RUNTIME_BYTES // GIB} GiB runtime"
    parts = tuple(host.items())
    if method not in CALIBRATED:
        return QuantizeSizing(True, f"{method} on the CPU: {memory_text}", "model", memory_bytes=memory, host=parts)

    gpu = gpu_terms(method, arch, samples, max_seq_length)
    need = sum(gpu.values())
    need_text = (
        f"one GPU with {gib(need + RESERVE_BYTES)} for one layer's calibration ("
        + " + ".join(f"{k} {gib(v)}" for k, v in gpu.items())
        + f" + {gib(RESERVE_BYTES)} CUDA reserve; {samples} samples x {max_seq_length} tokens)"
    )
    base = QuantizeSizing(True, "", "model", memory_bytes=memory, gpus=1, gpu_memory_bytes=need + RESERVE_BYTES,
                          host=parts, gpu=tuple(gpu.items()))  # fmt: skip
    pools = list(inventory.pools) if inventory is not None else []
    if not pools:
        return replace(base, reason=f"{need_text}, of any type (no GPU pools known); {memory_text}")
    matching = [p for p in pools if _matches(p, gpu_type) and p.matches(dict(node_selector or {}))]
    if not matching:
        return replace(base, feasible=False, reason=f"no GPU pool matches gpuType {gpu_type} and the nodeSelector; "
                       f"{need_text}")  # fmt: skip
    tried = []
    for pool in sorted(matching, key=lambda p: (p.memory_bytes, p.gpu.name)):  # cheapest first, as serving
        usable = usable_gpu_bytes(pool)
        if need > usable:
            tried.append(f"{pool.gpu.name} has {gib(max(usable, 0))} usable")
        elif pool.host_memory_bytes and memory > pool.host_memory_bytes:
            tried.append(f"{pool.gpu.name} nodes have {gib(pool.host_memory_bytes)} of host memory")
        else:
            reason = f"{need_text}: {pool.gpu.name} ({gib(pool.memory_bytes)}); {memory_text}"
            return replace(base, reason=reason, gpu_type=pool.gpu.name, node_selector=pool.selector)
    hint = _fewer_samples(method, arch, samples, max_seq_length, max(usable_gpu_bytes(p) for p in matching))
    reason = f"{need_text} and {memory_text}: no pool fits ({'; '.join(tried)}){hint}"
    return replace(base, feasible=False, reason=reason)


def _fewer_samples(method: str, arch: Architecture, samples: int, seq: int, usable: float) -> str:
    """The nearest feasible alternative: AWQ keeps every sample on the GPU, so fewer samples fit."""
    if method != "w4a16-awq" or arch.num_experts > 1:
        return ". Use bigger GPUs"
    fixed = sum(gpu_terms(method, arch, 0, seq).values())
    per_sample = seq * (_awq_width(arch) + 2 * arch.hidden_size) * 2
    fit = int((usable - fixed) // per_sample) if usable > fixed else 0
    if fit >= 1:
        return f". calibration.samples {fit} (of {samples}) would fit, or use w4a16-gptq (no activation cache)"
    return ". Use w4a16-gptq (no activation cache on the GPU) or bigger GPUs"


def _matches(pool: Pool, gpu_type: str) -> bool:
    wanted = gpu_type.lower()
    return wanted == "auto" or wanted in (pool.gpu.name.lower(), pool.gpu.family.lower())
