"""Reconciles follow events, not a poll: with the resync far away, every transition still happens.

The operator runs with a 600 s resync, so a pass within the test's time can only come from an
event: the create handler, a child's or pod's change waking its owner, a FineTuneJob's change
waking the QuantizeJob and ModelService that use it, a node's change waking a job waiting for
GPUs. Progress is read by the job's loop with a total deadline, outside the pass: a pod that
answers one byte every half second delays nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import time

import pytest

from kubeforge.runtime.contract import termination_message
from tests.builders import DELETE, finetune, quantize
from tests.conftest import running_operator
from tests.harness.cluster import add_nodes, complete_job, finish_pods, start_pods, wait_children
from tests.harness.waiters import wait_phase, wait_status

pytestmark = pytest.mark.operator

BASE = "/apis/kubeforge.io/v1alpha1/namespaces/team-a"
FTJ, QJ = "kubeforge.io/v1alpha1/finetunejobs", "kubeforge.io/v1alpha1/quantizejobs"
FAR = {"KUBEFORGE_RESYNC_SECONDS": "600", "KUBEFORGE_PROGRESS_SECONDS": "0.5",
       "KUBEFORGE_PROGRESS_DEADLINE_SECONDS": "3"}  # fmt: skip


@contextlib.contextmanager
def endpoint(handler: type[http.server.BaseHTTPRequestHandler]):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


class Trickle(http.server.BaseHTTPRequestHandler):
    """A progress endpoint that sends its body one byte every half second (15 s: far past the deadline)."""

    def do_GET(self) -> None:
        body = json.dumps({"step": 1, "totalSteps": 10}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for byte in body:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)

    def log_message(self, *_: object) -> None:
        pass


class Fast(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"step": 7, "totalSteps": 10, "loss": 0.5}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


async def create(api, path: str, doc: dict) -> None:
    resp = await api.post(f"{BASE}/{path}", json=doc)
    assert resp.status == 201, await resp.text()


async def test_children_pods_and_sources_wake_their_owners(emulator, tmp_path, request):
    async with running_operator(emulator, tmp_path, request, **FAR) as operator:
        await add_nodes(emulator, "h100-4x8.yaml")
        await create(emulator, "quantizejobs", quantize())
        await create(emulator, "finetunejobs", finetune(**{"resources.queue": DELETE}))
        gang = (await wait_children(emulator, "team-a", "support-bot", ("Job",)))["Job"]
        await start_pods(emulator, gang)
        await wait_phase(emulator, FTJ, "team-a", "support-bot", "Running")  # a pod event woke it
        await finish_pods(emulator, gang, exit_code=0, message=termination_message(
            {"status": "succeeded", "uri": "pvc://models/support-bot", "digest": "sha256:ft1"}))  # fmt: skip
        await complete_job(emulator, gang)
        await wait_phase(emulator, FTJ, "team-a", "support-bot", "Succeeded")  # the Job's event
        # the FineTuneJob's change woke the QuantizeJob that waits for it
        quantizer = (await wait_children(emulator, "team-a", "support-bot-fp8", ("Job",)))["Job"]
        await start_pods(emulator, quantizer)
        await finish_pods(emulator, quantizer, exit_code=0, message=termination_message(
            {"status": "succeeded", "uri": "pvc://models/support-bot-fp8", "digest": "sha256:q1"}))  # fmt: skip
        await complete_job(emulator, quantizer)
        await wait_phase(emulator, QJ, "team-a", "support-bot-fp8", "Succeeded")
        assert operator.logs().count("Loop 'finetunejob' pass succeeded") >= 2  # the loop ran, woken


async def test_a_job_waiting_for_gpus_is_woken_by_a_new_node(emulator, tmp_path, request):
    async with running_operator(emulator, tmp_path, request, **FAR):
        await create(emulator, "finetunejobs", finetune(**{"resources.queue": DELETE}))
        await wait_status(emulator, FTJ, "team-a", "support-bot",
                          lambda s: s.get("phase") == "Pending" and (s.get("plan") or {}).get("feasible") is False,
                          what="infeasible without nodes")  # fmt: skip
        await add_nodes(emulator, "h100-4x8.yaml")
        await wait_children(emulator, "team-a", "support-bot", ("Job",))


async def test_a_slow_progress_endpoint_holds_up_nobody(emulator, tmp_path, request):
    async with running_operator(emulator, tmp_path, request, **FAR) as operator:
        await add_nodes(emulator, "h100-4x8.yaml")
        with endpoint(Trickle) as slow, endpoint(Fast) as fast:
            for name in ("slow", "fast"):
                await create(emulator, "finetunejobs", _named(name))
            gangs = {n: (await wait_children(emulator, "team-a", n, ("Job",)))["Job"] for n in ("slow", "fast")}
            await start_pods(emulator, gangs["slow"], progress_port=slow)
            await start_pods(emulator, gangs["fast"], progress_port=fast)
            stepped = lambda s: (s.get("progress") or {}).get("step") == 7  # noqa: E731
            try:
                fast_job = await wait_status(emulator, FTJ, "team-a", "fast", stepped, what="the fast job's progress",
                                             timeout=60)  # fmt: skip
            except AssertionError:
                print(operator.logs()[-12000:])
                raise
            assert fast_job["status"]["progress"]["loss"] == 0.5
            # meanwhile the slow one is Running (its pods' event), without progress: each read hit the deadline
            slow_job = await wait_phase(emulator, FTJ, "team-a", "slow", "Running")
            assert "progress" not in slow_job["status"]
            await asyncio.sleep(2)
            assert operator.alive


def _named(name: str) -> dict:
    doc = finetune(**{"resources.queue": DELETE})
    doc["metadata"]["name"] = name
    return doc
