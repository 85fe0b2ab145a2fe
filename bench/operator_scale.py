"""The operator at scale: N running FineTuneJobs, with their Jobs and pods, on the API emulator.

Starts the emulator (tests/harness, kmock) in this process and the real operator
(`python -m kubeforge.controller`) as a child process against it; creates N FineTuneJobs
(four distinct specs, so four distinct plans), waits for the operator to create each one's
ConfigMap, Service and Job, creates each Job's pod as the Job controller and kubelet would
(Running, with an IP), waits until every job reports Running, lets it settle, then measures
the operator process alone over a steady window: CPU time used (as a share of one core),
resident memory, passes run, API writes made. With ``--progress`` every pod's progress
endpoint answers (one local server for all, its step advancing), so the operator reads
progress and writes it to each job's status every KUBEFORGE_PROGRESS_SECONDS, or less often
as the reads' budget asks (KUBEFORGE_PROGRESS_READS_PER_SECOND over all jobs).

    python bench/operator_scale.py [--jobs 1000] [--window 60] [--progress] [--json out.json]
    python bench/operator_scale.py --ref 8292d39 --resync 10   # an older operator, for comparison

Run it on a quiet machine; the emulator shares the CPUs with the operator, and its own CPU
is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT)]

import kmock  # noqa: E402
import psutil  # noqa: E402
from aiohttp import web  # noqa: E402

import tests.harness.operator as harness_operator  # noqa: E402
from tests.builders import DELETE, finetune  # noqa: E402
from tests.harness.cluster import add_nodes, start_pods  # noqa: E402
from tests.harness.emulator import FaithfulEmulator  # noqa: E402
from tests.harness.operator import OperatorProcess, write_kubeconfig  # noqa: E402

NS = "team-a"
FTJ = "kubeforge.io/v1alpha1/finetunejobs"
FTJ_PATH = f"/apis/kubeforge.io/v1alpha1/namespaces/{NS}/finetunejobs"
RANKS = (8, 16, 32, 64)  # four distinct specs: four distinct plans


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def progress_server() -> tuple[web.AppRunner, int]:
    """One progress endpoint for every pod (they all have IP 127.0.0.1): a step that advances."""
    started = time.monotonic()

    async def progress(_: web.Request) -> web.Response:
        step = int(time.monotonic() - started)
        return web.json_response({"step": step, "totalSteps": 100000, "loss": 1.0, "tokensPerSecond": 1000.0})

    app = web.Application()
    app.router.add_get("/progress", progress)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def wait_until(probe: Any, what: str, timeout: float) -> float:
    start = time.monotonic()
    while not probe():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(1.0)
    return time.monotonic() - start


def count(api: FaithfulEmulator, resource: str) -> int:
    return len(api.stored_all(resource, NS))


def running(api: FaithfulEmulator) -> int:
    return sum(1 for o in api.stored_all(FTJ, NS) if (o.get("status") or {}).get("phase") == "Running")


WRITES = {"count": 0}


class CountingEmulator(FaithfulEmulator):
    """Counts the API writes as they arrive (the request log is capped: kmock's cost grows with it)."""

    async def _handle(self, request: Any) -> Any:  # type: ignore[override]
        if str(request.method).upper().endswith(("POST", "PUT", "PATCH", "DELETE")):
            WRITES["count"] += 1
        return await super()._handle(request)


def passes(log: str) -> int:
    """Passes in the operator's log: its loops' (this tree) or kopf's resync timers' (older refs)."""
    return log.count("pass succeeded") + log.count("Timer 'finetunejob' succeeded")


def writes(_: FaithfulEmulator) -> int:
    return WRITES["count"]


def checkout(ref: str, into: Path) -> Path:
    """The operator and runtime packages of a git ref (read with git archive; the work tree is untouched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "operator", "runtime"],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="kubeforge-scale-"))
    if args.ref:  # the operator process runs that ref's code (PYTHONPATH and cwd from the harness' ROOT)
        harness_operator.ROOT = checkout(args.ref, work / "src")
    async with CountingEmulator(strict=False) as api, kmock.Server(api) as server:
        api.url = str(server.url).rstrip("/")
        api.log_limit = 25  # as tests/operator/test_faults.py: measure the operator, not kmock's log scans
        api.resume_watches = True  # as the API server: a reconnecting watch gets what changed, not everything
        resp = await api.post("/api/v1/namespaces", json={"metadata": {"name": NS}})
        assert resp.status == 201, await resp.text()
        await add_nodes(api, "h100-4x8.yaml")
        runner, port = await progress_server() if args.progress else (None, None)
        env = {
            "KUBEFORGE_OFFLINE": "1",
            "KUBEFORGE_METRICS_PORT": str(free_port()),
            "KUBEFORGE_RESYNC_SECONDS": str(args.resync),
            "KUBEFORGE_PROGRESS_SECONDS": str(args.progress_seconds),
            "KUBEFORGE_PROGRESS_READS_PER_SECOND": str(args.progress_reads),
        }
        kubeconfig = write_kubeconfig(work / "kubeconfig", api.url)
        operator = OperatorProcess(kubeconfig, work / "operator.log", api, env=env)
        await operator.start()
        try:
            started = time.monotonic()
            for i in range(args.jobs):
                doc = finetune(**{"resources.queue": DELETE, "lora.rank": RANKS[i % len(RANKS)]})
                doc["metadata"] = {"name": f"job-{i:04d}", "namespace": NS}
                resp = await api.post(FTJ_PATH, json=doc)
                assert resp.status == 201, await resp.text()
            await wait_until(lambda: count(api, "batch/v1/jobs") >= args.jobs, "every Job", args.timeout)
            children_s = time.monotonic() - started
            for job in api.stored_all("batch/v1/jobs", NS):
                await start_pods(api, job, progress_port=port)
            await wait_until(lambda: running(api) >= args.jobs, "every FineTuneJob Running", args.timeout)
            ramp_s = time.monotonic() - started
            await asyncio.sleep(args.settle)

            proc = psutil.Process(operator.proc.pid)  # type: ignore[union-attr]
            log_before = passes(operator.logs())
            woken_before = operator.logs().count("pass succeeded (woken")
            writes_before, cpu_before, t0 = writes(api), sum(proc.cpu_times()[:2]), time.monotonic()
            rss = []
            while time.monotonic() - t0 < args.window:
                rss.append(proc.memory_info().rss)
                await asyncio.sleep(1.0)
            elapsed = time.monotonic() - t0
            cpu = sum(proc.cpu_times()[:2]) - cpu_before
            result = {
                "operator": args.ref or "work tree",
                "jobs": args.jobs,
                "progress_endpoints": bool(args.progress),
                "resync_seconds": args.resync,
                "progress_seconds": args.progress_seconds,
                "progress_reads_per_s": args.progress_reads,
                "children_created_s": round(children_s, 1),
                "all_running_s": round(ramp_s, 1),
                "window_s": round(elapsed, 1),
                "cpu_percent_of_one_core": round(100 * cpu / elapsed, 2),
                "rss_mib_max": round(max(rss) / 2**20, 1),
                "passes_per_s": round((passes(operator.logs()) - log_before) / elapsed, 2),
                "woken_passes_per_s": round(
                    (operator.logs().count("pass succeeded (woken") - woken_before) / elapsed, 2
                ),
                "api_writes_per_s": round((writes(api) - writes_before) / elapsed, 2),
                "api_writes_total": writes(api),
                "operator_alive": operator.alive,
            }
        finally:
            await operator.stop()
            if runner is not None:
                await runner.cleanup()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of steady state measured")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds waited after all are Running")
    parser.add_argument("--resync", type=float, default=60.0, help="KUBEFORGE_RESYNC_SECONDS (the chart's default)")
    parser.add_argument("--progress-seconds", type=float, default=30.0, help="KUBEFORGE_PROGRESS_SECONDS")
    parser.add_argument("--progress", action="store_true", help="every pod answers its progress endpoint")
    parser.add_argument("--progress-reads", type=float, default=2.0,
                        help="KUBEFORGE_PROGRESS_READS_PER_SECOND (the chart's default; 0: no budget)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--ref", default=None, help="run the operator of this git ref (default: the work tree)")
    ns = parser.parse_args()
    out = asyncio.run(main(ns))
    print(json.dumps(out, indent=2))
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2) + "\n")
    sys.stdout.flush()
    os._exit(0)  # the emulator's request log is large: skip tearing it down
