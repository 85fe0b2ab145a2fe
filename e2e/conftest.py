"""kind-based end-to-end tests: they need a Docker engine, kind and kubectl, and skip otherwise."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def missing_tools() -> str | None:
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return "no Docker engine is running (docker info failed)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = [item for item in items if item.get_closest_marker("e2e") is not None]
    if not e2e:
        return
    reason = missing_tools()
    if reason:
        for item in e2e:
            item.add_marker(pytest.mark.skip(reason=f"e2e needs Docker and kind: {reason}"))
