"""The planner's decisions, table-driven, on small inventories built here and on the example clusters."""

from __future__ import annotations

import pytest

from kubeforge.api import parse
from kubeforge.planner import plan, resolve
from kubeforge.planner.plan import Plan
from tests.builders import DELETE, finetune
from tests.planner.nodes import cluster, example_cluster

GIB = 1024**3


def job(**changes):
    """The example FineTuneJob (Qwen3-8B LoRA) with changes; maxGPUs lifted unless given."""
    changes.setdefault("resources.maxGPUs", DELETE)
    changes.setdefault("resources.queue", DELETE)
    return parse(finetune(**changes)).spec


def planned(spec, inventory) -> Plan:
    return plan(spec, inventory, resolve(spec.model))


MISTRAL_7B = {"model": {"uri": "hf://mistralai/Mistral-7B-v0.3"}, "dataset.maxSeqLength": 2048}


def test_7b_lora_fits_one_24gb_gpu_with_gradient_checkpointing():
    spec = job(**MISTRAL_7B, **{"training.globalBatchSize": 16, "lora.rank": 16})
    result = planned(spec, cluster(("NVIDIA-A10G", 1, 1)))
    assert result.feasible, result.reason
    assert result.total_gpus == 1 and result.strategy == "ddp"
    assert result.gradient_checkpointing is True
    assert result.memory.total <= result.memory.available <= 24 * GIB


def test_7b_full_fine_tune_does_not_fit_one_24gb_gpu_without_offload():
    spec = job(**MISTRAL_7B, method="full", lora=DELETE, **{"training.globalBatchSize": 16})
    one_a10 = cluster(("NVIDIA-A10G", 1, 1), host_gib=512)
    for strategy in ("ddp", "zero1", "zero2", "zero3", "fsdp"):
        result = planned(job(**MISTRAL_7B, method="full", lora=DELETE, **{"parallelism.strategy": strategy}), one_a10)
        assert not result.feasible, strategy
        assert "does not fit" in result.reason and "A10G" in result.reason
    auto = planned(spec, one_a10)
    # ZeRO-Offload: the bf16 weights (14 GiB) stay on the GPU; fp32 masters, moments and gradients
    # (16 bytes x 7.2B) go to the host, before any parameter offload is tried
    assert auto.feasible and auto.strategy == "zero2-offload-optimizer"
    assert auto.offload == "optimizer" and auto.host_memory_per_node > 100 * GIB
    no_room = planned(spec, cluster(("NVIDIA-A10G", 1, 1), host_gib=64))
    assert not no_room.feasible and "of host memory per node for offloading" in no_room.reason, no_room.reason


def test_offload_only_when_nothing_fits_without_it():
    spec = job(**MISTRAL_7B, method="full", lora=DELETE, **{"training.globalBatchSize": 16})
    eight = planned(spec, cluster(("NVIDIA-A10G", 8, 1), host_gib=512))
    assert eight.feasible and eight.offload == "none", eight.strategy


