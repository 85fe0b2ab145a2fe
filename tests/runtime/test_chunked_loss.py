"""runtime/chunked_loss.py: the loss in chunks is transformers' own loss (value and gradients), for the cases the
runtime trains (packed rows with position ids, prompt tokens labelled -100, a LoRA-wrapped model, Gemma 2's
soft-capped logits), and models it cannot reproduce keep their own loss."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kubeforge.runtime import chunked_loss  # noqa: E402


def _llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa", **extra)  # fmt: skip
    return LlamaForCausalLM(config)


def _batch(rows: int = 2, width: int = 24):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (rows, width))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 7] = -100  # a packed example's first token
    positions = torch.cat([torch.arange(7), torch.arange(width - 7)]).repeat(rows, 1)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_the_chunked_loss_is_the_models_own(chunk):
    model, batch = _llama(), _batch()
    own, own_grads = _loss_and_grads(model, batch)
    assert chunked_loss.install(model, chunk, 2 * 24)
    loss, grads = _loss_and_grads(model, batch)
    assert torch.allclose(loss, own, rtol=1e-5, atol=1e-6)
    assert own_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(grad, own_grads[name], rtol=1e-4, atol=1e-6), name


def test_every_micro_batch_calls_the_head_as_often_whatever_its_length():
    """ZeRO-3 gathers the head's weight at each call, a collective: ranks whose packed batches differ in length
    must call it the same number of times, ceil(most tokens / chunk), shorter or empty chunks included."""
    model = _llama()
    assert chunked_loss.install(model, 5, 48)  # 10 chunks of at most 5 tokens
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    for width in (24, 7, 3):
        calls.clear()
        batch = {k: v[:, :width] for k, v in _batch().items()}
        with torch.no_grad():
            model(**batch, use_cache=False)
        assert len(calls) == 10 and sum(calls) == 2 * width and max(calls) <= 5, (width, calls)


def test_without_labels_the_model_runs_its_own_forward_and_returns_logits():
    model, batch = _llama(), _batch()
    assert chunked_loss.install(model, 4, 48)
    out = model(input_ids=batch["input_ids"], use_cache=False)
    assert out.logits.shape == (2, 24, 300) and out.loss is None


def test_a_lora_wrapped_model_trains_only_its_adapters_through_the_chunks():
    from peft import LoraConfig, get_peft_model

    model, batch = _llama(), _batch()
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    own, own_grads = _loss_and_grads(model, batch)
    assert chunked_loss.install(model, 8, 48)
    loss, grads = _loss_and_grads(model, batch)
    assert torch.allclose(loss, own, rtol=1e-5) and grads.keys() == own_grads.keys()
    assert all("lora_" in name for name in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, own_grads[name], rtol=1e-4, atol=1e-6), name


def test_soft_capped_logits_are_capped_in_each_chunk():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=5.0, attn_implementation="eager")  # fmt: skip
    model = Gemma2ForCausalLM(config)
    batch = {k: v for k, v in _batch().items() if k != "position_ids"}
    own, _ = _loss_and_grads(model, batch)
    assert chunked_loss.install(model, 7, 48)
    loss, _ = _loss_and_grads(model, batch)
    assert torch.allclose(loss, own, rtol=1e-5)


def test_heads_that_scale_their_logits_keep_the_models_own_loss(caplog):
    model = _llama()
    model.config.logit_scale = 0.5  # as Cohere's head does
    with caplog.at_level("WARNING", logger="kubeforge.train"):
        assert chunked_loss.install(model, 4, 48) is False
    assert "scales its logits (logit_scale)" in caplog.text
    assert "forward" not in vars(model)  # nothing swapped
    assert chunked_loss.install(_llama(), 0, 48) is False  # 0: the contract asks for the model's own loss


def test_dpo_log_probs_in_chunks_are_the_ones_from_the_whole_logits():
    """dpo.logps_of: each row's summed log-probability of its labelled tokens and their count, and the gradients
    of a loss on them, equal with the loss in chunks and with the model's own logits (dpo.sequence_logps)."""
    from kubeforge.runtime import dpo

    model = _llama()
    batch = _batch()
    batch = {"input_ids": batch["input_ids"], "labels": batch["labels"], "attention_mask": torch.ones(2, 24)}

    def run(m):
        m.zero_grad()
        logps, tokens = dpo.logps_of(m, batch)
        (logps * torch.tensor([1.0, -0.5])).sum().backward()
        return logps.detach(), tokens, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    own, own_tokens, own_grads = run(model)
    assert chunked_loss.install(model, 5, 48) and chunked_loss.chunks_of(model) == 10
    got, tokens, grads = run(model)
    assert torch.equal(tokens, own_tokens) and own_tokens.tolist() == [19, 18]
    assert torch.allclose(got, own, rtol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, own_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("method", ["full", "lora"])
def test_under_zero3_the_chunked_loss_gives_the_models_own_gradients(tiny_model, task_data, tmp_path, method):
    """A 2-process ZeRO-3 gang (tests/runtime/probes/zero3_chunked.py): DeepSpeed partitions the head's weight again
    after each chunk's forward and gathers it for the chunk's recomputation in the backward pass, so torch's
    checkpoint must not compare the saved and recomputed weight's shapes (determinism_check "none"); every weight's
    full gradient, the trained head's included, equals the model's own loss's."""
    import json

    from tests.runtime import probes
    from tests.runtime.conftest import make_contract

    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method=method, strategy="zero3", world=2,
                             micro=2, accumulation=1, loss_chunk=16)  # fmt: skip
    assert contract.compute.loss_chunk_tokens == 16
    probes.run("zero3_chunked", contract, tmp_path, tmp_path / "out.json")
    found = json.loads((tmp_path / "out.json").read_text())
    assert found["loss_diff"] < 1e-5
    head = [n for n in found["names"] if "lm_head" in n]
    assert head if method == "full" else any("lora" in n for n in found["names"])
    assert max(found["grads"].values()) < 1e-4, found["grads"]
