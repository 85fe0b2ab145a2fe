"""spec.tracking reaches the trainer as KUBEFORGE_TRACKING plus the Secret's keys, and the contract carries the
GPU's peak for MFU (never a guess: none for an unknown GPU or a CPU)."""

from __future__ import annotations

import json

import pytest

from kubeforge.api import check
from kubeforge.render.contract import peak_tflops
from kubeforge.runtime.contract import CONFIG_FILE, ENV_TRACKING
from kubeforge.runtime.contract import parse as parse_contract
from tests.builders import finetune
from tests.render.test_finetune_render import by_kind, pod_spec, rendered, validate_all


def trainer(docs):
    return pod_spec(docs)["containers"][0]


@pytest.mark.parametrize(("backend", "variable"), [("wandb", "tensorboard,wandb"), ("mlflow", "tensorboard,mlflow")])
def test_a_tracking_backend_reads_its_secret_as_environment(backend, variable):
    _, _, docs = rendered(**{"tracking": {"backend": backend, "secretRef": {"name": "tracking-keys"}},
                             "credentials.s3": {"name": "s3-creds"}})  # fmt: skip
    validate_all(docs)
    container = trainer(docs)
    assert {"name": ENV_TRACKING, "value": variable} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}, {"secretRef": {"name": "tracking-keys"}}]


def test_without_spec_tracking_the_runtime_default_applies():
    _, _, docs = rendered()
    assert all(e["name"] != ENV_TRACKING for e in trainer(docs)["env"])
    _, _, docs = rendered(**{"tracking": {"backend": "none"}})
    assert {"name": ENV_TRACKING, "value": "none"} in trainer(docs)["env"]
    assert "envFrom" not in trainer(docs)


def test_wandb_and_mlflow_need_a_secret():
    _, problems = check(finetune(**{"tracking": {"backend": "mlflow"}}))
    assert [str(p) for p in problems] == [
        "spec.tracking.secretRef: backends wandb and mlflow read their key or URI from a Secret: name it in secretRef"
    ]
    assert check(finetune(**{"tracking": {"backend": "wandb", "secretRef": {"name": "w"}}}))[1] == []


def test_the_contract_carries_the_gpus_peak_for_mfu():
    _, result, docs = rendered()  # H100 SXM nodes
    contract = parse_contract(json.loads(by_kind(docs)["ConfigMap"]["data"][CONFIG_FILE]))
    expected = {"bf16": 989.0, "fp16": 989.0, "fp8": 989.0}[result.precision]  # fp8: against the bf16 peak
    assert contract.compute.peak_tflops == expected


@pytest.mark.parametrize(
    ("gpu", "precision", "peak"),
    [
        ("A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA-A10G", "bf16", 70.0),  # a product label, looked up in the catalog
        ("L4", "fp8", 121.0),
        ("T4", "fp16", 65.0),
        ("T4", "bf16", None),  # no bf16 tensor cores: no number
        ("H100-SXM-80GB", "fp32", None),
        ("cpu", "fp32", None),
        ("NVIDIA-RTX-9000-Ultra", "bf16", None),  # not in the catalog: no MFU rather than a guess
    ],
)
def test_peak_per_gpu(gpu, precision, peak):
    assert peak_tflops(gpu, precision) == peak
