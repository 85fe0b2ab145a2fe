"""The values table of charts/kubeforge/README.md, generated from values.yaml.

A key is documented by a ``# -- description`` comment right above it (helm-docs style; following
comment lines continue it). Its row gives the key's dotted path, type, default (JSON) and description;
keys under a documented key are covered by it. ``python -m tests.chart.values_table --write`` rewrites
the table between the README's markers; tests/chart/test_readme.py fails when they differ.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubeforge"
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(\s|$)")
_DOC = re.compile(r"^ *# -- ?(?P<text>.*)$")
_MORE = re.compile(r"^ *#(?! --) ?(?P<text>.*)$")


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def documented(text: str) -> dict[str, str]:
    """{dotted key: description} for every key with a ``# --`` comment above it."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        if (doc := _DOC.match(line)) is not None:
            pending = [doc["text"].strip()]
        elif pending is not None and (more := _MORE.match(line)) is not None:
            pending.append(more["text"].strip())
        elif (key := _KEY.match(line)) is not None:
            indent = len(key["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key["key"]))
            if pending is not None:
                docs[".".join(k for _, k in stack)] = " ".join(p for p in pending if p)
            pending = None
        elif not line.strip().startswith("#"):
            pending = None  # a blank or other line ends a description that no key followed
    return docs


TYPES = ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"), (list, "list"), (dict, "object"))


def _type(value: Any) -> str:
    return next((name for kind, name in TYPES if isinstance(value, kind)), "null")


def _lookup(values: dict[str, Any], key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        node = node[part]
    return node


def leaves(values: Any, prefix: str = "") -> list[str]:
    """Every key whose value is not a non-empty mapping."""
    if isinstance(values, dict) and values:
        return [leaf for k, v in values.items() for leaf in leaves(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def rows(text: str) -> list[Row]:
    values = yaml.safe_load(text)
    return [
        Row(key, _type(_lookup(values, key)), json.dumps(_lookup(values, key), separators=(", ", ": ")), description)
        for key, description in documented(text).items()
    ]


def undocumented(text: str) -> list[str]:
    """Keys neither documented themselves nor under a documented key."""
    docs = documented(text)
    return [
        leaf
        for leaf in leaves(yaml.safe_load(text))
        if not any(leaf == key or leaf.startswith(f"{key}.") for key in docs)
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(text: str) -> str:
    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{r.key}` | {r.type} | `{_cell(r.default)}` | {_cell(r.description)} |" for r in rows(text)]
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    """The text between the README's markers."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md has no {BEGIN} ... {END} markers")
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write(chart: Path = CHART) -> None:
    readme = (chart / "README.md").read_text()
    new = table((chart / "values.yaml").read_text())
    head, rest = readme.split(BEGIN, 1)
    (chart / "README.md").write_text(f"{head}{BEGIN}\n{new}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(table((CHART / "values.yaml").read_text()))
