"""The operator as the chart deploys it, as a real process against the API emulator: it serves the
health endpoint both probes ask (a standby too), and the pods it creates run the images the chart's
values name (its KUBEFORGE_IMAGE_* settings read at start)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.builders import DELETE, finetune
from tests.chart.charting import operator_container, operator_env, render
from tests.conftest import free_port
from tests.harness.cluster import add_nodes, wait_children
from tests.harness.emulator import FaithfulEmulator
from tests.harness.operator import OperatorProcess, write_kubeconfig
from tests.harness.waiters import wait_for

pytestmark = pytest.mark.operator

MIRROR = "mirror.example.com:5000"
DIGEST = "sha256:" + "cd" * 32
LEASES = "/apis/coordination.k8s.io/v1/namespaces/default/leases"
ELECTION = ("--leader-elect", "--lease-namespace=default", "--lease-duration=3", "--renew-deadline=1",
            "--retry-period=0.5")  # fmt: skip


async def health(url: str) -> dict[str, Any] | None:
    try:
        async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(2)) as resp:
            return await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def test_the_operator_answers_its_probes_and_runs_the_images_the_chart_names(
    emulator: FaithfulEmulator, tmp_path: Path
):
    port = free_port()
    docs = render({"imageRegistry": MIRROR, "images": {"trainer": {"digest": DIGEST}}, "livenessPort": port})
    container = operator_container(docs)
    probe = container["readinessProbe"]["httpGet"]
    assert container["livenessProbe"]["httpGet"] == probe
    liveness = next(a for a in container["args"] if a.startswith("--liveness="))
    assert liveness == f"--liveness=http://0.0.0.0:{port}{probe['path']}"
    url = f"http://127.0.0.1:{port}{probe['path']}"

    # another replica holds the Lease: this one stands by, answering the probes, until it runs out
    lease = {"metadata": {"name": "kubeforge-operator"},
             "spec": {"holderIdentity": "replica-a", "leaseDurationSeconds": 3, "leaseTransitions": 0}}  # fmt: skip
    resp = await emulator.post(LEASES, json=lease)
    assert resp.status in (200, 201), await resp.text()
    images = {k: v for k, v in operator_env(docs).items() if k.startswith("KUBEFORGE_IMAGE_")}
    env = {**images, "KUBEFORGE_RESYNC_SECONDS": "0.5", "KUBEFORGE_FULL_PASS_SECONDS": "0", "KUBEFORGE_OFFLINE": "1",
           "KUBEFORGE_METRICS_PORT": str(free_port()), "POD_NAME": "replica-b"}  # fmt: skip
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    proc = OperatorProcess(kubeconfig, tmp_path / "operator.log", emulator, (liveness, *ELECTION), env=env)
    starting = asyncio.create_task(proc.start())  # returns once it leads and watches
    try:
        standby = await wait_for(lambda: health(url), what="the standby's health endpoint", describe=proc.logs)
        assert standby == {"standby": True} and not starting.done()
        await starting
        await wait_for(lambda: _leading(url), what="kopf's health endpoint", describe=proc.logs)

        await add_nodes(emulator, "h100-4x8.yaml")
        doc = finetune(**{"resources.queue": DELETE})
        resp = await emulator.post("/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs", json=doc)
        assert resp.status == 201, await resp.text()
        job = (await wait_children(emulator, "team-a", doc["metadata"]["name"], ("Job",)))["Job"]
        image = job["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image == f"{MIRROR}/kubeforge/trainer@{DIGEST}"
        assert f"trainer={MIRROR}/kubeforge/trainer@{DIGEST}" in proc.logs()  # the images, logged at start
    finally:
        if not starting.done():
            starting.cancel()
        await proc.stop()


async def _leading(url: str) -> bool:
    body = await health(url)
    return body is not None and "standby" not in body
