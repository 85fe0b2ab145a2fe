"""The API models: defaults, and every problem reported with its field path."""

from __future__ import annotations

import pytest

from kubeforge.api import FineTuneJob, ModelService, QuantizeJob, check, immutable_changes, parse
from kubeforge.api.validation import InvalidResource
from tests.builders import DELETE, FINETUNE, QUANTIZE, SERVICE, example, finetune, quantize, service


@pytest.mark.parametrize(("name", "model"), [(FINETUNE, FineTuneJob), (QUANTIZE, QuantizeJob), (SERVICE, ModelService)])
def test_examples_parse(name, model):
    obj = parse(example(name))
    assert isinstance(obj, model)


def test_defaults_are_filled_in():
    doc = finetune(lora=DELETE, training=DELETE, parallelism=DELETE, resources=DELETE)
    doc["spec"]["dataset"] = {"uri": "pvc://data/train.jsonl"}
    job = parse(doc)
    assert job.spec.method == "lora"
    assert job.spec.lora is None  # LoRA settings default at use, not in the stored spec
    assert job.spec.dataset.format == "messages" and job.spec.dataset.max_seq_length == 2048
    assert job.spec.dataset.packing is True
    assert job.spec.training.global_batch_size == 32 and job.spec.training.seed == 42
    assert job.spec.training.epochs is None and job.spec.training.max_steps is None
    assert job.spec.parallelism.strategy == "auto" and job.spec.parallelism.precision == "auto"
    assert job.spec.resources.gpu_type == "auto" and job.spec.resources.max_gpus is None
    svc = parse(service())
    assert svc.spec.engine_options.gpu_memory_utilization == 0.9


def test_dump_round_trips_with_camel_case():
    job = parse(example(FINETUNE))
    dumped = job.dump()
    assert dumped["spec"]["resources"]["maxGPUs"] == 16
    assert dumped["spec"]["dataset"]["maxSeqLength"] == 4096
    assert parse(dumped) == job


