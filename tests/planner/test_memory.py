"""The memory model: its model states agree with DeepSpeed's own estimators, and it moves the right way."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kubeforge.planner import memory
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.catalog import lookup
from kubeforge.planner.memory import CHUNK_LOGIT_BYTES, LOGIT_BYTES, Layout, estimate, model_states
from kubeforge.runtime.contract import loss_chunk_tokens

deepspeed_zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
deepspeed_zero3 = pytest.importorskip("deepspeed.runtime.zero.stage3")

MODELS = ["Qwen/Qwen3-0.6B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen3-32B", "meta-llama/Llama-3.1-70B"]
GANGS = [(1, 1), (1, 4), (1, 8), (2, 8), (4, 8)]


def full(arch: Architecture, strategy: str, nodes: int, per_node: int) -> Layout:
    return Layout(method="full", strategy=strategy, nodes=nodes, gpus_per_node=per_node)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("nodes", "per_node"), GANGS)
def test_zero2_model_states_stay_under_deepspeeds_estimate_by_the_gradients_it_frees(model, nodes, per_node):
    """DeepSpeed's estimator counts 2P + 18P/N, with an fp32 copy of the gradient partition (4P/N) that
    DeepSpeed 0.19.8 makes only inside the optimizer step, one group at a time; what it holds after the
    backward pass is 2P + 14P/N (tests/runtime/test_precision_policy.py measures it)."""
    arch = lookup(model)
    P, n = arch.total_parameters, nodes * per_node
    _, ds_gpu = deepspeed_zero2.estimate_zero2_model_states_mem_needs(
        P, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False
    )
    ours = model_states(arch, full(arch, "zero2", nodes, per_node))
    assert ours.weights + ours.gradients + ours.optimizer == pytest.approx(ds_gpu - 4 * P / n, rel=1e-6)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("nodes", "per_node"), GANGS)
def test_zero3_model_states_stay_under_deepspeeds_estimate_by_the_fp32_gradients(model, nodes, per_node):
    """DeepSpeed's estimator: 4LL + 18P/N (fp32 gradient partitions); measured: bf16 partitions (16P/N)."""
    arch = lookup(model)
    P, n = arch.total_parameters, nodes * per_node
    _, ds_gpu, largest = deepspeed_zero3.estimate_zero3_model_states_mem_needs(
        P,
        arch.largest_layer_parameters,
        num_gpus_per_node=per_node,
        num_nodes=nodes,
        cpu_offload=False,
        cpu_offload_params=False,
    )
    ours = model_states(arch, full(arch, "zero3", nodes, per_node))
    assert ours.weights + ours.gradients + ours.optimizer + ours.gathered == pytest.approx(ds_gpu - 2 * P / n, rel=1e-6)
    assert largest == 4 * arch.largest_layer_parameters == ours.gathered


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("nodes", "per_node"), GANGS)
def test_zero3_offload_agrees_with_deepspeed_on_gpu_and_host(model, nodes, per_node):
    arch = lookup(model)
    ds_cpu, ds_gpu, _ = deepspeed_zero3.estimate_zero3_model_states_mem_needs(
        arch.total_parameters,
        arch.largest_layer_parameters,
        num_gpus_per_node=per_node,
        num_nodes=nodes,
        cpu_offload=True,
        cpu_offload_params=True,
        zero_init=True,
    )
    ours = model_states(arch, full(arch, "zero3-offload", nodes, per_node))
    assert ours.weights + ours.gradients + ours.optimizer + ours.gathered == pytest.approx(ds_gpu, rel=1e-6)
    assert ours.host_per_node == pytest.approx(ds_cpu, rel=1e-6)


def test_optimizer_offload_keeps_the_weights_on_the_gpu_and_moves_the_rest():
    arch = lookup("Qwen/Qwen3-32B")
    on_gpu = model_states(arch, full(arch, "zero3", 1, 8))
    offloaded = model_states(arch, full(arch, "zero3-offload-optimizer", 1, 8))
    assert offloaded.weights == on_gpu.weights and offloaded.gradients == offloaded.optimizer == 0
    P = arch.total_parameters
    assert offloaded.host_per_node == pytest.approx(16 * P * 1.5, rel=1e-6)  # fp32 masters, moments, gradients


def test_the_breakdown_adds_up():
    arch = lookup("meta-llama/Llama-3.1-8B")
    mem = estimate(arch, Layout(method="lora", strategy="ddp", nodes=1, gpus_per_node=1, seq_len=2048))
    assert mem.total == mem.weights + mem.gradients + mem.optimizer + mem.gathered + mem.activations + mem.overhead
    assert mem.model_states == mem.weights + mem.gradients + mem.optimizer


