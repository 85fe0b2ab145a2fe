"""Validate rendered manifests against the official Kubernetes schema (kubernetes-validate)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33"


def validate_manifest(doc: dict[str, Any], version: str = KUBERNETES_VERSION) -> None:
    """Raise AssertionError naming the object and the first schema error (strict: unknown fields fail)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        path = ".".join(str(p) for p in err.path) if getattr(err, "path", None) else ""
        raise AssertionError(f"{where} is not a valid Kubernetes {version} object: {path}: {err.message}") from err


def documents(texts: Iterable[str]) -> list[dict[str, Any]]:
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]
