"""`kubectl kubeforge` (kubeforge.kubectl_plugin) against the Kubernetes emulator, through a kubeconfig.

The operator's part is played by its own pure decide(): the FineTuneJob's status and children
are what the operator would write. kmock's emulator serves no pod logs of its own (nothing runs
pods), so the logs test stands in a reaction for rank 0's log endpoint, and the pod selection
is also tested directly.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.api import parse
from kubeforge.cli import main as kubeforge
from kubeforge.controller.finetune import Observed, decide
from kubeforge.controller.kube import object_path
from kubeforge.kubectl_plugin import context_namespace, pod_selector, rank0_pod_of, status_lines
from kubeforge.kubectl_plugin import main as plugin
from kubeforge.planner import resolve
from kubeforge.render import labels as L
from kubeforge.render.names import owner_label
from tests.builders import EXAMPLES, FINETUNE, example
from tests.harness.cluster import STATUS, add_nodes, kueue_admits, start_pods
from tests.harness.operator import write_kubeconfig
from tests.planner.nodes import example_cluster

ROOT = Path(__file__).resolve().parents[1]
JOB = str(EXAMPLES / FINETUNE)
FTJS = "/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs"
NOW = "2026-11-22T10:00:00Z"


async def run_plugin(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The plugin in a thread: its client blocks, and the emulator serves from this event loop."""
    code = await asyncio.to_thread(plugin, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def kubeconfig_for(emulator: Any, tmp_path: Path, namespace: str | None = None) -> str:
    path = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    if namespace:
        config = yaml.safe_load(path.read_text())
        config["contexts"][0]["context"]["namespace"] = namespace
        path.write_text(yaml.safe_dump(config))
    return str(path)


# ---------------------------------------------------------------- plan


@pytest.mark.parametrize("cluster", ["h100-4x8.yaml", "cordoned.yaml"])
async def test_plan_against_the_clusters_nodes_is_kubeforge_plan_on_the_same_nodes(emulator, tmp_path, capsys,
                                                                                    cluster):  # fmt: skip
    await add_nodes(emulator, cluster)
    config = kubeconfig_for(emulator, tmp_path)
    code, out, err = await run_plugin(capsys, "plan", JOB, "--kubeconfig", config, "--offline", "-o", "json")
    assert err == ""
    want_code = kubeforge(["plan", JOB, "--cluster", str(EXAMPLES / "clusters" / cluster), "--offline", "-o", "json"])
    want = capsys.readouterr().out
    assert code == want_code
    assert json.loads(out) == json.loads(want)


async def test_plan_table_and_an_empty_cluster(emulator, tmp_path, capsys):
    config = kubeconfig_for(emulator, tmp_path)
    code, out, _ = await run_plugin(capsys, "plan", JOB, "--kubeconfig", config, "--offline")
    assert code == 1 and out.startswith("INFEASIBLE: ")  # no GPU nodes at all
    await add_nodes(emulator, "h100-4x8.yaml")
    code, out, _ = await run_plugin(capsys, "--kubeconfig", config, "plan", JOB, "--offline")  # flags before too
    assert code == 0 and out.startswith("PLAN: ") and "Memory per GPU (GiB):" in out


# ---------------------------------------------------------------- a running FineTuneJob


async def create(emulator: Any, obj: dict[str, Any]) -> dict[str, Any]:
    resp = await emulator.post(object_path(obj).rsplit("/", 1)[0], json=obj)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def running_finetunejob(emulator: Any) -> list[dict[str, Any]]:
    """Nodes, the example FineTuneJob, its children and running pods, and the status the operator writes
    for them (its two passes, by decide()); the pods."""
    await add_nodes(emulator, "h100-4x8.yaml")
    inventory = example_cluster("h100-4x8.yaml")
    body = await create(emulator, example(FINETUNE))
    arch = resolve(parse(body).spec.model)
    first = decide(Observed(body=body, inventory=inventory, now=NOW, architecture=arch))
    children = [await create(emulator, child) for child in first.apply]
    await write_status(emulator, first.status)
    job = next(c for c in children if c["kind"] == "Job")
    await kueue_admits(emulator, job)  # the example names a Kueue queue
    pods = await start_pods(emulator, job)
    body = emulator.stored("kubeforge.io/v1alpha1/finetunejobs", "team-a", "support-bot")
    children = [emulator.stored(p, "team-a", c["metadata"]["name"])
                for p, c in zip(("v1/configmaps", "v1/services", "batch/v1/jobs"), children, strict=True)]  # fmt: skip
    progress = {"step": 30, "totalSteps": 120, "loss": 1.25, "tokensPerSecond": 5120.0, "etaSeconds": 3725}
    second = decide(Observed(body=body, inventory=inventory, now=NOW, children=children, pods=pods,
                             architecture=arch, progress=progress))  # fmt: skip
    assert second.status["phase"] == "Running", second.status
    await write_status(emulator, second.status)
    return pods


async def write_status(emulator: Any, status: dict[str, Any]) -> None:
    resp = await emulator.patch(f"{FTJS}/support-bot/status", json={"status": status}, headers=STATUS)
    assert resp.status == 200, await resp.text()


async def test_status_prints_phase_conditions_plan_progress_and_artifact(emulator, tmp_path, capsys):
    await running_finetunejob(emulator)
    config = kubeconfig_for(emulator, tmp_path, namespace="team-a")  # the context's namespace
    code, out, err = await run_plugin(capsys, "status", "support-bot", "--kubeconfig", config)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "FineTuneJob team-a/support-bot"
    assert lines[1] == "Phase:       Running"
    assert lines[2:4] == ["Conditions:", "  TYPE         STATUS  REASON       MESSAGE"]
    rows = [line.split(maxsplit=3) for line in lines[4:11]]
    assert [r[0] for r in rows[:3]] == ["Ready", "Reconciling", "Stalled"]  # the summary first, then the kind's own
    assert rows[0] == ["Ready", "False", "PodsRunning", "2 of 2 pod(s) running"]
    assert rows[1][:3] == ["Reconciling", "True", "PodsRunning"] and rows[2][:2] == ["Stalled", "False"]
    assert ["Running", "True", "PodsRunning", "2 of 2 pod(s) running"] in rows
    assert all(line == line.rstrip() for line in lines)
    stored = emulator.stored("kubeforge.io/v1alpha1/finetunejobs", "team-a", "support-bot")
    assert f"Plan:        {stored['status']['plan']['reason']}" in lines
    assert "Progress:    step 30/120, 25%, loss 1.25, 5120 tokens/s, ETA 1h02m (at 2026-11-22T10:00:00Z)" in lines
    assert lines[-1] == "Artifact:    -"

    code, out, _ = await run_plugin(capsys, "status", "support-bot", "--kubeconfig", config, "-o", "json")
    assert code == 0 and json.loads(out) == stored["status"]


async def test_status_of_a_missing_object_and_of_other_kinds(emulator, tmp_path, capsys):
    config = kubeconfig_for(emulator, tmp_path)  # no namespace in the context: default
    code, out, err = await run_plugin(capsys, "status", "support-bot", "--kubeconfig", config)
    assert code == 1 and out == ""
    assert err == 'error: FineTuneJob "support-bot" not found in namespace "default"\n'
    qj = example("quantizejob-support-bot-fp8.yaml")
    await create(emulator, qj)
    code, out, _ = await run_plugin(capsys, "status", "support-bot-fp8", "-k", "qj", "-n", "team-a",
                                    "--kubeconfig", config)  # fmt: skip
    assert code == 0 and out.splitlines()[:2] == ["QuantizeJob team-a/support-bot-fp8", "Phase:       -"]


async def test_logs_prints_rank_0s_log(emulator, tmp_path, capsys):
    pods = await running_finetunejob(emulator)
    rank0 = next(p for p in pods if p["metadata"]["labels"][L.JOB_COMPLETION_INDEX_LABEL] == "0")
    # the emulator runs no kubelet: rank 0's log endpoint answers what a kubelet would stream
    emulator[f"get /api/v1/namespaces/team-a/pods/{rank0['metadata']['name']}/log"] << b"step 1 loss 2.5\nstep 2\n"
    config = kubeconfig_for(emulator, tmp_path)
    code, out, err = await run_plugin(capsys, "logs", "support-bot", "-n", "team-a", "--kubeconfig", config)
    assert (code, out, err) == (0, "step 1 loss 2.5\nstep 2\n", "")
    asked = [r for r in emulator if r.url.path.endswith("/log")]
    assert asked and asked[-1].params.get("container") == "trainer"
    listed = [r for r in emulator if r.url.path == "/api/v1/namespaces/team-a/pods" and r.method == "GET"]
    assert listed[-1].params.get("labelSelector") == pod_selector("support-bot")

    code, out, err = await run_plugin(capsys, "logs", "other", "-n", "team-a", "--kubeconfig", config)
    assert code == 1 and err == 'error: FineTuneJob "other" has no rank-0 pod in namespace "team-a" (yet)\n'


async def test_the_plugin_runs_as_a_command(emulator, tmp_path):
    config = kubeconfig_for(emulator, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubeforge.kubectl_plugin", "status", "nope", "-k", "msvc", "--kubeconfig", config,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1 and out == b""
    assert err.decode() == 'error: ModelService "nope" not found in namespace "default"\n'


# ---------------------------------------------------------------- pure parts


def pod(name: str, owner: str, index: str | None, created: str, kind: str = "FineTuneJob") -> dict[str, Any]:
    labels = {L.OWNER_KIND: kind, L.OWNER_NAME: owner_label(owner)}
    if index is not None:
        labels[L.JOB_COMPLETION_INDEX_LABEL] = index
    return {"metadata": {"name": name, "labels": labels, "creationTimestamp": created}}


def test_rank0_is_the_newest_index_0_pod_of_that_finetunejob():
    pods = [
        pod("a-0-old", "a", "0", "2026-01-01T00:00:00Z"),
        pod("a-1", "a", "1", "2026-01-01T00:00:02Z"),
        pod("a-0-new", "a", "0", "2026-01-01T00:00:01Z"),
        pod("b-0", "b", "0", "2026-01-01T00:00:09Z"),
        pod("a-q", "a", "0", "2026-01-01T00:00:09Z", kind="QuantizeJob"),
    ]
    assert rank0_pod_of(pods, "a")["metadata"]["name"] == "a-0-new"
    assert rank0_pod_of(pods, "c") is None
    long = "x" * 70  # longer than a label value: the owner label is a hashed form, as on the pods
    assert rank0_pod_of([pod("l-0", long, "0", "")], long)["metadata"]["name"] == "l-0"
    annotated = pod("a-0-ann", "a", None, "2026-01-01T00:00:05Z")
    annotated["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": "0"}
    assert rank0_pod_of([*pods, annotated], "a")["metadata"]["name"] == "a-0-ann"


def test_pod_selector_uses_the_owner_labels():
    assert pod_selector("a") == f"{L.OWNER_KIND}=FineTuneJob,{L.OWNER_NAME}=a"


def test_status_lines_of_a_succeeded_job_a_quantizejob_and_a_service():
    ftj = {"kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "n"},
           "status": {"phase": "Succeeded", "artifact": {"uri": "pvc://m/j", "digest": "sha256:ab",
                                                         "sizeBytes": 2 * 1024**3}}}  # fmt: skip
    lines = status_lines(ftj)
    assert lines[2] == "Conditions:  - (the operator has not written any yet)"
    assert "Plan:        -" in lines and "Progress:    -" in lines
    assert lines[-1] == "Artifact:    pvc://m/j (sha256:ab, 2.00 GiB)"
    ready = {"type": "Ready", "status": "False", "reason": "Running", "message": "a\nb"}
    qj = {"kind": "QuantizeJob", "metadata": {"name": "q"},
          "status": {"phase": "Running", "gpus": 1, "source": {"uri": "pvc://m/j"}, "progress": {"stage": "calibrate"},
                     "conditions": [ready]}}  # fmt: skip
    lines = status_lines(qj)
    assert lines[0] == "QuantizeJob default/q"
    assert lines[4] == "  Ready  False   Running  a b"  # a message stays on one line
    assert "Source:      pvc://m/j" in lines and "Plan:        1 GPU" in lines and "Progress:    calibrate" in lines
    msvc = {"kind": "ModelService", "metadata": {"name": "s", "namespace": "n"},
            "status": {"phase": "Ready", "engine": "vllm", "gpus": 2, "replicas": 2, "readyReplicas": 1,
                       "endpoint": "http://s.n.svc:8000/v1", "servedArtifact": {"uri": "pvc://m/q"}}}  # fmt: skip
    lines = status_lines(msvc)
    assert lines[-4:] == ["Plan:        vllm, 2 GPU(s) per replica", "Replicas:    1 of 2 ready",
                          "Endpoint:    http://s.n.svc:8000/v1", "Serving:     pvc://m/q"]  # fmt: skip


def test_context_namespace(tmp_path):
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "one",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "one", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
                     {"name": "two", "context": {"cluster": "c", "user": "u"}}],
    }  # fmt: skip
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    assert context_namespace(str(path), None) == "team-a"
    assert context_namespace(str(path), "two") == "default"


def test_a_missing_kubeconfig_is_a_usage_error(tmp_path, capsys):
    assert plugin(["status", "x", "--kubeconfig", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: kubeconfig: ")


def test_the_entry_point_kubectl_finds():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-kubeforge"] == "kubeforge.kubectl_plugin:main"
