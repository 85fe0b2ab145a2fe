"""Kubernetes label and field selectors, as the API server evaluates them (for the emulator)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, str]], bool]

_SET = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_CMP = re.compile(r"^\s*([^\s!=(),]+)\s*(==|=|!=)\s*([^\s!=(),]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def parse_label_selector(selector: str) -> Predicate:
    """`a=b,c!=d,e in (x,y),f notin (z),g,!h` -> a predicate over a label dict."""
    terms: list[Predicate] = []
    for part in _split(selector or ""):
        if m := _SET.match(part):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                terms.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                terms.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := _CMP.match(part):
            key, op, value = m.groups()
            if op == "!=":
                terms.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                terms.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif m := _EXISTS.match(part):
            negate, key = m.group(1) == "!", m.group(2)
            terms.append(lambda labels, k=key, n=negate: (k in labels) != n)
        else:
            raise ValueError(f"unable to parse requirement: {part.strip()!r}")
    return lambda labels: all(t(labels) for t in terms)


def parse_field_selector(selector: str) -> Callable[[Mapping[str, Any]], bool]:
    """`metadata.name=x,metadata.namespace!=y` over an object (dotted paths)."""
    terms = []
    for part in _split(selector or ""):
        m = _CMP.match(part)
        if m is None:
            raise ValueError(f"unable to parse field requirement: {part.strip()!r}")
        path, op, value = m.groups()
        terms.append((path.split("."), op == "!=", value))

    def get(obj: Mapping[str, Any], path: list[str]) -> str:
        for key in path:
            obj = obj.get(key, {}) if isinstance(obj, Mapping) else {}
        return "" if obj == {} else str(obj)

    return lambda obj: all((get(obj, p) == v) != neg for p, neg, v in terms)
