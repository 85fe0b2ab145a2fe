"""Who wakes whom (controller/wakeups.py): children their owner, sources their users, nodes everyone;
a re-listed object at the same resourceVersion wakes no one."""

from __future__ import annotations

import asyncio

from kubeforge.controller.wakeups import Wakeups, node_facts, sources_of


def node(labels: dict, gpus: str = "8", heartbeat: str = "t0", ready: str = "True") -> dict:
    ready_condition = {"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat}
    status = {"allocatable": {"nvidia.com/gpu": gpus}, "conditions": [ready_condition]}
    return {"metadata": {"name": "n1", "labels": labels, "resourceVersion": heartbeat}, "spec": {}, "status": status}


def test_only_a_new_version_counts_as_a_change():
    w = Wakeups()
    assert w.changed("uid-1", "10")
    assert not w.changed("uid-1", "10")  # the same object re-listed after a watch restart
    assert w.changed("uid-1", "11")
    assert w.changed("uid-1", "11", deleted=True) and w.changed("uid-1", "11")  # forgotten once deleted


async def test_a_wake_reaches_the_registered_key_only():
    w = Wakeups()
    mine, other = w.register(("ns", "FineTuneJob", "a")), w.register(("ns", "FineTuneJob", "b"))
    assert w.wake(("ns", "FineTuneJob", "a")) and mine.is_set() and not other.is_set()
    assert not w.wake(("ns", "FineTuneJob", "nobody"))


async def test_sources_wake_the_objects_that_refer_to_them():
    w = Wakeups()
    spec = {"source": {"quantizeJobRef": {"name": "q"}}, "adapters": [{"name": "x", "fineTuneJobRef": {"name": "f"}}]}
    assert sources_of("ns", spec) == {("ns", "QuantizeJob", "q"), ("ns", "FineTuneJob", "f")}
    key = ("ns", "ModelService", "svc")
    trigger = w.register(key)
    w.refers_to(key, sources_of("ns", spec))
    assert w.wake_dependents(("ns", "FineTuneJob", "other")) == 0 and not trigger.is_set()
    assert w.wake_dependents(("ns", "FineTuneJob", "f")) == 1 and trigger.is_set()


async def test_a_node_wakes_everyone_when_what_it_offers_changes_not_on_heartbeats():
    w = Wakeups()
    trigger = w.register(("ns", "FineTuneJob", "a"))
    assert w.node_changed("n1", node_facts(node({"gpu": "h100"})))
    trigger.clear()
    assert not w.node_changed("n1", node_facts(node({"gpu": "h100"}, heartbeat="t1")))
    assert not trigger.is_set()
    assert w.node_changed("n1", node_facts(node({"gpu": "h100"}, gpus="4")))
    assert trigger.is_set()
    trigger.clear()
    assert w.node_changed("n1", node_facts(node({"gpu": "h100"}, gpus="4", ready="False")))  # the inventory drops it
    assert trigger.is_set()


async def test_the_loop_runs_a_pass_per_wake_and_on_resync_and_says_which():
    w, key, causes = Wakeups(), ("ns", "FineTuneJob", "a"), []
    stopped = asyncio.Event()

    class Stopped:
        def __bool__(self) -> bool:
            return stopped.is_set()

    async def one_pass(cause: str) -> None:
        causes.append(cause)

    async def until(n: int) -> None:
        for _ in range(200):
            if len(causes) >= n:
                return
            await asyncio.sleep(0.025)

    loop = asyncio.create_task(w.loop(key, Stopped(), lambda: 1.0, one_pass))
    await asyncio.sleep(0)
    w.wake(key)
    w.wake(key)  # two wakes before the pass: one pass
    await until(1)
    assert causes == ["woken"]
    await until(2)  # nothing wakes it: the resync comes due
    assert causes == ["woken", "resync"]
    stopped.set()
    w.wake(key)
    await asyncio.wait_for(loop, 2)
    assert len(w) == 0  # unregistered on the way out


def test_a_resync_is_skipped_only_while_the_inputs_are_the_same_and_a_full_pass_is_not_due():
    from kubeforge.controller.wakeups import SeenInputs, inputs_digest

    job = {"metadata": {"uid": "j", "generation": 1, "resourceVersion": "7"}}
    pod = {"metadata": {"uid": "p", "resourceVersion": "3"}}
    digest = inputs_digest(job, [pod], {"step": 1}, "inventory-1")
    seen, key = SeenInputs(full_every=100.0), ("ns", "FineTuneJob", "a")
    assert not seen.unchanged(key, digest, now=0.0)  # never seen: a pass
    seen.record(key, digest, now=0.0)
    assert seen.unchanged(key, digest, now=50.0)
    assert not seen.unchanged(key, digest, now=100.0)  # a full pass is due
    seen.record(key, digest, now=100.0)  # ... and ran: the next is due from there
    assert seen.unchanged(key, digest, now=150.0) and not seen.unchanged(key, digest, now=200.0)
    for changed in (
        inputs_digest({"metadata": {**job["metadata"], "generation": 2}}, [pod], {"step": 1}, "inventory-1"),
        inputs_digest({"metadata": {**job["metadata"], "deletionTimestamp": "t"}}, [pod], {"step": 1}, "inventory-1"),
        inputs_digest(job, [{"metadata": {"uid": "p", "resourceVersion": "4"}}], {"step": 1}, "inventory-1"),
        inputs_digest(job, [pod], {"step": 2}, "inventory-1"),
        inputs_digest(job, [pod], {"step": 1}, "inventory-2"),
        inputs_digest(job, [], {"step": 1}, "inventory-1"),
    ):
        assert not seen.unchanged(key, changed, now=60.0)
    # the pass's own status write moves the job's resourceVersion, not its inputs
    rewritten = {"metadata": {**job["metadata"], "resourceVersion": "9"}, "status": {"phase": "Running"}}
    assert inputs_digest(rewritten, [pod], {"step": 1}, "inventory-1") == digest
    assert inputs_digest(job, [pod, job], None) == inputs_digest(job, [job, pod], None)  # order does not matter
    assert not SeenInputs(full_every=0.0).unchanged(key, digest, now=0.0)
