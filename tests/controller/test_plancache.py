"""A plan is searched once per distinct (spec, inventory, architecture); any change searches again."""

from __future__ import annotations

import pytest

from kubeforge.api import parse
from kubeforge.controller import plancache
from kubeforge.planner import plan
from kubeforge.planner.catalog import lookup
from tests.builders import finetune
from tests.planner.nodes import example_cluster

QWEN, LLAMA = lookup("Qwen/Qwen3-8B"), lookup("meta-llama/Llama-3.1-8B")


def spec(**changes):
    return parse(finetune(**changes)).spec


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    plancache.clear()
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return plan(*args, **kwargs)

    monkeypatch.setattr(plancache, "make_plan", counted)
    yield calls
    plancache.clear()


def test_the_same_inputs_are_planned_once_and_get_the_same_plan(fresh):
    inventory = example_cluster("h100-4x8.yaml")
    first = plancache.cached_plan(spec(), inventory, QWEN)
    again = plancache.cached_plan(spec(), inventory, QWEN)  # an equal spec parsed anew, the same inventory
    assert again is first and len(fresh) == 1
    assert first == plan(spec(), inventory, QWEN)  # what the planner itself says


@pytest.mark.parametrize(
    "change",
    [
        lambda s, inv, arch: (spec(**{"lora.rank": 8}), inv, arch),
        lambda s, inv, arch: (s, example_cluster("a100-sxm4-80gb-2x8.yaml"), arch),
        lambda s, inv, arch: (s, inv, LLAMA),
    ],
    ids=["spec", "inventory", "architecture"],
)
def test_any_input_that_changes_plans_again(fresh, change):
    inventory = example_cluster("h100-4x8.yaml")
    first = plancache.cached_plan(spec(), inventory, QWEN)
    args = change(spec(), inventory, QWEN)
    second = plancache.cached_plan(*args)
    assert len(fresh) == 2 and second == plan(*args)
    assert plancache.cached_plan(spec(), inventory, QWEN) is first  # the first is still kept


def test_an_equal_inventory_rebuilt_from_the_same_nodes_hits(fresh):
    plancache.cached_plan(spec(), example_cluster("h100-4x8.yaml"), QWEN)
    plancache.cached_plan(spec(), example_cluster("h100-4x8.yaml"), QWEN)
    assert len(fresh) == 1


def test_the_cache_is_bounded(fresh, monkeypatch):
    monkeypatch.setattr(plancache, "SIZE", 3)
    inventory = example_cluster("h100-4x8.yaml")
    for rank in (8, 16, 32, 64):
        plancache.cached_plan(spec(**{"lora.rank": rank}), inventory, QWEN)
    assert len(plancache._plans) == 3
    plancache.cached_plan(spec(**{"lora.rank": 8}), inventory, QWEN)  # the oldest was dropped
    assert len(fresh) == 5
