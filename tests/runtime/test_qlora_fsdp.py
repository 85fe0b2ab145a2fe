"""QLoRA under FSDP2: the NF4 base (torchao's NF4Tensor) is sharded, trains, resumes and exports.

Every case runs 2 CPU processes (gloo) on a generated Llama-architecture model whose hidden size (256)
lets each rank's share of every linear weight be a whole number of NF4 scaler blocks (64 x 256).
The probe (this module run under torchrun: ``python -m tests.runtime.test_qlora_fsdp CONTRACT OUT``)
builds the FSDP engine, counts the bytes each rank really holds for its NF4 shards, gathers each
weight back, and compares the model's logits before training with two references: the same model
with every linear weight quantized whole by torchao and dequantized (dense), and bitsandbytes' NF4
(what QLoRA runs on DDP and ZeRO).
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
from tests.runtime.test_train import losses, run_torchrun

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
LAYERS = 2
NF4_PER_LAYER = 7  # q, k, v, o, gate, up, down

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def model_256(tmp_path_factory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("m256") / "m", task.words(), hidden=256, layers=LAYERS, heads=4)


def qlora_fsdp(model: Path, data: Path, out: Path, *, steps: int, merge: bool = True, precision: str = "fp32",
               every: int | None = None):  # fmt: skip
    contract = make_contract(model, data, out, method="qlora", strategy="fsdp", world=WORLD, steps=steps, micro=4,
                             accumulation=1, lr=3e-3, every=every, scheduler="constant")  # fmt: skip
    output = contract.output.model_copy(update={"merge": merge})
    return contract.model_copy(update={"compute": ComputeConfig(device="cpu", precision=precision), "output": output})


@pytest.fixture(scope="module")
def straight(model_256, task_data, tmp_path_factory) -> tuple[Path, str]:
    """Six steps in one go, checkpointing every 3, merged export."""
    folder = tmp_path_factory.mktemp("straight")
    logs: list[str] = []
    code, _ = run_torchrun(qlora_fsdp(model_256, task_data[0], folder / "out", steps=6, every=3), folder, WORLD, logs)
    assert code == 0, logs[0][-4000:]
    return folder / "out", logs[0]


def test_qlora_trains_on_a_sharded_nf4_base_and_exports_a_merged_model(straight):
    out, log = straight
    assert f"{LAYERS * NF4_PER_LAYER} base weights in NF4" in log and "this rank holds 50%" in log, log[-3000:]
    curve = losses(out)
    assert len(curve) == 6 and curve[-1] < curve[0] * 0.8, curve
    assert export.verify(out) == []
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # the adapters merged into the full-precision base

    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    generated = reloaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)


def test_qlora_fsdp_resumes_from_adapter_only_checkpoints_and_exports_the_adapter(model_256, task_data, straight,
                                                                                tmp_path):  # fmt: skip
    """The checkpoints hold the adapters and their optimizer states, not the frozen NF4 base (read again from the
    model folder): a run stopped at step 3 and resumed ends where the straight run ended."""
    assert run_torchrun(qlora_fsdp(model_256, task_data[0], tmp_path / "out", steps=3, every=3, merge=False),
                        tmp_path, WORLD)[0] == 0  # fmt: skip
    (tmp_path / "termination.json").unlink()
    logs: list[str] = []
    code, _ = run_torchrun(qlora_fsdp(model_256, task_data[0], tmp_path / "out", steps=6, every=3, merge=False),
                           tmp_path, WORLD, logs)  # fmt: skip
    assert code == 0, logs[0][-4000:]
    assert "resuming from" in logs[0] and "at step 3" in logs[0]
    assert losses(tmp_path / "out") == pytest.approx(losses(straight[0]), abs=1e-4)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "out"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(model_256)
    tuned = PeftModel.from_pretrained(base, adapter)
    b = [p for n, p in tuned.named_parameters() if ".lora_B." in n]
    assert b and any(float(p.abs().max()) > 0 for p in b)  # trained (B starts at zero)
    merged = AutoModelForCausalLM.from_pretrained(straight[0])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # the adapter on the base is the straight run's merged model
        assert torch.allclose(tuned(ids).logits, merged(ids).logits, atol=1e-3)


@pytest.fixture(scope="module")
def probed(model_256, task_data, tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("probe")
    contract = qlora_fsdp(model_256, task_data[0], folder / "out", steps=1, precision="bf16")
    config = folder / "contract.json"
    config.write_text(contract.to_json())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "tests.runtime.test_qlora_fsdp", str(config), str(folder / "measured")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((folder / "measured" / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_each_rank_holds_half_of_the_nf4_base_at_about_half_a_byte_per_weight(probed):
    whole = probed[0]["whole_nf4_bytes"]  # every weight quantized whole by torchao, on one process
    numel = probed[0]["nf4_parameters"]
    for rank in probed:
        assert rank["nf4_weights"] == LAYERS * NF4_PER_LAYER
        assert rank["nf4_local_parameters"] * WORLD == numel
        assert rank["nf4_bytes"] == pytest.approx(whole / WORLD, rel=0.01), (rank["nf4_bytes"], whole)
        per_weight = rank["nf4_bytes"] / rank["nf4_local_parameters"]
        assert 0.5 < per_weight < 0.52, per_weight  # 4 bits + an int8 scale per 64 + a factor per 16,384
        assert rank["nf4_bytes"] < 0.27 * rank["nf4_local_parameters"] * 2  # vs the same shard in bf16


def test_the_sharded_nf4_weights_are_those_of_quantizing_each_weight_whole(probed):
    """Each rank quantized only its rows; the mean of the block scales was all-reduced, so the gathered
    weight is what torchao's to_nf4 gives on the whole weight."""
    assert probed[0]["max_weight_difference"] == 0.0


