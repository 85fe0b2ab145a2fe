"""Sharded engines never hold the whole model: each process loads only its share.

A generated Llama-architecture model of 2.15 GB (fp32, 4 safetensors shards) is loaded by the
FSDP2 and ZeRO-3 loaders in 2 processes (gloo); the peak RSS each process adds over a process
that only imported the same libraries (tests/runtime/probes/load_peak.py) is held to a fraction
of the model's bytes. Half the model is each rank's share; the rest is what is in flight.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runtime import probes
from tests.runtime.conftest import make_contract
from tests.runtime.probes import big_model

LIMITS = {
    "fsdp": 0.60,  # measured 0.565: the rank's fp32 half plus one 16 MiB chunk in flight
    # measured 0.505-0.535: the rank's half plus the module zero.Init builds whole before partitioning
    # it (the 65 MB embedding here). Was 0.618 until session 7: 0.052 of it DeepSpeed's fixed
    # communication workspace (now in the baseline, load_peak.py), and transformers' from_config, left
    # to open zero.Init itself, gathered every module whole to initialise it (the engine now opens it)
    "zero3": 0.60,
}


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("big") / "model"
    return folder, big_model.make(folder, vocab=8000, layers=10)


def peak_share(model: Path, size: int, tmp: Path, strategy: str) -> list[float]:
    contract = make_contract(model, model / "config.json", tmp / "out", method="full", strategy=strategy, world=2,
                             micro=1, accumulation=1)  # fmt: skip
    probes.run("load_peak", contract, tmp, tmp / "peaks", timeout=900)
    return [json.loads((tmp / "peaks" / f"rank{r}.json").read_text())["attributable"] / size for r in range(2)]


@pytest.mark.parametrize("strategy", sorted(LIMITS))
def test_each_process_loads_only_its_share(big, tmp_path, strategy):
    model, size = big
    assert size >= 2 * 10**9
    shares = peak_share(model, size, tmp_path, strategy)
    assert all(0.45 < s <= LIMITS[strategy] for s in shares), shares  # at least its half, at most the limit


def test_zero3_loads_a_model_with_tied_embeddings(tmp_path):
    """The output embedding stays the input embedding's parameter and gets the checkpoint's values
    (the file has no lm_head.weight), in a 2-process ZeRO-3 gang."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    contract = make_contract(tmp_path / "model", tmp_path / "model" / "config.json", tmp_path / "out",
                             method="full", strategy="zero3", world=2, micro=1, accumulation=1)  # fmt: skip
    probes.run("zero3_tied", contract, tmp_path, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == {"tied": True, "max_diff": 0.0, "lm_head_in_file": False}
