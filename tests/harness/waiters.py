"""Named waits with timeouts: the only way operator tests wait (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
POLL = 0.05


class WaitTimeout(AssertionError):
    pass


async def wait_for(
    probe: Callable[[], T | Awaitable[T | None] | None],
    *,
    what: str,
    timeout: float = 30.0,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value  # type: ignore[misc]
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            extra = f"\n{describe()}" if describe else ""
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        await asyncio.sleep(POLL)


async def wait_status(
    emulator: Any,
    resource: str,
    namespace: str,
    name: str,
    check: Callable[[dict[str, Any]], bool],
    *,
    what: str,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Wait until the stored object's status satisfies ``check``; return the object."""

    def probe() -> dict[str, Any] | None:
        obj = emulator.stored(resource, namespace, name)
        return obj if obj is not None and check(obj.get("status") or {}) else None

    def describe() -> str:
        obj = emulator.stored(resource, namespace, name)
        return f"last seen status of {name}: {None if obj is None else obj.get('status')}"

    return await wait_for(probe, what=what, timeout=timeout, describe=describe)


async def wait_phase(emulator: Any, resource: str, namespace: str, name: str, phase: str, **kw: Any) -> dict[str, Any]:
    return await wait_status(
        emulator, resource, namespace, name, lambda s: s.get("phase") == phase, what=f"{name} phase {phase}", **kw
    )