@pytest.mark.parametrize("product", ["Tesla-T4", "Tesla-V100-SXM2-16GB", "NVIDIA-A10", "NVIDIA-A100-SXM4-80GB"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fp8_is_never_chosen_below_compute_capability_8_9(product, method):
    spec = job(model={"uri": "hf://Qwen/Qwen3-0.6B"}, method=method, **({"lora": DELETE} if method == "full" else {}))
    result = planned(spec, cluster((product, 8, 2)))
    assert result.feasible, result.reason
    assert result.precision != "fp8"
    expected = "bf16" if product in ("NVIDIA-A10", "NVIDIA-A100-SXM4-80GB") else "fp16"
    assert result.precision == expected


def test_fp8_for_full_fine_tuning_on_hopper():
    spec = job(model={"uri": "hf://Qwen/Qwen3-0.6B"}, method="full", lora=DELETE)
    assert planned(spec, cluster(("NVIDIA-H100-80GB-HBM3", 8, 1))).precision == "fp8"


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_fp8_only_for_engines_that_train_in_it(strategy):
    """DeepSpeed has no float8 path: with precision auto a ZeRO plan on Hopper trains in bf16; asked for
    fp8 explicitly, a ZeRO plan is refused naming the engine."""
    spec = job(model={"uri": "hf://Qwen/Qwen3-0.6B"}, method="full", lora=DELETE, **{"parallelism.strategy": strategy})
    h100 = cluster(("NVIDIA-H100-80GB-HBM3", 8, 1))
    assert planned(spec, h100).precision == "bf16"
    explicit = job(model={"uri": "hf://Qwen/Qwen3-0.6B"}, method="full", lora=DELETE,
                   **{"parallelism.strategy": strategy, "parallelism.precision": "fp8"})  # fmt: skip
    result = planned(explicit, h100)
    assert not result.feasible and "deepspeed" in result.reason and "cannot train in fp8" in result.reason


@pytest.mark.parametrize(
    ("precision", "product", "fragment"),
    [
        ("fp8", "NVIDIA-A100-SXM4-80GB", "fp8 needs compute capability >= 8.9"),
        ("bf16", "Tesla-T4", "bf16 needs compute capability >= 8.0"),
    ],
)
def test_explicit_precision_is_honoured_or_refused(precision, product, fragment):
    result = planned(job(**{"parallelism.precision": precision}), cluster((product, 8, 2)))
    assert not result.feasible and fragment in result.reason
    assert any(a.change == "parallelism: auto" for a in result.alternatives)


def test_explicit_strategy_is_honoured():
    for strategy in ("ddp", "zero2", "zero3", "fsdp"):
        result = planned(job(**{"parallelism.strategy": strategy}), example_cluster("h100-4x8.yaml"))
        assert result.feasible and result.strategy == strategy


def test_explicit_tensor_parallel_over_pcie_is_refused_with_the_reason():
    spec = job(method="full", lora=DELETE, **{"parallelism.strategy": "megatron", "parallelism.tensorParallel": 4})
    result = planned(spec, example_cluster("a100-pcie-40gb-2x8.yaml"))
    assert not result.feasible
    assert "tensorParallel 4 exceeds one NVLink domain on A100-PCIE-40GB (no NVLink)" in result.reason


def test_explicit_tensor_and_pipeline_parallel_are_honoured_on_nvlink():
    spec = job(
        method="full",
        lora=DELETE,
        **{"parallelism.strategy": "megatron", "parallelism.tensorParallel": 4, "parallelism.pipelineParallel": 2},
    )
    result = planned(spec, example_cluster("h100-4x8.yaml"))
    assert result.feasible
    assert (result.tensor_parallel, result.pipeline_parallel) == (4, 2)
    assert result.total_gpus % 8 == 0


def test_pipeline_parallel_must_divide_the_layers():
    spec = job(
        method="full", lora=DELETE, **{"parallelism.strategy": "megatron", "parallelism.pipelineParallel": 5}
    )  # Qwen3-8B: 36 layers
    result = planned(spec, example_cluster("h100-4x8.yaml"))
    assert not result.feasible and "does not divide the model's 36 layers" in result.reason


def test_max_gpus_is_never_exceeded_and_its_lift_is_offered():
    spec = job(model={"uri": "hf://meta-llama/Llama-3.1-70B"}, method="full", lora=DELETE, **{"resources.maxGPUs": 8})
    result = planned(spec, example_cluster("h100-4x8.yaml"))
    if result.feasible:
        assert result.total_gpus <= 8
    else:
        assert "maxGPUs 8" in result.reason
        assert any(a.change == "remove resources.maxGPUs" and a.total_gpus > 8 for a in result.alternatives)


def test_global_batch_is_exact():
    for gbs in (1, 6, 96, 128, 1000):
        result = planned(job(**{"training.globalBatchSize": gbs}), example_cluster("h100-4x8.yaml"))
        assert result.feasible, (gbs, result.reason)
        assert result.micro_batch_size * result.gradient_accumulation_steps * result.data_parallel == gbs


def test_an_odd_global_batch_limits_data_parallelism():
    result = planned(job(**{"training.globalBatchSize": 3}), example_cluster("h100-4x8.yaml"))
    assert result.feasible and result.data_parallel in (1, 3)


def test_infeasible_gives_the_binding_constraint_and_alternatives():
    spec = job(model={"uri": "hf://meta-llama/Llama-3.1-70B"}, method="full", lora=DELETE)
    result = planned(spec, example_cluster("a10-4x1.yaml"))
    assert not result.feasible
    assert "full fine-tuning of a 70.55B-parameter model does not fit" in result.reason
    assert "host memory" in result.reason or "per GPU" in result.reason
    assert [a.change for a in result.alternatives][:1] == ["method: lora"]
    payload = result.to_json()
    assert payload["feasible"] is False and payload["alternatives"][0]["gpuType"] == "A10"


def test_gpu_type_and_node_selector_pick_the_pool():
    mixed = example_cluster("mixed.yaml")
    small = {"model": {"uri": "hf://Qwen/Qwen3-0.6B"}}
    assert planned(job(**small, **{"resources.gpuType": "L4"}), mixed).gpu_type == "L4"
    assert planned(job(**small, **{"resources.gpuType": "H100"}), mixed).gpu_type == "H100-SXM-80GB"
    pinned = job(**small, **{"resources.nodeSelector": {"cloud.google.com/gke-nodepool": "serve-l4"}})
    assert planned(pinned, mixed).gpu_type == "L4"
    missing = planned(job(**small, **{"resources.gpuType": "B200"}), mixed)
    assert not missing.feasible and "no GPU pool matches gpuType 'B200'" in missing.reason
    assert "H100-SXM-80GB (2 nodes x 8 GPUs)" in missing.reason


def test_cordoned_nodes_are_left_out_and_said_so():
    result = planned(job(), example_cluster("cordoned.yaml"))
    assert result.feasible and result.total_gpus <= 16
    assert any("dgx-a100-1 (cordoned" in r for r in result.reasons)


def test_unknown_gpu_is_named_in_the_reasons():
    result = planned(job(), example_cluster("unknown-gpu.yaml"))
    assert result.feasible
    assert any("is not in kubeforge's table" in r for r in result.reasons)


def test_tensor_parallel_stays_inside_nvlink_and_pcie_prefers_sharding():
    spec = job(model={"uri": "hf://Qwen/Qwen3-32B"}, method="full", lora=DELETE)
    pcie = planned(spec, example_cluster("a100-pcie-40gb-2x8.yaml"))
    assert pcie.feasible and pcie.tensor_parallel == 1


def test_fewer_gpus_win_near_ties():
    spec = job(model={"uri": "hf://Qwen/Qwen3-0.6B"}, **{"training.globalBatchSize": 1, "dataset.maxSeqLength": 512})
    result = planned(spec, example_cluster("h100-4x8.yaml"))
    assert result.feasible and result.total_gpus == 1


def test_gpu_hours_need_a_step_count():
    assert planned(job(), example_cluster("h100-4x8.yaml")).estimated_gpu_hours is None
    with_steps = planned(
        job(**{"training.maxSteps": 1000, "training.epochs": DELETE}), example_cluster("h100-4x8.yaml")
    )
    assert with_steps.total_steps == 1000
    expected = with_steps.estimated_step_seconds * 1000 * with_steps.total_gpus / 3600
    assert with_steps.estimated_gpu_hours == pytest.approx(expected)
    by_examples = planned(job(**{"dataset.numExamples": 12800}), example_cluster("h100-4x8.yaml"))
    assert by_examples.total_steps == 3 * 100  # 3 epochs x 12800 / 128


def test_every_decision_has_a_reason():
    result = planned(job(), example_cluster("h100-4x8.yaml"))
    text = " ".join(result.reasons)
    for needle in ("Model:", "Pool ", "GPU(s)", "Precision", "Global batch", "Gradient checkpointing", "Attention",
                   "Memory per GPU", "per step"):  # fmt: skip
        assert needle in text


def test_strategy_reason_quotes_the_numbers():
    spec = job(model={"uri": "hf://Qwen/Qwen3-14B"}, method="full", lora=DELETE, **{"resources.maxGPUs": 8})
    result = planned(spec, example_cluster("a100-sxm4-80gb-2x8.yaml"))
    assert result.feasible and result.strategy != "ddp"
    sentence = next(r for r in result.reasons if r.startswith(("ZeRO", "FSDP", "Megatron")))
    assert "unsharded (DDP) the model states would need" in sentence and "GiB" in sentence


LLAMA_70B_QLORA = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-70B"},
    "method": "qlora",
    "dataset.maxSeqLength": 2048,
    "training.globalBatchSize": 16,
}  # fmt: skip  (Answer.AI's fsdp_qlora runs: 2,048 tokens)


OFFLOADS = ("fsdp-offload", "zero3-offload")


def test_a_70b_qlora_base_on_four_single_a10_nodes_offloads_its_shards():
    """Answer.AI's fsdp_qlora recipe: FSDP alone needs more than an A10 (the gathered layers and activations on top
    of a quarter of the NF4 base), so the shards go to host memory: FSDP2's CPU offload or ZeRO-3's parameter
    offload, whichever is estimated faster (both fit), and an explicit fsdp-offload is honoured."""
    four = cluster(("NVIDIA-A10", 1, 4), host_gib=256)
    alone = planned(job(**LLAMA_70B_QLORA, **{"parallelism.strategy": "fsdp"}), four)
    assert not alone.feasible and "per GPU" in alone.reason, alone.reason
    auto = planned(job(**LLAMA_70B_QLORA), four)
    assert auto.feasible and auto.strategy in OFFLOADS, auto.reason
    assert auto.offload == "parameters" and auto.memory.weights == auto.memory.optimizer == 0
    both = [planned(job(**LLAMA_70B_QLORA, **{"parallelism.strategy": s}), four) for s in OFFLOADS]
    assert all(p.feasible for p in both)
    assert auto.estimated_step_seconds == min(p.estimated_step_seconds for p in both)


def test_fsdp_offload_needs_the_host_memory_it_fills():
    small = cluster(("NVIDIA-A10", 1, 4), host_gib=16)  # 80% of 16 GiB < the ~15 GiB of shards each node keeps
    result = planned(job(**LLAMA_70B_QLORA, **{"parallelism.strategy": "fsdp-offload"}), small)
    assert not result.feasible and "of host memory per node for offloading" in result.reason, result.reason


def test_fsdp_offload_is_not_chosen_when_fsdp_fits():
    """Never offload when a layout without it fits: with 8 GPUs a node the same job fits sharded in GPU memory."""
    eight = cluster(("NVIDIA-A10", 8, 1), host_gib=512)
    result = planned(job(**LLAMA_70B_QLORA), eight)
    assert result.feasible and result.offload == "none", result.strategy
    forced = planned(job(**LLAMA_70B_QLORA, **{"parallelism.strategy": "fsdp-offload"}), eight)
    assert forced.feasible and forced.strategy == "fsdp-offload"  # an explicit choice is honoured


def test_the_optimizer_step_streams_each_gpus_share_of_the_trainable_weights_through_its_memory():
    """cost.py's optimizer term: OPTIMIZER_BYTES per parameter a GPU updates at its memory bandwidth: every
    parameter under DDP, a 1/N shard under ZeRO/FSDP, nothing where Adam runs on the host."""
    from kubeforge.planner.catalog import lookup
    from kubeforge.planner.cost import OPTIMIZER_BYTES, step_time
    from kubeforge.planner.memory import Layout

    arch = lookup("meta-llama/Llama-3.1-8B")
    pool = example_cluster("h100-4x8.yaml").pools[0]
    assert pool.gpu.memory_gbps == 3350

    def optimizer(**choices):
        layout = Layout(nodes=1, gpus_per_node=8, seq_len=2048, **choices)
        return step_time(arch, layout, pool, 8).optimizer

    ddp = optimizer(method="full", strategy="ddp")
    assert ddp == pytest.approx(OPTIMIZER_BYTES * arch.total_parameters / 3350e9)
    assert optimizer(method="full", strategy="zero1") == pytest.approx(ddp / 8)
    assert optimizer(method="full", strategy="fsdp") == pytest.approx(ddp / 8)
    assert optimizer(method="full", strategy="zero2-offload-optimizer") == 0.0
    assert 0 < optimizer(method="lora", strategy="ddp") < ddp / 100
