"""A loopback proxy in front of the emulator that fails a fraction of the API requests.

The operator is pointed at the proxy; tests keep talking to the emulator directly, so
only the operator's requests (its own and kopf's) see faults. Watch streams pass
untouched (a broken watch is kopf's business, not an API fault). Each faulted request
gets one of:

- ``500``: an internal error, the request not performed;
- ``429``: Too Many Requests with ``Retry-After`` (seconds), not performed;
- ``409``: a Conflict, not performed; only where the API server can answer one (a
  server-side apply, a PUT, or a write that carries a resourceVersion precondition);
  elsewhere a 500 instead;
- ``reset``: the connection dropped before the request reached the server;
- ``lost``: the request performed, then the connection dropped before the answer (the
  client cannot tell it from ``reset``: a retry must be harmless);
- ``timeout``: no answer for ``stall`` seconds, then the connection dropped.

``counts`` records what was injected, ``forwarded`` how many requests were passed on.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
from typing import Any

import aiohttp
from aiohttp import web

KINDS = ("500", "429", "409", "reset", "lost", "timeout")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        rate: float = 0.2,
        *,
        seed: int = 0,
        kinds: tuple[str, ...] = KINDS,
        retry_after: int = 1,
        stall: float = 2.0,
    ):
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.kinds = kinds
        self.retry_after = retry_after
        self.stall = stall
        self.rng = random.Random(seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.forwarded = 0
        self.in_flight = 0  # requests (not watches) passed on and not yet answered
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FaultProxy:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # shutdown_timeout: at exit the relays of watch streams (held open by the emulator until an event) are
        # cancelled after a second instead of aiohttp's default 60 s wait for every handler to finish
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------ the decision

    def _fault_for(self, request: web.Request, body: bytes) -> str | None:
        if request.query.get("watch") in ("true", "1") or self.rng.random() >= self.rate:
            return None
        kind = self.rng.choice(self.kinds)
        if kind == "409" and not _may_conflict(request, body):
            kind = "500"
        return kind

    # ------------------------------------------------------------ serving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._fault_for(request, body)
        if fault is not None:
            self.counts[fault] += 1
        if fault in ("500", "429", "409"):
            return _status(int(fault), self.retry_after)
        if fault == "reset":
            return _drop(request)
        if fault == "timeout":
            await asyncio.sleep(self.stall)
            return _drop(request)
        return await self._forward(request, body, lose_answer=fault == "lost")

    async def _forward(self, request: web.Request, body: bytes, *, lose_answer: bool) -> web.StreamResponse:
        assert self._session is not None
        self.forwarded += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        watch = request.query.get("watch") in ("true", "1")
        self.in_flight += not watch
        try:
            return await self._relay(request, body, headers, lose_answer=lose_answer)
        finally:
            self.in_flight -= not watch

    async def _relay(
        self, request: web.Request, body: bytes, headers: dict[str, str], *, lose_answer: bool
    ) -> web.StreamResponse:
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body or None, headers=headers
        ) as upstream:
            if lose_answer:
                await upstream.read()  # the server did it; the client never hears
                return _drop(request)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers[key] = value
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


def _may_conflict(request: web.Request, body: bytes) -> bool:
    """Whether a real API server could answer this request with 409 Conflict."""
    if request.method == "PUT":
        return True
    if request.method != "PATCH":
        return False
    if "apply-patch" in request.headers.get("Content-Type", ""):
        return True
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return False
    return isinstance(data, dict) and bool((data.get("metadata") or {}).get("resourceVersion"))


def _status(code: int, retry_after: int) -> web.Response:
    reason = {500: "InternalError", 429: "TooManyRequests", 409: "Conflict"}[code]
    status = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason,
              "message": f"injected fault: {reason}", "details": {}}  # fmt: skip
    headers = {}
    if code == 429:
        status["details"] = {"retryAfterSeconds": retry_after}
        headers["Retry-After"] = str(retry_after)
    return web.json_response(status, status=code, headers=headers)


class _Dropped(web.StreamResponse):
    """The answer to a dropped connection: nothing to write (and no error logged for trying)."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer (the client sees a disconnect)."""
    if request.transport is not None:
        request.transport.abort()
    return _Dropped()
