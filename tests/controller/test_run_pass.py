"""One reconcile pass (controller/reconcile.run_pass) against a body kopf replaces while the pass runs.

kopf hands timers, and every handler of an object that has a timer, a *live* body: each
watch event swaps its contents in place, from the event loop, while the pass runs in a
thread. A pass must decide, key its Events and condition its status write on one version.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import kopf

from kubeforge.controller.kube import event_object
from kubeforge.controller.reconcile import run_pass, snapshot
from kubeforge.controller.state import Decision, State, written_state

PATH = "/apis/kubeforge.io/v1alpha1/namespaces/ns/finetunejobs/job"


def version(rv: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "uid-1", "resourceVersion": rv, "generation": 1},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def decide_from(obj: Mapping[str, Any], children: list[Mapping[str, Any]]) -> Decision:
    """A two-step object: nothing -> Created (phase Waiting) -> Started (phase Running)."""
    old = dict(obj.get("status") or {})
    state = State(old, 1, "2026-01-01T00:00:00Z", "FineTuneJob")
    state.set("Created", "True", "Created", "created")
    state.phase = "Waiting"
    if old.get("phase"):
        state.set("Started", "True", "Started", "started")
        state.phase = "Running"
    return state.decision(old)


FIRST = decide_from(version("1"), []).status  # what an earlier pass wrote (phase Waiting)


class FakeKube:
    """The stored object; a read is also when the watch delivers it to kopf's live body."""

    identity = "test"

    def __init__(self, stored: dict[str, Any], live: kopf.Body | None = None):
        self.stored = stored
        self.live = live
        self.events: list[dict[str, Any]] = []
        self.status_writes: list[tuple[dict[str, Any], str | None, dict[str, Any]]] = []

    def read(self, path: str) -> dict[str, Any]:
        assert path == PATH
        if self.live is not None:
            self.live._replace_with(copy.deepcopy(self.stored))  # the watch catches up meanwhile
        return copy.deepcopy(self.stored)

    def post_event(self, event: Mapping[str, Any]) -> bool:
        self.events.append(dict(event))
        return True

    def apply(self, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        return obj

    def patch_status(self, path: str, status: Mapping[str, Any], rv: str | None, based_on: Mapping[str, Any]) -> bool:
        self.status_writes.append((dict(status), rv, dict(based_on)))
        return True


def test_a_live_body_that_catches_up_during_the_pass_does_not_hide_the_newer_status():
    live = kopf.Body(version("1", {}))  # kopf's view lags: the status an earlier pass wrote is not in it yet
    kube = FakeKube(version("5", FIRST), live)

    decision = run_pass(live, [], decide_from, kube)  # type: ignore[arg-type]

    assert decision.status["phase"] == "Running"
    assert [e["reason"] for e in kube.events] == ["Started", "PhaseRunning"]  # not Created/PhaseWaiting again
    keys = [e.key for e in decide_from(version("5", FIRST), []).events]
    assert all(k.startswith(written_state(FIRST) + "|") for k in keys)  # keyed by the status it starts from
    assert [e["metadata"]["name"] for e in kube.events] == [
        event_object(version("5"), "Normal", "", "", key, "")["metadata"]["name"] for key in keys
    ]
    ((written, rv, based_on),) = kube.status_writes
    assert (written["phase"], rv, based_on) == ("Running", "5", FIRST)  # conditional on what it decided from


def test_a_body_that_moves_after_the_re_read_does_not_change_what_the_pass_writes():
    live = kopf.Body(version("5", FIRST))
    kube = FakeKube(version("5", FIRST))

    def reading(path: str) -> dict[str, Any]:
        live._replace_with(version("9", {"phase": "Running"}))  # someone else moved on meanwhile
        return copy.deepcopy(kube.stored)

    kube.read = reading  # type: ignore[method-assign]
    run_pass(live, [], decide_from, kube)  # type: ignore[arg-type]
    ((_, rv, based_on),) = kube.status_writes
    assert (rv, based_on) == ("5", FIRST)  # the write's precondition is the version decided from


class Swapping(Mapping[str, Any]):
    """A body whose source is replaced right after its ``spec`` is first read: mid-copy, between metadata and status."""

    def __init__(self, *versions: dict[str, Any]):
        self.versions = list(versions)
        self.swapped = False

    def __getitem__(self, key: str) -> Any:
        value = self.versions[0][key]
        if key == "spec" and not self.swapped and len(self.versions) > 1:
            self.versions.pop(0)
            self.swapped = True
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.versions[0]))

    def __len__(self) -> int:
        return len(self.versions[0])


def test_a_snapshot_is_one_version_even_when_the_body_is_replaced_while_copying():
    old, new = version("1", {}), version("5", FIRST)
    body = Swapping(old, new)
    copied = snapshot(body)
    assert copied == new
    assert snapshot(copied) == copied and snapshot(copied) is not copied
