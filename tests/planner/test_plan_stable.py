"""Plans do not change by accident: representative jobs x clusters against a recorded golden file.

Each case's `plan.to_json()` (layout, memory breakdown, step time, reasons, alternatives) must equal
`plan_stable.json`, recorded before the search was made faster (issue 11: one plan in 5 ms) and kept
since. The cases cover every strategy family the search can pick (DDP, ZeRO-1/2/3, FSDP, offloads,
Megatron TP x PP, Ulysses), fp8/bf16/fp16, LoRA/QLoRA/full, DPO, and each way a plan is refused (does
not fit, too slow, no pool, an explicit choice that cannot hold), with their alternatives.

A change to the planner that is meant to change plans re-records the file:

    KUBEFORGE_RECORD_PLANS=1 .venv/bin/python -m pytest tests/planner/test_plan_stable.py

and the diff of plan_stable.json is then part of the review.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from kubeforge.api import parse
from kubeforge.inventory.pools import Inventory, pools_from_nodes
from kubeforge.planner import plan, resolve
from tests.builders import DELETE, EXAMPLES, example, finetune, with_spec
from tests.planner.nodes import example_cluster, gfd_node

GOLDEN = Path(__file__).with_name("plan_stable.json")
RECORD = os.environ.get("KUBEFORGE_RECORD_PLANS") == "1"

# bench/plan_scale.py's pool types: H100 x8, A100-80GB x8, L40S x4, A10G x1, some nodes cordoned
SCALE_TYPES = [("NVIDIA-H100-80GB-HBM3", 8), ("NVIDIA-A100-SXM4-80GB", 8), ("NVIDIA-L40S", 4), ("NVIDIA-A10G", 1)]


@cache
def inventory(name: str) -> Inventory:
    if name == "scale-100":
        nodes = [gfd_node(f"node-{i}", *SCALE_TYPES[i % len(SCALE_TYPES)], cordoned=(i % 97 == 0)) for i in range(100)]
        return pools_from_nodes(nodes)
    return example_cluster(f"{name}.yaml")


def from_file(path: str, **changes: Any) -> dict[str, Any]:
    return with_spec(example(path), changes)


LLAMA_8B = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}}
FULL = {"method": "full", "lora": DELETE}

# name -> (the FineTuneJob document, the cluster)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "qwen3-8b-lora-scale": (finetune(), "scale-100"),  # bench/plan_scale.py's job and pools
    "qwen3-8b-lora-h100": (finetune(), "h100-4x8"),
    "qwen3-8b-lora-mixed": (finetune(), "mixed"),
    "qwen3-8b-lora-unknown-gpu": (finetune(), "unknown-gpu"),
    "qwen3-8b-lora-cordoned": (finetune(), "cordoned"),
    "qwen3-8b-lora-a100-pcie": (finetune(), "a100-pcie-40gb-2x8"),
    "mistral-7b-qlora-a10": (from_file("finetunejob-mistral-7b-qlora.yaml"), "a10-4x1"),
    "llama-70b-full-a10-infeasible": (from_file("finetunejob-llama-70b-full.yaml"), "a10-4x1"),
    "llama-70b-full-a100": (from_file("finetunejob-llama-70b-full.yaml"), "a100-sxm4-80gb-2x8"),
    "seed-a10-qlora-70b": (from_file("seeds/a10-qlora-70b.yaml"), "a10-4x1"),
    "seed-a100-full-70b-megatron": (from_file("seeds/a100-full-70b.yaml"), "a100-sxm4-80gb-2x8"),
    "seed-h100-ulysses-fp8": (from_file("seeds/h100-long-context-8b.yaml"), "h100-4x8"),
    "seed-h100-no-ulysses": (
        from_file("seeds/h100-long-context-8b.yaml", **{"parallelism.sequenceParallel": False}),
        "h100-4x8",
    ),
    "llama-8b-full-a100-pcie-sharded": (
        finetune(**LLAMA_8B, **FULL, **{"resources.maxGPUs": 16, "training.globalBatchSize": 64}),
        "a100-pcie-40gb-2x8",
    ),
    "llama-8b-full-megatron-tp2-pp2": (
        finetune(
            **LLAMA_8B,
            **FULL,
            **{"parallelism.strategy": "megatron", "parallelism.tensorParallel": 2, "parallelism.pipelineParallel": 2},
        ),
        "a100-sxm4-80gb-2x8",
    ),
    "llama-8b-tp-over-pcie-refused": (
        finetune(**LLAMA_8B, **FULL, **{"parallelism.strategy": "megatron", "parallelism.tensorParallel": 2}),
        "a10-4x1",
    ),
    "llama-8b-full-a100-pcie-fsdp": (
        finetune(**LLAMA_8B, **FULL, **{"resources.maxGPUs": 8, "training.globalBatchSize": 64}),
        "a100-pcie-40gb-2x8",
    ),
    "llama-8b-full-h100-bf16-zero2": (
        finetune(**LLAMA_8B, **FULL, **{"resources.maxGPUs": 8, "parallelism.precision": "bf16"}),
        "h100-4x8",
    ),
    "llama-8b-full-zero1-explicit": (finetune(**LLAMA_8B, **FULL, **{"parallelism.strategy": "zero1"}), "h100-4x8"),
    "llama-8b-full-a10-pipeline": (finetune(**LLAMA_8B, **FULL), "a10-4x1"),
    "qwen3-32b-qlora-a10-zero3": (finetune(method="qlora", model={"uri": "hf://Qwen/Qwen3-32B"}), "a10-4x1"),
    "mixtral-full-h100": (finetune(**FULL, model={"uri": "hf://mistralai/Mixtral-8x7B-v0.1"}), "h100-4x8"),
    "gemma-9b-qlora-batch-12-scale": (
        finetune(method="qlora", model={"uri": "hf://google/gemma-2-9b"}, **{"training.globalBatchSize": 12}),
        "scale-100",
    ),
    "zero2-offload-fp16-a10": (
        finetune(**{"parallelism.strategy": "zero2-offload-optimizer", "parallelism.precision": "fp16"}),
        "a10-4x1",
    ),
    "too-slow-for-max-hours": (
        finetune(**LLAMA_8B, **FULL, **{"dataset.numExamples": 10_000_000, "resources.maxHours": 1}),
        "a10-4x1",
    ),
    "no-pool-for-gpu-type": (finetune(**{"resources.gpuType": "T4"}), "h100-4x8"),
    "dpo-h100": (
        from_file("dpo/finetunejob-dpo.yaml", model={"uri": "hf://Qwen/Qwen3-1.7B"}, **{"dataset.numExamples": 5000}),
        "h100-4x8",
    ),
}


def planned(doc: dict[str, Any], cluster: str) -> dict[str, Any]:
    spec = parse(doc).spec
    return plan(spec, inventory(cluster), resolve(spec.model)).to_json()


@cache
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def test_the_cases_are_the_recorded_ones():
    """A case added or removed without re-recording is caught here, not silently skipped."""
    if RECORD:
        GOLDEN.write_text(json.dumps({n: planned(*CASES[n]) for n in sorted(CASES)}, indent=1, sort_keys=True) + "\n")
        golden.cache_clear()
    assert sorted(golden()) == sorted(CASES)
    assert (EXAMPLES / "seeds").is_dir()


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_is_unchanged(name):
    doc, cluster = CASES[name]
    assert planned(doc, cluster) == golden()[name]


@pytest.mark.parametrize("name", ["qwen3-8b-lora-scale", "seed-h100-ulysses-fp8", "seed-a100-full-70b-megatron"])
def test_the_search_shortcuts_agree_with_the_full_computation(name):
    """Every candidate the search keeps: its Layout (copied field by field), memory total and seconds per
    step (computed from per-group terms) equal what replace(), estimate() and step_time() give in full."""
    from dataclasses import replace

    from kubeforge.planner.cost import step_time
    from kubeforge.planner.memory import checkpointing_fields, estimate
    from kubeforge.planner.search import Request, choose_precision, enumerate_candidates

    doc, cluster = CASES[name]
    spec = parse(doc).spec
    arch, req, inv = resolve(spec.model), Request.from_spec(spec), inventory(cluster)
    fitting, unfit, shared = [], [], {}
    for pool in inv.pools:
        precision, _ = choose_precision(req, pool)
        if precision is not None:
            enumerate_candidates(req, pool, arch, precision, [], fitting, unfit, shared)
    assert fitting and unfit

    for c in fitting:
        base = c.group.layout
        full = replace(base, micro_batch=c.micro_batch, gradient_accumulation=c.gradient_accumulation,
                       **checkpointing_fields(c.gradient_checkpointing))  # fmt: skip
        assert c.layout == full and hash(c.layout) == hash(full)
        assert c.memory_total == estimate(arch, full).total == c.memory.total
        assert c.seconds == step_time(arch, full, c.pool, req.global_batch).total == c.time.total
    for group, mb, gc, accumulation, total in unfit:
        full = replace(group.layout, micro_batch=mb, gradient_accumulation=accumulation, **checkpointing_fields(gc))
        needed = estimate(arch, full)
        assert total is None or total == needed.total
        assert needed.total > 0.9 * group.pool.memory_bytes or needed.host_per_node > 0.8 * group.pool.host_memory_bytes


@pytest.mark.parametrize("name", sorted(CASES))
def test_with_one_pipeline_stage_a_larger_micro_batch_is_never_slower(name):
    """What lets the search time only the largest micro-batch that fits per checkpointing choice when p == 1:
    for every group it keeps, each micro-batch dividing the batch is at least as fast as every smaller one."""
    from itertools import pairwise

    from kubeforge.planner.search import MICRO_BATCHES, Request, choose_precision, enumerate_candidates

    doc, cluster = CASES[name]
    spec = parse(doc).spec
    arch, req, inv = resolve(spec.model), Request.from_spec(spec), inventory(cluster)
    fitting, shared = [], {}
    for pool in inv.pools:
        precision, _ = choose_precision(req, pool)
        if precision is not None:
            enumerate_candidates(req, pool, arch, precision, [], fitting, [], shared)
    groups = {id(c.group): c.group for c in fitting if c.group.layout.pipeline_parallel == 1}
    for group in groups.values():
        per_step = group.layout.data_parallel
        sizes = [mb for mb in MICRO_BATCHES if req.global_batch % (mb * per_step) == 0]
        for checkpointing in (False, True):
            times = [group.step.seconds(mb, checkpointing, req.global_batch // (mb * per_step)) for mb in sizes]
            assert all(b <= a for a, b in pairwise(times)), (group.layout.strategy, sizes, times)
