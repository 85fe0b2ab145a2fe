"""Render the chart with Helm's own SDK, and read the operator's container out of what it renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm

from tests.harness.manifests import documents

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubeforge"
RELEASE, NAMESPACE = "kubeforge", "kubeforge-system"


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = helm.Chart.load(str(CHART)).render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return documents(text for path, text in out.items() if path.endswith((".yaml", ".yml")))


def notes(values: dict[str, Any] | None = None) -> str:
    out = helm.Chart.load(str(CHART)).render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return out[f"{CHART.name}/templates/NOTES.txt"]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def operator_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs)["Deployment"]["spec"]["template"]["spec"]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = operator_pod(docs)["containers"]
    return container


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The operator's literal environment variables (those taken from fields or Secrets left out)."""
    return {e["name"]: e["value"] for e in operator_container(docs).get("env", []) if "value" in e}
