"""The training runtime on CPU: LoRA and full fine-tuning, DDP with torchrun, resume, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubeforge.runtime import export, train
from kubeforge.runtime.contract import EXIT_USER_ERROR
from kubeforge.runtime.engines.loading import load_whole
from tests.runtime.conftest import make_contract

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "tests" / "assets" / "losses" / "full-tiny-30.json"


def run_inline(contract, tmp_path) -> tuple[int, dict]:
    config, term = tmp_path / "contract.json", tmp_path / "termination.json"
    config.write_text(contract.to_json())
    code = train.main(["--config", str(config), "--termination-log", str(term)])
    return code, json.loads(term.read_text())


def run_torchrun(contract, tmp_path, nproc: int, logs: list | None = None) -> tuple[int, dict]:
    config, term = tmp_path / "contract.json", tmp_path / "termination.json"
    config.write_text(contract.to_json())
    env = dict(os.environ, KUBEFORGE_TERMINATION_LOG=str(term), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "kubeforge.runtime.train", "--config", str(config)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert term.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    if logs is not None:
        logs.append(result.stdout + result.stderr)
    return result.returncode, json.loads(term.read_text())


def losses(out: Path) -> list[float]:
    return json.loads((out / export.MANIFEST).read_text())["losses"]


def test_lora_trains_exports_and_verifies(tiny_model, task_data, tmp_path):
    out = tmp_path / "out"
    code, summary = run_inline(make_contract(tiny_model, task_data[0], out, method="lora", steps=30), tmp_path)
    assert code == 0, summary
    assert summary["status"] == "succeeded" and summary["uri"] == str(out)
    curve = losses(out)
    assert len(curve) == 30 and curve[-1] < curve[0] * 0.8
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["method"] == "lora" and manifest["merged"] is True
    assert manifest["dataset"]["digest"].startswith("sha256:")
    assert {f["path"] for f in manifest["files"]} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert export.verify(out) == []
    assert summary["digest"] == export.digest(out)
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    assert export.verify(out) == ["config.json: content differs from the manifest"]


def test_lora_without_merge_keeps_the_adapter(tiny_model, task_data, tmp_path):
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method="lora", steps=3)
    contract = contract.model_copy(update={"output": contract.output.model_copy(update={"merge": False})})
    code, _ = run_inline(contract, tmp_path)
    assert code == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "out" / export.MANIFEST).read_text())["merged"] is False


def test_full_fine_tuning_follows_the_recorded_loss_curve(tiny_model, task_data, tmp_path):
    out = tmp_path / "out"
    code, _ = run_inline(make_contract(tiny_model, task_data[0], out, method="full", steps=30, lr=1e-3), tmp_path)
    assert code == 0
    curve = losses(out)
    if os.environ.get("KUBEFORGE_RECORD_LOSSES"):
        RECORDED.parent.mkdir(parents=True, exist_ok=True)
        RECORDED.write_text(json.dumps(curve, indent=1))
    recorded = json.loads(RECORDED.read_text())
    assert curve == pytest.approx(recorded, rel=0.05, abs=0.02)
    assert curve[-1] < curve[0] * 0.7


def test_ddp_with_two_processes_matches_one_process(tiny_model, task_data, tmp_path):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir()
    ddp_dir.mkdir()
    one = make_contract(
        tiny_model, task_data[0], single_dir / "out", method="full", steps=8, lr=1e-3, micro=4, accumulation=2
    )
    code, _ = run_inline(one, single_dir)
    assert code == 0
    two = make_contract(tiny_model, task_data[0], ddp_dir / "out", method="full", steps=8, lr=1e-3, micro=4,
                        accumulation=1, world=2)  # fmt: skip
    code, summary = run_torchrun(two, ddp_dir, 2)
    assert code == 0, summary
    # the same global batch (8) split over 2 ranks instead of 2 micro-batches: the same updates
    assert losses(ddp_dir / "out") == pytest.approx(losses(single_dir / "out"), abs=2e-3)


def test_resume_continues_the_step_count_and_the_loss(tiny_model, task_data, tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()

    def contract(folder, steps):
        return make_contract(tiny_model, task_data[0], folder / "out", method="full", steps=steps, lr=1e-3, every=6,
                             scheduler="constant")  # fmt: skip

    assert run_inline(contract(straight_dir, 12), straight_dir)[0] == 0
    assert run_inline(contract(resumed_dir, 6), resumed_dir)[0] == 0
    assert (resumed_dir / "out" / "checkpoints" / "step-00000006" / "state.json").exists()
    # the same output, a longer run: it continues from the checkpoint at step 6, not from scratch
    code, summary = run_inline(contract(resumed_dir, 12), resumed_dir)
    assert code == 0
    resumed = losses(resumed_dir / "out")
    assert len(resumed) == 12
    assert resumed == pytest.approx(losses(straight_dir / "out"), abs=1e-4)
    assert summary["metrics"]["resumed_from_step"] == 6


def test_bad_data_fails_fast_with_the_line_and_a_user_error_code(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\nnot json\n'
    )
    code, summary = run_inline(make_contract(tiny_model, bad, tmp_path / "out"), tmp_path)
    assert code == EXIT_USER_ERROR
    assert f"{bad} line 2: not JSON" in summary["error"]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def full_runs(tiny_model, task_data, tmp_path_factory):
    """Full fine-tuning for 6 steps (lr 1e-3, a global batch of 8), each run made once in this module and read by
    every test that compares with it: ``full_runs("single", schedule)`` is one process (4 x 2 accumulation),
    ``full_runs(strategy, schedule)`` 2 processes under torchrun (4 each, checkpoints every 3).
    Returns (output folder, termination summary, log)."""
    made: dict[tuple[str, str], tuple[Path, dict, str]] = {}

    def run(strategy: str, scheduler: str) -> tuple[Path, dict, str]:
        if (strategy, scheduler) not in made:
            folder = tmp_path_factory.mktemp(f"{strategy}-{scheduler}")
            settings = {"method": "full", "steps": 6, "lr": 1e-3, "micro": 4, "scheduler": scheduler}
            logs: list[str] = []
            if strategy == "single":
                contract = make_contract(tiny_model, task_data[0], folder / "out", accumulation=2, **settings)
                code, summary = run_inline(contract, folder)
                logs.append("")
            else:
                contract = make_contract(tiny_model, task_data[0], folder / "out", accumulation=1, world=2,
                                         strategy=strategy, every=3, **settings)  # fmt: skip
                code, summary = run_torchrun(contract, folder, 2, logs)
            assert code == 0, (summary, logs[0][-4000:])
            made[strategy, scheduler] = (folder / "out", summary, logs[0])
        return made[strategy, scheduler]

    return run


# full fine-tuning on fsdp (and zero3 below) with a constant lr: the very runs the resume test continues; the
# cosine schedule on 2 processes is checked by the lora case (the same FSDPEngine optimizer and schedule) and zero2
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp2_really_shards_and_matches_one_process(tiny_model, task_data, tmp_path, method, full_runs):
    if method == "full":
        single_out = full_runs("single", "constant")[0]
        fsdp_out, summary, log = full_runs("fsdp", "constant")
    else:
        single_dir, fsdp_dir = tmp_path / "single", tmp_path / "fsdp"
        single_dir.mkdir()
        fsdp_dir.mkdir()
        one = make_contract(tiny_model, task_data[0], single_dir / "out", method=method, steps=6, lr=3e-3, micro=4,
                            accumulation=2)  # fmt: skip
        assert run_inline(one, single_dir)[0] == 0
        two = make_contract(tiny_model, task_data[0], fsdp_dir / "out", method=method, steps=6, lr=3e-3, micro=4,
                            accumulation=1, world=2, strategy="fsdp", every=3)  # fmt: skip
        logs: list[str] = []
        code, summary = run_torchrun(two, fsdp_dir, 2, logs)
        assert code == 0, logs[0][-3000:]
        single_out, fsdp_out, log = single_dir / "out", fsdp_dir / "out", logs[0]
    assert "this rank holds 5" in log or "this rank holds 4" in log, log[-2000:]  # about half each
    assert losses(fsdp_out) == pytest.approx(losses(single_out), abs=2e-3)
    assert export.verify(fsdp_out) == []
    assert summary["digest"] == export.digest(fsdp_out)


@pytest.mark.parametrize(("strategy", "scheduler"), [("zero2", "cosine"), ("zero3", "constant")])
def test_deepspeed_zero_with_two_processes_matches_one_process(strategy, scheduler, full_runs):
    """zero2 with the cosine schedule (DeepSpeed steps the one it was given, the same for every stage); zero3 with
    a constant lr: the run the resume test continues."""
    single_out = full_runs("single", scheduler)[0]
    ds_out = full_runs(strategy, scheduler)[0]
    assert losses(ds_out) == pytest.approx(losses(single_out), abs=5e-3)
    assert export.verify(ds_out) == []
    assert (ds_out / "checkpoints").is_dir()


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_checkpoints_resume_exactly(tiny_model, task_data, tmp_path, strategy, full_runs):
    """Stopped at step 3 and resumed: the same losses as the straight 6-step run (the one the tests above compare
    with one process)."""

    def contract(steps):
        return make_contract(tiny_model, task_data[0], tmp_path / "out", method="full", steps=steps, lr=1e-3,
                             micro=4, accumulation=1, world=2, strategy=strategy, every=3,
                             scheduler="constant")  # fmt: skip

    straight = full_runs(strategy, "constant")[0]
    assert run_torchrun(contract(3), tmp_path, 2)[0] == 0
    logs: list[str] = []
    code, _ = run_torchrun(contract(6), tmp_path, 2, logs)
    assert code == 0
    assert "resuming from" in logs[0] and "at step 3" in logs[0]
    assert losses(tmp_path / "out") == pytest.approx(losses(straight), abs=1e-4)


def test_deepspeed_runs_in_one_process_with_lora(tiny_model, task_data, tmp_path):
    """A single-GPU ZeRO plan (e.g. zero3-offload on one card) starts without torchrun's environment too."""
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method="lora", steps=4, strategy="zero2")
    code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    assert export.verify(tmp_path / "out") == []
    curve = losses(tmp_path / "out")
    assert len(curve) == 4 and curve[-1] < curve[0]


def test_qlora_trains_4bit_weights_on_cpu_and_exports_full_precision(tiny_model, task_data, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method="qlora", steps=20)
    model = load_whole(contract, tiny_model, torch.device("cpu"))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    assert not any(m.weight.requires_grad for m in quantized)  # only the adapters train

    code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    curve = losses(tmp_path / "out")
    assert curve[-1] < curve[0] * 0.8
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config  # the adapter merged into the full-precision base
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    out = reloaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
