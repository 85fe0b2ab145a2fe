"""The operator under API faults: 1 request in 5 fails (500, 429, 409, dropped, lost, timed out).

The operator talks to the emulator through tests/harness/faults.py; the test plays the Job
controller and kubelet directly against the emulator. Every job must still reach its phase,
each child must be created exactly once, and each transition must give exactly one Event,
across a SIGKILL of the operator in the middle.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kubeforge.controller.kube import COMPONENT
from kubeforge.controller.readiness import SUMMARY
from kubeforge.runtime.contract import termination_message
from tests.builders import DELETE, finetune
from tests.conftest import free_port
from tests.harness.cluster import add_nodes, complete_job, events_for, finish_pods, owned, start_pods
from tests.harness.emulator import FaithfulEmulator
from tests.harness.faults import KINDS, FaultProxy
from tests.harness.operator import OperatorProcess, write_kubeconfig
from tests.harness.waiters import wait_for, wait_phase

pytestmark = pytest.mark.operator

FTJ = "kubeforge.io/v1alpha1/finetunejobs"
FTJ_PATH = "/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs"
CHILDREN = (("ConfigMap", "v1/configmaps"), ("Service", "v1/services"), ("Job", "batch/v1/jobs"))
JOBS = 10
RATE = 0.2
BOUND = 60  # seconds each stage may take for all jobs together


@pytest_asyncio.fixture()
async def faulty(
    emulator: FaithfulEmulator, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[OperatorProcess, FaultProxy]]:
    """The operator behind a proxy that fails RATE of its requests (watch streams excepted)."""
    emulator.log_limit = 25  # kmock's cost per request grows with its log (facts.md): measure the operator
    async with FaultProxy(emulator.url, RATE, seed=12, retry_after=1, stall=4.0) as proxy:
        env = {
            "KUBEFORGE_RESYNC_SECONDS": "0.5",
            "KUBEFORGE_FULL_PASS_SECONDS": "0",
            "KUBEFORGE_OFFLINE": "1",
            "KUBEFORGE_METRICS_PORT": str(free_port()),
            "KUBEFORGE_API_TIMEOUT_SECONDS": "3",  # below the proxy's 4 s stall: those are timeouts
            "KUBEFORGE_API_DEADLINE_SECONDS": "20",
        }
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", proxy.url)
        proc = OperatorProcess(kubeconfig, tmp_path / "operator.log", emulator, env=env)
        await proc.start()
        try:
            yield proc, proxy
        finally:
            await proc.stop()
            report = getattr(request.node, "rep_call", None)
            if report is not None and report.failed:
                print(f"----- faults: {dict(proxy.counts)} of {proxy.forwarded} forwarded -----")
                print(f"----- operator log -----\n{proc.logs()[-20000:]}")


def names() -> list[str]:
    return [f"job-{i}" for i in range(JOBS)]


def children_of(api: FaithfulEmulator, name: str) -> dict[str, list[str]]:
    return {kind: [c["metadata"]["uid"] for c in owned(api, res, "team-a", name)] for kind, res in CHILDREN}


async def all_phases(api: FaithfulEmulator, phase: str) -> None:
    deadline = time.monotonic() + BOUND
    for name in names():
        await wait_phase(api, FTJ, "team-a", name, phase, timeout=max(1.0, deadline - time.monotonic()))


def our_events(api: FaithfulEmulator, name: str) -> list[dict]:
    """Events the operator posted about ``name``, in the order the API stored them."""
    events = [e for e in events_for(api, "team-a", name) if e.get("reportingComponent") == COMPONENT]
    return sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))


def replay(events: list[dict]) -> tuple[dict[str, tuple[str, str]], str | None, list[str]]:
    """Replay Events as transitions: (conditions, phase, the Events that changed nothing: duplicates).

    A condition Event's message is "Type=Status: ...", a phase Event's "phase Old -> New".
    """
    conditions: dict[str, tuple[str, str]] = {}
    phase: str | None = None
    duplicates = []
    for e in events:
        head = e["message"].split(":")[0]
        if e["reason"].startswith("Phase") and head.startswith("phase "):
            old, new = head.removeprefix("phase ").split(" -> ")
            if new == phase or old != str(phase):
                duplicates.append(f"{e['reason']} ({head}) with the phase at {phase}")
            phase = new
            continue
        type_, status = head.split("=")
        if conditions.get(type_) == (status, e["reason"]):
            duplicates.append(f"{e['reason']} ({head}) again")
        conditions[type_] = (status, e["reason"])
    return conditions, phase, duplicates


async def test_every_job_converges_under_20_percent_faults_with_no_duplicates(emulator, faulty):
    operator, proxy = faulty
    began = time.monotonic()
    await add_nodes(emulator, "h100-4x8.yaml")
    for name in names():
        doc = finetune(**{"resources.queue": DELETE})
        doc["metadata"]["name"] = name
        resp = await emulator.post(FTJ_PATH, json=doc)
        assert resp.status == 201, await resp.text()

    await all_phases(emulator, "Waiting")
    await wait_for(
        lambda: all(all(len(uids) == 1 for uids in children_of(emulator, n).values()) for n in names()),
        what="a ConfigMap, a Service and a Job for every job",
        timeout=BOUND,
    )
    first = {n: children_of(emulator, n) for n in names()}
    planned = time.monotonic()

    operator.proc.kill()  # SIGKILL mid-flight: no graceful stop, whatever was in progress is lost
    await operator.proc.wait()
    # What the dead process had sent still lands (an API server finishes a request whose client
    # died in milliseconds; the loaded emulator may take seconds): let it, before the restart.
    await wait_for(lambda: proxy.in_flight == 0, what="the dead operator's requests to land", timeout=BOUND)
    await operator.start()

    for name in names():  # the Job controller and the kubelet: every gang's pods run
        (job,) = owned(emulator, "batch/v1/jobs", "team-a", name)
        await start_pods(emulator, job)
    await all_phases(emulator, "Running")
    summary = termination_message({"status": "succeeded", "uri": "pvc://models/x", "digest": "sha256:ab"})
    for name in names():
        (job,) = owned(emulator, "batch/v1/jobs", "team-a", name)
        await finish_pods(emulator, job, exit_code=0, message=summary)
        await complete_job(emulator, job)
    await all_phases(emulator, "Succeeded")
    done = time.monotonic()

    # a few more passes under faults: nothing is created or posted again
    log_before = operator.logs().count("Loop 'finetunejob' pass succeeded")
    await wait_for(
        lambda: operator.logs().count("Loop 'finetunejob' pass succeeded") >= log_before + 3 * JOBS,
        what="more timer passes",
        timeout=BOUND,
    )
    for name in names():
        assert children_of(emulator, name) == first[name], f"{name}: children re-created"
        # one Event per transition: replayed in order, each moves a condition or the phase, and they
        # end where the status ended
        events = our_events(emulator, name)
        conditions, phase, duplicates = replay(events)
        assert duplicates == [], f"{name}: {duplicates}\n" + "\n".join(
            f"{e['metadata']['name']} rv={e['metadata']['resourceVersion']} {e['reason']}: {e['message'][:60]}"
            for e in events
        )
        status = emulator.stored(FTJ, "team-a", name)["status"]
        assert phase == status["phase"] == "Succeeded"
        own = [c for c in status["conditions"] if c["type"] not in SUMMARY]  # Ready & co. restate the phase
        assert conditions == {c["type"]: (c["status"], c["reason"]) for c in own}
        assert {e["reason"] for e in events} >= {"SpecValid", "Planned", "PodsRunning", "PhaseRunning", "Completed"}
        assert status["artifact"]["uri"] == "pvc://models/x"
    assert set(proxy.counts) == set(KINDS), proxy.counts  # every kind of fault was met
    assert sum(proxy.counts.values()) >= 0.1 * (sum(proxy.counts.values()) + proxy.forwarded)
    print(
        f"\nplanned in {planned - began:.1f}s, succeeded {done - began:.1f}s after creation; "
        f"faults {dict(proxy.counts)}, {proxy.forwarded} forwarded"
    )
