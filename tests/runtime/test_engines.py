"""Engines: plans the runtime cannot honour are refused before any weights load; fp8 really is float8."""

from __future__ import annotations

import json

import pytest
import torch

from kubeforge.runtime import engines, export
from kubeforge.runtime.contract import EXIT_USER_ERROR, ComputeConfig
from kubeforge.runtime.engines import Dist, Setup
from kubeforge.runtime.entry import UserError
from tests.runtime.conftest import make_contract
from tests.runtime.test_train import losses, run_inline


def contract_for(tiny_model, task_data, tmp_path, *, method="full", strategy="ddp", precision="fp32", device="cpu",
                 host=0, master="fp32"):  # fmt: skip
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method=method, strategy=strategy, steps=10,
                             lr=1e-3)  # fmt: skip
    compute = ComputeConfig(device=device, precision=precision, host_memory_bytes=host, master_weights=master)
    return contract.model_copy(update={"compute": compute})


REFUSED = [
    ({"strategy": "megatron", "precision": "bf16"}, "parallel.strategy megatron needs CUDA GPUs"),
    ({"strategy": "zero2", "precision": "fp8"}, "compute.precision fp8: strategy zero2 (deepspeed) cannot train in it"),
    ({"strategy": "megatron", "precision": "fp32", "device": "cuda"}, "compute.device cuda: the plan needs a CUDA"),
    ({"method": "lora", "precision": "fp8"}, "compute.precision fp8 trains training.method full only"),
    ({"strategy": "zero3-offload", "host": 2**50}, "compute.hostMemoryBytes: the plan offloads 1048576.0 GiB"),
    ({"strategy": "fsdp-offload", "host": 2**50}, "compute.hostMemoryBytes: the plan offloads 1048576.0 GiB"),
    ({"master": "bf16"}, "compute.master_weights bf16 (pure bf16) needs bf16 compute, not precision fp32"),
    (
        {"master": "bf16", "precision": "bf16", "strategy": "zero2-offload-optimizer"},
        "compute.master_weights bf16 (pure bf16): strategy zero2-offload-optimizer keeps fp32 master weights",
    ),
]


@pytest.mark.parametrize(("change", "message"), REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_plans_the_runtime_cannot_honour_are_refused_with_the_field(tiny_model, task_data, tmp_path, change, message):
    contract = contract_for(tiny_model, task_data, tmp_path, **change)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engines.check(contract, cuda=False)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fsdp_offload_is_a_plan_the_runtime_honours(tiny_model, task_data, tmp_path, method):
    """FSDP2 with CPUOffloadPolicy trains every method (QLoRA's NF4Tensor shards move to the GPU in 4 bits;
    tests/runtime/test_fsdp_offload.py runs them)."""
    pytest.importorskip("torchao")
    contract = contract_for(tiny_model, task_data, tmp_path, method=method, strategy="fsdp-offload", host=2**20)
    engines.check(contract, cuda=False, host_memory_bytes=2**30)


def test_a_refused_plan_exits_3_before_loading_weights(tiny_model, task_data, tmp_path, monkeypatch):
    from kubeforge.runtime.engines import loading

    loaded = []
    monkeypatch.setattr(loading, "load_whole", lambda *a, **k: loaded.append(a))
    code, summary = run_inline(contract_for(tiny_model, task_data, tmp_path, strategy="zero2", precision="fp8"),
                               tmp_path)  # fmt: skip
    assert code == EXIT_USER_ERROR and "cannot train in it" in summary["error"] and loaded == []


def test_fp8_trains_with_float8_matmuls_and_exports_plain_weights(tiny_model, task_data, tmp_path):
    pytest.importorskip("torchao")
    contract = contract_for(tiny_model, task_data, tmp_path, precision="fp8")
    engine = engines.build(Setup(contract, Dist(0, 1, 0), torch.device("cpu"), tiny_model, total_steps=10))
    swapped = [name for name, m in engine.model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert swapped and not any(name.endswith("lm_head") for name in swapped)
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())  # fp32 masters, float8 matmuls

    code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    curve = losses(tmp_path / "out")
    assert curve[-1] < curve[0]
    assert export.verify(tmp_path / "out") == []
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_pure_bf16_trains_bf16_weights_with_bf16_moments(tiny_model, task_data, tmp_path):
    """compute.master_weights bf16: no fp32 copy anywhere, AdamW's moments take the weights' dtype, the loss
    still falls (tests/runtime/test_precision_policy.py counts the bytes under each engine)."""
    contract = contract_for(tiny_model, task_data, tmp_path, precision="bf16", master="bf16")
    engine = engines.build(Setup(contract, Dist(0, 1, 0), torch.device("cpu"), tiny_model, total_steps=10))
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    curve = losses(tmp_path / "out")
    assert curve[-1] < curve[0]
    assert export.verify(tmp_path / "out") == []
