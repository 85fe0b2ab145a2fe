"""Generate the CustomResourceDefinitions from the models (the models are the source of truth).

pydantic's JSON schema is turned into a *structural* OpenAPI v3 schema as the API
server requires: $refs inlined, ``X | None`` collapsed to X, a type on every node,
OpenAPI 3.0 exclusive bounds, int-or-string where declared, unknown fields preserved
only where a field says so, and every model's Rules attached as CEL
``x-kubernetes-validations`` (Immutable fields get a transition rule).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from kubeforge.api.base import Immutable
from kubeforge.api.kinds import CATEGORY, GROUP, KINDS, VERSION, Kind
from kubeforge.api.meta import ObjectMeta
from kubeforge.api.validation import model_in

KEEP = {
    "type", "format", "description", "default", "enum", "required", "properties", "items",
    "additionalProperties", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "nullable",
}  # fmt: skip
LABELS = {"app.kubernetes.io/name": "kubeforge", "app.kubernetes.io/part-of": "kubeforge"}


def crd(kind: Kind) -> dict[str, Any]:
    fields = kind.model.model_fields
    spec_model = model_in(fields["spec"].annotation)
    status_model = model_in(fields["status"].annotation)
    assert spec_model is not None and status_model is not None
    schema = {
        "type": "object",
        "description": (kind.model.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubeforge.io/v1alpha1."},
            "kind": {"type": "string", "description": f"{kind.kind}."},
            "metadata": {"type": "object", "description": "Standard object metadata (name, namespace, labels)."},
            "spec": structural_schema(spec_model),
            "status": structural_schema(status_model),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name, "labels": dict(LABELS)},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": kind.subresources,
                    "additionalPrinterColumns": [c.dump() for c in kind.columns],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [crd(k) for k in KINDS]


def file_name(kind: Kind) -> str:
    return f"{kind.crd_name}.yaml"


def to_yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    classes = _classes(model)
    return _convert(raw, defs, classes, model)


def _classes(model: type[BaseModel], seen: dict[str, type[BaseModel]] | None = None) -> dict[str, type[BaseModel]]:
    seen = {} if seen is None else seen
    if model.__name__ in seen:
        if seen[model.__name__] is not model:
            raise ValueError(f"two API models are named {model.__name__}")
        return seen
    seen[model.__name__] = model
    for info in model.model_fields.values():
        sub = model_in(info.annotation)
        if sub is not None:
            _classes(sub, seen)
    return seen


def _convert(
    node: dict[str, Any], defs: dict[str, Any], classes: dict[str, type[BaseModel]], model: type[BaseModel] | None
) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        target = classes.get(name)
        if target is ObjectMeta:
            return {"type": "object"}
        merged = {**defs[name], **node}  # the referring field's description wins
        return _convert(merged, defs, classes, target)
    if node.get("x-kubernetes-int-or-string"):
        out = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
        out.update({k: v for k, v in node.items() if k in ("description", "default")})
        return out
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express {node['anyOf']} structurally; declare x-kubernetes-int-or-string")
        outer = {k: v for k, v in node.items() if k not in ("anyOf", "default") or (k == "default" and v is not None)}
        return _convert({**options[0], **outer}, defs, classes, model)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {k: v for k, v in node.items() if k in KEEP or k.startswith("x-kubernetes-")}
    if "type" not in out and "enum" in out:
        out["type"] = "string"
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), int | float) and not isinstance(out.get(bound), bool):
            out[plain], out[bound] = out[bound], True
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
        out["type"] = "object"
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)
        out["properties"] = {name: _convert(sub, defs, classes, None) for name, sub in out["properties"].items()}
        if model is not None:
            _attach_rules(out, model)
    elif out.get("type") == "object" and isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(out["additionalProperties"], defs, classes, None)
    elif out.get("type") == "object" and out.get("additionalProperties") is False:
        out.pop("additionalProperties")
    if out.get("type") == "array":
        out["items"] = _convert(out["items"], defs, classes, None)
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        raise ValueError(f"schema node without a type: {node}")
    return out


def _attach_rules(out: dict[str, Any], model: type[BaseModel]) -> None:
    rules = []
    for rule in getattr(model, "rules", ()):
        entry = {"rule": rule.cel, "message": rule.message}
        if rule.field:
            entry["fieldPath"] = rule.field
        rules.append(entry)
    if rules:
        out["x-kubernetes-validations"] = rules
    for name, info in model.model_fields.items():
        marks = [m for m in info.metadata if isinstance(m, Immutable)]
        alias = info.alias or name
        if marks and alias in out["properties"]:
            prop = out["properties"][alias]
            prop.setdefault("x-kubernetes-validations", []).append(
                {"rule": "self == oldSelf", "message": marks[0].reason}
            )
