"""`python -m kubeforge.runtime.quantize --config CONTRACT`: quantize an artifact with llm-compressor.

    read the contract -> fetch the source (and check its manifest) -> check the method fits
    the model -> [evaluate before] -> one-shot quantization (calibrated for GPTQ, AWQ, int8)
    -> save in the compressed-tensors format vLLM and SGLang load natively, to a staging
    place (export.staging_folder: <output>.staging-<tag>; s3: a local folder) -> [evaluate
    the staged model after; beyond the limit, fail with both numbers and discard the staging
    output: the output location is left as it was] -> kubeforge-artifact.json -> promote to the
    output (rename; s3: a staging prefix, then a server-side copy, manifest last).

Memory: the calibrated model is freed before the staged one is loaded for the gate, so the
peak is the quantization's (planner/quantize_size.py sizes the pod from it).

Methods (llm-compressor schemes):
- fp8: FP8_DYNAMIC (per-channel FP8 weights, per-token dynamic FP8 activations; no data).
- w4a16-gptq: int4 weights in groups of 128 by GPTQ over the calibration set.
- w4a16-awq: int4 weights (asymmetric, groups of 128) with AWQ's activation-aware scales.
- w8a8-int8: SmoothQuant then GPTQ to int8 weights and dynamic per-token int8 activations.
"""

from __future__ import annotations

import gc
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from kubeforge.runtime import data, entry, evaluate, export, fetch
from kubeforge.runtime.contract import JobIdentity, QuantizeContract, load_quantize
from kubeforge.runtime.entry import UserError

log = logging.getLogger("kubeforge.quantize")
GROUP_SIZE = 128  # W4A16 groups: every quantized layer's input width must divide by it
CALIBRATED = ("w4a16-gptq", "w4a16-awq", "w8a8-int8")


def main(argv: list[str] | None = None) -> int:
    return entry.main("python -m kubeforge.runtime.quantize", argv, load_quantize, run)


def check_fit(method: str, config: dict[str, Any], device: str) -> None:
    """Refuse, before any work, what the method cannot do with this model or here."""
    if method == "w4a16-awq" and device != "cuda":
        raise UserError(
            "method w4a16-awq needs a CUDA GPU: llm-compressor 0.14's AWQ pins memory for GPU transfers "
            "during its scale search; on CPU use w4a16-gptq"
        )
    if method in ("w4a16-gptq", "w4a16-awq"):
        widths = {"hidden_size": config.get("hidden_size"), "intermediate_size": config.get("intermediate_size")}
        bad = {k: v for k, v in widths.items() if isinstance(v, int) and v % GROUP_SIZE}
        if bad:
            raise UserError(
                f"method {method} quantizes weights in groups of {GROUP_SIZE}, but this model's "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + f" is not a multiple of {GROUP_SIZE}; use method fp8 or w8a8-int8"
            )


def recipe(method: str) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head"]
    if method == "fp8":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    if method == "w4a16-gptq":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if method == "w4a16-awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=ignore)]
    if method == "w8a8-int8":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore),
        ]
    raise UserError(f"unknown quantization method {method!r}")


def calibration_dataset(contract: QuantizeContract, tokenizer: Any):
    """The calibration samples as a tokenized datasets.Dataset (prompt and completion, as trained)."""
    from datasets import Dataset

    cal = contract.calibration
    if cal is None:
        raise UserError(f"method {contract.method} needs calibration data (spec.calibration.datasetUri)")
    examples = data.read_examples(fetch.local_path(cal.location), cal.format, tokenizer)[: cal.samples]
    items = data.tokenize(examples, tokenizer, cal.max_seq_length, cal.location.uri)
    return Dataset.from_dict(
        {"input_ids": [i.input_ids for i in items], "attention_mask": [[1] * len(i.input_ids) for i in items]}
    ), min(cal.max_seq_length, max(len(i.input_ids) for i in items))


def measure(contract: QuantizeContract, model_dir: Path) -> float | None:
    """The gate's metric for the model in ``model_dir`` (loaded the way a server would)."""
    ev = contract.evaluation
    if ev is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if _cpu(contract) else "auto")
    examples = data.read_examples(fetch.local_path(ev.location), ev.format, tokenizer)[: ev.samples]
    if ev.metric == "perplexity":
        return round(evaluate.perplexity(model, tokenizer, examples, ev.max_seq_length), 4)
    return round(evaluate.exact_match(model, tokenizer, examples), 4)


def degradation(metric: str, before: float, after: float) -> float:
    """Relative perplexity increase, or absolute exact-match drop (never negative)."""
    if metric == "perplexity":
        return max(0.0, (after - before) / before)
    return max(0.0, before - after)


def _cpu(contract: QuantizeContract) -> bool:
    return contract.compute.device == "cpu"


