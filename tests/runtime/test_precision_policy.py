"""The runtime holds what the planner's memory model says: one precision policy, measured.

Each case builds the real engine under torchrun (2 CPU processes, gloo, bf16 compute), runs a
step and the backward pass of another (tests/runtime/probes/model_states.py), and counts the
bytes of every tensor alive on each rank. memory.py's model states (weights + gradients +
optimizer states, from contract.precision_policy) must be within 5% of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeforge.planner.architecture import from_hf_config
from kubeforge.planner.memory import Layout, deepspeed_buckets, model_states
from kubeforge.runtime.contract import STRATEGIES, ComputeConfig
from kubeforge.runtime.demo import task, tiny
from tests.runtime import probes
from tests.runtime.conftest import make_contract

WORLD = 2
CASES = [
    ("full", "ddp", "fp32"),
    ("full", "fsdp", "fp32"),
    ("full", "zero1", "fp32"),
    ("full", "zero2", "fp32"),
    ("full", "zero3", "fp32"),
    ("lora", "ddp", "fp32"),
    ("lora", "fsdp", "fp32"),
    ("lora", "zero3", "fp32"),
    ("qlora", "ddp", "fp32"),
    ("qlora", "zero3", "fp32"),  # the NF4 bytes (stored as bf16, bnb_4bit_quant_storage) are partitioned too
    # pure bf16 (compute.master_weights bf16): 8 bytes per trained parameter instead of 16
    ("full", "ddp", "bf16"),
    ("full", "fsdp", "bf16"),
    ("full", "zero2", "bf16"),
    ("full", "zero3", "bf16"),
]


@pytest.fixture(scope="module")
def model_256(tmp_path_factory) -> Path:
    """Large enough that per-tensor rounding does not matter, small enough for 2 CPU processes."""
    return tiny.make_model(tmp_path_factory.mktemp("m256") / "m", task.words(), hidden=256, layers=4, heads=4)


def measure(model: Path, data: Path, tmp: Path, method: str, strategy: str, master: str) -> list[dict]:
    contract = make_contract(model, data, tmp / "out", method=method, strategy=strategy, world=WORLD, micro=2,
                             accumulation=1)  # fmt: skip
    compute = ComputeConfig(device="cpu", precision="bf16", master_weights=master)
    contract = contract.model_copy(update={"compute": compute})
    probes.run("model_states", contract, tmp, tmp / "measured", nproc=WORLD)
    return [json.loads((tmp / "measured" / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize(("method", "strategy", "master"), CASES, ids=[f"{m}-{s}-{w}" for m, s, w in CASES])
def test_each_rank_holds_what_the_memory_model_says(model_256, task_data, tmp_path, method, strategy, master):
    arch = from_hf_config(json.loads((model_256 / "config.json").read_text()), "test")
    layout = Layout(method=method, strategy=strategy, nodes=1, gpus_per_node=WORLD, precision="bf16",
                    lora_rank=16, lora_targets=("all-linear",), master_weights=master)  # fmt: skip
    states = model_states(arch, layout)
    expected = states.weights + states.gradients + states.optimizer
    if STRATEGIES[strategy].zero_stage == 3:
        expected += deepspeed_buckets(arch, layout)  # memory.py counts ZeRO-3's reduce bucket as overhead
    if STRATEGIES[strategy].zero_stage == 1:
        # measured after the boundary's reduction; memory.py counts the peak just before it, when the
        # whole bf16 gradients still exist (2 bytes per parameter, of which this rank keeps 1/N)
        expected -= 2 * arch.total_parameters * (1 - 1 / WORLD)
    ranks = measure(model_256, task_data[0], tmp_path, method, strategy, master)
    for rank in ranks:
        assert rank["bytes"] == pytest.approx(expected, rel=0.05), (rank["bytes"] / expected, states)
        if STRATEGIES[strategy].engine != "deepspeed":  # DeepSpeed keeps its masters inside its optimizer
            assert rank["dtypes"]["trainable"] == [{"fp32": "torch.float32", "bf16": "torch.bfloat16"}[master]]
        if method == "lora" and STRATEGIES[strategy].engine != "deepspeed":
            assert rank["dtypes"]["frozen"] == ["torch.bfloat16"]
