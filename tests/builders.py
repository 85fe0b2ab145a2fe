"""Small builders for test objects: the examples as dicts, and ways to change them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FINETUNE = "finetunejob-qwen3-8b-lora.yaml"
QUANTIZE = "quantizejob-support-bot-fp8.yaml"
SERVICE = "modelservice-support-bot.yaml"


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def finetune(**spec: Any) -> dict[str, Any]:
    return with_spec(example(FINETUNE), spec)


def quantize(**spec: Any) -> dict[str, Any]:
    return with_spec(example(QUANTIZE), spec)


def service(**spec: Any) -> dict[str, Any]:
    return with_spec(example(SERVICE), spec)


def with_spec(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Set spec fields; a dotted key reaches into sub-objects; the value DELETE removes a field."""
    doc = copy.deepcopy(doc)
    for dotted, value in changes.items():
        set_path(doc["spec"], dotted.replace("__", "."), value)
    return doc


class _Delete:
    """The marker for a key to remove; its repr is stable, so test ids are the same in every process."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def set_path(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj.setdefault(key, {})
    if value is DELETE:
        obj.pop(last, None)
    else:
        obj[last] = value
