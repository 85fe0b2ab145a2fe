"""Prometheus metrics of the operator: reconciles, their duration and errors by kind; objects by phase."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("kubeforge_reconciles_total", "Reconcile passes, by kind", ["kind"])
ERRORS = Counter("kubeforge_reconcile_errors_total", "Reconcile passes that raised, by kind", ["kind"])
DURATION = Histogram(
    "kubeforge_reconcile_duration_seconds",
    "Time spent in one reconcile pass, by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OBJECTS = Gauge("kubeforge_objects", "kubeforge objects, by kind and phase", ["kind", "phase"])
APPLIES = Counter("kubeforge_child_applies_total", "Children applied (created or corrected), by kind", ["kind"])

_phases: dict[tuple[str, str, str], str] = {}
_lock = threading.Lock()


@contextmanager
def measured(kind: str) -> Iterator[None]:
    RECONCILES.labels(kind).inc()
    start = time.perf_counter()
    try:
        yield
    except Exception:
        ERRORS.labels(kind).inc()
        raise
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - start)


def record_phase(kind: str, namespace: str, name: str, phase: str | None) -> None:
    with _lock:
        key = (kind, namespace, name)
        if phase is None:
            _phases.pop(key, None)
        else:
            _phases[key] = phase
        counts: dict[tuple[str, str], int] = {}
        for (k, _, _), p in _phases.items():
            counts[(k, p)] = counts.get((k, p), 0) + 1
        OBJECTS.clear()
        for (k, p), n in counts.items():
            OBJECTS.labels(k, p).set(n)


def serve(port: int) -> None:
    start_http_server(port)
