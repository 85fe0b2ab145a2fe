"""Turn a user's document into a typed object, or into every problem it has.

Two passes, both reporting every problem with its field path:
1. structure and values (pydantic, in strict mode like the API server);
2. the cross-field ``Rule``s of every sub-object that passed the first pass.
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from kubeforge.api.base import Immutable, KubeModel
from kubeforge.api.kinds import API_VERSION, BY_KIND


@dataclass(frozen=True, order=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidResource(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def parse(doc: Any) -> KubeModel:
    """The typed object for ``doc``; raises InvalidResource listing every problem."""
    obj, problems = check(doc)
    if problems or obj is None:
        raise InvalidResource(problems)
    return obj


def check(doc: Any) -> tuple[KubeModel | None, list[Problem]]:
    """(the typed object or None, every problem found)."""
    if not isinstance(doc, Mapping):
        return None, [Problem("", f"must be a mapping (a Kubernetes object), not {_type_name(doc)}")]
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in BY_KIND:  # a list or a mapping is not even hashable
        known = ", ".join(BY_KIND)
        msg = "is required" if kind is None else f"unknown kind {kind!r}; expected one of {known}"
        return None, [Problem("kind", msg)]
    problems: list[Problem] = []
    if doc.get("apiVersion") != API_VERSION:
        got = doc.get("apiVersion")
        problems.append(Problem("apiVersion", f"must be {API_VERSION}" + (f" (got {got!r})" if got else "")))
    model = BY_KIND[kind].model
    body = dict(doc, apiVersion=API_VERSION)
    try:
        obj: KubeModel | None = model.model_validate(body)
    except ValidationError as err:
        obj = None
        problems.extend(_from_pydantic(model, err))
    problems.extend(rule_problems(model, obj if obj is not None else body, ""))
    return obj, sorted(set(problems), key=_order(problems))


def _order(problems: list[Problem]):
    first = {p: i for i, p in reversed(list(enumerate(problems)))}
    return lambda p: first[p]


# ---------------------------------------------------------------- rules


def rule_problems(model: type[BaseModel], value: Any, path: str) -> list[Problem]:
    """Evaluate the Rules of every sub-object that is itself structurally valid."""
    typed: BaseModel | None = value if isinstance(value, BaseModel) else None
    if typed is None:
        if not isinstance(value, Mapping):
            return []  # a type error, reported by the structural pass
        try:
            typed = model.model_validate(value)
        except ValidationError:
            typed = None
    out: list[Problem] = []
    if typed is not None:
        out += [Problem(_join(path, r.field), r.message) for r in getattr(model, "rules", ()) if not r.check(typed)]
    for alias, sub, child in _children(model, typed if typed is not None else value):
        out += _each(sub, child, _join(path, "." + alias))
    return out


def _each(sub: type[BaseModel], child: Any, path: str) -> list[Problem]:
    if isinstance(child, list | tuple):
        return [p for i, item in enumerate(child) for p in rule_problems(sub, item, f"{path}[{i}]")]
    return rule_problems(sub, child, path)


def _children(model: type[BaseModel], value: Any) -> Iterator[tuple[str, type[BaseModel], Any]]:
    """(alias, model class, value) for every present field whose type holds a model."""
    for name, alias, sub in _model_fields(model):
        child = getattr(value, name) if isinstance(value, BaseModel) else value.get(alias)
        if child is not None:
            yield alias, sub, child


@functools.cache
def _model_fields(model: type[BaseModel]) -> tuple[tuple[str, str, type[BaseModel]], ...]:
    """(name, alias, model class) of the fields whose type holds a model; computed once per class."""
    out = []
    for name, info in model.model_fields.items():
        sub = model_in(info.annotation)
        if sub is not None:
            out.append((name, info.alias or name, sub))
    return tuple(out)


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class inside X, X | None, list[X], Annotated[X, ...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return model_in(typing.get_args(annotation)[0])
    if origin in (list, tuple, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = model_in(arg)
            if found is not None:
                return found
    return None


def _field_by_alias(model: type[BaseModel], alias: str) -> str:
    for name, info in model.model_fields.items():
        if (info.alias or name) == alias:
            return name
    raise KeyError(alias)


def _join(path: str, suffix: str) -> str:
    return f"{path}{suffix}" if path else suffix.lstrip(".")


# ---------------------------------------------------------------- immutability


def immutable_changes(old: BaseModel, new: BaseModel, path: str = "spec") -> list[Problem]:
    """Fields marked Immutable whose value differs between two versions of a spec, each with its Immutable
    reason and both values; in a field that holds a model, each of its fields that differs (spec.model.uri).

    The one check of immutability in Python: the CRD's transition rules come from the same markers (crd.py),
    and the operator refuses with it what changed under a running FineTuneJob (controller/finetune.py)."""
    out = []
    for name, info in type(new).model_fields.items():
        mark = next((m for m in info.metadata if isinstance(m, Immutable)), None)
        if mark is None:
            continue
        for where, was, now in _differences(getattr(old, name), getattr(new, name), f"{path}.{info.alias or name}"):
            out.append(Problem(where, f"{mark.reason} ({_show(was)} -> {_show(now)})"))
    return out


def _differences(old: Any, new: Any, path: str) -> list[tuple[str, Any, Any]]:
    """(path, old value, new value) where two values differ; two models of one class field by field."""
    if old == new:
        return []
    if isinstance(old, BaseModel) and type(old) is type(new):
        return [
            d
            for name, info in type(new).model_fields.items()
            for d in _differences(getattr(old, name), getattr(new, name), f"{path}.{info.alias or name}")
        ]
    return [(path, old, new)]


# ---------------------------------------------------------------- pydantic errors


def _from_pydantic(model: type[BaseModel], err: ValidationError) -> Iterable[Problem]:
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        path = _loc_path(loc)
        yield Problem(path, _message(model, e, loc))


def _loc_path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(model: type[BaseModel], e: Mapping[str, Any], loc: list[Any]) -> str:
    kind, ctx, given = e["type"], e.get("ctx") or {}, e.get("input")
    simple = {
        "missing": "is required",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "model_type": "must be a mapping",
        "model_attributes_type": "must be a mapping",
        "dict_type": "must be a mapping",
        "list_type": "must be a list",
        "finite_number": "must be a finite number",
    }
    if kind in simple:
        return simple[kind] + ("" if kind == "missing" else f" (got {_show(given)})")
    if kind == "extra_forbidden":
        return _unknown_field(model, loc)
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in bounds:
        key, op = bounds[kind]
        return f"must be {op} {_number(ctx[key])} (got {_show(given)})"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']} (got {_show(given)})"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else f"must be at least {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} items"
    if kind == "value_error":
        return str(ctx.get("error", e["msg"]))
    return str(e["msg"])


def _unknown_field(model: type[BaseModel], loc: list[Any]) -> str:
    known = _known_fields(model, loc[:-1])
    name = str(loc[-1])
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown field{hint}; known fields: {', '.join(known)}" if known else "unknown field"


def _known_fields(model: type[BaseModel], loc: list[Any]) -> list[str]:
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        try:
            info = current.model_fields[_field_by_alias(current, str(part))]
        except KeyError:
            return []
        current = model_in(info.annotation)
    if current is None:
        return []
    return [info.alias or name for name, info in current.model_fields.items()]


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", type(None): "empty"}.get(type(value), type(value).__name__)
