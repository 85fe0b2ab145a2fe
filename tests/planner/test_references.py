"""The published runs in references.yaml (issue 11): the table is well-formed, and the planner's memory
model is not wildly off them. The full comparison (memory, step time, verdicts, per method) is
bench/planner_vs_references.py; this file only keeps what is true today from getting worse."""

from __future__ import annotations

import math
import re
from collections import Counter
from numbers import Number

import pytest

from bench.planner_vs_references import CHUNKED_LOSSES, UNMODELLED, load, memory_row
from kubeforge.planner.memory import READINGS

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
    assert entry.get("loss") in (None, *CHUNKED_LOSSES), "loss: absent (the whole logits) or one of CHUNKED_LOSSES"
    reading = (entry.get("measured") or {}).get("reading")
    assert reading in (None, "unknown", *READINGS), "measured.reading: allocated, reserved, device or unknown"
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


# Today (bench/planner_vs_references.py): over the 29 runs with an architecture (the catalog's, or a public
# config.json written out in the bench), a measured peak and none of the features in UNMODELLED, what each peak's
# reading shows of memory.estimate (memory.shown_by: allocated, reserved, else the whole device) is 0.74x-1.79x of
# the measured peak (checkpointing not stated -> the nearer of on/off); 12 of the 29 are within 10%, every full
# fine-tuning among them (6 of 6, 0.90x-1.01x: torchtitan's selective checkpointing at 1.01x on 8 and 128 H100s).
# Issue 11 asks for 10% on all of them. What stands in the way, from the bench's rows: other frameworks' LoRA and
# QLoRA implementations (ms-swift on Qwen-1's fused c_attn: 0.75x/0.86x; PEFT's and Answer.AI's FSDP CPU offload
# on 24 GB cards: 0.76x/0.83x; LitGPT's bitsandbytes QLoRA: 0.74x; torchtune's LoRA recipes, compiled:
# 1.51x-1.79x; Qwen's, Answer.AI's and LLaMA-Factory's 7B LoRA/QLoRA: 1.12x-1.19x) and runs whose settings or
# batches' lengths are not published. The bound below is what holds now with a little room; tighten it as those
# close.
FACTOR = 2.0


def test_memory_estimate_within_a_factor_of_two_of_measured_peaks():
    rows = [memory_row(e) for e in ENTRIES]
    compared = [r for r in rows if r.ratio is not None and not r.caveats]
    assert len(compared) >= 20
    off = {r.id: round(r.ratio, 2) for r in compared if abs(math.log(r.ratio)) > math.log(FACTOR)}
    assert not off, f"memory.estimate / measured peak outside {1 / FACTOR:.2f}-{FACTOR:.2f}: {off}"
    within = sorted(r.id for r in compared if abs(r.ratio - 1) <= 0.10)
    assert len(within) >= WITHIN_TEN_PERCENT, within


WITHIN_TEN_PERCENT = 12  # of the 29 today: a change that loses one of them fails here. (It was 14 of 31 with an
# allocator term of 8% that nobody had measured; the published measurement, 15% (memory.FRAGMENTATION), put five
# 7B LoRA/QLoRA runs at 1.12-1.16x, and selective checkpointing brought torchtitan's two 8B runs inside.)


def test_full_fine_tuning_memory_within_ten_percent():
    """Every like-for-like full fine-tuning reference (kubeforge's runtime trains the same way: its precision
    policy, checkpointing policy and allocator setting) within 10% of its measured peak."""
    rows = [memory_row(e) for e in ENTRIES if e["method"] == "full"]
    compared = {r.id: round(r.ratio, 3) for r in rows if r.ratio is not None and not r.caveats}
    assert len(compared) >= 6, compared
    off = {k: v for k, v in compared.items() if abs(v - 1) > 0.10}
    assert not off, off


