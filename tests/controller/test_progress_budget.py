"""The progress reads' budget (controller/progress_reader.py): all running jobs together are read at most
``rate`` times a second, so each read (and the pass and status write a new step brings) stays bounded."""

from __future__ import annotations

import pytest

from kubeforge.controller.progress_reader import ProgressCache


def tracked(rate: float, jobs: int) -> ProgressCache:
    cache = ProgressCache(rate)
    for i in range(jobs):
        cache.put(("ns", "FineTuneJob", f"j{i}"), {"step": i}, now=0.0, wall="2026-11-30T10:00:00Z")
    return cache


BUDGETS = [(0, 1000, 30.0), (2, 10, 30.0), (2, 60, 30.0), (2, 100, 50.0), (2, 1000, 500.0), (10, 1000, 100.0)]


@pytest.mark.parametrize(("rate", "jobs", "interval"), BUDGETS)
def test_each_job_is_read_every_progress_seconds_or_as_the_budget_allows(rate: float, jobs: int, interval: float):
    cache = tracked(rate, jobs)
    assert cache.interval(30.0) == interval
    key = ("ns", "FineTuneJob", "j0")
    assert not cache.due(key, 30.0, now=interval - 0.1)
    assert cache.due(key, 30.0, now=interval)


def test_a_job_never_read_is_due_at_once_whatever_the_budget():
    cache = tracked(1, 1000)
    assert cache.due(("ns", "FineTuneJob", "new"), 30.0, now=0.0)


def test_jobs_that_stop_running_no_longer_count_against_the_budget():
    cache = tracked(2, 200)
    assert cache.interval(30.0) == 100.0
    for i in range(150):
        cache.forget(("ns", "FineTuneJob", f"j{i}"))
    assert cache.interval(30.0) == 30.0  # 50 left: 25 s at 2/s, so every 30 s


def test_a_failed_read_keeps_the_last_progress_and_counts_as_a_read():
    cache = tracked(0, 1)
    key = ("ns", "FineTuneJob", "j0")
    cache.put(key, None, now=40.0)
    assert cache.get(key) == {"step": 0, "readAt": "2026-11-30T10:00:00Z"}  # when rank 0 last answered
    assert not cache.due(key, 30.0, now=60.0)
