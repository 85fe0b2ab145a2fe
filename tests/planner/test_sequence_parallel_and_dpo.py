"""The planner's Ulysses sequence parallelism and DPO, table-driven on small inventories."""

from __future__ import annotations

from dataclasses import replace

from kubeforge.planner import resolve
from kubeforge.planner.cost import reference_pass_seconds, step_time
from kubeforge.planner.memory import Layout, activation_bytes, estimate
from tests.builders import DELETE
from tests.planner.nodes import cluster
from tests.planner.test_planner import job, planned

H100x8 = ("NVIDIA-H100-80GB-HBM3", 8, 1)  # one node of 8
LLAMA_8B = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "method": "full", "lora": DELETE}


def long_job(seq: int, **more):
    return job(**LLAMA_8B, **{"dataset.maxSeqLength": seq, "training.globalBatchSize": 8, **more})


def test_ulysses_divides_activations_by_its_degree():
    arch = resolve(long_job(8192).model)
    # the whole logits on both sides (Ulysses' loss works on its slice of them; the chunked loss is test_memory's)
    one = Layout("full", "fsdp", 1, 8, seq_len=65536, gradient_checkpointing=True, chunked_loss=False)
    for u in (2, 4, 8):
        assert activation_bytes(arch, replace(one, ulysses=u, sequence_parallel=True)) * u == activation_bytes(
            arch, one
        )


def test_short_sequences_never_get_ulysses_long_ones_do():
    short = planned(long_job(4096), cluster(H100x8))
    assert short.feasible and short.ulysses == 1
    long = planned(long_job(131072), cluster(H100x8))
    assert long.feasible, long.reason
    assert long.ulysses > 1 and long.sequence_parallel and long.strategy in ("fsdp", "zero3", "zero2", "zero1", "ddp")
    assert long.tensor_parallel * long.pipeline_parallel * long.ulysses * long.data_parallel == long.total_gpus
    assert any("Ulysses" in r for r in long.reasons)


def test_an_explicit_ulysses_degree_is_honoured_or_refused_with_the_reason():
    ok = planned(long_job(32768, **{"parallelism.sequenceParallelSize": 4}), cluster(H100x8))
    assert ok.feasible and ok.ulysses == 4
    bad = planned(long_job(32768, **{"parallelism.sequenceParallelSize": 16}), cluster(H100x8))
    assert not bad.feasible
    assert "sequenceParallelSize 16" in bad.reason and "per node" in bad.reason


def test_sequence_parallel_true_on_a_native_strategy_means_ulysses():
    result = planned(long_job(8192, **{"parallelism.strategy": "fsdp", "parallelism.sequenceParallel": True}),
                     cluster(H100x8))  # fmt: skip
    assert result.feasible and result.ulysses > 1 and result.strategy == "fsdp"


def test_ulysses_costs_all_to_all_time_inside_the_node():
    arch = resolve(long_job(8192).model)
    pool = cluster(H100x8).pools[0]
    base = Layout(
        "full", "fsdp", 1, 8, seq_len=65536, gradient_checkpointing=True, precision="bf16", chunked_loss=False
    )
    alone = step_time(arch, base, pool, 8)
    split = step_time(arch, replace(base, ulysses=8, sequence_parallel=True), pool, 8)
    assert alone.ulysses == 0 and split.ulysses > 0
    assert split.compute == alone.compute  # the same FLOPs, spread over the same GPUs


def test_dpo_counts_two_sequences_per_pair_and_no_second_model():
    arch = resolve(long_job(2048).model)
    # 8192 tokens: full efficiency either way; the whole logits for both (DPO's loss reads them whole)
    sft = Layout("lora", "ddp", 1, 1, seq_len=2048, micro_batch=4, chunked_loss=False)
    dpo = replace(sft, objective="dpo")
    assert activation_bytes(arch, dpo) == 2 * activation_bytes(arch, sft)
    assert estimate(arch, dpo).model_states == estimate(arch, sft).model_states  # reference: precomputed log-probs
    pool = cluster(H100x8).pools[0]
    assert step_time(arch, dpo, pool, 8).compute == 2 * step_time(arch, sft, pool, 8).compute
    step = step_time(arch, dpo, pool, 8)
    assert reference_pass_seconds(arch, sft, step, 100) == 0.0
    assert reference_pass_seconds(arch, dpo, step, 100) == 100 * step.compute * 2 / 4  # forward of 4 FLOPs/param


def dpo_job(**more):
    return job(**{"training.objective": "dpo", "dataset.format": "preference", "dataset.numExamples": 1000, **more})


def test_a_dpo_plan_never_uses_megatron_or_ulysses_and_counts_the_reference_pass():
    result = planned(dpo_job(), cluster(H100x8))
    assert result.feasible and result.objective == "dpo"
    assert result.ulysses == 1 and not result.strategy.startswith("megatron")
    assert result.reference_seconds > 0
    assert any("DPO" in r for r in result.reasons)
    sft = planned(job(**{"dataset.numExamples": 1000}), cluster(H100x8))
    assert result.estimated_step_seconds > sft.estimated_step_seconds


def test_a_plan_estimated_past_max_hours_is_infeasible_with_the_time_in_the_reason():
    one_a10 = cluster(("NVIDIA-A10", 1, 1))
    long = {"model": {"uri": "hf://mistralai/Mistral-7B-v0.3"}, "dataset.maxSeqLength": 2048,
            "training.globalBatchSize": 16, "training.maxSteps": DELETE, "training.epochs": 3,
            "dataset.numExamples": 2_000_000}  # fmt: skip
    result = planned(job(**long), one_a10)
    assert not result.feasible
    assert "hours" in result.reason and "over 168 hours" in result.reason and "resources.maxHours" in result.reason
    allowed = planned(job(**long, **{"resources.maxHours": 8760}), one_a10)
    assert allowed.feasible, allowed.reason
    assert allowed.estimated_step_seconds * allowed.total_steps / 3600 > 168


def test_unknown_run_length_is_never_refused_for_time():
    result = planned(job(**{"training.maxSteps": DELETE, "dataset.numExamples": DELETE}), cluster(("NVIDIA-A10", 1, 1)))
    assert result.total_steps is None and result.feasible
