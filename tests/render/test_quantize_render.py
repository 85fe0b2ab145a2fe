"""render/quantize.py with a sizing from planner/quantize_size.py: requests, placement, status.resources."""

from __future__ import annotations

import pytest

from kubeforge.api import parse
from kubeforge.planner.catalog import lookup
from kubeforge.planner.quantize_size import GIB, size_quantize
from kubeforge.render import labels as L
from kubeforge.render.quantize import memory_quantity, render_quantize, resources_status
from tests.builders import quantize
from tests.harness.manifests import validate_manifest
from tests.planner.nodes import example_cluster

QWEN = lookup("Qwen/Qwen3-8B")


@pytest.mark.parametrize(
    ("n", "quantity"), [(32 * GIB, "32Gi"), (33 * GIB - 1, "33Gi"), (int(5.51 * GIB), "5.6Gi"), (GIB // 10, "0.1Gi")]
)
def test_memory_is_a_quantity_in_gib_rounded_up(n, quantity):
    assert memory_quantity(n) == quantity


def pod(docs):
    return docs[1]["spec"]["template"]["spec"]


def test_without_a_sizing_the_pod_gets_the_old_fixed_request():
    job = parse(quantize(method="w4a16-gptq"))
    resources = pod(render_quantize(job, source_uri="pvc://models/a"))["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "4", "memory": "32Gi", L.GPU_RESOURCE: "1"},
                         "limits": {"memory": "32Gi", L.GPU_RESOURCE: "1"}}  # fmt: skip


def test_a_sized_pod_requests_the_estimate_on_the_pool_it_names():
    job = parse(quantize(method="w8a8-int8", calibration={"samples": 64, "maxSeqLength": 1024}))
    sizing = size_quantize("w8a8-int8", QWEN, samples=64, max_seq_length=1024, inventory=example_cluster("mixed.yaml"))
    docs = render_quantize(job, source_uri="pvc://models/a", sizing=sizing)
    spec = pod(docs)
    memory = memory_quantity(sizing.memory_bytes)
    assert spec["containers"][0]["resources"]["limits"] == {"memory": memory, L.GPU_RESOURCE: "1"}
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {(e["key"], e["values"][0]) for e in terms[0]["matchExpressions"]} == set(sizing.node_selector)
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    for doc in docs:
        validate_manifest(doc)
    status = resources_status(sizing)
    assert status["memory"] == memory and status["gpuType"] == sizing.gpu_type and status["sizedFrom"] == "model"
