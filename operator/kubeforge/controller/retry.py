"""One retry policy for every API call the operator makes (ours in kube.py, and kopf's own).

    delay(n)  = min(cap, base * 2**n) * U(0.5, 1)        attempt n = 0, 1, 2, ... ("equal jitter")
    429       : wait max(delay(n), Retry-After)           the server's word is a floor, never shortened
    409       : re-read (the caller's on_conflict), then retry; AlreadyExists is the caller's to judge
    5xx, 0    : retry                                      0 = no answer: refused, reset, timed out
    other 4xx : raise at once                              a retry would get the same answer
    all within one deadline per call: a wait that would end past it raises the last error instead.

Pure apart from the clock, the sleep and the random source, which tests replace.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("kubeforge.retry")
T = TypeVar("T")

UNREACHABLE = 0  # the status of an ApiError for a request that got no answer


class ApiError(RuntimeError):
    """An API answer >= 400, or no answer at all (status 0)."""

    def __init__(self, status: int, reason: str, body: str = "", headers: Mapping[str, str] | None = None):
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        super().__init__(f"{status} {reason}: {body[:500]}")

    @property
    def api_reason(self) -> str:
        """The Status object's reason (AlreadyExists, Conflict, NotFound...), or ''."""
        try:
            return str(json.loads(self.body).get("reason") or "")
        except (ValueError, AttributeError):
            return ""

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked us to wait: Retry-After, else the Status' details.retryAfterSeconds."""
        value = self.headers.get("retry-after")
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return None  # an HTTP date: not sent by the API server
        try:
            seconds = json.loads(self.body).get("details", {}).get("retryAfterSeconds")
        except (ValueError, AttributeError):
            return None
        return float(seconds) if isinstance(seconds, int | float) else None

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.api_reason == "AlreadyExists"


RETRY, CONFLICT, THROTTLED, FATAL = "retry", "conflict", "throttled", "fatal"


def classify(err: ApiError) -> str:
    if err.status == 409:
        return CONFLICT
    if err.status == 429:
        return THROTTLED
    if err.status == UNREACHABLE or err.status >= 500:
        return RETRY
    return FATAL


@dataclass(frozen=True)
class Policy:
    base: float = 0.1  # seconds before the first retry (before jitter)
    cap: float = 5.0  # the longest wait between two attempts (before a Retry-After)
    deadline: float = 30.0  # the most time one call may take, all attempts and waits together

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(attempt, 32))
        return ceiling * (rng or random).uniform(0.5, 1.0)

    def backoffs(self) -> Backoffs:
        """The same schedule for kopf's own requests (settings.networking.error_backoffs)."""
        return Backoffs(self)


class Backoffs:
    """Iterable anew for each request, with fresh jitter, and as many waits as fit the deadline.

    Not Sized on purpose: kopf then numbers its attempts without a total.
    """

    def __init__(self, policy: Policy, rng: random.Random | None = None):
        self.policy = policy
        self.rng = rng

    def __iter__(self) -> Iterator[float]:
        spent, attempt = 0.0, 0
        while True:
            wait = self.policy.delay(attempt, self.rng)
            if spent + wait > self.policy.deadline:
                return
            spent += wait
            attempt += 1
            yield wait


def call(
    fn: Callable[[], T],
    *,
    policy: Policy,
    what: str = "",
    on_conflict: Callable[[], bool | None] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T | None:
    """Call ``fn`` until it succeeds, a fatal error, or the deadline; see the module docstring.

    ``on_conflict`` runs after a 409 and before the retry (re-read what changed); when it
    returns True the call is considered done (e.g. the re-read shows nothing is left to do)
    and ``call`` returns None.
    """
    start = clock()
    attempt = 0
    while True:
        try:
            return fn()
        except ApiError as err:
            kind = classify(err)
            if kind == FATAL:
                raise
            wait = policy.delay(attempt, rng)
            if kind == THROTTLED and err.retry_after is not None:
                wait = max(wait, err.retry_after)
            if clock() - start + wait > policy.deadline:
                log.warning("giving up on %s after %d attempt(s): %s", what, attempt + 1, err)
                raise
            log.info("retrying %s in %.2fs (attempt %d): %s", what, wait, attempt + 1, str(err)[:200])
            sleep(wait)
            attempt += 1
            if kind == CONFLICT and on_conflict is not None:
                try:
                    if on_conflict():
                        return None
                except ApiError as reread:  # the re-read failed too: retry the call itself
                    log.info("re-reading for %s failed: %s", what, str(reread)[:200])
