"""End to end on a kind cluster: a real API server admits our CRDs, enforces their schema and CEL
rules, and the operator (run locally against it) records what it saw.

Skipped where Docker/kind are absent (see conftest.py). Run with: pytest e2e -m e2e
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.builders import EXAMPLES, finetune

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
CLUSTER = os.environ.get("KUBEFORGE_E2E_CLUSTER", "kubeforge-e2e")


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["kubectl", "--context", f"kind-{CLUSTER}", *args], input=stdin, capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    existing = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True).stdout.split()
    created = CLUSTER not in existing
    if created:
        subprocess.run(["kind", "create", "cluster", "--name", CLUSTER, "--wait", "120s"], check=True, timeout=600)
    kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    kubectl("create", "namespace", "team-a", check=False)
    try:
        yield CLUSTER
    finally:
        if created and not os.environ.get("KUBEFORGE_E2E_KEEP"):
            subprocess.run(["kind", "delete", "cluster", "--name", CLUSTER], timeout=300)


def test_the_api_server_accepts_the_examples(cluster):
    for path in sorted(EXAMPLES.glob("*.yaml")):
        kubectl("apply", "--dry-run=server", "-f", str(path))


def test_cel_rules_reject_a_bad_spec_naming_the_field(cluster):
    bad = finetune(method="full")  # the example has lora settings
    result = kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(bad), check=False)
    assert result.returncode != 0
    assert "spec.lora" in result.stderr and "only applies to method lora or qlora" in result.stderr


def test_immutable_fields_are_refused_by_the_api_server(cluster):
    kubectl("apply", "-f", str(EXAMPLES / "finetunejob-qwen3-8b-lora.yaml"))
    try:
        changed = finetune(**{"model.uri": "hf://Qwen/Qwen3-4B"})
        result = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(changed), check=False)
        assert result.returncode != 0 and "is immutable" in result.stderr
    finally:
        kubectl("delete", "-f", str(EXAMPLES / "finetunejob-qwen3-8b-lora.yaml"), "--wait=false", check=False)


def test_the_operator_records_what_it_saw(cluster, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        subprocess.run(
            ["kind", "get", "kubeconfig", "--name", cluster], capture_output=True, text=True, check=True
        ).stdout
    )
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    operator = subprocess.Popen([sys.executable, "-m", "kubeforge.controller"], env=env, cwd=ROOT)
    try:
        kubectl("apply", "-f", str(EXAMPLES / "finetunejob-qwen3-8b-lora.yaml"))
        deadline = time.monotonic() + 60
        phase = ""
        while time.monotonic() < deadline and phase != "Pending":
            phase = kubectl("get", "ftj", "support-bot", "-n", "team-a", "-o", "jsonpath={.status.phase}").stdout
            time.sleep(1)
        assert phase == "Pending"
        listed = kubectl("get", "kubeforge", "-n", "team-a").stdout
        assert "support-bot" in listed
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        kubectl("delete", "-f", str(EXAMPLES / "finetunejob-qwen3-8b-lora.yaml"), "--wait=false", check=False)
