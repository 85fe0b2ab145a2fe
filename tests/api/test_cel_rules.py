"""The CEL rules in the CRDs and the Python rules in the models say the same thing.

Every object here is checked twice: by cel-python evaluating the CRD's
x-kubernetes-validations (after the API server's defaulting), and by the models'
Rules. The two must report the same (path, message) pairs.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeforge.api import check, parse
from kubeforge.api.crd import crd
from kubeforge.api.kinds import BY_KIND as KINDS_BY_NAME
from kubeforge.api.validation import rule_problems
from tests.builders import DELETE, FINETUNE, QUANTIZE, SERVICE, example, finetune, quantize, service
from tests.harness.crdschema import apply_defaults, cel_violations, compile_rule, schema_errors

SCHEMAS = {kind: crd(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for kind, info in KINDS_BY_NAME.items()}


def all_rules(schema: dict[str, Any]) -> list[str]:
    out = [r["rule"] for r in schema.get("x-kubernetes-validations", ())]
    for sub in (schema.get("properties") or {}).values():
        out += all_rules(sub)
    if isinstance(schema.get("items"), dict):
        out += all_rules(schema["items"])
    return out


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_every_rule_compiles(kind):
    rules = all_rules(SCHEMAS[kind])
    assert rules
    for rule in rules:
        compile_rule(rule)


def both(doc: dict[str, Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    schema = SCHEMAS[doc["kind"]]
    defaulted = apply_defaults(schema, doc)
    assert schema_errors(schema, defaulted) == [], "only structurally valid objects reach CEL"
    cel = set(cel_violations(schema, defaulted))
    model = KINDS_BY_NAME[doc["kind"]].model
    python = {(p.path, p.message) for p in rule_problems(model, doc, "")}
    return cel, python


def test_examples_break_no_rule():
    for name in (FINETUNE, QUANTIZE, SERVICE):
        cel, python = both(example(name))
        assert cel == python == set()


finetune_docs = st.builds(
    lambda method, lora, strategy, tp, pp, sp, fmt, objective, epochs, steps, revision, kv, precision, master, ac: (
        finetune(
            method=method,
            lora={"rank": 8} if lora else DELETE,
            **{
                "parallelism.strategy": strategy,
                "parallelism.tensorParallel": tp if tp else DELETE,
                "parallelism.pipelineParallel": pp if pp else DELETE,
                "parallelism.sequenceParallel": sp if sp is not None else DELETE,
                "dataset.format": fmt,
                "training.objective": objective,
                "training.epochs": epochs if epochs else DELETE,
                "training.maxSteps": steps if steps else DELETE,
                "model.revision": revision if revision else DELETE,
                "model.uri": "hf://Qwen/Qwen3-8B" if revision != "pvc" else "pvc://models/base",
                "model.architecture": {"numAttentionHeads": 32, "numKeyValueHeads": kv} if kv else DELETE,
                "parallelism.precision": precision,
                "parallelism.masterWeights": master if master else DELETE,
                "parallelism.activationCheckpointing": ac if ac else DELETE,
            },
        )
    ),
    st.sampled_from(["full", "lora", "qlora"]),
    st.booleans(),
    st.sampled_from(["auto", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3-offload", "megatron"]),
    st.sampled_from([None, 1, 2, 8]),
    st.sampled_from([None, 1, 4]),
    st.sampled_from([None, True, False]),
    st.sampled_from(["messages", "alpaca", "text", "preference"]),
    st.sampled_from(["sft", "dpo"]),
    st.sampled_from([None, 1, 2.5]),
    st.sampled_from([None, 100]),
    st.sampled_from([None, "main", "pvc"]),
    st.sampled_from([None, 8, 5]),
    st.sampled_from(["auto", "bf16", "fp16"]),
    st.sampled_from([None, "fp32", "bf16"]),
    st.sampled_from([None, "auto", "full", "selective"]),
)

quantize_docs = st.builds(
    lambda ref, uri, method, calibration, dataset: quantize(
        source={**({"fineTuneJobRef": {"name": "job"}} if ref else {}), **({"uri": "pvc://m/x"} if uri else {})},
        method=method,
        calibration=(
            {"samples": 64, **({"datasetUri": "pvc://d/c.jsonl"} if dataset else {})} if calibration else DELETE
        ),
    ),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["fp8", "w4a16-gptq", "w4a16-awq", "w8a8-int8"]),
    st.booleans(),
    st.booleans(),
)

service_docs = st.builds(
    lambda q, f, u, engine, tp, names: service(
        source={
            **({"quantizeJobRef": {"name": "q"}} if q else {}),
            **({"fineTuneJobRef": {"name": "f"}} if f else {}),
            **({"uri": "s3://models/x"} if u else {}),
        },
        engine=engine,
        tensorParallel=tp,
        adapters=[{"name": n, "uri": f"pvc://a/{i}"} for i, n in enumerate(names)],
    ),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["auto", "vllm", "sglang", "transformers"]),
    st.sampled_from(["auto", 1, 2, 8]),
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(finetune_docs, quantize_docs, service_docs))
def test_cel_and_python_rules_agree(doc):
    cel, python = both(doc)
    assert cel == python
    _, problems = check(doc)
    assert python <= {(p.path, p.message) for p in problems}


def test_transition_rules_refuse_changes_to_immutable_fields():
    schema = SCHEMAS["FineTuneJob"]
    old = apply_defaults(schema, example(FINETUNE))
    new = apply_defaults(schema, finetune(**{"model.uri": "hf://Qwen/Qwen3-4B", "training.epochs": 1}))
    violations = cel_violations(schema, new, old)
    assert violations == [(".spec.model".lstrip("."), "is immutable once the object exists")]
    assert cel_violations(schema, old, old) == []
    assert parse(new).spec.training.epochs == 1