BASE = Layout(method="full", strategy="zero2", nodes=1, gpus_per_node=8, seq_len=4096, micro_batch=2)


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        (replace(BASE, gradient_checkpointing=True), BASE),
        (replace(BASE, micro_batch=1), BASE),
        (replace(BASE, seq_len=2048), BASE),
        (replace(BASE, strategy="zero3"), BASE),
        (replace(BASE, strategy="zero2"), replace(BASE, strategy="zero1")),
        (replace(BASE, strategy="zero1"), replace(BASE, strategy="ddp")),
        (replace(BASE, method="lora", lora_dropout=0.0), BASE),
        (replace(BASE, method="lora", lora_dropout=0.0), replace(BASE, method="lora", lora_dropout=0.1)),
        (replace(BASE, method="qlora"), replace(BASE, method="lora")),
        (replace(BASE, strategy="megatron", tensor_parallel=4, sequence_parallel=True),
         replace(BASE, strategy="megatron", tensor_parallel=4)),
        (replace(BASE, strategy="megatron", tensor_parallel=4), replace(BASE, strategy="megatron", tensor_parallel=2)),
        (replace(BASE, gpus_per_node=8, strategy="zero3"), replace(BASE, gpus_per_node=4, strategy="zero3")),
    ],
)  # fmt: skip
def test_memory_moves_the_right_way(smaller, larger):
    arch = lookup("meta-llama/Llama-3.1-8B")
    assert estimate(arch, smaller).total < estimate(arch, larger).total


def test_qlora_weights_are_about_a_quarter_of_bf16():
    arch = lookup("meta-llama/Llama-3.1-70B")
    lora = estimate(arch, Layout(method="lora", strategy="ddp", nodes=1, gpus_per_node=1))
    qlora = estimate(arch, Layout(method="qlora", strategy="ddp", nodes=1, gpus_per_node=1))
    assert 0.27 < qlora.weights / lora.weights < 0.32  # NF4 on the linear layers, bf16 embeddings


def test_lora_adapter_states_are_small_and_in_fp32():
    arch = lookup("meta-llama/Llama-3.1-8B")
    mem = estimate(arch, Layout(method="lora", strategy="ddp", nodes=1, gpus_per_node=1, lora_rank=16))
    trainable = 41_943_040
    assert mem.gradients == 4 * trainable and mem.optimizer == 8 * trainable


def test_activations_follow_the_formula_for_one_layer():
    arch = Architecture(
        num_layers=1, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, intermediate_size=4096,
        vocab_size=1000,
    )  # fmt: skip
    layout = Layout(method="full", strategy="fsdp", nodes=1, gpus_per_node=1, seq_len=100, micro_batch=1)
    per_token = 12 * 1024 + 8 * 1024 + 4 * 1024 + 8 * 4096
    # the chunked loss: 100 tokens are one chunk (contract.loss_chunk_tokens: 32,768 for 1,000 entries)
    assert estimate(arch, layout).activations == 100 * per_token + 100 * 1000 * CHUNK_LOGIT_BYTES
    # DDP's full fine-tuning under autocast: a fp32 residual stream (12h more) and a bf16 copy of each weight
    amp = estimate(arch, replace(layout, strategy="ddp")).activations
    assert amp == 100 * (per_token + 12 * 1024) + 2 * arch.params_per_layer + 100 * 1000 * CHUNK_LOGIT_BYTES
    # DPO: two sequences per example, their log-probs in chunks too (200 tokens: one chunk)
    dpo = estimate(arch, replace(layout, objective="dpo")).activations
    assert dpo == 2 * 100 * per_token + 200 * 1000 * CHUNK_LOGIT_BYTES
    # megatron-core's own loss: the whole logits, 10 bytes per token and entry
    whole = estimate(arch, replace(layout, chunked_loss=False)).activations
    assert whole == 100 * per_token + 100 * 1000 * LOGIT_BYTES


