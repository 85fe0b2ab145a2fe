"""loading.share_adapter_inputs: the adapters read their module's input as it is instead of peft's per-adapter
copy, which changes what autograd keeps (memory.lora_activations counts it; tests/planner/test_activations.py
measures it) and nothing else: without dropout the loss and every adapter gradient are the same bits, under
autocast with fp32 adapters over a bf16 base (how DDP trains LoRA)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from kubeforge.runtime.engines.loading import share_adapter_inputs  # noqa: E402


def _lora(shared: bool, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
                p.normal_(0, 0.05)  # lora_B starts at zero: give every adapter a gradient path
    if shared:
        assert share_adapter_inputs(model) == 2 * 7
    return model.train()


def _run(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 24))
    saved: dict[int, int] = {}  # storage -> bytes: a tensor several modules keep is counted once

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved.values())


def test_same_loss_and_gradients_fewer_saved_bytes():
    loss, grads, saved = _run(_lora(False, 0.0))
    loss_shared, grads_shared, saved_shared = _run(_lora(True, 0.0))
    assert torch.equal(loss, loss_shared)
    assert grads.keys() == grads_shared.keys() and len(grads) == 2 * 2 * 7
    different = [n for n in grads if not torch.equal(grads[n], grads_shared[n])]
    assert not different, different
    assert saved_shared < saved


def test_with_dropout_the_same_up_to_rounding_the_dropped_input():
    """With dropout the dropped input is scaled in bf16 rather than in fp32 before the matmul rounds it to
    bf16 anyway: the same masks, values within bf16 rounding."""
    loss, grads, saved = _run(_lora(False, 0.1))
    loss_shared, grads_shared, saved_shared = _run(_lora(True, 0.1))
    assert torch.allclose(loss, loss_shared, rtol=1e-4)
    flat, flat_shared = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, grads_shared))
    assert torch.nn.functional.cosine_similarity(flat, flat_shared, dim=0) > 0.9999
    assert saved_shared < saved
