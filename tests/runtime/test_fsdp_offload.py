"""fsdp-offload: FSDP2 with CPUOffloadPolicy (shards, gradients and AdamW's moments in host memory).

On CPU (gloo, 2 processes) the offload moves nothing, but every step of its code path runs: the policy passed to
fully_shard, the shards materialised on the host (unpinned: pinning needs an accelerator), a gradient
reduce-scatter every micro-batch, torch's fused CPU AdamW over the DTensor shards. Full fine-tuning and QLoRA
(torchao NF4Tensor base) train, resume and export like plain fsdp; the probe (this module under torchrun:
``python -m tests.runtime.test_fsdp_offload CONTRACT OUT``) reads what FSDP2 itself was told.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubeforge.runtime import export
from kubeforge.runtime.contract import ComputeConfig
from kubeforge.runtime.demo import task, tiny
from tests.runtime.conftest import make_contract
from tests.runtime.test_train import losses, run_inline, run_torchrun

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
LAYERS = 2


@pytest.fixture(scope="module")
def model_256(tmp_path_factory) -> Path:
    """hidden 256: each rank's share of every linear weight is a whole number of NF4 scaler blocks."""
    return tiny.make_model(tmp_path_factory.mktemp("m256") / "m", task.words(), hidden=256, layers=LAYERS, heads=4)


def offload_contract(model: Path, data: Path, out: Path, *, method: str, steps: int, every: int | None = None,
                     merge: bool = True, world: int = WORLD, accumulation: int = 1,
                     precision: str = "fp32"):  # fmt: skip
    contract = make_contract(model, data, out, method=method, strategy="fsdp-offload", world=world, steps=steps,
                             micro=4, accumulation=accumulation, lr=3e-3 if method != "full" else 1e-3, every=every,
                             scheduler="constant")  # fmt: skip
    output = contract.output.model_copy(update={"merge": merge})
    return contract.model_copy(update={"compute": ComputeConfig(device="cpu", precision=precision), "output": output})


def straight_run(model: Path, data: Path, folder: Path, method: str) -> tuple[Path, str]:
    logs: list[str] = []
    contract = offload_contract(model, data, folder / "out", method=method, steps=6, every=3, accumulation=2)
    code, _ = run_torchrun(contract, folder, WORLD, logs)
    assert code == 0, logs[0][-4000:]
    return folder / "out", logs[0]


@pytest.fixture(scope="module")
def full_straight(model_256, task_data, tmp_path_factory) -> tuple[Path, str]:
    return straight_run(model_256, task_data[0], tmp_path_factory.mktemp("full"), "full")


@pytest.fixture(scope="module")
def qlora_straight(model_256, task_data, tmp_path_factory) -> tuple[Path, str]:
    pytest.importorskip("torchao")
    return straight_run(model_256, task_data[0], tmp_path_factory.mktemp("qlora"), "qlora")


def test_full_fine_tuning_trains_offloaded_and_exports_a_whole_model(full_straight):
    out, log = full_straight
    assert "fsdp-offload: 2 layers sharded; this rank holds 50% of the parameters in host memory" in log, log[-3000:]
    curve = losses(out)
    assert len(curve) == 6 and curve[-1] < curve[0] * 0.9, curve
    assert export.verify(out) == []

    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    generated = reloaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)


def test_full_fine_tuning_offloaded_resumes_where_the_straight_run_went(model_256, task_data, full_straight, tmp_path):
    contract = offload_contract(model_256, task_data[0], tmp_path / "out", method="full", steps=3, every=3,
                                accumulation=2)  # fmt: skip
    assert run_torchrun(contract, tmp_path, WORLD)[0] == 0
    (tmp_path / "termination.json").unlink()
    logs: list[str] = []
    contract = offload_contract(model_256, task_data[0], tmp_path / "out", method="full", steps=6, every=3,
                                accumulation=2)  # fmt: skip
    code, _ = run_torchrun(contract, tmp_path, WORLD, logs)
    assert code == 0, logs[0][-4000:]
    assert "resuming from" in logs[0] and "at step 3" in logs[0]
    assert losses(tmp_path / "out") == pytest.approx(losses(full_straight[0]), abs=1e-4)