def test_nf4_outputs_before_training_match_the_dequantized_reference_and_bitsandbytes(probed):
    result = probed[0]
    # the same NF4 values as dense bf16 weights: only the order of bf16 operations differs
    assert result["logits_vs_dequantized"] < 0.02 * result["logits_scale"], result
    # bitsandbytes' NF4 has the same code book and blocks but quantizes the scales differently (an 8-bit dynamic
    # map): both are within NF4's own error of the full-precision model and nearer each other than to it
    if result.get("logits_vs_bitsandbytes") is not None:
        assert result["logits_vs_bitsandbytes"] < result["logits_vs_full_precision"], result
        assert result["logits_vs_bitsandbytes"] < 0.1 * result["logits_scale"], result


def test_qlora_fsdp_needs_torchao_and_says_so(model_256, task_data, tmp_path, monkeypatch):
    from kubeforge.runtime import engines
    from kubeforge.runtime.engines import nf4
    from kubeforge.runtime.entry import UserError

    contract = qlora_fsdp(model_256, task_data[0], tmp_path / "out", steps=1)
    engines.check(contract, cuda=False)  # accepted
    monkeypatch.setattr(nf4, "available", lambda: False)
    with pytest.raises(UserError, match=r"training\.method qlora with parallel\.strategy fsdp needs torchao"):
        engines.check(contract, cuda=False)


def test_only_shapes_that_split_into_whole_scaler_blocks_per_rank_are_quantized():
    from kubeforge.runtime.engines.nf4 import eligible

    assert eligible((256, 256), 2) and eligible((4096, 4096), 8) and eligible((1024, 4096), 64)
    assert not eligible((64, 64), 2)  # 4,096 weights: less than one scaler block
    assert not eligible((255, 256), 2)  # rows do not split evenly
    assert not eligible((256,), 2)  # not a matrix


# ---- the probe: python -m tests.runtime.test_qlora_fsdp CONTRACT OUT_DIR (under torchrun) ----


