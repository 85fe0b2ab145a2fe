"""Two operator processes with leader election: one acts, the other stands by and takes over."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.builders import DELETE, finetune
from tests.conftest import free_port
from tests.harness.cluster import add_nodes, events_for, owned, wait_children
from tests.harness.emulator import FaithfulEmulator
from tests.harness.operator import ROOT, OperatorProcess, write_kubeconfig
from tests.harness.waiters import wait_for, wait_phase

pytestmark = pytest.mark.operator

FTJ = "kubeforge.io/v1alpha1/finetunejobs"
FTJ_PATH = "/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs"
LEASE = "coordination.k8s.io/v1/leases"
DURATION = 4.0  # --lease-duration: how long a standby waits out a silent leader
ELECTION = ("--leader-elect", "--lease-namespace=default", f"--lease-duration={DURATION:g}",
            "--renew-deadline=2", "--retry-period=0.5")  # fmt: skip


class Replica(OperatorProcess):
    """An operator process that may stand by: started once it has spoken about the Lease, not once it watches."""

    async def start(self) -> None:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1", **self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "runtime"), env.get("PYTHONPATH", "")])
        with self.log_path.open("ab") as log:
            log.write(f"\n===== operator start #{self.starts + 1} =====\n".encode())
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubeforge.controller", *self.args, stdout=log, stderr=log, env=env, cwd=ROOT
        )
        self.starts += 1
        await wait_for(
            lambda: "standing by for lease" in self.current() or not self.alive,
            what=f"{self.env['POD_NAME']} to stand by",
            describe=self.logs,
        )
        assert self.alive, self.logs()

    def current(self) -> str:
        """The log of the current run only."""
        return self.logs().split(f"operator start #{self.starts}")[-1]

    @property
    def leads(self) -> bool:
        return "became the leader" in self.current()


def replica(emulator: FaithfulEmulator, tmp_path: Path, name: str) -> Replica:
    env = {
        "KUBEFORGE_RESYNC_SECONDS": "0.5",
        "KUBEFORGE_FULL_PASS_SECONDS": "0",
        "KUBEFORGE_OFFLINE": "1",
        "KUBEFORGE_METRICS_PORT": str(free_port()),
        "POD_NAME": name,
    }
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    return Replica(kubeconfig, tmp_path / f"{name}.log", emulator, ELECTION, env=env)


async def create(emulator: FaithfulEmulator, name: str) -> None:
    doc = finetune(**{"resources.queue": DELETE})
    doc["metadata"]["name"] = name
    resp = await emulator.post(FTJ_PATH, json=doc)
    assert resp.status == 201, await resp.text()


def holder(emulator: FaithfulEmulator) -> dict:
    return (emulator.stored(LEASE, "default", "kubeforge-operator") or {}).get("spec") or {}


async def renewals(emulator: FaithfulEmulator, n: int) -> None:
    seen: set[str] = set()

    def probe() -> bool:
        seen.add(holder(emulator).get("renewTime"))
        return len(seen) > n

    await wait_for(probe, what=f"{n} renewals of the lease")


def applied(proc: Replica, name: str) -> bool:
    return f"team-a/{name}-contract" in proc.current()


async def test_one_replica_acts_and_the_standby_takes_over(emulator, tmp_path, request):
    a, b = replica(emulator, tmp_path, "replica-a"), replica(emulator, tmp_path, "replica-b")
    try:
        await add_nodes(emulator, "h100-4x8.yaml")
        await a.start()
        await wait_for(lambda: a.leads, what="replica-a to lead", timeout=15, describe=a.logs)
        await b.start()
        assert holder(emulator)["holderIdentity"] == "replica-a"

        await create(emulator, "first")
        await wait_children(emulator, "team-a", "first", ("ConfigMap", "Service", "Job"))
        await wait_phase(emulator, FTJ, "team-a", "first", "Waiting")
        await renewals(emulator, 3)  # the leader keeps renewing; the standby, meanwhile, did nothing
        assert applied(a, "first") and not applied(b, "first") and not b.leads
        assert {e.get("reportingInstance") for e in events_for(emulator, "team-a", "first")} == {"replica-a"}

        a.proc.send_signal(signal.SIGKILL)  # the leader dies without a word: the Lease must run out
        await a.proc.wait()
        killed = time.monotonic()
        await wait_for(lambda: b.leads, what="replica-b to take over", timeout=DURATION + 10, describe=b.logs)
        took_over = time.monotonic() - killed
        assert took_over >= DURATION - 1  # it waited the Lease out (measured from its own observation)
        spec = holder(emulator)
        assert spec["holderIdentity"] == "replica-b" and spec["leaseTransitions"] == 1

        await create(emulator, "second")
        await wait_children(emulator, "team-a", "second", ("ConfigMap", "Service", "Job"), timeout=30)
        await wait_phase(emulator, FTJ, "team-a", "second", "Waiting")
        assert applied(b, "second") and not applied(b, "first")  # first's children were there already
        for name in ("first", "second"):
            for res in ("v1/configmaps", "v1/services", "batch/v1/jobs"):
                assert len(owned(emulator, res, "team-a", name)) == 1
        handover = time.monotonic() - killed

        # a graceful stop hands over at once: replica-a, back as a standby, leads well within the Lease time
        await a.start()
        stopped = time.monotonic()
        await b.stop()
        await wait_for(lambda: a.leads, what="replica-a to lead again", timeout=DURATION + 10, describe=a.logs)
        graceful = time.monotonic() - stopped
        assert "released lease" in b.logs()
        assert graceful < DURATION
        print(f"\ntakeover after SIGKILL {took_over:.1f}s (second job's children {handover:.1f}s after the kill); "
              f"after SIGTERM {graceful:.1f}s")  # fmt: skip
    finally:
        for proc in (a, b):
            await proc.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for proc in (a, b):
                print(f"----- {proc.env['POD_NAME']} log -----\n{proc.logs()[-10000:]}")
