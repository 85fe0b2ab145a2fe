"""planner/quantize_size.py: a QuantizeJob pod's host memory and GPU, from the model (table tests).

Figures used, and where they come from:
- parameters and shapes: the built-in catalog (config.json of each model on the Hub); Qwen2.5-0.5B below
  from its config.json (24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864, vocab 151936, tied, qkv bias).
- llm-compressor 0.14 (the installed package): the whole model in host memory, one decoder layer onloaded
  at a time (pipelines/sequential/pipeline.py); every sample's hidden states at the current layer boundary
  cached on sequential_offload_device="cpu" (pipelines/cache.py, args/dataset_arguments.py); GPTQ's fp32
  in x in Hessian per Linear on the execution device (modifiers/gptq/helpers.py make_empty_hessian); AWQ's
  parent-args cache on the GPU for dense models, on the CPU for MoE (modifiers/transform/awq/base.py).
- llm-compressor's memory guide (docs/guides/memory.md): Meta-Llama-3-8B-Instruct needs "mem(8B params)
  ~= 16Gb" of CPU memory and "mem(1 Layer) ~= 0.5Gb" of GPU memory for RTN, "mem(1 Layer) * 2 ~= 1Gb" for
  GPTQ (Hessians "approximately the same size as the original weights"; counted exactly here they are
  larger: down_proj's 14336^2 fp32 alone is 0.82 GB).
- the runtime: float32 on the CPU (fp8), dtype "auto" (bf16) on a GPU (runtime/quantize.py).
"""

from __future__ import annotations

import re

import pytest

from kubeforge.planner.architecture import Architecture
from kubeforge.planner.catalog import lookup
from kubeforge.planner.quantize_size import (
    DEFAULT_MEMORY_BYTES,
    GIB,
    RUNTIME_BYTES,
    gpu_terms,
    host_terms,
    size_quantize,
)
from kubeforge.planner.serving import RESERVE_BYTES
from tests.planner.nodes import cluster, example_cluster

QWEN25_05B = Architecture(
    num_layers=24,
    hidden_size=896,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    attention_bias=True,
    source="Qwen/Qwen2.5-0.5B config.json",
)
MODELS = {
    "Qwen2.5-0.5B": QWEN25_05B,
    "Llama-3.1-8B": lookup("meta-llama/Llama-3.1-8B"),
    "Llama-3.1-70B": lookup("meta-llama/Llama-3.1-70B"),
    "Mixtral-8x7B": lookup("mistralai/Mixtral-8x7B-v0.1"),
}
LLAMA8 = MODELS["Llama-3.1-8B"]


def test_the_terms_of_llama_8b_gptq_by_hand():
    """256 samples x 2048 tokens (the API's defaults); every figure computed from the shapes by hand."""
    host = host_terms("w4a16-gptq", LLAMA8, 256, 2048)
    assert host == {
        "weights": 8_030_261_248 * 2,  # bf16: the guide's "mem(8B params) ~= 16Gb"
        "quantized": 1_050_673_152 * 2 + 6_979_588_096 // 2,  # embed + lm_head in bf16, the rest 4-bit
        "activations": 256 * 2048 * 4096 * 2,  # one layer boundary, every sample, bf16
    }
    gpu = gpu_terms("w4a16-gptq", LLAMA8, 256, 2048)
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336 + 2 * 4096  # q, o; k, v; MLP; norms
    assert layer * 2 == 436_224_000  # the guide's "mem(1 Layer) ~= 0.5Gb"
    assert gpu == {
        "layer": (layer + 128256 * 4096) * 2,  # + the embedding (the first subgraph holds it)
        "hessians": 4 * (6 * 4096**2 + 14336**2),  # q, k, v, o, gate, up: 4096^2; down: 14336^2
        "gptq work": 4 * (2 * 4096 * 14336 + 14336**2),
        "sample": 2048 * (4 * 4096 + 3 * 14336) * 2,
    }
    sized = size_quantize("w4a16-gptq", LLAMA8)
    total = sum(host.values()) * 1.2 + RUNTIME_BYTES
    assert sized.memory_bytes == 33 * GIB and 32 * GIB < total <= 33 * GIB
    assert sized.gpu_memory_bytes == sum(gpu.values()) + RESERVE_BYTES


# model, method -> host GiB (request and limit), GPU GiB one layer's calibration needs (to 0.1)
TABLE = [
    ("Qwen2.5-0.5B", "fp8", 7, 0.0),
    ("Qwen2.5-0.5B", "w4a16-gptq", 7, 2.6),
    ("Llama-3.1-8B", "fp8", 51, 0.0),  # float32 on the CPU: 4 bytes a parameter (today's fixed 32 GiB OOMs)
    ("Llama-3.1-8B", "w4a16-gptq", 33, 6.0),
    ("Llama-3.1-8B", "w4a16-awq", 33, 37.6),  # AWQ keeps every sample's layer inputs on the GPU
    ("Llama-3.1-8B", "w8a8-int8", 37, 6.0),
    ("Llama-3.1-70B", "fp8", 401, 0.0),
    ("Llama-3.1-70B", "w4a16-gptq", 215, 15.4),
    ("Llama-3.1-70B", "w4a16-awq", 215, 74.0),
    ("Mixtral-8x7B", "w4a16-gptq", 140, 13.8),  # eight experts' Hessians per layer
    ("Mixtral-8x7B", "w4a16-awq", 171, 5.2),  # MoE: AWQ's cache is offloaded to the host
]