# (changes to the example, expected "path: message" lines, each must appear)
FINETUNE_CASES = [
    ({"lora.rank": 0}, ["spec.lora.rank: must be > 0 (got 0)"]),
    ({"lora.rank": "8"}, ["spec.lora.rank: must be an integer (got '8')"]),
    ({"lora.dropout": 1.0}, ["spec.lora.dropout: must be < 1 (got 1.0)"]),
    ({"lora.targetModules": []}, ["spec.lora.targetModules: must have at least 1 item(s)"]),
    ({"method": "dora"}, ["spec.method: must be one of 'full', 'lora' or 'qlora' (got 'dora')"]),
    ({"method": "full"}, ["spec.lora: only applies to method lora or qlora"]),
    ({"model.uri": "gs://bucket/model"}, ["spec.model.uri: 'gs://bucket/model': unsupported scheme 'gs'"]),
    (
        {"model.uri": "pvc://Bad_Claim/x"},
        ["spec.model.uri: 'pvc://Bad_Claim/x': pvc:// takes a PersistentVolumeClaim name"],
    ),
    (
        {"model.revision": "main", "model.uri": "pvc://models/base"},
        ["spec.model.revision: only applies to hf:// models"],
    ),
    ({"model": DELETE}, ["spec.model: is required"]),
    ({"dataset.format": "csv"}, ["spec.dataset.format: must be one of 'messages', 'alpaca', 'text' or 'preference'"]),
    ({"dataset.format": "preference"}, ["spec.dataset.format: format preference goes with training.objective dpo"]),
    ({"dataset.maxSeqLength": -1}, ["spec.dataset.maxSeqLength: must be > 0"]),
    ({"training.maxSteps": 100}, ["spec.training.maxSteps: set epochs or maxSteps, not both"]),
    ({"training.learningRate": 0}, ["spec.training.learningRate: must be > 0"]),
    ({"training.globalBatchSize": 0}, ["spec.training.globalBatchSize: must be > 0"]),
    ({"resources.maxGPUs": 0}, ["spec.resources.maxGPUs: must be > 0"]),
    ({"resources.queue": "Team A"}, ["spec.resources.queue: 'Team A' is not a DNS-1123 label"]),
    (
        {"resources.tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]},
        ["spec.resources.tolerations[0].value: must not be set when operator is Exists"],
    ),
    (
        {"parallelism.strategy": "zero3", "parallelism.tensorParallel": 2},
        ["spec.parallelism.strategy: tensorParallel and pipelineParallel above 1 need strategy megatron"],
    ),
    (
        {"parallelism.strategy": "megatron", "parallelism.sequenceParallelSize": 2, "method": "full"},
        ["spec.parallelism.sequenceParallelSize: sequenceParallelSize above 1 is the Ulysses degree"],
    ),
    (
        {"parallelism.strategy": "fsdp", "parallelism.sequenceParallel": False, "parallelism.sequenceParallelSize": 2},
        ["spec.parallelism.sequenceParallelSize: sequenceParallelSize above 1 is the Ulysses degree"],
    ),
    (
        {"training.objective": "dpo", "dataset.format": "preference", "parallelism.sequenceParallelSize": 2},
        ["spec.parallelism: objective dpo trains with ddp, fsdp or a zero stage"],
    ),
    (
        {"method": "full", "lora": DELETE, "parallelism.masterWeights": "bf16", "parallelism.precision": "fp16"},
        ["spec.parallelism.masterWeights: masterWeights bf16 (pure bf16) needs precision bf16 or auto"],
    ),
    (
        {
            "method": "full",
            "lora": DELETE,
            "parallelism.masterWeights": "bf16",
            "parallelism.strategy": "zero3-offload",
        },
        ["spec.parallelism.masterWeights: masterWeights bf16 (pure bf16) needs precision bf16 or auto and a strategy"],
    ),
    ({"parallelism.masterWeights": "fp16"}, ["spec.parallelism.masterWeights: must be one of 'fp32' or 'bf16'"]),
    (
        {"parallelism.activationCheckpointing": "selective"},
        ["spec.parallelism.activationCheckpointing: activationCheckpointing selective serves method full only"],
    ),
    (
        {
            "method": "full",
            "lora": DELETE,
            "parallelism.strategy": "megatron",
            "parallelism.activationCheckpointing": "selective",
        },
        ["spec.parallelism.activationCheckpointing: activationCheckpointing selective needs a non-Megatron strategy"],
    ),
    (
        {"training.dpo": {"beta": 0.2}},
        ["spec.training.dpo: only applies to objective dpo"],
    ),
    (
        {"training.objective": "dpo", "dataset.format": "preference", "training.dpo": {"labelSmoothing": 0.1}},
        ["spec.training.dpo.labelSmoothing: only loss types robust and exo_pair use labelSmoothing"],
    ),
    (
        {"training.objective": "dpo", "dataset.format": "preference", "training.dpo": {"lossType": "exo_pair"}},
        ["spec.training.dpo.labelSmoothing: loss type exo_pair needs labelSmoothing above 0"],
    ),
    (
        {"method": "qlora", "parallelism.strategy": "megatron"},
        ["spec.parallelism.strategy: Megatron (strategy megatron, tensorParallel or pipelineParallel above 1) trains"],
    ),
    (
        {"method": "lora", "parallelism.tensorParallel": 2},
        ["spec.parallelism.strategy: Megatron (strategy megatron, tensorParallel or pipelineParallel above 1) trains"],
    ),
    ({"parallelism.precision": "int8"}, ["spec.parallelism.precision: must be one of 'auto', 'bf16', 'fp16' or 'fp8'"]),
    ({"output.uri": "hf://me/out"}, ["spec.output.uri: 'hf://me/out': hf:// is read-only here"]),
    (
        {"credentials.huggingFace": {"name": "hf", "value": "hf_secret"}},
        ["spec.credentials.huggingFace.value: unknown field", "spec.credentials.huggingFace.key: is required"],
    ),
    ({"lora.rnak": 8}, ["spec.lora.rnak: unknown field (did you mean 'rank'?)"]),
    (
        {"model.architecture": {"numAttentionHeads": 32, "numKeyValueHeads": 5}},
        ["spec.model.architecture.numKeyValueHeads: must divide numAttentionHeads"],
    ),
    (
        {"model.architecture": {"numExpertsPerToken": 2}},
        ["spec.model.architecture.numExpertsPerToken: needs numExperts, and may not exceed it"],
    ),
]


@pytest.mark.parametrize(("changes", "expected"), FINETUNE_CASES, ids=[str(c[0]) for c in FINETUNE_CASES])
def test_finetunejob_problems_name_the_field(changes, expected):
    _, problems = check(finetune(**changes))
    lines = [str(p) for p in problems]
    for want in expected:
        assert any(line.startswith(want) for line in lines), f"{want!r} not in {lines}"


QUANTIZE_CASES = [
    ({"source.uri": "pvc://models/x"}, ["spec.source: set exactly one of fineTuneJobRef and uri"]),
    ({"source": {}}, ["spec.source: set exactly one of fineTuneJobRef and uri"]),
    ({"method": "nf4"}, ["spec.method: must be one of 'fp8', 'w4a16-gptq', 'w4a16-awq' or 'w8a8-int8'"]),
    ({"calibration": {"samples": 64}}, ["spec.calibration: fp8 is dynamic and takes no calibration"]),
    (
        {"method": "w4a16-gptq", "source": {"uri": "pvc://models/x"}},
        ["spec.calibration.datasetUri: is required when the source is a uri and the method needs calibration"],
    ),
    ({"evaluation.maxDegradation": 2}, ["spec.evaluation.maxDegradation: must be <= 1"]),
    ({"evaluation.maxDegradation": DELETE}, ["spec.evaluation.maxDegradation: is required"]),
]


@pytest.mark.parametrize(("changes", "expected"), QUANTIZE_CASES, ids=[str(c[0]) for c in QUANTIZE_CASES])
def test_quantizejob_problems_name_the_field(changes, expected):
    _, problems = check(quantize(**changes))
    lines = [str(p) for p in problems]
    for want in expected:
        assert any(line.startswith(want) for line in lines), f"{want!r} not in {lines}"


SERVICE_CASES = [
    ({"source.uri": "s3://models/x"}, ["spec.source: set exactly one of quantizeJobRef, fineTuneJobRef and uri"]),
    ({"engine": "tgi"}, ["spec.engine: must be one of 'auto', 'vllm', 'sglang' or 'transformers'"]),
    ({"replicas": -1}, ["spec.replicas: must be >= 0"]),
    ({"tensorParallel": 0}, ["spec.tensorParallel: must be 'auto' or a number >= 1"]),
    ({"tensorParallel": "four"}, ["spec.tensorParallel: must be 'auto' or a number >= 1"]),
    ({"engineOptions.gpuMemoryUtilization": 1.5}, ["spec.engineOptions.gpuMemoryUtilization: must be <= 1"]),
    (
        {"adapters": [{"name": "a", "uri": "pvc://m/a"}, {"name": "a", "uri": "pvc://m/b"}]},
        ["spec.adapters: adapter names must be unique"],
    ),
]


@pytest.mark.parametrize(("changes", "expected"), SERVICE_CASES, ids=[str(c[0]) for c in SERVICE_CASES])
def test_modelservice_problems_name_the_field(changes, expected):
    _, problems = check(service(**changes))
    lines = [str(p) for p in problems]
    for want in expected:
        assert any(line.startswith(want) for line in lines), f"{want!r} not in {lines}"


def test_every_problem_is_reported_at_once():
    doc = finetune(
        **{
            "lora.rank": 0,
            "lora.alpha": -1,
            "dataset.maxSeqLength": 0,
            "resources.maxGPUs": 0,
            "training.epochs": 1,
            "training.maxSteps": 5,
            "parallelism.strategy": "ddp",
            "parallelism.pipelineParallel": 2,
        }
    )
    doc["metadata"]["name"] = "Not A Name"
    _, problems = check(doc)
    paths = {p.path for p in problems}
    assert {
        "metadata.name",
        "spec.lora.rank",
        "spec.lora.alpha",
        "spec.dataset.maxSeqLength",
        "spec.resources.maxGPUs",
        "spec.training.maxSteps",
        "spec.parallelism.strategy",
    } <= paths


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ([1, 2], ": must be a mapping (a Kubernetes object), not a list"),
        (
            {"kind": "Pod", "apiVersion": "v1"},
            "kind: unknown kind 'Pod'; expected one of FineTuneJob, QuantizeJob, ModelService",
        ),
        ({"apiVersion": "kubeforge.io/v1alpha1"}, "kind: is required"),
    ],
)
def test_documents_that_are_not_our_kinds(doc, expected):
    obj, problems = check(doc)
    assert obj is None
    assert [f"{p.path}: {p.message}" for p in problems] == [expected]


