"""The operator's metrics forget deleted objects of every kind, by delete handler or by DELETED event."""

from __future__ import annotations

from collections.abc import Iterator

import kopf
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubeforge.controller import handlers, metrics

KINDS = ("FineTuneJob", "QuantizeJob", "ModelService")


@pytest.fixture(autouse=True)
def no_objects() -> Iterator[None]:
    saved = dict(metrics._phases)
    metrics._phases.clear()
    yield
    metrics._phases.clear()
    metrics._phases.update(saved)


def body(kind: str, name: str, namespace: str = "team-a") -> kopf.Body:
    return kopf.Body(
        {"apiVersion": "kubeforge.io/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": namespace}}
    )


def objects() -> dict[tuple[str, str], float]:
    """kubeforge_objects as a scrape of the default registry shows it: {(kind, phase): count}."""
    families = text_string_to_metric_families(generate_latest(REGISTRY).decode())
    return {
        (s.labels["kind"], s.labels["phase"]): s.value for f in families if f.name == metrics.OBJECTS for s in f.samples
    }


def report(kind: str, name: str, phase: str) -> None:
    handlers._report(kind, body(kind, name), type("Decision", (), {"status": {"phase": phase}})())


def test_objects_are_counted_by_kind_and_phase():
    for kind in KINDS:
        report(kind, "a", "Running")
        report(kind, "b", "Running")
        report(kind, "c", "Pending")
    report("ModelService", "c", "Ready")  # a new phase replaces the old
    assert objects() == {
        ("FineTuneJob", "Running"): 2, ("FineTuneJob", "Pending"): 1,
        ("QuantizeJob", "Running"): 2, ("QuantizeJob", "Pending"): 1,
        ("ModelService", "Running"): 2, ("ModelService", "Ready"): 1,
    }  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_the_delete_handler_forgets_an_object_of_every_kind(kind: str):
    report(kind, "a", "Succeeded")
    report(kind, "b", "Succeeded")
    handlers.deleted(body=body(kind, "a"))
    assert objects() == {(kind, "Succeeded"): 1}
    handlers.deleted(body=body(kind, "b"))
    assert objects() == {}  # the series is gone, not left at its last count


@pytest.mark.parametrize("kind", KINDS)
async def test_a_deleted_event_forgets_an_object_without_a_delete_handler_call(kind: str):
    report(kind, "a", "Running")
    for event_type in ("ADDED", "MODIFIED", None):
        await handlers.object_event(event={"type": event_type}, body=body(kind, "a"))
    assert objects() == {(kind, "Running"): 1}
    await handlers.object_event(event={"type": "DELETED"}, body=body(kind, "a"))
    assert objects() == {}


def test_only_the_deleted_object_of_its_namespace_and_kind_is_forgotten():
    report("QuantizeJob", "a", "Running")
    report("ModelService", "a", "Running")
    handlers._report(
        "QuantizeJob", body("QuantizeJob", "a", "team-b"), type("D", (), {"status": {"phase": "Running"}})()
    )
    handlers.deleted(body=body("QuantizeJob", "a"))
    assert objects() == {("QuantizeJob", "Running"): 1, ("ModelService", "Running"): 1}


def test_every_operator_metric_is_per_kind_not_per_object():
    """Only kubeforge_objects is fed per object; the others are labelled by kind alone, so nothing else
    can keep a deleted object's series."""
    for collector in (metrics.RECONCILES, metrics.ERRORS, metrics.DURATION, metrics.APPLIES):
        assert collector._labelnames == ("kind",)
