"""For any valid input, the plan is infeasible with a reason, or it obeys every hard rule and fits."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeforge.api import parse
from kubeforge.inventory.pools import pools_from_nodes
from kubeforge.planner import plan, resolve
from tests.builders import DELETE, finetune
from tests.planner.nodes import GFD, gfd_node

MODELS = ["Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen3-32B",
          "mistralai/Mixtral-8x7B-v0.1"]  # fmt: skip

# products the planner does not know (GPUFacts from the labels alone): never a crash or a division by zero
UNKNOWN = ["NVIDIA-GB300", "NVIDIA-Future-X1"]

pool_specs = st.tuples(
    st.sampled_from(sorted(GFD) + UNKNOWN),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(min_value=1, max_value=6),
    st.sampled_from([64, 256, 1024, 2048]),
)


@st.composite
def inventories(draw):
    specs = draw(st.lists(pool_specs, min_size=1, max_size=3, unique_by=lambda s: (s[0], s[1])))
    nodes = []
    for product, gpus, count, host in specs:
        clique = {"nvidia.com/gpu.clique": f"{product.lower()}.1"} if draw(st.booleans()) else {}
        nodes += [
            gfd_node(f"{product}-{gpus}-{i}".lower(), product, gpus, host_gib=host, labels=clique) for i in range(count)
        ]
    if draw(st.booleans()):
        nodes[0] = gfd_node(nodes[0]["metadata"]["name"], specs[0][0], specs[0][1], cordoned=True)
    return pools_from_nodes(nodes)


@st.composite
def specs(draw):
    method = draw(st.sampled_from(["full", "lora", "qlora"]))
    strategy = draw(
        st.sampled_from(["auto", "auto", "ddp", "zero2", "zero3", "zero3-offload", "fsdp", "fsdp-offload", "megatron"])
    )
    if method != "full" and strategy == "megatron":  # Megatron trains method full only (an API rule)
        strategy = "auto"
    changes = {
        "model": {"uri": f"hf://{draw(st.sampled_from(MODELS))}"},
        "method": method,
        "lora": DELETE if method == "full" else {"rank": draw(st.sampled_from([8, 64]))},
        "dataset.maxSeqLength": draw(st.sampled_from([512, 2048, 8192])),
        "training.globalBatchSize": draw(st.sampled_from([1, 8, 12, 64, 256])),
        "parallelism.strategy": strategy,
        "parallelism.precision": draw(st.sampled_from(["auto", "auto", "bf16", "fp16", "fp8"])),
        "resources.maxGPUs": draw(st.sampled_from([DELETE, 1, 4, 8, 16])),
        "resources.queue": DELETE,
    }
    if draw(st.booleans()) and strategy != "megatron":  # DPO: the API keeps it off Megatron
        changes.update({"training.objective": "dpo", "dataset.format": "preference"})
    elif strategy != "megatron" and draw(st.booleans()):  # Ulysses: asked for, or a given degree
        changes["parallelism.sequenceParallel"] = True
        changes["parallelism.sequenceParallelSize"] = draw(st.sampled_from([DELETE, 2, 4]))
    ulysses = "parallelism.sequenceParallelSize" in changes or "training.objective" in changes
    megatron = strategy == "megatron"
    if (megatron or (strategy == "auto" and method == "full")) and not ulysses and draw(st.booleans()):
        changes["parallelism.tensorParallel"] = draw(st.sampled_from([1, 2, 4, 8]))
        changes["parallelism.pipelineParallel"] = draw(st.sampled_from([1, 2, 4]))
        megatron = megatron or changes["parallelism.tensorParallel"] > 1 or changes["parallelism.pipelineParallel"] > 1
    # pure bf16 and the checkpointing policy where the API lets them be asked for
    if changes["parallelism.precision"] in ("auto", "bf16") and strategy in ("auto", "ddp", "zero2", "zero3", "fsdp"):
        changes["parallelism.masterWeights"] = draw(st.sampled_from(["fp32", "fp32", "bf16"]))
    choices = ["auto", "auto", "full"] + (["selective"] if method == "full" and not megatron else [])
    changes["parallelism.activationCheckpointing"] = draw(st.sampled_from(choices))
    return parse(finetune(**changes)).spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs(), inventories())
def test_plan_is_infeasible_with_a_reason_or_obeys_every_hard_rule(spec, inventory):
    arch = resolve(spec.model)
    result = plan(spec, inventory, arch, alternatives=False)
    if not result.feasible:
        assert result.reason
        return
    pool = next(p for p in inventory.pools if p.name == result.pool)
    assert pool.selector == result.node_selector
    gpu = pool.gpu
    par = spec.parallelism
    # resources
    assert result.total_gpus <= pool.total_gpus
    assert result.nodes <= pool.nodes and result.gpus_per_node <= pool.gpus_per_node
    if spec.resources.max_gpus:
        assert result.total_gpus <= spec.resources.max_gpus
    # parallelism
    assert (
        result.tensor_parallel * result.pipeline_parallel * result.ulysses * result.data_parallel == result.total_gpus
    )
    assert result.gpus_per_node % result.ulysses == 0
    assert result.tensor_parallel <= pool.nvlink_domain
    assert arch.num_layers % result.pipeline_parallel == 0
    assert result.micro_batch_size * result.gradient_accumulation_steps * result.data_parallel == (
        spec.training.global_batch_size
    )
    # precision
    if result.precision == "fp8":
        assert gpu.compute_capability >= (8, 9)
    if result.precision == "bf16":
        assert gpu.compute_capability >= (8, 0)
    # memory
    assert result.memory.total <= result.memory.available <= pool.memory_bytes
    if result.offload:
        assert result.host_memory_per_node <= pool.host_memory_bytes
    # explicit values honoured, never silently changed
    if par.strategy != "auto":
        assert result.strategy == par.strategy
    if par.precision != "auto":
        assert result.precision == par.precision
    assert result.master_weights == par.master_weights
    if par.activation_checkpointing != "auto":
        assert result.gradient_checkpointing and result.checkpointing_policy == par.activation_checkpointing
    if par.tensor_parallel:
        assert result.tensor_parallel == par.tensor_parallel
    if par.pipeline_parallel:
        assert result.pipeline_parallel == par.pipeline_parallel
    assert result.method == spec.method
    assert result.objective == spec.training.objective
    if result.objective == "dpo":
        assert result.ulysses == 1 and not result.strategy.startswith("megatron")
    if par.sequence_parallel_size:
        assert result.ulysses == par.sequence_parallel_size
    if par.sequence_parallel is not None and not result.strategy.startswith("megatron"):
        assert (result.ulysses > 1) == par.sequence_parallel
