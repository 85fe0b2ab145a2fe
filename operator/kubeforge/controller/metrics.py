"""Prometheus metrics of the operator: reconciles, their duration and errors by kind; objects by phase.

``kubeforge_objects`` is counted at scrape time from the phase each object last reported; an object
leaves the count when it is deleted (``forget``, from the delete handlers and the DELETED watch event).
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

RECONCILES = Counter("kubeforge_reconciles_total", "Reconcile passes, by kind", ["kind"])
ERRORS = Counter("kubeforge_reconcile_errors_total", "Reconcile passes that raised, by kind", ["kind"])
DURATION = Histogram(
    "kubeforge_reconcile_duration_seconds",
    "Time spent in one reconcile pass, by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
APPLIES = Counter("kubeforge_child_applies_total", "Children applied (created or corrected), by kind", ["kind"])
OBJECTS = "kubeforge_objects"

_phases: dict[tuple[str, str, str], str] = {}  # (kind, namespace, name) -> last reported phase
_lock = threading.Lock()


class _Objects:
    """kubeforge_objects{kind, phase}: the live objects' last phases, counted at each scrape."""

    def collect(self) -> Iterator[Metric]:
        with _lock:
            counts = Tally((kind, phase) for (kind, _, _), phase in _phases.items())
        family = GaugeMetricFamily(OBJECTS, "kubeforge objects, by kind and phase", labels=["kind", "phase"])
        for (kind, phase), n in sorted(counts.items()):
            family.add_metric([kind, phase], n)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(OBJECTS, "kubeforge objects, by kind and phase", labels=["kind", "phase"])


OBJECTS_COLLECTOR = _Objects()
REGISTRY.register(OBJECTS_COLLECTOR)  # type: ignore[arg-type]


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
    """The phase an object's pass ended in; None forgets the object."""
    with _lock:
        if phase is None:
            _phases.pop((kind, namespace, name), None)
        else:
            _phases[(kind, namespace, name)] = phase


def forget(kind: str, namespace: str, name: str) -> None:
    """A deleted object: it leaves every per-object metric."""
    record_phase(kind, namespace, name, None)


def forget_if_deleted(event_type: str | None, kind: str, namespace: str, name: str) -> None:
    """A watch event: DELETED forgets the object (kopf calls no delete handler for an object it holds no
    finalizer on, e.g. one deleted while the operator was down)."""
    if event_type == "DELETED":
        forget(kind, namespace, name)


def serve(port: int) -> None:
    start_http_server(port)
