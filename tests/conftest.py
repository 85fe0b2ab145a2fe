"""Shared fixtures: the API emulator on loopback and the real operator process against it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import kmock
import pytest
import pytest_asyncio

from tests.harness.emulator import FaithfulEmulator
from tests.harness.operator import OperatorProcess, write_kubeconfig

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = ("default", "team-a")


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[FaithfulEmulator]:
    """A Kubernetes API emulator on 127.0.0.1 with our CRDs and the built-ins we use."""
    async with FaithfulEmulator(strict=False) as api, kmock.Server(api) as server:
        api.url = str(server.url).rstrip("/")
        for ns in NAMESPACES:
            resp = await api.post("/api/v1/namespaces", json={"metadata": {"name": ns}})
            assert resp.status == 201, await resp.text()
        yield api


@pytest_asyncio.fixture()
async def operator(
    emulator: FaithfulEmulator, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[OperatorProcess]:
    """The real operator process (`python -m kubeforge.controller`) against the emulator."""
    async with running_operator(emulator, tmp_path, request) as proc:
        yield proc


@contextlib.asynccontextmanager
async def running_operator(
    emulator: FaithfulEmulator, tmp_path: Path, request: pytest.FixtureRequest, **env_overrides: str
) -> AsyncIterator[OperatorProcess]:
    """Start the operator process against ``emulator``; stop it after, printing its log if the test failed."""
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    env = {
        "KUBEFORGE_RESYNC_SECONDS": "0.5",  # the safety-net resync; the chart's default is 60 s
        "KUBEFORGE_FULL_PASS_SECONDS": "0",  # every resync a full pass (what the tests count), never skipped
        "KUBEFORGE_OFFLINE": "1",  # no Hub lookups from tests
        "KUBEFORGE_METRICS_PORT": str(free_port()),
        **env_overrides,
    }
    proc = OperatorProcess(kubeconfig, tmp_path / "operator.log", emulator, env=env)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"----- operator log -----\n{proc.logs()[-20000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
