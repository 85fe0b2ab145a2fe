"""Playing the parts the emulator lacks: nodes, the Job controller, the kubelet and Kueue.

Each helper does through the API what that component would do in a real cluster, so the
operator sees the same watch events it would see there.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.harness.waiters import wait_for

ROOT = Path(__file__).resolve().parents[2]
STATUS = {"Content-Type": "application/merge-patch+json"}


async def add_nodes(api: Any, cluster_file: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load((ROOT / "examples" / "clusters" / cluster_file).read_text())
    created = []
    for node in doc["items"]:
        status = node.pop("status", None)
        resp = await api.post("/api/v1/nodes", json=node)
        assert resp.status == 201, await resp.text()
        name = node["metadata"]["name"]
        resp = await api.patch(f"/api/v1/nodes/{name}/status", json={"status": status}, headers=STATUS)
        assert resp.status == 200, await resp.text()
        created.append(await resp.json())
    return created


async def wait_children(api: Any, namespace: str, owner: str, kinds: tuple[str, ...], timeout: float = 20) -> dict:
    """Wait until children of these kinds, labelled as owned by ``owner``, exist; return them by kind."""
    paths = {
        "ConfigMap": "v1/configmaps",
        "Service": "v1/services",
        "Job": "batch/v1/jobs",
        "JobSet": "jobset.x-k8s.io/v1alpha2/jobsets",
        "Deployment": "apps/v1/deployments",
    }

    def probe() -> dict | None:
        found = {}
        for kind in kinds:
            items = [
                o
                for o in api.stored_all(paths[kind], namespace)
                if (o["metadata"].get("labels") or {}).get("kubeforge.io/owner-name") == owner
            ]
            if not items:
                return None
            found[kind] = items[0]
        return found

    return await wait_for(probe, what=f"{', '.join(kinds)} of {owner}", timeout=timeout)


def owned(api: Any, resource: str, namespace: str, owner: str) -> list[dict[str, Any]]:
    return [
        o
        for o in api.stored_all(resource, namespace)
        if (o["metadata"].get("labels") or {}).get("kubeforge.io/owner-name") == owner
    ]


async def start_pods(
    api: Any, job: dict[str, Any], *, ip: str = "127.0.0.1", progress_port: int | None = None, phase: str = "Running"
) -> list[dict[str, Any]]:
    """The Job controller creates one pod per completion index; the kubelet runs them."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    template = copy.deepcopy(job["spec"]["template"])
    pods = []
    for index in range(job["spec"].get("completions") or 1):
        labels = dict(template["metadata"].get("labels") or {})
        labels["batch.kubernetes.io/job-completion-index"] = str(index)
        labels["job-name"] = name
        spec = copy.deepcopy(template["spec"])
        if progress_port is not None:
            for port in spec["containers"][0]["ports"]:
                if port["name"] == "progress":
                    port["containerPort"] = progress_port
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-{index}-abcde", "namespace": ns, "labels": labels},
            "spec": spec,
        }
        resp = await api.post(f"/api/v1/namespaces/{ns}/pods", json=pod)
        assert resp.status == 201, await resp.text()
        status = {
            "phase": phase,
            "podIP": ip,
            "containerStatuses": [{"name": "trainer", "ready": True, "state": {"running": {}}}],
        }
        resp = await api.patch(
            f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status", json={"status": status}, headers=STATUS
        )
        pods.append(await resp.json())
    await patch_job_status(api, job, {"active": len(pods), "startTime": "2026-11-22T10:00:00Z"})
    return pods


async def finish_pods(api: Any, job: dict[str, Any], *, exit_code: int, message: str = "") -> None:
    """The kubelet records each container's end; rank 0 leaves its termination message."""
    ns = job["metadata"]["namespace"]
    for pod in owned(api, "v1/pods", ns, job["metadata"]["labels"]["kubeforge.io/owner-name"]):
        index = pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
        if index == "0" and message:
            terminated["message"] = message
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "trainer", "ready": False, "state": {"terminated": terminated}}],
        }
        resp = await api.patch(
            f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status", json={"status": status}, headers=STATUS
        )
        assert resp.status == 200


async def complete_job(api: Any, job: dict[str, Any]) -> None:
    n = job["spec"].get("completions") or 1
    await patch_job_status(
        api,
        job,
        {
            "active": 0,
            "succeeded": n,
            "completionTime": "2026-11-22T11:00:00Z",
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True"},
                {"type": "Complete", "status": "True", "reason": "CompletionsReached"},
            ],
        },
    )


async def fail_job(api: Any, job: dict[str, Any], reason: str, message: str) -> None:
    await patch_job_status(
        api,
        job,
        {
            "active": 0,
            "failed": 1,
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason},
                {"type": "Failed", "status": "True", "reason": reason, "message": message},
            ],
        },
    )


async def patch_job_status(api: Any, job: dict[str, Any], status: dict[str, Any]) -> None:
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    resp = await api.patch(
        f"/apis/batch/v1/namespaces/{ns}/jobs/{name}/status", json={"status": status}, headers=STATUS
    )
    assert resp.status == 200, await resp.text()


async def kueue_admits(api: Any, job: dict[str, Any]) -> None:
    """Kueue admits the whole gang by unsuspending the Job."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    resp = await api.patch(
        f"/apis/batch/v1/namespaces/{ns}/jobs/{name}", json={"spec": {"suspend": False}}, headers=STATUS
    )
    assert resp.status == 200, await resp.text()


def events_for(api: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    return [e for e in api.stored_all("v1/events", namespace) if (e.get("involvedObject") or {}).get("name") == name]


async def roll_out(api: Any, deployment: dict[str, Any], *, ready: int | None = None) -> dict[str, Any]:
    """The Deployment controller and kubelets: every replica runs the current template (``ready`` of them ready)."""
    ns, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    current = next(d for d in api.stored_all("apps/v1/deployments", ns) if d["metadata"]["name"] == name)
    n = current["spec"].get("replicas", 1)
    ready = n if ready is None else ready
    status = {"observedGeneration": current["metadata"].get("generation", 1), "replicas": n, "updatedReplicas": n,
              "availableReplicas": ready, "readyReplicas": ready}  # fmt: skip
    resp = await api.patch(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}/status", json={"status": status},
                           headers=STATUS)  # fmt: skip
    assert resp.status == 200, await resp.text()
    return await resp.json()
