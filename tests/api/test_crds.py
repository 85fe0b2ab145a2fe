"""The CRDs: generated from the models, structural, and in agreement with them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.api.crd import all_crds, crd, file_name, to_yaml
from kubeforge.api.kinds import CATEGORY, KINDS
from tests.builders import FINETUNE, QUANTIZE, SERVICE, example, finetune, quantize, service
from tests.harness.crdschema import apply_defaults, schema_errors

ROOT = Path(__file__).resolve().parents[2]
BY_KIND = {k.kind: crd(k) for k in KINDS}

# Where an object of unknown shape is kept on purpose (and only there).
PRESERVE_UNKNOWN = {"FineTuneJob": {".status.plan"}}


def schema_of(kind: str) -> dict[str, Any]:
    return BY_KIND[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in (schema.get("properties") or {}).items():
        out += nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += nodes(schema["additionalProperties"], f"{path}{{}}")
    return out


def test_committed_crds_match_the_models():
    """`kubeforge crds -o crds/` must be re-run after changing operator/kubeforge/api."""
    for kind, doc in zip(KINDS, all_crds(), strict=True):
        committed = ROOT / "crds" / file_name(kind)
        assert committed.exists(), f"{committed} is missing: run `kubeforge crds -o crds/`"
        assert committed.read_text() == to_yaml(doc), f"{committed} drifted: run `kubeforge crds -o crds/`"
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(file_name(k) for k in KINDS)


@pytest.mark.parametrize("kind", [k.kind for k in KINDS])
def test_schema_is_structural(kind):
    for path, node in nodes(schema_of(kind)):
        assert "$ref" not in node and "$defs" not in node, path
        assert "allOf" not in node and "oneOf" not in node and "not" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "anyOf" not in node, path
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert path in PRESERVE_UNKNOWN.get(kind, set()), f"unexpected preserve-unknown-fields at {path}"
        if "default" in node:
            assert node["type"] != "object", f"object defaults hide nested defaults: {path}"
        if node.get("type") == "array":
            assert "maxItems" in node, f"unbounded list (CEL cost): {path}"
        if isinstance(node.get("exclusiveMinimum"), bool):
            assert "minimum" in node, path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_names_columns_and_subresources(kind):
    doc = BY_KIND[kind.kind]
    names = doc["spec"]["names"]
    assert doc["metadata"]["name"] == f"{kind.plural}.kubeforge.io"
    assert names["shortNames"] == list(kind.short_names)
    assert names["categories"] == [CATEGORY]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    scale = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
             "labelSelectorPath": ".status.selector"}  # fmt: skip
    # kubectl scale msvc, and an HPA or KEDA aimed at a ModelService, go through the scale subresource
    expected = {"status": {}, "scale": scale} if kind.kind == "ModelService" else {"status": {}}
    assert version["subresources"] == expected
    for path in version["subresources"].get("scale", {}).values():  # each path is a field of the schema
        node = version["schema"]["openAPIV3Schema"]
        for part in path.strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == ("string" if path == ".status.selector" else "integer"), path
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[0] == "Phase" and "Model" in columns and "GPUs" in columns and columns[-1] == "Age"
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata"):
            continue
        node = schema
        path = re.sub(r"\[\?\(.*?\)\]", "[]", column["jsonPath"])  # a filter such as [?(@.type=="Ready")]
        for part in path.strip(".").split("."):
            if node.get("x-kubernetes-preserve-unknown-fields"):
                break
            name = part.removesuffix("[]")
            assert name in node.get("properties", {}), f"printer column {column['name']}: no {column['jsonPath']}"
            node = node["properties"][name]
            if part.endswith("[]"):
                assert node["type"] == "array", f"printer column {column['name']}: {name} is not a list"
                node = node["items"]


def test_short_names_are_the_documented_ones():
    assert {k.kind: k.short_names for k in KINDS} == {
        "FineTuneJob": ("ftj",),
        "QuantizeJob": ("qj",),
        "ModelService": ("msvc",),
    }


def test_immutable_fields_have_transition_rules():
    spec = schema_of("FineTuneJob")["properties"]["spec"]["properties"]
    for field in ("model", "dataset", "method", "output"):
        assert {"rule": "self == oldSelf", "message": "is immutable once the object exists"} in spec[field][
            "x-kubernetes-validations"
        ]
    assert "x-kubernetes-validations" not in spec["training"] or all(
        "oldSelf" not in r["rule"] for r in spec["training"]["x-kubernetes-validations"]
    )


@pytest.mark.parametrize("name", [FINETUNE, QUANTIZE, SERVICE])
def test_examples_validate_against_the_crd_schema(name):
    doc = example(name)
    schema = schema_of(doc["kind"])
    assert schema_errors(schema, apply_defaults(schema, doc)) == []


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (finetune(**{"lora.rank": 0}), "spec.lora.rank: 0 is less than or equal to the minimum of 0"),
        (finetune(method="dora"), "spec.method: 'dora' is not one of"),
        (finetune(**{"model.uri": "gs://x"}), "spec.model.uri: 'gs://x' does not match"),
        (finetune(**{"resources.maxGPUs": "4"}), "spec.resources.maxGPUs: '4' is not of type 'integer'"),
        (quantize(method="nf4"), "spec.method: 'nf4' is not one of"),
        (service(replicas=-1), "spec.replicas: -1 is less than the minimum of 0"),
        (service(tensorParallel=1.5), "spec.tensorParallel: 1.5 is not of type 'integer', 'string'"),
    ],
)
def test_wrong_values_are_rejected_by_the_crd_schema(doc, fragment):
    schema = schema_of(doc["kind"])
    errors = schema_errors(schema, apply_defaults(schema, doc))
    assert any(fragment in e for e in errors), errors


def test_crd_yaml_is_stable_and_loadable():
    for doc in all_crds():
        text = to_yaml(doc)
        assert yaml.safe_load(text) == doc
        assert to_yaml(yaml.safe_load(text)) == text


@pytest.mark.parametrize("kind", sorted(BY_KIND))
def test_kubectl_explain_answers_for_every_field(kind):
    """Every schema node of every CRD has a description: `kubectl explain` never answers with nothing."""
    missing = [path or "<root>" for path, node in nodes(schema_of(kind)) if not node.get("description", "").strip()]
    assert missing == [], f"{kind}: schema nodes without a description: {missing}"
