"""The retry policy of every API call (controller/retry.py), on a fake clock."""

from __future__ import annotations

import json
import random

import pytest

from kubeforge.controller.retry import UNREACHABLE, ApiError, Backoffs, Policy, call, classify
from kubeforge.controller.state import Event, events, written_state


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def failing(*errors: ApiError, result: str = "ok"):
    """A call that raises these errors in turn, then returns ``result``; it counts its attempts."""
    queue = list(errors)

    def fn() -> str:
        fn.attempts += 1  # type: ignore[attr-defined]
        if queue:
            raise queue.pop(0)
        return result

    fn.attempts = 0  # type: ignore[attr-defined]
    return fn


def status(code: int, reason: str = "", headers: dict | None = None, **details) -> ApiError:
    body = json.dumps({"kind": "Status", "code": code, "reason": reason, "details": details})
    return ApiError(code, reason or "Error", body, headers)


def run(fn, policy: Policy = Policy(), **kw):  # noqa: B008
    clock = Clock()
    result = call(fn, policy=policy, sleep=clock.sleep, clock=clock, rng=random.Random(1), **kw)
    return result, clock


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (status(500), "retry"),
        (status(503), "retry"),
        (ApiError(UNREACHABLE, "ReadTimeoutError"), "retry"),
        (status(429), "throttled"),
        (status(409, "Conflict"), "conflict"),
        (status(409, "AlreadyExists"), "conflict"),
        (status(400), "fatal"),
        (status(403), "fatal"),
        (status(404), "fatal"),
        (status(422), "fatal"),
    ],
)
def test_classify(error, kind):
    assert classify(error) == kind


@pytest.mark.parametrize("error", [status(500), status(503), ApiError(UNREACHABLE, "ProtocolError"), status(429)])
def test_transient_errors_are_retried_until_success(error):
    fn = failing(error, error, error)
    result, clock = run(fn)
    assert result == "ok" and fn.attempts == 4 and len(clock.slept) == 3


@pytest.mark.parametrize("code", [400, 403, 404, 422])
def test_other_client_errors_are_raised_at_once(code):
    fn = failing(status(code))
    with pytest.raises(ApiError) as err:
        run(fn)
    assert err.value.status == code and fn.attempts == 1


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    policy = Policy(base=0.1, cap=1.0, deadline=1000)
    fn = failing(*[status(500)] * 8)
    _, clock = run(fn, policy)
    for attempt, slept in enumerate(clock.slept):
        ceiling = min(1.0, 0.1 * 2**attempt)
        assert ceiling / 2 <= slept <= ceiling
    assert max(clock.slept) <= 1.0 and clock.slept[-1] >= 0.5


def test_429_waits_at_least_retry_after():
    for error in (status(429, headers={"Retry-After": "3"}), status(429, retryAfterSeconds=3)):
        _, clock = run(failing(error))
        assert clock.slept == [3.0]


def test_the_deadline_bounds_one_call():
    fn = failing(*[status(500)] * 100)
    with pytest.raises(ApiError):
        run(fn, Policy(base=0.1, cap=1.0, deadline=5.0))
    assert 5 <= fn.attempts < 20


def test_a_retry_after_past_the_deadline_gives_up_instead_of_waiting():
    fn = failing(status(429, headers={"Retry-After": "60"}))
    with pytest.raises(ApiError):
        run(fn, Policy(deadline=10))
    assert fn.attempts == 1


def test_409_re_reads_then_retries():
    reads = []
    fn = failing(status(409, "Conflict"))
    result, _ = run(fn, on_conflict=lambda: reads.append("read") or False)
    assert result == "ok" and reads == ["read"] and fn.attempts == 2


def test_409_stops_when_the_re_read_shows_nothing_is_left_to_do():
    fn = failing(status(409, "Conflict"))
    result, _ = run(fn, on_conflict=lambda: True)
    assert result is None and fn.attempts == 1


def test_a_failing_re_read_does_not_escape():
    def reread():
        raise status(500)

    fn = failing(status(409, "Conflict"))
    result, _ = run(fn, on_conflict=reread)
    assert result == "ok" and fn.attempts == 2


def test_already_exists_is_recognised():
    assert status(409, "AlreadyExists").already_exists
    assert not status(409, "Conflict").already_exists


def test_kopf_backoffs_are_fresh_each_time_and_fit_the_deadline():
    backoffs = Backoffs(Policy(base=0.1, cap=2.0, deadline=10.0), random.Random(3))
    first, second = list(backoffs), list(backoffs)
    assert first and second and first != second  # new jitter per request
    assert sum(first) <= 10.0 and max(first) <= 2.0
    assert not hasattr(backoffs, "__len__")  # kopf then numbers attempts without a total


# ---------------------------------------------------------------- Event keys (state.events)


def cond(type_: str, status_: str, reason: str, at: str = "2026-01-01T00:00:00Z") -> dict:
    return {"type": type_, "status": status_, "reason": reason, "message": "m", "lastTransitionTime": at}


def test_the_same_transition_from_the_same_written_status_has_the_same_key():
    old = {"phase": "Waiting", "conditions": [cond("Running", "False", "PodsPending")]}
    new = {"phase": "Running", "conditions": [cond("Running", "True", "PodsRunning", "2026-01-01T00:01:00Z")]}
    again = {"phase": "Running", "conditions": [cond("Running", "True", "PodsRunning", "2026-01-01T00:02:00Z")]}
    assert [e.key for e in events(old, new)] == [e.key for e in events(old, again)]
    assert [e.reason for e in events(old, new)] == ["PodsRunning", "PhaseRunning"]


def test_a_later_real_transition_to_the_same_state_has_a_new_key():
    first = {"phase": "Waiting", "conditions": [cond("Running", "False", "PodsPending")]}
    running = {"phase": "Running", "conditions": [cond("Running", "True", "PodsRunning", "2026-01-01T00:01:00Z")]}
    back = {"phase": "Waiting", "conditions": [cond("Running", "False", "PodsPending", "2026-01-01T00:02:00Z")]}
    assert written_state(first) != written_state(back)
    keys = {e.key for e in events(first, running)} & {e.key for e in events(back, running)}
    assert keys == set()


def test_messages_do_not_change_the_key():
    a = {"phase": "Waiting", "conditions": [dict(cond("Running", "False", "PodsPending"), message="0 of 2")]}
    b = {"phase": "Waiting", "conditions": [dict(cond("Running", "False", "PodsPending"), message="1 of 2")]}
    assert written_state(a) == written_state(b)
    assert Event("Normal", "R", "m").key == ""
