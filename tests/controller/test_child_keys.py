"""The controller finds an owner's children under the key they are indexed by, for any name.

handlers.owner_key() keys each child in the kopf indexes by its owner labels; the handlers look an
owner's children up with labels.owner_key(). Both must agree for every name (a FineTuneJob with a
name over 63 characters stayed Waiting forever when they did not), and two owners must never get
each other's children (a job named with another's 63-character prefix adopted its finished Job).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import pytest

from kubeforge.controller.finetune import Observed, decide
from kubeforge.controller.handlers import owner_key
from kubeforge.render import labels as L
from tests.builders import DELETE, finetune
from tests.planner.nodes import example_cluster
from tests.render.rendering import all_cases

NOW = "2026-11-22T10:00:00Z"
PREFIX = "support-bot-" + "x" * 51
LONG = PREFIX + "-and-then-some"


def index(*children_lists: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """What the kopf child indexes hold: every child under owner_key(child)."""
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for children in children_lists:
        for child in children:
            out[owner_key(child)].append(child)
    return out


@pytest.mark.parametrize("name", ["support-bot", PREFIX, LONG, "x" * 253, "7b.chat"])
def test_every_child_is_found_under_its_owners_key(name):
    for case, docs in all_cases(name, every_cluster=False):
        for doc in docs:
            kind = doc["metadata"]["labels"][L.OWNER_KIND]
            assert owner_key(doc) == L.owner_key(doc["metadata"]["namespace"], kind, name), case


def body(name: str, status: dict | None = None) -> dict[str, Any]:
    doc = finetune(**{"resources.queue": DELETE})
    doc["metadata"].update(name=name, uid=f"uid-{len(name)}", generation=1)
    if status is not None:
        doc["status"] = status
    return doc


def observe(doc: dict[str, Any], children: list[dict[str, Any]]) -> Observed:
    from kubeforge.planner.catalog import lookup

    return Observed(body=doc, inventory=example_cluster("h100-4x8.yaml"), now=NOW, children=children,
                    architecture=lookup("Qwen/Qwen3-8B"))  # fmt: skip


def test_a_long_named_job_follows_its_gang_and_a_prefix_named_one_gets_its_own():
    long_first = decide(observe(body(LONG), []))
    assert [c["kind"] for c in long_first.apply] == ["ConfigMap", "Service", "Job"]
    existing = copy.deepcopy(long_first.apply)
    for child in existing:
        if child["kind"] == "Job":
            child["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    indexed = index(existing)

    # the long-named job finds its children by its own key and follows them (here: to Succeeded)
    mine = indexed.get(L.owner_key("team-a", "FineTuneJob", LONG), [])
    assert len(mine) == 3
    followed = decide(observe(body(LONG, long_first.status), mine))
    assert followed.status["phase"] == "Succeeded" and followed.apply == []

    # a job named with the 63-character prefix finds nothing of the first one's and renders its own gang
    theirs = indexed.get(L.owner_key("team-a", "FineTuneJob", PREFIX), [])
    assert theirs == []
    prefix_first = decide(observe(body(PREFIX), theirs))
    assert prefix_first.status["phase"] == "Waiting" and "artifact" not in prefix_first.status
    new_names = {(c["kind"], c["metadata"]["name"]) for c in prefix_first.apply}
    old_names = {(c["kind"], c["metadata"]["name"]) for c in existing}
    assert len(new_names) == 3 and not new_names & old_names
