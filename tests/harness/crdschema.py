"""What the API server does with a CRD's schema, for tests: defaulting, schema and CEL validation.

- ``apply_defaults``: structural defaulting (a ``default`` fills a missing field whose
  parent exists), as the API server does before validation;
- ``schema_errors``: the openAPIV3Schema checked with jsonschema (x-kubernetes-* keys
  stripped, int-or-string understood), OpenAPI 3.0 being draft-4 style;
- ``cel_violations``: every ``x-kubernetes-validations`` rule evaluated with cel-python,
  transition rules (``oldSelf``) only when an old object is given, reported like the
  API server: the node's path plus the rule's ``fieldPath``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from typing import Any

import celpy
import jsonschema


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    obj = copy.deepcopy(obj)
    _default(schema, obj)
    return obj


def _default(schema: dict[str, Any], obj: Any) -> None:
    if isinstance(obj, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                _default(sub, obj[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, value in obj.items():
                if key not in (schema.get("properties") or {}):
                    _default(extra, value)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            _default(schema["items"], item)


def strip_extensions(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: strip_extensions(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        if schema.get("x-kubernetes-int-or-string"):
            out = {k: v for k, v in out.items() if k != "anyOf"}
            out["type"] = ["integer", "string"]
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            out.pop("additionalProperties", None)
        return out
    if isinstance(schema, list):
        return [strip_extensions(v) for v in schema]
    return schema


def schema_errors(schema: dict[str, Any], obj: Any) -> list[str]:
    validator = jsonschema.Draft4Validator(strip_extensions(schema))
    return sorted(f"{'.'.join(str(p) for p in err.absolute_path)}: {err.message}" for err in validator.iter_errors(obj))


@cache
def _program(expr: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expr))


def compile_rule(expr: str) -> None:
    _program(expr)


def cel_violations(schema: dict[str, Any], obj: Any, old: Any = None, path: str = "") -> list[tuple[str, str]]:
    """(path, message) for every rule that evaluates to false (or errors) on obj."""
    return sorted(_walk(schema, obj, old, path))


def _walk(schema: dict[str, Any], obj: Any, old: Any, path: str) -> Iterator[tuple[str, str]]:
    for rule in schema.get("x-kubernetes-validations", ()):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        activation = {"self": celpy.json_to_cel(obj)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        result = _program(rule["rule"]).evaluate(activation)
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            where = path + rule.get("fieldPath", "")
            yield (where.lstrip("."), rule.get("message", rule["rule"]))
    if isinstance(obj, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in obj:
                sub_old = old.get(name) if isinstance(old, dict) else None
                yield from _walk(sub, obj[name], sub_old, f"{path}.{name}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            # The API server correlates list items for transition rules only in map lists; we don't need it.
            yield from _walk(schema["items"], item, None, f"{path}[{i}]")
