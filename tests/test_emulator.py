"""The API emulator behaves like an API server where our tests rely on it."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.harness.selectors import parse_field_selector, parse_label_selector

JOBS = "/apis/batch/v1/namespaces/team-a/jobs"
FTJS = "/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs"
MERGE = {"Content-Type": "application/merge-patch+json"}


def job(name: str, labels: dict | None = None, owner_uid: str | None = None) -> dict:
    meta: dict = {"name": name, "labels": labels or {}}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": owner_uid}]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {"parallelism": 1}, "status": {"x": 1}}


async def create(api, path: str, body: dict) -> dict:
    resp = await api.post(path, json=body)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_create_sets_server_metadata_and_answers_201(emulator):
    obj = await create(emulator, JOBS, job("a"))
    meta = obj["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z") and meta["namespace"] == "team-a"
    assert "status" not in obj  # status is a subresource: ignored on create
    resp = await emulator.post(JOBS, json=job("a"))
    assert resp.status == 409 and (await resp.json())["reason"] == "AlreadyExists"


async def test_generate_name(emulator):
    body = job("")
    body["metadata"] = {"generateName": "run-"}
    obj = await create(emulator, JOBS, body)
    assert obj["metadata"]["name"].startswith("run-") and len(obj["metadata"]["name"]) == 9


async def test_generation_moves_with_spec_only_and_status_is_a_subresource(emulator):
    obj = await create(emulator, JOBS, job("a"))
    rv1 = int(obj["metadata"]["resourceVersion"])

    resp = await emulator.patch(
        f"{JOBS}/a", json={"metadata": {"labels": {"x": "y"}}, "status": {"a": 1}}, headers=MERGE
    )
    obj = await resp.json()
    assert obj["metadata"]["generation"] == 1 and "status" not in obj
    assert int(obj["metadata"]["resourceVersion"]) > rv1

    resp = await emulator.patch(f"{JOBS}/a", json={"spec": {"parallelism": 2}}, headers=MERGE)
    assert (await resp.json())["metadata"]["generation"] == 2

    resp = await emulator.patch(
        f"{JOBS}/a/status", json={"spec": {"parallelism": 9}, "status": {"active": 1}}, headers=MERGE
    )
    obj = await resp.json()
    assert obj["status"] == {"active": 1} and obj["spec"]["parallelism"] == 2
    assert obj["metadata"]["generation"] == 2


async def test_server_owned_metadata_cannot_be_overwritten(emulator):
    obj = await create(emulator, JOBS, job("a"))
    resp = await emulator.patch(f"{JOBS}/a", json={"metadata": {"uid": "mine", "generation": 99}}, headers=MERGE)
    after = await resp.json()
    assert after["metadata"]["uid"] == obj["metadata"]["uid"] and after["metadata"]["generation"] == 1


async def test_noop_patch_keeps_resource_version(emulator):
    obj = await create(emulator, JOBS, job("a"))
    resp = await emulator.patch(f"{JOBS}/a", json={"spec": {"parallelism": 1}}, headers=MERGE)
    assert (await resp.json())["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


async def test_stale_resource_version_conflicts(emulator):
    obj = await create(emulator, JOBS, job("a"))
    stale = obj["metadata"]["resourceVersion"]
    await emulator.patch(f"{JOBS}/a", json={"spec": {"parallelism": 3}}, headers=MERGE)
    resp = await emulator.patch(
        f"{JOBS}/a", json={"metadata": {"resourceVersion": stale}, "spec": {"parallelism": 4}}, headers=MERGE
    )
    assert resp.status == 409 and (await resp.json())["reason"] == "Conflict"


async def test_json_patch_and_put(emulator):
    await create(emulator, JOBS, job("a"))
    resp = await emulator.patch(
        f"{JOBS}/a",
        data=json.dumps([{"op": "replace", "path": "/spec/parallelism", "value": 5}]),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert (await resp.json())["spec"]["parallelism"] == 5
    current = await (await emulator.get(f"{JOBS}/a")).json()
    current["spec"] = {"parallelism": 7, "completions": 7}
    resp = await emulator.put(f"{JOBS}/a", json=current)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["spec"] == {"parallelism": 7, "completions": 7}


async def test_a_failed_json_patch_test_is_422(emulator):
    await create(emulator, JOBS, job("a"))
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"}, {"op": "remove", "path": "/spec"}]
    resp = await emulator.patch(
        f"{JOBS}/a", data=json.dumps(ops), headers={"Content-Type": "application/json-patch+json"}
    )
    assert resp.status == 422
    assert emulator.stored("batch/v1/jobs", "team-a", "a")["spec"] == {"parallelism": 1}


async def test_server_side_apply_creates_then_merges(emulator):
    headers = {"Content-Type": "application/apply-patch+yaml"}
    body = job("applied")
    resp = await emulator.patch(f"{JOBS}/applied?fieldManager=kubeforge", data=json.dumps(body), headers=headers)
    assert resp.status in (200, 201), await resp.text()
    body["spec"]["parallelism"] = 2
    resp = await emulator.patch(f"{JOBS}/applied?fieldManager=kubeforge", data=json.dumps(body), headers=headers)
    obj = await resp.json()
    assert obj["spec"]["parallelism"] == 2 and obj["metadata"]["generation"] == 2


async def test_label_and_field_selectors_on_list(emulator):
    await create(emulator, JOBS, job("a", {"app": "x", "tier": "gpu"}))
    await create(emulator, JOBS, job("b", {"app": "y"}))
    await create(emulator, JOBS, job("c"))

    async def names(query: str) -> list[str]:
        resp = await emulator.get(f"{JOBS}?{query}")
        data = await resp.json()
        assert data["kind"] == "JobList"
        return sorted(i["metadata"]["name"] for i in data["items"])

    assert await names("labelSelector=app%3Dx") == ["a"]
    assert await names("labelSelector=app") == ["a", "b"]
    assert await names("labelSelector=!app") == ["c"]
    assert await names("labelSelector=app%20in%20(x,y),tier!%3Dcpu") == ["a", "b"]
    assert await names("fieldSelector=metadata.name%3Db") == ["b"]


async def test_watch_filters_by_label(emulator):
    resp = await emulator.get(f"{JOBS}?watch=true&labelSelector=app%3Dx")
    seen: list[str] = []

    async def read() -> None:
        async for line in resp.content:
            if line.strip():
                seen.append(json.loads(line)["object"]["metadata"]["name"])
                if "a" in seen:
                    return

    reader = asyncio.ensure_future(read())
    await create(emulator, JOBS, job("b", {"app": "y"}))
    await create(emulator, JOBS, job("a", {"app": "x"}))
    await asyncio.wait_for(reader, timeout=5)
    resp.close()
    assert seen == ["a"]


async def test_deleting_an_owner_collects_its_dependents(emulator):
    owner = await create(emulator, JOBS, job("owner"))
    await create(emulator, JOBS, job("child", owner_uid=owner["metadata"]["uid"]))
    await create(emulator, JOBS, job("stranger"))
    resp = await emulator.delete(f"{JOBS}/owner")
    assert resp.status == 200
    assert emulator.stored("batch/v1/jobs", "team-a", "child") is None
    assert emulator.stored("batch/v1/jobs", "team-a", "stranger") is not None


async def test_children_of_a_gone_owner_are_collected(emulator):
    resp = await emulator.post(JOBS, json=job("orphan", owner_uid="no-such-uid"))
    assert resp.status == 201
    assert emulator.stored("batch/v1/jobs", "team-a", "orphan") is None


async def test_finalizers_hold_deletion(emulator):
    body = job("held")
    body["metadata"]["finalizers"] = ["kubeforge.io/test"]
    await create(emulator, JOBS, body)
    await emulator.delete(f"{JOBS}/held")
    obj = emulator.stored("batch/v1/jobs", "team-a", "held")
    assert obj is not None and obj["metadata"]["deletionTimestamp"]
    await emulator.patch(f"{JOBS}/held", json={"metadata": {"finalizers": None}}, headers=MERGE)
    assert emulator.stored("batch/v1/jobs", "team-a", "held") is None


async def test_discovery_serves_our_crds_and_builtins(emulator):
    data = await (await emulator.get("/apis/kubeforge.io/v1alpha1")).json()
    by_name = {r["name"]: r for r in data["resources"]}
    assert by_name["finetunejobs"]["kind"] == "FineTuneJob"
    assert by_name["finetunejobs"]["shortNames"] == ["ftj"]
    assert "finetunejobs/status" in by_name
    assert {"list", "watch", "patch"} <= set(by_name["finetunejobs"]["verbs"])
    core = await (await emulator.get("/api/v1")).json()
    assert {"pods", "services", "configmaps", "namespaces", "nodes", "events"} <= {r["name"] for r in core["resources"]}
    namespaces = await (await emulator.get("/api/v1/namespaces")).json()
    assert {"default", "team-a"} <= {n["metadata"]["name"] for n in namespaces["items"]}


async def test_custom_resource_status_subresource(emulator):
    from tests.builders import finetune

    obj = await create(emulator, FTJS, finetune())
    assert obj["kind"] == "FineTuneJob"
    resp = await emulator.patch(f"{FTJS}/support-bot/status", json={"status": {"phase": "Pending"}}, headers=MERGE)
    assert (await resp.json())["status"] == {"phase": "Pending"}
    resp = await emulator.get(f"{FTJS}/missing")
    assert resp.status == 404


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("a=b", {"a": "b"}, True),
        ("a==b", {"a": "c"}, False),
        ("a!=b", {}, True),
        ("a", {"a": ""}, True),
        ("!a", {"a": "x"}, False),
        ("a in (x, y)", {"a": "y"}, True),
        ("a notin (x,y)", {"a": "y"}, False),
        ("a notin (x)", {}, True),
        ("a=b,c in (d)", {"a": "b", "c": "d"}, True),
        ("a=b,c in (d)", {"a": "b", "c": "e"}, False),
    ],
)
def test_label_selector(selector, labels, expected):
    assert parse_label_selector(selector)(labels) is expected


def test_field_selector():
    obj = {"metadata": {"name": "x", "namespace": "ns"}}
    assert parse_field_selector("metadata.name=x,metadata.namespace!=other")(obj)
    assert not parse_field_selector("metadata.name=y")(obj)


def test_bad_selector_is_an_error():
    with pytest.raises(ValueError, match="unable to parse"):
        parse_label_selector("a in x")
