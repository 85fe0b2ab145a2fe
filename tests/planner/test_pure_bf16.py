"""Pure bf16 (spec.parallelism.masterWeights bf16): what the planner does with it, and what it refuses.

The runtime side (the bytes each engine really holds in pure bf16) is measured in
tests/runtime/test_precision_policy.py against the same memory.model_states."""

from __future__ import annotations

import pytest

from kubeforge.api import parse
from kubeforge.planner import resolve
from kubeforge.planner.cost import OPTIMIZER_BYTES, optimizer_bytes
from kubeforge.planner.local import plan_cpu
from kubeforge.planner.memory import Layout, model_states
from kubeforge.render.contract import finetune_contract
from tests.builders import DELETE, finetune
from tests.planner.nodes import cluster
from tests.planner.test_planner import MISTRAL_7B, job, planned

GIB = 1024**3


def full(**changes):
    return job(**{**MISTRAL_7B, "method": "full", "lora": DELETE, "training.globalBatchSize": 16, **changes})


def pure(**changes):
    return full(**{"parallelism.masterWeights": "bf16"}, **changes)


def test_model_states_take_half_the_bytes_per_trained_parameter():
    arch = resolve(full().model)
    for strategy in ("ddp", "fsdp", "zero1", "zero2", "zero3"):
        layouts = [
            Layout(method="full", strategy=strategy, nodes=1, gpus_per_node=8, master_weights=m)
            for m in ("fp32", "bf16")
        ]
        fp32, bf16 = (model_states(arch, lay) for lay in layouts)
        # the optimizer's share: masters + two moments (DeepSpeed) or two moments (DDP/FSDP) halve
        assert bf16.optimizer == pytest.approx(fp32.optimizer / 2), strategy
        assert bf16.weights + bf16.gradients <= fp32.weights + fp32.gradients, strategy
    ddp = [Layout(method="full", strategy="ddp", nodes=1, gpus_per_node=1, master_weights=m) for m in ("fp32", "bf16")]
    held = [model_states(arch, lay) for lay in ddp]
    assert [round((s.weights + s.gradients + s.optimizer) / arch.total_parameters) for s in held] == [16, 8]


def test_a_7b_full_fine_tune_fits_one_80gb_gpu_only_in_pure_bf16():
    a100 = cluster(("NVIDIA-A100-SXM4-80GB", 1, 1), host_gib=512)
    mixed = planned(full(), a100)
    assert mixed.feasible and mixed.offload == "optimizer", mixed.reason  # 16 bytes x 7.2B > 80 GB
    bf16 = planned(pure(), a100)
    assert bf16.feasible and bf16.offload == "none" and bf16.strategy == "ddp", bf16.reason
    assert bf16.master_weights == "bf16" and bf16.precision == "bf16"
    assert "pure bf16" in bf16.reason
    assert any(r.startswith("Pure bf16, as spec.parallelism.masterWeights asks") for r in bf16.reasons)
    assert bf16.to_json()["masterWeights"] == "bf16"


def test_pure_bf16_never_trains_in_fp8_and_never_offloads():
    h100 = cluster(("NVIDIA-H100-80GB-HBM3", 8, 1), host_gib=512)
    assert planned(full(), h100).precision == "fp8"  # precision auto, full fine-tuning on Hopper
    result = planned(pure(), h100)
    assert result.feasible and result.precision == "bf16" and result.offload == "none"
    one_a10 = cluster(("NVIDIA-A10G", 1, 1), host_gib=512)
    result = planned(pure(), one_a10)  # 7.2B x 8 bytes > 24 GB, and no offloading engine keeps bf16 masters
    assert not result.feasible and "does not fit" in result.reason, result.reason
    assert "parallelism.masterWeights: fp32" in [a.change for a in result.alternatives]  # offloads, fp32 masters


def test_refused_where_it_cannot_run_with_the_field_named():
    t4 = planned(pure(), cluster(("Tesla-T4", 8, 2)))
    assert not t4.feasible and "masterWeights bf16 needs bf16" in t4.reason, t4.reason
    cpu = plan_cpu(pure(), resolve(pure().model), nproc=1, host_memory_bytes=512 * GIB)
    assert not cpu.feasible
    assert cpu.reason.startswith("spec.parallelism.masterWeights bf16 (pure bf16) needs bf16 compute"), cpu.reason


def test_the_contract_carries_it_to_the_runtime():
    doc = finetune(
        **MISTRAL_7B, method="full", lora=DELETE, **{"parallelism.masterWeights": "bf16", "resources.queue": DELETE}
    )
    job_ = parse(doc)
    result = planned(job_.spec, cluster(("NVIDIA-A100-SXM4-80GB", 8, 1)))
    assert result.feasible, result.reason
    assert finetune_contract(job_, result).compute.master_weights == "bf16"


def test_the_optimizer_step_moves_half_the_bytes():
    assert OPTIMIZER_BYTES == 40  # clipping 3 x 4, AdamW reads weight, gradient, two moments and writes three
    assert optimizer_bytes("bf16", "full", "bf16") == 20