def test_qlora_trains_offloaded_on_a_sharded_nf4_base_and_exports_a_merged_model(qlora_straight):
    out, log = qlora_straight
    assert f"{LAYERS * 7} base weights in NF4" in log and "in host memory" in log, log[-3000:]
    curve = losses(out)
    assert len(curve) == 6 and curve[-1] < curve[0] * 0.8, curve
    assert export.verify(out) == []
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_qlora_offloaded_resumes_from_adapter_only_checkpoints(model_256, task_data, qlora_straight, tmp_path):
    contract = offload_contract(model_256, task_data[0], tmp_path / "out", method="qlora", steps=3, every=3,
                                accumulation=2, merge=False)  # fmt: skip
    assert run_torchrun(contract, tmp_path, WORLD)[0] == 0
    (tmp_path / "termination.json").unlink()
    logs: list[str] = []
    contract = offload_contract(model_256, task_data[0], tmp_path / "out", method="qlora", steps=6, every=3,
                                accumulation=2, merge=False)  # fmt: skip
    code, _ = run_torchrun(contract, tmp_path, WORLD, logs)
    assert code == 0, logs[0][-4000:]
    assert "resuming from" in logs[0] and "at step 3" in logs[0]
    assert losses(tmp_path / "out") == pytest.approx(losses(qlora_straight[0]), abs=1e-4)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_alone_on_one_device_it_still_shards_and_offloads(model_256, task_data, tmp_path, caplog):
    """Plain fsdp on one device is DDP's whole model; fsdp-offload keeps FSDP2 (a one-rank mesh) so that its
    parameters live in host memory, as the plan counted them."""
    contract = offload_contract(model_256, task_data[0], tmp_path / "out", method="lora", steps=2, world=1)
    with caplog.at_level("INFO", logger="kubeforge.train"):
        code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    assert "fsdp-offload: 2 layers sharded; this rank holds 100% of the parameters in host memory" in caplog.text
    assert len(losses(tmp_path / "out")) == 2


@pytest.fixture(scope="module")
def probed(model_256, task_data, tmp_path_factory) -> list[dict]:
    pytest.importorskip("torchao")
    folder = tmp_path_factory.mktemp("probe")
    contract = offload_contract(model_256, task_data[0], folder / "out", method="qlora", steps=1, precision="bf16",
                                accumulation=2)  # fmt: skip
    config = folder / "contract.json"
    config.write_text(contract.to_json())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "tests.runtime.test_fsdp_offload", str(config), str(folder / "measured")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((folder / "measured" / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_fsdp2_is_told_to_offload_every_sharded_module_without_pinning_on_cpu(probed):
    for rank in probed:
        assert rank["modules"] == LAYERS + 1  # each decoder layer and the root
        assert rank["offloaded_params"] == rank["params"] > 0
        assert rank["pinned_params"] == 0
        assert rank["shards_on"] == ["cpu"]


def test_the_optimizer_is_torchs_fused_cpu_adamw_and_gradients_reach_the_shards_every_micro_batch(probed):
    for rank in probed:
        assert rank["fused"] is True
        assert rank["loss_finite"] and rank["nf4_weights"] == LAYERS * 7
        # one step of 2 micro-batches: the sharded gradients were reduce-scattered each time (not held unsharded)
        assert rank["syncs"] == [True, True]
        assert rank["moved"] > 0  # the adapters moved


# ---- the probe: python -m tests.runtime.test_fsdp_offload CONTRACT OUT_DIR (under torchrun) ----


def probe(config: Path, out: Path) -> None:
    import math

    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    from kubeforge.runtime.contract import load
    from kubeforge.runtime.engines import Setup, build, nf4
    from kubeforge.runtime.train import _dist_env, _init_process_group

    contract = load(config)
    dist = _dist_env()
    device = torch.device("cpu")
    _init_process_group(dist, device)
    engine = build(Setup(contract, dist, device, Path(contract.model.local_path), total_steps=1))
    result: dict = {"modules": 0, "params": 0, "offloaded_params": 0, "pinned_params": 0, "shards_on": set()}
    for module in engine.model.modules():
        if not isinstance(module, FSDPModule):
            continue
        result["modules"] += 1
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        offloaded = isinstance(group.offload_policy, CPUOffloadPolicy)
        for fsdp_param in group.fsdp_params:
            result["params"] += 1
            result["offloaded_params"] += int(offloaded and fsdp_param.offload_to_cpu)
            result["pinned_params"] += int(fsdp_param.pin_memory)
            result["shards_on"].add(fsdp_param.sharded_param.device.type)
    result["shards_on"] = sorted(result["shards_on"])
    result["fused"] = bool(engine.optimizer.defaults.get("fused"))
    result["nf4_weights"] = sum(1 for p in engine.model.parameters() if nf4.is_nf4(getattr(p, "_local_tensor", p)))

    syncs: list[bool] = []
    original = engine.module.set_requires_gradient_sync

    def recorded(flag: bool, *args, **kwargs):
        syncs.append(flag)
        return original(flag, *args, **kwargs)

    engine.module.set_requires_gradient_sync = recorded
    before = [p.detach().to_local().clone() for p in engine.params]
    generator = torch.Generator().manual_seed(dist.rank)
    batches = []
    for _ in range(contract.training.gradient_accumulation_steps):
        ids = torch.randint(0, engine.model.config.vocab_size, (2, 16), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    loss = engine.train_step(batches)
    after = [p.detach().to_local() for p in engine.params]
    result["moved"] = sum(float((a - b).abs().sum()) for a, b in zip(after, before, strict=True))
    result["syncs"] = syncs
    result["loss_finite"] = math.isfinite(float(loss))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    probe(Path(sys.argv[1]), Path(sys.argv[2]))
