"""spec.parallelism.activationCheckpointing: what the planner does with full and selective checkpointing.

What selective checkpointing keeps is measured on the runtime's modules in tests/planner/test_activations.py,
its gradients in tests/runtime/test_selective_checkpointing.py."""

from __future__ import annotations

from dataclasses import replace

from kubeforge.api import parse
from kubeforge.planner import resolve
from kubeforge.planner.cost import flops_per_token, selective_recompute
from kubeforge.planner.memory import Layout, estimate
from kubeforge.render.contract import finetune_contract
from tests.builders import DELETE, finetune
from tests.planner.nodes import cluster
from tests.planner.test_planner import planned

LLAMA_8B = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset.maxSeqLength": 8192}


def full(checkpointing: str | None = None, **changes):
    doc = finetune(**LLAMA_8B, method="full", lora=DELETE, **{"resources.queue": DELETE, "resources.maxGPUs": 8,
                   "training.globalBatchSize": 16, "parallelism.strategy": "fsdp", **changes})  # fmt: skip
    if checkpointing:
        doc["spec"]["parallelism"]["activationCheckpointing"] = checkpointing
    return parse(doc)


H100 = cluster(("NVIDIA-H100-80GB-HBM3", 8, 1))


def test_selective_keeps_more_than_full_and_less_than_none_and_recomputes_part_of_the_matmuls():
    arch = resolve(full().spec.model)
    base = Layout(method="full", strategy="fsdp", nodes=1, gpus_per_node=8, seq_len=8192, micro_batch=1)
    off = estimate(arch, base).activations
    whole = estimate(arch, replace(base, gradient_checkpointing=True)).activations
    sac = replace(base, gradient_checkpointing=True, checkpointing_policy="selective")
    assert whole < estimate(arch, sac).activations < off
    # selective runs k, o and up again (every second matmul of a Llama layer), full the whole forward pass
    assert 0.3 < selective_recompute(arch) / arch.active_parameters < 0.5
    plain, whole = flops_per_token(arch, base), flops_per_token(arch, replace(base, gradient_checkpointing=True))
    assert plain < flops_per_token(arch, sac) < whole
    assert flops_per_token(arch, sac) - plain == 2 * selective_recompute(arch)


def test_asked_for_selective_the_plan_says_so_and_is_faster_than_full():
    sac, whole = planned(full("selective").spec, H100), planned(full("full").spec, H100)
    assert sac.feasible and whole.feasible, (sac.reason, whole.reason)
    assert sac.gradient_checkpointing and sac.checkpointing_policy == "selective"
    assert whole.gradient_checkpointing and whole.checkpointing_policy == "full"
    assert sac.memory.activations > whole.memory.activations
    assert sac.estimated_step_seconds < whole.estimated_step_seconds
    assert any(r.startswith("Gradient checkpointing selective, as spec.parallelism.activationCheckpointing asks")
               for r in sac.reasons)  # fmt: skip
    assert sac.to_json()["checkpointingPolicy"] == "selective"


def test_auto_takes_selective_where_it_fits_and_is_faster_than_full():
    auto, sac, whole = (planned(full(c).spec, H100) for c in (None, "selective", "full"))
    assert auto.checkpointing_policy == "selective"  # no checkpointing does not fit 8,192 tokens here
    assert auto.estimated_step_seconds == sac.estimated_step_seconds < whole.estimated_step_seconds
    assert any(
        r.startswith("Gradient checkpointing selective: without it activations would need") for r in auto.reasons
    )


def test_auto_never_checkpoints_lora_selectively():
    lora = parse(finetune(**LLAMA_8B, **{"resources.queue": DELETE, "resources.maxGPUs": 1})).spec
    result = planned(lora, H100)
    assert result.feasible and result.checkpointing_policy in ("full", "")


def test_the_contract_carries_the_policy():
    job = full("selective")
    result = planned(job.spec, H100)
    compute = finetune_contract(job, result).compute
    assert compute.gradient_checkpointing and compute.checkpointing_policy == "selective"


def test_refused_with_the_alternatives_when_it_cannot_fit():
    """Selective checkpointing of 8,192-token sequences of Llama-3.1-8B under FSDP on 8 A100-40GB, no Ulysses: the kept
    outputs do not fit; the planner's own choice (full checkpointing) is offered, as it does."""
    a100_40 = cluster(("NVIDIA-A100-SXM4-40GB", 8, 1))
    no_ulysses = {"parallelism.sequenceParallel": False}
    result = planned(full("selective", **no_ulysses).spec, a100_40)
    assert not result.feasible, result.reason
    assert "parallelism.activationCheckpointing: auto" in [a.change for a in result.alternatives], result.alternatives
    assert planned(full(**no_ulysses).spec, a100_40).feasible
