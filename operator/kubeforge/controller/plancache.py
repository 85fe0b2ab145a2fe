"""Plans, computed once per distinct input: the digest of (spec, inventory, architecture).

A plan is a pure function of the job's spec, the GPU inventory and the model's
architecture, so a reconcile that sees the same three gets the same plan without
searching again. The inventory's digest is computed once per Inventory object (the glue
builds a new one only when a node changes); the spec's from its JSON; the architecture
is a frozen dataclass of numbers and is its own key. The cache is bounded (LRU).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import Any

from kubeforge.api.finetune import FineTuneJobSpec
from kubeforge.inventory.pools import Inventory
from kubeforge.planner import Architecture, Plan
from kubeforge.planner import plan as make_plan

SIZE = 4096  # distinct (spec, inventory, architecture) triples kept; a plan is a few KiB

_plans: OrderedDict[tuple[str, str, Architecture], Plan] = OrderedDict()
_guard = threading.Lock()
_last_inventory: tuple[weakref.ReferenceType[Inventory], str] | None = None


def inventory_digest(inventory: Inventory) -> str:
    """sha256 of the inventory's contents, remembered for the object last asked about."""
    global _last_inventory
    last = _last_inventory
    if last is not None and last[0]() is inventory:
        return last[1]
    digest = hashlib.sha256(repr(inventory).encode()).hexdigest()
    _last_inventory = (weakref.ref(inventory), digest)
    return digest


def spec_digest(spec: FineTuneJobSpec) -> str:
    return hashlib.sha256(spec.model_dump_json(by_alias=True).encode()).hexdigest()


def cached_plan(spec: FineTuneJobSpec, inventory: Inventory, arch: Architecture, **kwargs: Any) -> Plan:
    """planner.plan(spec, inventory, arch), searched once per distinct input."""
    key = (spec_digest(spec) + repr(sorted(kwargs.items())), inventory_digest(inventory), arch)
    with _guard:
        found = _plans.get(key)
        if found is not None:
            _plans.move_to_end(key)
            return found
    result = make_plan(spec, inventory, arch, **kwargs)  # outside the lock: passes of other objects go on
    with _guard:
        _plans[key] = result
        while len(_plans) > SIZE:
            _plans.popitem(last=False)
    return result


def clear() -> None:
    global _last_inventory
    with _guard:
        _plans.clear()
        _last_inventory = None
