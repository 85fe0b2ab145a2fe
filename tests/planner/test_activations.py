"""memory.Activations against what the runtime's model really keeps for the backward pass.

The runtime trains transformers' modules, so the bytes autograd saves per token and layer can be counted
on the CPU: a Llama block (sdpa attention, as the flash kernels save q, k, v, the output and the log-sum-exp)
runs forward under ``saved_tensors_hooks``, every saved tensor's storage is counted once (parameters
excluded), and the difference between a 4-layer and a 2-layer model is two layers' worth. Each case is
the runtime's own setup: bf16 weights (FSDP2 and DeepSpeed compute in bf16), fp32 weights under autocast
(DDP's full fine-tuning), a bf16 base with peft's fp32 adapters (DDP) or bf16 adapters (as FSDP2 gathers
them), each reading its module's input as the runtime lets it (loading.share_adapter_inputs), for several
target sets, with and without dropout, and with gradient checkpointing. The formula must be within 10% of
the count for each.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from kubeforge.planner.architecture import Architecture  # noqa: E402
from kubeforge.planner.memory import Activations, Layout, checkpointing_mode  # noqa: E402

SEQ, VOCAB = 128, 256
SHAPES = [(512, 1024, 2, 8), (512, 2048, 8, 8)]  # hidden, MLP width, KV heads, heads
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV, MLP = ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")
CASES = {  # name -> (how the runtime holds the weights, strategy, method, LoRA dropout, checkpointing, targets)
    "fsdp-full-bf16": ("bf16", "fsdp", "full", 0.0, False, ALL),
    "ddp-full-amp": ("amp", "ddp", "full", 0.0, False, ALL),
    "ddp-full-amp-checkpointing": ("amp", "ddp", "full", 0.0, True, ALL),
    "lora": ("lora", "ddp", "lora", 0.0, False, ALL),
    "lora-dropout": ("lora", "ddp", "lora", 0.1, False, ALL),
    "lora-checkpointing": ("lora", "ddp", "lora", 0.1, True, ALL),
    "lora-qv": ("lora", "ddp", "lora", 0.0, False, QV),
    "lora-qv-dropout": ("lora", "ddp", "lora", 0.1, False, QV),
    "lora-mlp-dropout": ("lora", "ddp", "lora", 0.1, False, MLP),
    "lora-o": ("lora", "ddp", "lora", 0.0, False, ("o_proj",)),
    "fsdp-lora": ("lora-bf16", "fsdp", "lora", 0.0, False, ALL),
    "fsdp-lora-dropout": ("lora-bf16", "fsdp", "lora", 0.1, False, ALL),
    "fsdp-lora-qkv-dropout": ("lora-bf16", "fsdp", "lora", 0.1, False, ("q_proj", "k_proj", "v_proj")),
    "fsdp-lora-down": ("lora-bf16", "fsdp", "lora", 0.0, False, ("down_proj",)),
    # selective checkpointing (runtime/selective.py), full fine-tuning only
    "fsdp-full-bf16-selective": ("bf16", "fsdp", "full", 0.0, "selective", ALL),
    "ddp-full-amp-selective": ("amp", "ddp", "full", 0.0, "selective", ALL),
}


def saved_bytes(layers: int, hold: str, dropout: float, checkpointing: bool | str, shape: tuple[int, ...],
                targets: tuple[str, ...] = ALL) -> int:  # fmt: skip
    """The bytes one forward pass keeps for the backward pass. ``checkpointing``: False, True (full) or
    "selective", whose kept outputs live in torch's checkpoint cache, not in autograd's saved tensors: then the
    bytes the forward pass leaves allocated, from the profiler's memory events (the logits and the loss, the same
    for 4 and 2 layers, cancel in the difference)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    h, i, kv, heads = shape
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, attn_implementation="sdpa")  # fmt: skip
    with no_init_weights():  # the values do not matter, only what is saved
        model = LlamaForCausalLM(config)
    model = model.float() if hold == "amp" else model.to(torch.bfloat16)
    if hold.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        from kubeforge.runtime.engines.loading import share_adapter_inputs

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=list(targets))
        model = get_peft_model(model, config)
        assert share_adapter_inputs(model) == len(targets) * layers
        adapter_dtype = torch.float32 if hold == "lora" else torch.bfloat16  # DDP's fp32, FSDP2's gathered bf16
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(adapter_dtype)
    if checkpointing:
        from kubeforge.runtime import selective

        policy = "selective" if checkpointing == "selective" else "full"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=selective.checkpoint_kwargs(policy))
        if hold.startswith("lora"):
            model.enable_input_require_grads()
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, VOCAB, (1, SEQ))
    if checkpointing == "selective":
        from torch.profiler import ProfilerActivity, profile

        recorder = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with recorder as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, use_cache=False)  # alive until the recording ends
        del out
        return sum(e.self_cpu_memory_usage for e in prof.events())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}-i{s[1]}-kv{s[2]}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_layers_keep_what_the_formula_says(case, shape):
    hold, strategy, method, dropout, checkpointing, targets = CASES[case]
    measured = (saved_bytes(4, hold, dropout, checkpointing, shape, targets)
                - saved_bytes(2, hold, dropout, checkpointing, shape, targets)) / 2  # fmt: skip
    h, i, kv, heads = shape
    layout = Layout(method=method, strategy=strategy, nodes=1, gpus_per_node=1, seq_len=SEQ, lora_rank=8,
                    lora_dropout=dropout, lora_targets=targets,
                    checkpointing_policy="selective" if checkpointing == "selective" else "full")  # fmt: skip
    one, two = (Architecture(num_layers=n, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv,
                             intermediate_size=i, vocab_size=VOCAB) for n in (1, 2))  # fmt: skip
    mode = checkpointing_mode(replace(layout, gradient_checkpointing=bool(checkpointing)))
    formula = Activations(two, layout)(1, mode, 1) - Activations(one, layout)(1, mode, 1)
    assert abs(formula / measured - 1) <= 0.10, (measured / SEQ / h, formula / SEQ / h)


