"""Rank 0's progress, read off the event loop's critical path: asynchronously, with a total deadline.

A FineTuneJob's loop (handlers.py) reads the progress endpoint named in the runtime
contract before its pass, never inside it: a pod that answers slowly (or one byte at a
time) costs its own job at most DEADLINE seconds and nobody else anything, since the
read is a coroutine and the deadline covers connect, headers and body together. The
body is capped (a progress document is a few hundred bytes). The last answer is kept
per job, so passes that run between reads (create, update, resume) report it too.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from kubeforge.controller.conditions import now_rfc3339
from kubeforge.controller.finetune import READ_AT, rank0_pod
from kubeforge.runtime.contract import PROGRESS_PATH, PROGRESS_PORT, PROGRESS_PORT_NAME

DEADLINE = float(os.environ.get("KUBEFORGE_PROGRESS_DEADLINE_SECONDS", "2"))
READS_PER_SECOND = float(os.environ.get("KUBEFORGE_PROGRESS_READS_PER_SECOND", "2"))
MAX_BYTES = 64 * 1024


def progress_url(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """Rank 0's progress endpoint, as named in the contract (None while it has no IP)."""
    pod = rank0_pod(list(pods))
    ip = ((pod or {}).get("status") or {}).get("podIP")
    if not ip:
        return None
    port = PROGRESS_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:  # type: ignore[union-attr]
        for p in container.get("ports") or []:
            if p.get("name") == PROGRESS_PORT_NAME:
                port = int(p["containerPort"])
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{PROGRESS_PATH}"


_sessions: dict[int, aiohttp.ClientSession] = {}  # one per event loop, its connections pooled across reads


async def close_sessions() -> None:
    for session in list(_sessions.values()):
        await session.close()
    _sessions.clear()


def _session() -> aiohttp.ClientSession:
    loop = id(asyncio.get_running_loop())
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = _sessions[loop] = aiohttp.ClientSession()
    return session


async def read_progress(url: str, deadline: float = DEADLINE) -> dict[str, Any] | None:
    """The JSON document at ``url``, or None (unreachable, slow past the deadline, too big, not JSON)."""
    try:
        async with asyncio.timeout(deadline):
            timeout = aiohttp.ClientTimeout(total=deadline)
            async with _session().get(url, timeout=timeout) as response:
                if response.status != 200:
                    return None
                body = await response.content.read(MAX_BYTES + 1)
        if len(body) > MAX_BYTES:
            return None
        data = json.loads(body.decode())
        return data if isinstance(data, dict) else None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None


class ProgressCache:
    """The last progress read per running job (by its owner key), and when it was read.

    Reads are budgeted: all jobs together are read at most ``rate`` times a second (0: no
    budget), so with N running jobs no job's progress is read more often than every
    max(every, N / rate) seconds (reads happen at the job's jittered checks: in practice about
    every 1-2 such intervals). Each read that brings a new step costs a pass and a status write;
    the budget keeps that bounded for the operator and the API server at any number of jobs.
    """

    def __init__(self, rate: float = 0.0) -> None:
        self.rate = rate
        self._last: dict[Any, tuple[float, dict[str, Any]]] = {}

    def interval(self, every: float) -> float:
        """The least time between two reads of one job: ``every``, or longer when the budget asks for it."""
        return max(every, len(self._last) / self.rate) if self.rate > 0 else every

    def get(self, key: Any) -> dict[str, Any] | None:
        found = self._last.get(key)
        return found[1] if found else None

    def due(self, key: Any, every: float, now: float) -> bool:
        found = self._last.get(key)
        return found is None or now - found[0] >= self.interval(every)

    def put(self, key: Any, progress: dict[str, Any] | None, now: float, wall: str | None = None) -> None:
        """A read at ``now`` (monotonic); an answer is stamped with ``wall`` (RFC 3339, default: now) as its
        READ_AT, a failed read (None) keeps the last answer."""
        if progress is None:
            previous = self._last.get(key)
            self._last[key] = (now, previous[1]) if previous else (now, {})
        else:
            self._last[key] = (now, {**progress, READ_AT: wall or now_rfc3339()})

    def forget(self, key: Any) -> None:
        """The job is not running (or gone): it no longer counts against the budget."""
        self._last.pop(key, None)
