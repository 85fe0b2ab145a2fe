"""MFU: the model-FLOPs formula (PaLM appendix B; 4 per frozen parameter for LoRA), its parameter counts on real
models, and the exported gauge, present only where the device's peak is known."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubeforge.runtime import progress as P
from kubeforge.runtime.contract import PROGRESS_PATH
from tests.runtime.conftest import make_contract


def test_the_formula_is_palms_with_frozen_weights_at_four():
    attention = 12 * 32 * 32 * 128 * 4096  # 12 L H Q T
    full = P.flops_per_token(trainable=6_500_000_000, frozen=0, layers=32, heads=32, head_dim=128, seq_len=4096)
    assert full == 6 * 6.5e9 + attention
    lora = P.flops_per_token(trainable=40_000_000, frozen=6_500_000_000, layers=32, heads=32, head_dim=128,
                             seq_len=4096)  # fmt: skip
    assert lora == 4 * 6.5e9 + 6 * 4e7 + attention  # no weight gradients for the frozen base
    assert lora < full


def test_palm_540b_model_flops_per_token():
    """PaLM's own example (Chowdhery et al. 2022, appendix B): N = 540.35B, L = 118, H = 48, Q = 256, T = 2048;
    6N dominates: at this size the attention term adds about 1%."""
    n = 540.35e9
    flops = P.flops_per_token(trainable=int(n), frozen=0, layers=118, heads=48, head_dim=256, seq_len=2048)
    assert flops == pytest.approx(6 * n + 12 * 118 * 48 * 256 * 2048)
    assert flops / (6 * n) == pytest.approx(1.011, abs=0.001)


def test_mfu_is_achieved_over_peak():
    # 8 H100s (989 TFLOP/s bf16) training 50,000 tokens/s of a model needing 6.2e10 FLOPs per token
    assert P.mfu(50_000, 6.2e10, 8, 989.0) == pytest.approx(50_000 * 6.2e10 / (8 * 989e12))
    assert 0 < P.mfu(50_000, 6.2e10, 8, 989.0) < 1


def _llama_matmul_parameters(c) -> int:
    """A Llama's multiplying parameters by hand: attention, MLP and norms per layer, the final norm, the head."""
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    layer += 2 * c.hidden_size  # two RMSNorms
    return c.num_hidden_layers * layer + c.hidden_size + c.vocab_size * c.hidden_size  # final norm, output head


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_of_a_real_model(tiny_model, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config)
    n = _llama_matmul_parameters(config)  # a tied head multiplies too, so the count is the same
    attention = 12 * config.num_hidden_layers * config.hidden_size * 64
    assert P.model_flops_per_token(config, model, "full", 64) == 6 * n + attention


def test_lora_counts_the_adapters_as_trainable(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=8, target_modules=["q_proj"]))
    adapters = config.num_hidden_layers * 8 * (config.hidden_size + config.hidden_size)  # A and B of each q_proj
    n = _llama_matmul_parameters(config)
    attention = 12 * config.num_hidden_layers * config.hidden_size * 64
    assert P.model_flops_per_token(config, model, "lora", 64) == 4 * n + 6 * adapters + attention


def test_no_peak_no_mfu_inputs(tiny_model, task_data, tmp_path):
    contract = make_contract(tiny_model, task_data[0], tmp_path)
    assert contract.compute.peak_tflops is None
    assert P.mfu_inputs(contract, None, None) == {}  # nothing is computed on a CPU


def scrape(progress: P.Progress) -> dict[str, float]:
    server = P.serve(progress, 0, PROGRESS_PATH)
    assert server is not None
    try:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}{P.METRICS_PATH}", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_gauge_is_exported_only_where_the_peak_is_known():
    known = P.Progress(100, flops_token=1e10, devices=2, peak_tflops=1.0)
    known.started = time.monotonic() - 1000.0  # long enough that the scrape's own second does not count
    known.update(1, 2.0, 100_000, 0.01)  # 100 tokens/s x 1e10 FLOPs / (2 x 1e12 FLOP/s) = 0.5
    assert scrape(known)[P.MFU_METRIC] == pytest.approx(0.5, rel=0.02)
    assert known.scalars()["mfu"] == pytest.approx(0.5, rel=0.02)
    unknown = P.Progress(100, flops_token=1e10, devices=2, peak_tflops=None)
    unknown.update(1, 2.0, 1000, 0.01)
    assert P.MFU_METRIC not in scrape(unknown) and "mfu" not in unknown.scalars()