@pytest.mark.parametrize(("model", "method", "host_gib", "gpu_gib"), TABLE, ids=[f"{m}-{q}" for m, q, *_ in TABLE])
def test_table(model, method, host_gib, gpu_gib):
    sized = size_quantize(method, MODELS[model])
    assert sized.feasible and sized.sized_from == "model"
    assert sized.memory_bytes == host_gib * GIB
    assert round(sized.gpu_memory_bytes / GIB, 1) == gpu_gib
    assert sized.gpus == (0 if method == "fp8" else 1) and sized.gpu_type is None  # no pools known: any GPU
    assert f"host {host_gib} GiB = weights " in sized.reason


def test_fp8_reads_no_calibration_data_and_needs_no_gpu():
    assert size_quantize("fp8", LLAMA8, samples=256) == size_quantize("fp8", LLAMA8, samples=65536)
    sized = size_quantize("fp8", LLAMA8, inventory=example_cluster("h100-4x8.yaml"))
    assert sized.gpus == 0 and sized.device == "cpu" and sized.node_selector == () and sized.gpu == ()
    assert dict(sized.host)["weights"] == LLAMA8.total_parameters * 4


def test_calibrated_memory_grows_with_the_calibration_set():
    small, large = (size_quantize("w4a16-gptq", LLAMA8, samples=n, max_seq_length=4096) for n in (64, 1024))
    assert small.memory_bytes < large.memory_bytes
    assert dict(large.host)["activations"] == 1024 * 4096 * 4096 * 2


def test_an_unknown_model_gets_the_old_defaults_and_says_why():
    gptq = size_quantize("w4a16-gptq", None, unknown="pvc://models/x is not in the planner's catalog")
    assert (gptq.sized_from, gptq.cpu, gptq.memory_bytes, gptq.gpus) == ("defaults", "4", DEFAULT_MEMORY_BYTES, 1)
    assert gptq.feasible and gptq.reason.endswith("pvc://models/x is not in the planner's catalog")
    assert gptq.reason.startswith("default resources (4 CPUs, 32 GiB, one GPU of any type)")
    assert size_quantize("fp8", None).gpus == 0


def test_the_cheapest_pool_that_holds_the_layer_and_the_host_memory():
    mixed = example_cluster("mixed.yaml")  # H100 nodes with 1864 GiB, L4 nodes with 24 GiB of host memory
    small = size_quantize("w4a16-gptq", QWEN25_05B, inventory=mixed)
    assert small.gpu_type == "L4" and dict(small.node_selector)
    big = size_quantize("w4a16-gptq", LLAMA8, inventory=mixed)  # 33 GiB of host memory: not on an L4 node
    assert big.gpu_type == "H100-SXM-80GB"
    only_l4 = size_quantize("w4a16-gptq", LLAMA8, inventory=mixed, gpu_type="L4")
    assert not only_l4.feasible and "L4 nodes have 24.0 GiB of host memory" in only_l4.reason
    none = size_quantize("w4a16-gptq", LLAMA8, inventory=example_cluster("h100-4x8.yaml"), gpu_type="A100")
    assert not none.feasible and none.reason.startswith("no GPU pool matches gpuType A100")


def test_a_node_selector_narrows_the_pools():
    inv = cluster(("NVIDIA-A10", 1, 2), ("NVIDIA-L40S", 1, 2))
    a10 = size_quantize("w4a16-gptq", LLAMA8, inventory=inv)
    assert a10.gpu_type == "A10"
    l40s = next(p for p in inv.pools if p.gpu.name == "L40S")
    pinned = size_quantize("w4a16-gptq", LLAMA8, inventory=inv, node_selector=dict(l40s.selector))
    assert pinned.gpu_type == "L40S"


def test_awq_that_does_not_fit_names_the_samples_that_would():
    a10 = example_cluster("a10-4x1.yaml")
    sized = size_quantize("w4a16-awq", LLAMA8, inventory=a10)
    assert not sized.feasible and "A10 has 18.2 GiB usable" in sized.reason
    fit = int(re.search(r"calibration.samples (\d+) \(of 256\) would fit", sized.reason).group(1))
    assert size_quantize("w4a16-awq", LLAMA8, inventory=a10, samples=fit).feasible  # the alternative is real
    assert not size_quantize("w4a16-awq", LLAMA8, inventory=a10, samples=fit + 1).feasible
    assert size_quantize("w4a16-gptq", LLAMA8, inventory=a10).feasible  # GPTQ caches nothing on the GPU
    seventy = size_quantize("w4a16-awq", MODELS["Llama-3.1-70B"], inventory=example_cluster("h100-4x8.yaml"))
    assert not seventy.feasible and "(of 256) would fit" in seventy.reason