def test_the_chunked_loss_holds_one_chunk_of_logits_whatever_the_sequence_length(monkeypatch):
    """Llama 3's 128,256 entries: 256-token chunks (2^25 logits), 8 bytes per chunk token and entry at 2k or 32k
    tokens, where the model's own loss (megatron-core) holds 10 bytes per token and entry."""
    arch = lookup("meta-llama/Llama-3.1-8B")
    assert loss_chunk_tokens(arch.vocab_size, "fsdp") == 256
    assert loss_chunk_tokens(arch.vocab_size, "megatron") == 0
    layouts = [Layout(method="lora", strategy="fsdp", nodes=1, gpus_per_node=8, seq_len=s) for s in (2048, 32768)]
    chunked = [estimate(arch, layout).activations for layout in layouts]
    monkeypatch.setattr(memory, "loss_chunk_tokens", lambda *_: 0)
    whole = [estimate(arch, layout).activations for layout in layouts]
    for layout, a, b in zip(layouts, chunked, whole, strict=True):
        assert b - a == layout.seq_len * arch.vocab_size * LOGIT_BYTES - 256 * arch.vocab_size * CHUNK_LOGIT_BYTES


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fsdp_offload_keeps_only_the_gathered_layers_on_the_gpu_and_every_shard_state_on_the_host(method):
    """FSDP2's CPUOffloadPolicy: the shards (fp32 trainable, the frozen base as stored), their fp32 gradients and
    AdamW's two fp32 moments live in host memory; the GPU holds what plain fsdp gathers, nothing sharded."""
    arch = lookup("meta-llama/Llama-3.1-70B")
    lora = {} if method == "full" else {"lora_rank": 16}
    on_gpu = model_states(arch, Layout(method=method, strategy="fsdp", nodes=4, gpus_per_node=2, **lora))
    offloaded = model_states(arch, Layout(method=method, strategy="fsdp-offload", nodes=4, gpus_per_node=2, **lora))
    assert offloaded.weights == offloaded.gradients == offloaded.optimizer == 0
    assert offloaded.gathered == on_gpu.gathered > 0
    sharded = on_gpu.weights + on_gpu.gradients + on_gpu.optimizer  # (B + (4 + 4 + 8) T) / N per GPU
    assert offloaded.host_per_node == pytest.approx(sharded * 2 * 1.5, rel=1e-9)  # 2 GPUs a node, pinned blocks


def test_fsdp_gathers_a_qlora_base_in_nf4_and_dequantizes_one_linear_weight_at_a_time():
    """In flight under FSDP2: c x root + 2 x (NF4 x linear per layer + c x the rest of a layer) + c x the largest
    linear weight, not the compute dtype for everything."""
    from kubeforge.planner.memory import fsdp_gathered
    from kubeforge.runtime.contract import NF4_BYTES

    arch = lookup("meta-llama/Llama-3.1-70B")
    root = arch.total_parameters - arch.num_layers * arch.params_per_layer
    linear = arch.linear_parameters / arch.num_layers
    largest = arch.hidden_size * arch.intermediate_size  # gate, up and down are the largest
    expected = 2 * root + 2 * (NF4_BYTES * linear + 2 * (arch.params_per_layer - linear)) + 2 * largest
    assert fsdp_gathered(arch, "qlora", 2.0) == pytest.approx(expected, rel=1e-12)
    assert fsdp_gathered(arch, "lora", 2.0) == 2 * (root + 2 * arch.params_per_layer)
    assert fsdp_gathered(arch, "qlora", 2.0) < 0.75 * fsdp_gathered(arch, "lora", 2.0)
    layout = Layout(method="qlora", strategy="fsdp", nodes=4, gpus_per_node=1)
    assert model_states(arch, layout).gathered == fsdp_gathered(arch, "qlora", 2.0)


def test_what_each_reading_of_gpu_memory_shows_of_an_estimate():
    """nvidia-smi shows everything; max_memory_reserved not the CUDA context or NCCL's buffers; max_memory_allocated
    not the allocator's cached blocks either (the fragmentation term): what the references' peaks are compared with."""
    from kubeforge.planner.catalog import lookup
    from kubeforge.planner.memory import CUDA_CONTEXT, FRAGMENTATION, NCCL_BUFFERS, estimate, shown_by

    arch = lookup("meta-llama/Llama-3.1-8B")
    for gpus in (1, 8):
        layout = Layout(method="lora", strategy="zero2", nodes=1, gpus_per_node=gpus, seq_len=2048)
        mem = estimate(arch, layout)
        outside = CUDA_CONTEXT + (NCCL_BUFFERS if gpus > 1 else 0)
        cached = FRAGMENTATION * (mem.model_states + mem.gathered + mem.activations)
        assert shown_by("device", arch, layout, mem) == mem.total
        assert shown_by("reserved", arch, layout, mem) == mem.total - outside
        assert abs(shown_by("allocated", arch, layout, mem) - (mem.total - outside - cached)) <= 4  # int rounding
    with pytest.raises(ValueError, match="one of device, reserved, allocated"):
        shown_by("nvidia-smi", arch, layout, mem)
