"""Selective activation checkpointing (runtime/selective.py): the same gradients as no checkpointing, fewer
bytes kept than none and more than full checkpointing (memory.Activations counts them:
tests/planner/test_activations.py), and a plan the runtime trains and refuses where it does not apply."""

from __future__ import annotations

import pytest
import torch

from kubeforge.runtime import engines, selective
from kubeforge.runtime.contract import ComputeConfig
from kubeforge.runtime.entry import UserError
from tests.runtime.conftest import make_contract
from tests.runtime.test_train import losses, run_inline


def _model(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config).to(torch.bfloat16).train()


def _gradients_and_kept(policy: str | None) -> tuple[dict[str, torch.Tensor], int]:
    """Every parameter's gradient after one forward and backward pass, and the bytes the forward pass left
    allocated (the kept activations, the logits and the loss)."""
    from torch.profiler import ProfilerActivity, profile

    model = _model()
    if policy:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=selective.checkpoint_kwargs(policy))
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(input_ids=ids, labels=ids, use_cache=False)
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, kept


def test_selective_recomputes_exactly_what_no_checkpointing_computes():
    plain, kept_none = _gradients_and_kept(None)
    full, kept_full = _gradients_and_kept("full")
    sac, kept_sac = _gradients_and_kept("selective")
    for name, grad in plain.items():
        assert torch.equal(sac[name], grad), name  # the recomputed norms, rotary and SwiGLU are the same ops
        assert torch.equal(full[name], grad), name
    assert kept_full < kept_sac < kept_none, (kept_full, kept_sac, kept_none)


def _contract(tiny_model, task_data, tmp_path, method: str, policy: str, strategy: str = "ddp"):
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method=method, strategy=strategy, steps=8,
                             lr=1e-3)  # fmt: skip
    compute = contract.compute.model_copy(update={"gradient_checkpointing": True, "checkpointing_policy": policy})
    return contract.model_copy(update={"compute": compute})


def test_a_selective_plan_trains(tiny_model, task_data, tmp_path):
    contract = _contract(tiny_model, task_data, tmp_path, "full", "selective")
    code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    curve = losses(tmp_path / "out")
    assert curve[-1] < curve[0]


@pytest.mark.parametrize(
    ("method", "strategy", "message"),
    [
        ("lora", "ddp", "compute.checkpointing_policy selective serves method full only: with lora each adapter"),
        ("full", "megatron", "compute.checkpointing_policy selective: strategy megatron (megatron-core)"),
    ],
)
def test_refused_where_it_does_not_apply(tiny_model, task_data, tmp_path, method, strategy, message):
    contract = _contract(tiny_model, task_data, tmp_path, method, "selective", strategy)
    cuda = ComputeConfig(**{**contract.compute.model_dump(), "device": "cuda", "precision": "bf16"})
    contract = contract.model_copy(update={"compute": cuda})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engines.check(contract, cuda=True)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_selective_under_sharding_engines(tiny_model, task_data, tmp_path, strategy):
    """FSDP2 gathers each layer's shards again for the recomputation, DeepSpeed ZeRO-3 its partitions: both
    inside the selective contexts (their collectives are recomputed, not kept)."""
    from tests.runtime.test_train import run_torchrun

    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method="full", strategy=strategy, steps=4,
                             world=2, micro=4, accumulation=1, lr=1e-3)  # fmt: skip
    compute = contract.compute.model_copy(update={"gradient_checkpointing": True, "checkpointing_policy": "selective"})
    code, summary = run_torchrun(contract.model_copy(update={"compute": compute}), tmp_path, 2)
    assert code == 0, summary
    curve = losses(tmp_path / "out")
    assert len(curve) == 4 and curve[-1] < curve[0]


def test_selective_with_ulysses_trains_like_one_process(tiny_model, task_data, tmp_path):
    """Two ranks splitting each sequence (Ulysses' all-to-alls inside the checkpointed layers, recomputed) train
    the same model as one process without checkpointing."""
    from tests.runtime.test_ulysses_training import single_and_split

    single, split, _ = single_and_split(tiny_model, task_data, tmp_path, "fsdp", steps=4,
                                        gradient_checkpointing=True, checkpointing_policy="selective")  # fmt: skip
    assert split == pytest.approx(single, abs=2e-3)
