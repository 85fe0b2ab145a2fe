"""The real operator, as a separate process (`python -m kubeforge.controller`), against the emulator."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.harness.waiters import wait_for

ROOT = Path(__file__).resolve().parents[2]


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


class OperatorProcess:
    """Start, stop and restart the operator; its log is kept for failure messages."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        emulator: Any,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.emulator = emulator
        self.args = args
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1", **self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "runtime"), env.get("PYTHONPATH", "")])
        log = self.log_path.open("ab")
        log.write(f"\n===== operator start #{self.starts + 1} =====\n".encode())
        log.flush()
        watches_before = self._watch_count()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubeforge.controller", *self.args, stdout=log, stderr=log, env=env, cwd=ROOT
        )
        self.starts += 1
        await wait_for(
            lambda: self._watch_count() >= watches_before + 3 or self._exited(),
            what="the operator to watch its three kinds",
            timeout=30,
            describe=self.logs,
        )
        if self._exited():
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.logs()}")

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    def _watch_count(self) -> int:
        return sum(
            1
            for r in self.emulator
            if r.params.get("watch") == "true" and r.resource is not None and r.resource.group == "kubeforge.io"
        )

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None