def staging_tag(job: JobIdentity) -> str:
    """The job's own tag for its staging output: the uid's first 8 characters (the name for local runs), so a
    retried attempt finds, and clears, what an earlier one left."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", (job.uid or "")[:8] or job.name or "local")


def release_model() -> None:
    """Free the calibrated model: llm-compressor's session holds it until reset."""
    from llmcompressor.core import active_session

    active_session().reset()
    gc.collect()


def manifest_info(
    contract: QuantizeContract, source: Path, quant: dict[str, Any], samples: int, metrics: dict[str, float]
) -> dict[str, Any]:
    """What the artifact's manifest says besides its files."""
    source_manifest = export.read_manifest(source)
    calibration = contract.calibration
    return {
        "baseModel": (source_manifest or {}).get("baseModel", contract.source.uri),
        "method": f"quantize:{contract.method}",
        "source": {"uri": contract.source.uri, "digest": export.digest(source) if source_manifest else None},
        "quantization": {
            "method": contract.method,
            "format": quant.get("format"),
            "quant_method": quant.get("quant_method"),
        },
        "job": contract.job.model_dump(),
        "calibration": {"uri": calibration.location.uri, "samples": samples} if calibration and samples else None,
        "metrics": metrics,
    }


def run(contract: QuantizeContract) -> dict[str, Any]:
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    source = fetch.local_path(contract.source)
    if (source / export.MANIFEST).exists():
        problems = export.verify(source)
        if problems:
            raise UserError(
                f"{contract.source.uri}: the artifact does not match its manifest: {'; '.join(problems[:3])}"
            )
    config_path = source / "config.json"
    if not config_path.exists():
        raise UserError(f"{contract.source.uri}: no config.json (is this a model folder?)")
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        raise UserError(
            f"{contract.source.uri}: already quantized ({config['quantization_config'].get('quant_method')})"
        )
    check_fit(contract.method, config, contract.compute.device)
    out_location = contract.output.location
    final = Path(out_location.local_path) if out_location.local_path else None
    if final is not None and final.resolve() == source.resolve():
        raise UserError(f"{out_location.uri} is the source itself: the quantized model replaces its output folder")
    tokenizer = AutoTokenizer.from_pretrained(source)
    dataset, seq_len = calibration_dataset(contract, tokenizer) if contract.method in CALIBRATED else (None, 0)

    before = measure(contract, source)
    gc.collect()  # the source loaded for the measurement
    if before is not None:
        log.info("evaluation before: %s = %s", contract.evaluation.metric, before)

    from llmcompressor import oneshot

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32 if _cpu(contract) else "auto")
    log.info("quantizing %s with %s", contract.source.uri, contract.method)
    kwargs: dict[str, Any] = {"model": model, "recipe": recipe(contract.method)}
    if dataset is not None:
        kwargs.update(dataset=dataset, num_calibration_samples=len(dataset), max_seq_length=seq_len)
    oneshot(**kwargs)

    tag = staging_tag(contract.job)
    stage = export.staging_folder(final, tag) if final is not None else fetch.staging_dir(out_location.uri)
    export.discard(stage)  # what an earlier attempt of this job left
    try:
        stage.mkdir(parents=True)
        model.save_pretrained(stage, save_compressed=True)
        tokenizer.save_pretrained(stage)
        del model, kwargs
        release_model()
        quant = json.loads((stage / "config.json").read_text()).get("quantization_config", {})

        metrics: dict[str, float] = {"quantize_seconds": round(time.monotonic() - started, 2)}
        after = measure(contract, stage)
        if contract.evaluation is not None and before is not None and after is not None:
            ev = contract.evaluation
            lost = degradation(ev.metric, before, after)
            metrics.update({f"{ev.metric}_before": before, f"{ev.metric}_after": after,
                            "degradation": round(lost, 4)})  # fmt: skip
            log.info("evaluation after: %s = %s (degradation %.4f, limit %.4f)", ev.metric, after, lost,
                     ev.max_degradation)  # fmt: skip
            if lost > ev.max_degradation:
                raise UserError(
                    f"evaluation gate: {ev.metric} {before} before, {after} after quantization "
                    f"(degradation {lost:.4f} > maxDegradation {ev.max_degradation}); "
                    f"{out_location.uri} is left as it was"
                )
        samples = 0 if dataset is None else len(dataset)
        export.write_manifest(stage, manifest_info(contract, source, quant, samples, metrics))
        if final is None:
            export.promote_s3(stage, out_location.uri, tag)
            return export.summary(stage, out_location.uri, metrics)
        export.promote(stage, final)
        return export.summary(final, out_location.uri, metrics)
    except BaseException:
        export.discard(stage)  # a failed gate or any error: the output location keeps what it had
        raise


if __name__ == "__main__":
    sys.exit(main())
