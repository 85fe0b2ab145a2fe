"""Quantization with llm-compressor on CPU: FP8 and GPTQ on the tiny model, the evaluation gate (the output is
staged and promoted only when it passes), refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeforge.runtime import export, quantize
from kubeforge.runtime.contract import (
    EXIT_USER_ERROR as USER_ERROR,
)
from kubeforge.runtime.contract import (
    CalibrationConfig,
    ComputeConfig,
    EvaluationConfig,
    JobIdentity,
    Location,
    QuantizeContract,
    QuantizeOutputConfig,
)

pytest.importorskip("llmcompressor", reason="llm-compressor is not installed (the quantize extra)")


def here(path: Path) -> Location:
    return Location(uri=str(path), local_path=str(path))


def contract(model: Path, out: Path, method: str, data: tuple[Path, Path], *, gate: float | None = None,
             metric: str = "perplexity") -> QuantizeContract:  # fmt: skip
    return QuantizeContract(
        job=JobIdentity(name="q", kind="QuantizeJob"),
        source=here(model),
        method=method,
        calibration=None
        if method == "fp8"
        else CalibrationConfig(location=here(data[0]), samples=32, max_seq_length=64),
        evaluation=None
        if gate is None
        else EvaluationConfig(location=here(data[1]), metric=metric, max_degradation=gate, max_seq_length=64),
        output=QuantizeOutputConfig(location=here(out)),
        compute=ComputeConfig(device="cpu", precision="fp32"),
    )


def earlier_artifact(out: Path) -> dict[str, bytes]:
    """A good artifact already at the output (two shards, so a leftover shard would show), and its bytes."""
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"earlier": true}')
    for k in (1, 2):
        (out / f"model-0000{k}-of-00002.safetensors").write_bytes(bytes([k]) * 1024)
    export.write_manifest(out, {"method": "earlier"})
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def run(c: QuantizeContract, tmp_path: Path) -> tuple[int, dict]:
    config, term = tmp_path / "q.json", tmp_path / "term.json"
    config.write_text(c.to_json())
    code = quantize.main(["--config", str(config), "--termination-log", str(term)])
    return code, json.loads(term.read_text())


def reload_and_generate(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_fp8_dynamic_writes_compressed_tensors_and_reloads(tiny_model, task_data, tmp_path):
    out = tmp_path / "fp8"
    earlier_artifact(out)
    code, summary = run(contract(tiny_model, out, "fp8", task_data, gate=0.5), tmp_path)
    assert code == 0, summary
    # the gate passed: the staged output replaced the earlier artifact as a whole, and no staging folder is left
    assert siblings(out) == ["fp8"] and not list(out.glob("model-0000*-of-00002.safetensors"))
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"]) == (8, "float")
    assert "lm_head" in q["ignore"]
    assert export.verify(out) == [] and summary["digest"] == export.digest(out)
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["quantization"]["method"] == "fp8" and manifest["method"] == "quantize:fp8"
    assert summary["metrics"]["perplexity_before"] > 0 and "perplexity_after" in summary["metrics"]
    reload_and_generate(out)


def test_gptq_w4a16_with_calibration(tiny_model_128, task_data, tmp_path):
    out = tmp_path / "gptq"
    code, summary = run(contract(tiny_model_128, out, "w4a16-gptq", task_data), tmp_path)
    assert code == 0, summary
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (4, 128)
    assert json.loads((out / export.MANIFEST).read_text())["calibration"]["samples"] == 32
    reload_and_generate(out)


def test_degradation_is_relative_for_perplexity_and_absolute_for_exact_match():
    assert quantize.degradation("perplexity", 10.0, 11.0) == pytest.approx(0.1)
    assert quantize.degradation("perplexity", 10.0, 9.0) == 0.0  # better is no loss
    assert quantize.degradation("exact-match", 0.9, 0.75) == pytest.approx(0.15)


def test_the_gate_fails_the_job_with_both_numbers(tiny_model_128, task_data, tmp_path):
    # FP8 raises this seeded model's held-out perplexity by ~0.3% (measured; on the hidden-64 model it
    # happens to lower it), so a limit of 0 must fail
    out = tmp_path / "out"
    earlier = earlier_artifact(out)
    code, summary = run(contract(tiny_model_128, out, "fp8", task_data, gate=0.0), tmp_path)
    assert code == USER_ERROR
    assert summary["error"].startswith("evaluation gate: perplexity ")
    assert "before" in summary["error"] and "after quantization" in summary["error"]
    # the earlier artifact is left as it was, and the quantized output that failed is gone
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == earlier
    assert export.verify(out) == [] and siblings(out) == ["out"]


def test_an_s3_output_is_staged_under_a_prefix_then_copied_in(tiny_model, task_data, tmp_path, s3_env):
    from kubeforge.runtime import fetch

    s3_env.make_bucket("q-out")
    earlier = tmp_path / "earlier"
    earlier_artifact(earlier)
    export.publish(earlier, "s3://q-out/bot-fp8", {})
    c = contract(tiny_model, tmp_path / "unused", "fp8", task_data)
    c = c.model_copy(update={"output": QuantizeOutputConfig(location=Location(uri="s3://q-out/bot-fp8"))})
    code, summary = run(c, tmp_path)
    assert code == 0, summary
    assert not [o.object_name for o in s3_env.list_objects("q-out", prefix="bot-fp8.staging-", recursive=True)]
    back = fetch.download_s3("s3://q-out/bot-fp8", tmp_path / "back")
    assert export.verify(back) == [] and export.digest(back) == summary["digest"]
    assert export.read_manifest(back)["quantization"]["method"] == "fp8"


def test_the_staging_tag_is_the_jobs():
    assert quantize.staging_tag(JobIdentity(name="q", uid="1a2b3c4d-5e6f-0000-0000-000000000000")) == "1a2b3c4d"
    assert quantize.staging_tag(JobIdentity(name="my.job")) == "my-job"


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("w4a16-gptq", "groups of 128, but this model's hidden_size=64"),
        ("w4a16-awq", "w4a16-awq needs a CUDA GPU"),
    ],
)
def test_methods_that_cannot_work_are_refused_up_front(tiny_model, task_data, tmp_path, method, message):
    code, summary = run(contract(tiny_model, tmp_path / "out", method, task_data), tmp_path)
    assert code == USER_ERROR and message in summary["error"]
    assert not (tmp_path / "out").exists()


def test_an_already_quantized_source_is_refused(tiny_model, task_data, tmp_path):
    first = tmp_path / "fp8"
    assert run(contract(tiny_model, first, "fp8", task_data), tmp_path)[0] == 0
    code, summary = run(contract(first, tmp_path / "again", "fp8", task_data), tmp_path)
    assert code == USER_ERROR and "already quantized (compressed-tensors)" in summary["error"]
    code, summary = run(contract(tiny_model, tiny_model, "fp8", task_data), tmp_path)  # it would replace its source
    assert code == USER_ERROR and "is the source itself" in summary["error"]
    assert (tiny_model / "config.json").exists()