def test_wrong_api_version_is_named():
    doc = example(FINETUNE)
    doc["apiVersion"] = "kubeforge.io/v1"
    _, problems = check(doc)
    assert [str(p) for p in problems] == ["apiVersion: must be kubeforge.io/v1alpha1 (got 'kubeforge.io/v1')"]


def test_parse_raises_with_every_problem():
    with pytest.raises(InvalidResource) as err:
        parse(finetune(**{"lora.rank": 0, "method": "full"}))
    assert {p.path for p in err.value.problems} == {"spec.lora.rank"}
    with pytest.raises(InvalidResource) as err:
        parse(finetune(**{"method": "full"}))
    assert [str(p) for p in err.value.problems] == ["spec.lora: only applies to method lora or qlora"]


def test_server_metadata_is_accepted():
    doc = example(FINETUNE)
    doc["metadata"].update(uid="abc", resourceVersion="12", generation=3, creationTimestamp="2026-01-01T00:00:00Z")
    obj, problems = check(doc)
    assert problems == [] and obj is not None


def test_immutable_changes_name_the_fields():
    old = parse(example(FINETUNE)).spec
    new = parse(finetune(**{"model.uri": "hf://Qwen/Qwen3-4B", "method": "qlora", "training.epochs": 1})).spec
    assert [str(p) for p in immutable_changes(old, new)] == [
        "spec.model.uri: is immutable once the object exists ('hf://Qwen/Qwen3-8B' -> 'hf://Qwen/Qwen3-4B')",
        "spec.method: is immutable once the object exists ('lora' -> 'qlora')",
    ]  # the field of an immutable model that changed, and both values
    assert immutable_changes(old, old) == []


def test_the_api_strategies_are_the_runtimes():
    from typing import get_args

    from kubeforge.api.finetune import Strategy
    from kubeforge.runtime.contract import STRATEGIES
    from kubeforge.runtime.contract import Strategy as RuntimeStrategy

    assert get_args(Strategy) == ("auto", *get_args(RuntimeStrategy))
    assert set(get_args(RuntimeStrategy)) == set(STRATEGIES)
