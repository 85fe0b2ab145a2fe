"""The published runs in references.yaml (issue 11): the table is well-formed, and the planner's memory
model is not wildly off them. The full comparison (memory, step time, verdicts, per method) is
bench/planner_vs_references.py; this file only keeps what is true today from getting worse."""

from __future__ import annotations

import math
import re
from collections import Counter
from numbers import Number

import pytest

from bench.planner_vs_references import UNMODELLED, load, memory_row

ENTRIES = load()
METHODS = {"full", "lora", "qlora"}
VERDICTS = {"fits-one-gpu", "needs-sharding", "needs-offload", "does-not-fit", None}


def _numbers(value, path=""):
    if isinstance(value, bool):
        return
    if isinstance(value, Number):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


def _peak(entry):
    return (entry.get("measured") or {}).get("peak_memory_gib")


def _step(entry):
    return (entry.get("measured") or {}).get("step_seconds") or ((entry.get("derived") or {}).get("step_seconds"))


def test_ids_are_unique_kebab_case():
    ids = [e.get("id") for e in ENTRIES]
    assert all(isinstance(i, str) and re.fullmatch(r"[a-z0-9]+([._-][a-z0-9]+)*", i) for i in ids), ids
    assert not [i for i, n in Counter(ids).items() if n > 1]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_entry_is_well_formed(entry):
    source = entry.get("source") or {}
    assert source.get("title"), "source.title"
    assert str(source.get("url", "")).startswith("https://"), "source.url must be https"
    assert entry.get("method") in METHODS
    assert entry.get("verdict") in VERDICTS
    assert entry.get("model", {}).get("name")
    negative = [(p, v) for p, v in _numbers(entry) if v < 0]
    assert not negative, negative
    if _peak(entry) is not None:
        gpus = entry.get("gpus") or {}
        assert gpus.get("type") and gpus.get("count"), "a measured peak needs the GPU it was measured on"


def test_enough_measured_references():
    measured = [e["id"] for e in ENTRIES if _peak(e) is not None or _step(e) is not None]
    assert len(measured) >= 20, measured


def test_unmodelled_list_names_real_entries():
    assert set(UNMODELLED) <= {e["id"] for e in ENTRIES}


# Today (bench/planner_vs_references.py): over the 27 runs with an architecture (the catalog's, or a public
# config.json written out in the bench), a measured peak and none of the memory savers in UNMODELLED,
# memory.estimate is 0.59x-1.82x of the measured peak (checkpointing not stated -> the nearer of on/off);
# 11 of the 27 are within 10%. Issue 11 asks for 10% on all of them. What stands in the way, from the
# bench's rows: no model of selective activation checkpointing (torchtitan: the peak lies between the
# on/off estimates), activations with torch.compile + float8 (torchtitan 70B 2D: 0.75x; Trainy 8B: 0.59x),
# FSDP's transient gather counted in bf16 for QLoRA's NF4 layers (part of the 405B QLoRA's 1.82x), FSDP CPU offload
# mapped to ZeRO-3 offload (0.62x, 0.76x), and readings that include the allocator's cache (ms-swift with
# checkpointing: 0.71x). The bound below is what holds now with a little room; tighten it as those close.
FACTOR = 2.0


def test_memory_estimate_within_a_factor_of_two_of_measured_peaks():
    rows = [memory_row(e) for e in ENTRIES]
    compared = [r for r in rows if r.ratio is not None and not r.caveats]
    assert len(compared) >= 20
    off = {r.id: round(r.ratio, 2) for r in compared if abs(math.log(r.ratio)) > math.log(FACTOR)}
    assert not off, f"memory.estimate / measured peak outside {1 / FACTOR:.2f}-{FACTOR:.2f}: {off}"


def test_runs_with_unmodelled_memory_savers_are_overestimated_never_under():
    """8-bit or bf16-only optimizer states, the optimizer in the backward pass, activation offload: kubeforge
    models none of them, so for those runs its estimate stays on the safe side (above the measured peak)."""
    rows = [memory_row(e) for e in ENTRIES if e["id"] in UNMODELLED]
    under = {r.id: round(r.ratio, 2) for r in rows if r.ratio is not None and r.ratio < 1}
    assert not under, under
