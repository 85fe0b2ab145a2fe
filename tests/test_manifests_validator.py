"""The manifest validator the render tests rely on really rejects bad objects."""

from __future__ import annotations

import pytest

from tests.harness.manifests import validate_manifest

CM = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "plan"}, "data": {"plan.json": "{}"}}


def test_accepts_a_valid_object():
    validate_manifest(CM)


@pytest.mark.parametrize(
    "doc",
    [
        {**CM, "spec": {"unexpected": True}},
        {**CM, "data": {"plan.json": 5}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"completionMode": 3}},
    ],
)
def test_rejects_unknown_fields_and_wrong_types(doc):
    with pytest.raises(AssertionError, match=r"is not a valid Kubernetes 1\.33 object"):
        validate_manifest(doc)
