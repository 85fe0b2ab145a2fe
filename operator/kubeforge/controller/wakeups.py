"""Event-driven reconciles: a change of a child, a pod or a source wakes its owner's pass.

Each FineTuneJob, QuantizeJob and ModelService has one loop (a kopf daemon, see
handlers.py) that sleeps until it is woken or until a slow resync comes due. The watch
handlers of the children (Jobs, JobSets, Deployments, LeaderWorkerSets, pods) wake the
owner named by the child's owner labels; a FineTuneJob's or QuantizeJob's change wakes
the QuantizeJobs and ModelServices whose spec refers to it; a change in what the nodes
offer wakes every object, since any of them may have been waiting for GPUs. Only a real
change wakes anyone: an object seen again at the same resourceVersion (kopf re-lists every
watched object whenever a watch is re-established) is not one. Wake-ups that arrive while a
pass runs coalesce into one more pass.

Everything here runs on the operator's event loop (one thread): no locks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

Key = tuple[Any, ...]  # labels.owner_key(namespace, kind, name): how the child indexes are keyed
Source = tuple[str | None, str, str]  # (namespace, kind, name) of a FineTuneJob or QuantizeJob

DEBOUNCE = 0.05  # seconds: a burst of child events (pod created, then its status) makes one pass
JITTER = 0.1  # resyncs spread over +-10% of the interval: objects created together do not resync together


class Wakeups:
    def __init__(self) -> None:
        self._triggers: dict[Key, asyncio.Event] = {}
        self._sources: dict[Key, frozenset[Source]] = {}
        self._node_facts: dict[str, Any] = {}
        self._versions: dict[str, str] = {}  # uid -> the last resourceVersion seen of a child or source

    def __len__(self) -> int:
        return len(self._triggers)

    def register(self, key: Key) -> asyncio.Event:
        trigger = self._triggers.get(key)
        if trigger is None:
            trigger = self._triggers[key] = asyncio.Event()
        return trigger

    def unregister(self, key: Key, trigger: asyncio.Event) -> None:
        if self._triggers.get(key) is trigger:
            del self._triggers[key]
            self._sources.pop(key, None)

    def changed(self, uid: str, version: str | None, deleted: bool = False) -> bool:
        """Whether this event brings a new version of object ``uid`` (a re-list repeats the last one)."""
        if deleted:
            self._versions.pop(uid, None)
            return True
        if not uid or version is None:
            return True
        if self._versions.get(uid) == version:
            return False
        self._versions[uid] = version
        return True

    def wake(self, key: Key) -> bool:
        trigger = self._triggers.get(key)
        if trigger is not None:
            trigger.set()
        return trigger is not None

    def refers_to(self, key: Key, sources: frozenset[Source]) -> None:
        """``key`` waits for these FineTuneJobs/QuantizeJobs: their changes wake it."""
        self._sources[key] = sources

    def wake_dependents(self, source: Source) -> int:
        woken = [k for k, sources in self._sources.items() if source in sources]
        for key in woken:
            self.wake(key)
        return len(woken)

    def node_changed(self, name: str, facts: Any) -> bool:
        """Record what a node offers (None: deleted); True (and everyone woken) when that changed."""
        if facts is None:
            changed = self._node_facts.pop(name, None) is not None
        else:
            changed = self._node_facts.get(name) != facts
            self._node_facts[name] = facts
        if changed:
            for trigger in self._triggers.values():
                trigger.set()
        return changed

    async def loop(
        self,
        key: Key,
        stopped: Any,
        interval: Callable[[], float],
        one_pass: Callable[[str], Awaitable[None]],
    ) -> None:
        """Run ``one_pass(cause)`` each time ``key`` is woken ("woken"), and at least every ``interval()``
        seconds ("resync")."""
        trigger = self.register(key)
        try:
            while not stopped:
                cause = "woken"
                try:
                    await asyncio.wait_for(trigger.wait(), timeout=interval() * random.uniform(1 - JITTER, 1 + JITTER))
                except TimeoutError:
                    cause = "resync"
                if stopped:
                    break
                await asyncio.sleep(DEBOUNCE)
                trigger.clear()
                await one_pass(cause)
        finally:
            self.unregister(key, trigger)


def sources_of(namespace: str | None, spec: Mapping[str, Any]) -> frozenset[Source]:
    """The FineTuneJobs and QuantizeJobs a QuantizeJob or ModelService spec refers to (a QuantizeJob's
    own source is followed through the QuantizeJob: its status changes when its source's does)."""
    out: set[Source] = set()
    source = spec.get("source") or {}
    for field, ref_kind in (("fineTuneJobRef", "FineTuneJob"), ("quantizeJobRef", "QuantizeJob")):
        name = (source.get(field) or {}).get("name")
        if name:
            out.add((namespace, ref_kind, name))
    for adapter in spec.get("adapters") or []:
        name = ((adapter or {}).get("fineTuneJobRef") or {}).get("name")
        if name:
            out.add((namespace, "FineTuneJob", name))
    return frozenset(out)


def node_facts(body: Mapping[str, Any]) -> Any:
    """What the inventory reads of a Node (labels, schedulability, readiness, capacity): not its heartbeats."""
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    return (
        tuple(sorted((meta.get("labels") or {}).items())),
        bool(spec.get("unschedulable")),
        tuple(sorted((str(t.get("key")), str(t.get("effect"))) for t in spec.get("taints") or [])),
        tuple(sorted((status.get("allocatable") or {}).items())),
        tuple(sorted((status.get("capacity") or {}).items())),
        tuple(sorted((str(c.get("type")), str(c.get("status"))) for c in conditions if c.get("type") == "Ready")),
    )


class SeenInputs:
    """What each object's last pass decided from, as a digest: a resync that finds the same inputs skips its
    pass (the decision would be the same, and it was applied), except once every ``full_every`` seconds."""

    def __init__(self, full_every: float) -> None:
        self.full_every = full_every
        self._seen: dict[Key, tuple[str, float]] = {}

    def unchanged(self, key: Key, digest: str, now: float | None = None) -> bool:
        seen = self._seen.get(key)
        now = time.monotonic() if now is None else now
        return seen is not None and seen[0] == digest and now - seen[1] < self.full_every

    def record(self, key: Key, digest: str, now: float | None = None) -> None:
        """A pass ran from these inputs (a full one: the next is due ``full_every`` from now)."""
        self._seen[key] = (digest, time.monotonic() if now is None else now)

    def forget(self, key: Key) -> None:
        self._seen.pop(key, None)


def inputs_digest(body: Mapping[str, Any], objects: Iterable[Mapping[str, Any]], *extra: Any) -> str:
    """The object's spec version (generation), each child's and pod's (uid, resourceVersion), and whatever else
    a pass reads. Not the object's resourceVersion: that moves with every status write, so each pass's own
    write would make the next check a pass too; a change of its spec or metadata runs kopf's update handler."""
    versions = sorted(
        (str((o.get("metadata") or {}).get("uid")), str((o.get("metadata") or {}).get("resourceVersion")))
        for o in objects
    )
    meta = body.get("metadata") or {}
    doc = [meta.get("uid"), meta.get("generation"), meta.get("deletionTimestamp"), versions, *extra]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