def probe(config: Path, out: Path) -> None:
    import torch
    from torch.distributed.fsdp import FSDPModule

    from kubeforge.runtime.contract import load
    from kubeforge.runtime.engines import Setup, build, common, nf4, shards
    from kubeforge.runtime.engines.loading import hf_name
    from kubeforge.runtime.train import _dist_env, _init_process_group

    contract = load(config)
    dist = _dist_env()
    device = torch.device("cpu")
    _init_process_group(dist, device)
    model_dir = Path(contract.model.local_path)
    engine = build(Setup(contract, dist, device, model_dir, total_steps=1))
    ckpt = shards.Checkpoint(model_dir)
    from torchao.quantization import to_nf4

    result: dict = {"nf4_weights": 0, "nf4_bytes": 0, "nf4_parameters": 0, "nf4_local_parameters": 0,
                    "whole_nf4_bytes": 0, "max_weight_difference": 0.0}  # fmt: skip
    for name, param in engine.model.named_parameters():
        local = getattr(param, "_local_tensor", param)
        if not nf4.is_nf4(local):
            continue
        result["nf4_weights"] += 1
        result["nf4_bytes"] += nf4.storage_bytes(local)
        result["nf4_parameters"] += param.numel()
        result["nf4_local_parameters"] += local.numel()
        whole = to_nf4(ckpt.rows(hf_name(name), 0, param.shape[0]).to(local.dtype), nf4.BLOCK, nf4.SCALER_BLOCK)
        result["whole_nf4_bytes"] += nf4.storage_bytes(whole)
    ids = torch.randint(0, engine.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.model.eval()
    with torch.no_grad(), common.autocast(contract, device):
        logits = engine.module(input_ids=ids).logits.float()
    # gather each sharded NF4 weight back (FSDP2 all-gathers the 4-bit data) and compare with quantizing it whole
    for module in engine.model.modules():
        if not isinstance(module, FSDPModule) or module is engine.model:
            continue
        module.unshard()
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            if isinstance(sub, torch.nn.Linear) and nf4.is_nf4(weight):
                name = next(n for n, m in engine.model.named_modules() if m is sub) + ".weight"
                full = ckpt.rows(hf_name(name), 0, weight.shape[0]).to(weight.dtype)
                expected = to_nf4(full, nf4.BLOCK, nf4.SCALER_BLOCK).get_original_weight()
                difference = float((nf4.dequantize(weight) - expected).abs().max())
                result["max_weight_difference"] = max(result["max_weight_difference"], difference)
        module.reshard()

    if dist.main:
        result.update(references(contract, model_dir, ids, logits))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def references(contract, model_dir: Path, ids, logits) -> dict:
    """How far the sharded NF4 model's logits are from: the dense dequantized model, bitsandbytes' NF4 and the
    full-precision model (max absolute differences; logits_scale: the logits' own max magnitude)."""
    import torch
    from torchao.quantization import to_nf4
    from transformers import AutoModelForCausalLM

    from kubeforge.runtime.engines import common, nf4
    from kubeforge.runtime.engines.loading import compute_dtype, load_whole

    dtype, device = compute_dtype(contract), torch.device("cpu")

    def run(model) -> torch.Tensor:
        model.eval()
        with torch.no_grad(), common.autocast(contract, device):
            return model(input_ids=ids).logits.float()

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    full_precision = run(plain)
    with torch.no_grad():
        for name, module in plain.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                module.weight.copy_(to_nf4(module.weight, nf4.BLOCK, nf4.SCALER_BLOCK).get_original_weight())
    found = {
        "logits_scale": float(logits.abs().max()),
        "logits_vs_dequantized": float((logits - run(plain)).abs().max()),
        "logits_vs_full_precision": float((logits - full_precision).abs().max()),
        "logits_vs_bitsandbytes": None,
    }
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return found
    ddp = contract.model_copy(update={"parallel": contract.parallel.model_copy(update={"strategy": "ddp"})})
    found["logits_vs_bitsandbytes"] = float((logits - run(load_whole(ddp, model_dir, device))).abs().max())
    return found


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    probe(Path(sys.argv[1]), Path(sys.argv[2]))