def test_runs_with_unmodelled_memory_savers_are_overestimated_never_under():
    """8-bit optimizer states, the optimizer in the backward pass, activation offload, torch.compile, torchtune's
    chunked cross-entropy, unpublished batch lengths: kubeforge models none of them, so for those runs its estimate
    stays on the safe side (above the measured peak)."""
    rows = [memory_row(e) for e in ENTRIES if e["id"] in UNMODELLED]
    under = {r.id: round(r.ratio, 2) for r in rows if r.ratio is not None and r.ratio < 1}
    assert not under, under


# Step time (issue 11: within 1.5x where published). Every run outside 1.5x is named here with why; the
# test fails when another one leaves the band and when one of these comes back into it (then drop it).
STEP_MISSES = {
    "torchtitan-llama3-8b-fsdp-64xa100": "the page does not state the network between its 8 nodes; at the assumed "
    "100 Gb/s FSDP's gathers alone take longer than the published 2.76 s step",
    "torchtitan-llama3-70b-fsdp-64xa100": "network not stated, as the 8B row",
    "trainy-llama31-8b-fsdp-32xh200-fp8": "torch.compile (and fp8 all-gathers) in the published run; kubeforge's "
    "runtime does not compile",
    "peft-metamathqa-llama32-3b-full-1xl40s": "840 real tokens a step (variable-length batches): kernels that small "
    "run far below the efficiency cost.py assumes (its small-micro-batch floor is 0.75 of EFFICIENCY); the AdamW "
    "update on the GPU is counted (pure bf16: 0.07 of the 0.52 s predicted vs 1.34 s published)",
    "torchao-llama3-8b-fsdp-8xb200-750w-bf16": "the B200s were power-limited to 750 W (the part is rated 1000 W) and "
    "the run compiled its model; cost.py has no B200 run to calibrate on (its 0.62x is the only one)",
    "philschmid-llama3-70b-qlora-fsdp-offload-4xa10g-3072": "timed loosely by the source ('~40 steps', '~1h': "
    "+-25%); the planner's compute term alone at the A10G's 70 TFLOPS and FSDP offload's efficiency is 184 s of "
    "its 187 s, twice the published 90 s; the A10 family has no other published step to calibrate on",
}
VERDICT_MISSES = {
    "torchtune-llama31-70b-full-8xa100-cpu-offload": "the recipe fuses the optimizer step into the backward pass "
    "(13.9 GiB per GPU); kubeforge's parameter offload needs more host memory than the assumed node has",
    "answerai-llama2-70b-qlora-fsdp-4xh100-2048": "the run chose 4 GPUs for speed (no peak published); the planner "
    "finds one H100 with checkpointing enough for the memory",
    "philschmid-llama3-70b-qlora-fsdp-offload-4xa10g-3072": "the run's FSDP1 + bitsandbytes stack needed CPU offload "
    "(22 GB per GPU); the planner splits each 3,072-token sequence over the 4 GPUs with Ulysses instead (FSDP2, NF4 "
    "gathered in 4 bits: 19.6 of 20.2 GiB), a layout the run did not have",
}


@pytest.fixture(scope="module")
def evaluated():
    from bench.planner_vs_references import evaluate

    return [evaluate(e) for e in ENTRIES]


def test_step_times_within_one_and_a_half_times_the_published_ones(evaluated):
    compared = [r for r in evaluated if r.step_ratio is not None]
    assert len(compared) >= 20
    outside = {r.id: round(r.step_ratio, 2) for r in compared if abs(math.log(r.step_ratio)) > math.log(1.5)}
    assert set(outside) == set(STEP_MISSES), outside


def test_verdicts_agree_with_the_published_runs(evaluated):
    compared = [r for r in evaluated if r.verdict and r.planner_verdict]
    assert len(compared) >= 30
    differ = {r.id: (r.verdict, r.planner_verdict) for r in compared if r.verdict != r.planner_verdict}
    assert set(differ) == set(VERDICT_MISSES), differ