def loss_peak(vocab: int, seq: int = 256, chunk: int = 0, dpo: bool = False) -> int:
    """The highest allocated CPU bytes of one forward and backward pass through transformers' causal-LM loss
    (bf16 weights, one small layer that trains), from the profiler's memory timeline; ``chunk``: through the
    runtime's chunked loss (runtime/chunked_loss.py) instead; ``dpo``: DPO's summed log-probs of two rows
    (dpo.logps_of) in its chunks."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq,
                         tie_word_embeddings=False, attn_implementation="sdpa")  # fmt: skip
    with no_init_weights():
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02).requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    if chunk:
        from kubeforge.runtime import chunked_loss

        assert chunked_loss.install(model, chunk, seq * (2 if dpo else 1))
    ids = torch.randint(0, vocab, (2 if dpo else 1, seq))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if dpo:
            from kubeforge.runtime import dpo as preference

            batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
            preference.logps_of(model, batch)[0].sum().backward()
        else:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    live = peak = 0
    for _, change in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        live += change
        peak = max(peak, live)
    return peak


def test_the_logits_cost_what_the_loss_really_allocates():
    """memory.LOGIT_BYTES per token and vocabulary entry: the peak grows by exactly that with the vocabulary
    (the bf16 logits, their fp32 copy and the fp32 log-softmax the loss keeps)."""
    from kubeforge.planner.memory import LOGIT_BYTES

    seq = 256
    per_entry = (loss_peak(16000, seq) - loss_peak(8000, seq)) / (seq * 8000)
    assert abs(per_entry - LOGIT_BYTES) <= 0.05 * LOGIT_BYTES, per_entry


@pytest.mark.parametrize("dpo", [False, True], ids=["sft", "dpo"])
def test_the_chunked_loss_costs_one_chunk_of_logits(dpo):
    """memory.CHUNK_LOGIT_BYTES per chunk token and vocabulary entry: the peak grows by that with the chunk (for
    SFT's loss and DPO's log-probs), and not with the sequence (a 1,024-token sequence holds what a 512-token one
    does, but its hidden states)."""
    from kubeforge.planner.memory import CHUNK_LOGIT_BYTES

    vocab, seq = 16000, 512
    per_entry = (loss_peak(vocab, seq, 256, dpo) - loss_peak(vocab, seq, 128, dpo)) / (128 * vocab)
    assert abs(per_entry - CHUNK_LOGIT_BYTES) <= 0.05 * CHUNK_LOGIT_BYTES, per_entry
    if dpo:
        return
    longer = loss_peak(vocab, 2 * seq, chunk=128) - loss_peak(vocab, seq, chunk=128)
    assert longer < 0.05 * 128 * vocab * CHUNK_LOGIT_BYTES, longer  # far less than one chunk's logits
