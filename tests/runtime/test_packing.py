"""Packed examples do not see each other: a packed micro-batch gives every example the logits and the
loss it gets alone (fp32, a tiny random Llama), for each attention implementation that runs on CPU.

What transformers 5.17 does with the batch ``data.collate`` lays out (no attention_mask, position ids
restarting at 0 at each example), checked here rather than assumed:

- sdpa, eager: masking_utils.create_causal_mask -> _preprocess_mask_arguments finds the examples from the
  position ids (find_packed_sequence_indices) and builds a block-diagonal causal mask, but only when it
  gets no 2-D attention mask and no KV cache: a model left at config.use_cache=True builds a DynamicCache
  even in training and silently attends across examples (the controls below show both).
- flash_attention_2: modeling_flash_attention_utils._flash_attention_forward takes the varlen path from
  position ids only for a one-row batch (_is_packed_sequence); several packed rows run the plain causal
  kernel across examples. Hence data.collate(..., flatten=True) for flash-attention. No flash-attn kernel
  runs on CPU: that test drives transformers' real dispatch with reference kernels written on torch's sdpa.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from kubeforge.runtime import data
from kubeforge.runtime.mcore.engine import shifted

TOL = 1e-5
PAD = 0
# (tokens, of which a prompt with label -100): a BOS-led example with a prompt, and examples laid out as
# tokenize lays out text without a BOS token (every token learned, the first one included)
SHAPES = [(9, 4), (5, 0), (13, 3), (7, 0)]
MAX_LEN = 20  # pack: [9 + 5] (6 tokens of padding), [13 + 7]


def examples(vocab: int) -> list[data.Tokenized]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in SHAPES:
        ids = torch.randint(4, vocab, (n,), generator=gen).tolist()  # no special tokens
        out.append(data.Tokenized(ids, [data.IGNORE] * prompt + ids[prompt:]))
    return out


def load(model_dir, attention: str, *, use_cache: bool = False) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(
        model_dir, attn_implementation=attention, dtype=torch.float32, use_cache=use_cache
    )
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny_model):
    return {attention: load(tiny_model, attention) for attention in ("sdpa", "eager")}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per position t, the loss of predicting labels[t + 1] (0 where ignored), as transformers shifts."""
    target = F.pad(labels, (0, 1), value=data.IGNORE)[..., 1:]
    losses = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=data.IGNORE, reduction="none")
    return losses.view(target.shape)


def alone(model, items: list[data.Tokenized]) -> list[tuple[torch.Tensor, float]]:
    """Each example run by itself, as before packing existed: its logits and its summed loss."""
    out = []
    with torch.no_grad():
        for item in items:
            ids, labels = torch.tensor([item.input_ids]), torch.tensor([item.labels])
            logits = model(input_ids=ids).logits[0]
            out.append((logits, float(token_losses(logits, labels[0]).sum())))
    return out


def where(rows: list[data.Tokenized], flatten: bool) -> list[tuple[int, int, int]]:
    """(row, start, length) of every example, in order, as collate lays the rows out."""
    out, offset = [], 0
    for r, row in enumerate(rows):
        start = offset if flatten else 0
        for n in row.examples:
            out.append((0 if flatten else r, start, n))
            start += n
        offset = start if flatten else 0
    return out


def compare(model, batch: dict, rows, items, flatten: bool = False, reference=None) -> tuple[float, float, float]:
    """Largest logit difference, largest per-example loss difference, and the batch loss difference
    against the examples run alone (``reference``: ``alone``'s result, else computed here)."""
    reference = reference or alone(model, items)
    with torch.no_grad():
        out = model(**batch)
    per_token = token_losses(out.logits, batch["labels"])
    logit_diff = loss_diff = 0.0
    for (row, start, n), (logits, loss) in zip(where(rows, flatten), reference, strict=True):
        logit_diff = max(logit_diff, float((out.logits[row, start : start + n] - logits).abs().max()))
        loss_diff = max(loss_diff, abs(float(per_token[row, start : start + n].sum()) - loss))
    learned = sum(sum(label != data.IGNORE for label in item.labels[1:]) for item in items)
    mean_alone = sum(loss for _, loss in reference) / learned
    return logit_diff, loss_diff, abs(float(out.loss) - mean_alone)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "one-row"])
def test_packed_examples_get_the_logits_and_loss_they_get_alone(models, attention, flatten):
    model = models[attention]
    items = examples(model.config.vocab_size)
    rows = data.pack(items, MAX_LEN, PAD)
    assert [r.examples for r in rows] == [(9, 5), (13, 7)]
    batch = data.collate(rows, PAD, flatten=flatten)
    assert "attention_mask" not in batch and batch["input_ids"].shape == ((1, 34) if flatten else (2, 20))
    logit_diff, loss_diff, mean_diff = compare(model, batch, rows, items, flatten)
    assert logit_diff < TOL and loss_diff < TOL and mean_diff < TOL, (logit_diff, loss_diff, mean_diff)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_negative_controls_do_not_match(models, tiny_model, attention):
    """The old layout (a padding mask, positions running on across examples, labels as concatenated) and
    the new one undone by either condition transformers sets: a 2-D mask, or a KV cache."""
    model = models[attention]
    items = examples(model.config.vocab_size)
    rows = data.pack(items, MAX_LEN, PAD)
    new = data.collate(rows, PAD)
    real = torch.zeros_like(new["input_ids"])
    for r, row in enumerate(rows):
        real[r, : len(row.input_ids)] = 1
    old = {"input_ids": new["input_ids"], "attention_mask": real, "labels": torch.full_like(real, data.IGNORE)}
    for r, row in enumerate(rows):
        old["labels"][r, : len(row.labels)] = torch.tensor(row.labels)  # the first label of each example kept

    measured = {
        "old layout": compare(model, old, rows, items),
        "with a 2-D mask": compare(model, {**new, "attention_mask": real}, rows, items),
        "use_cache=True": compare(load(tiny_model, attention, use_cache=True).train(), new, rows, items),  # training
    }
    print(attention, {k: [f"{v:.3g}" for v in values] for k, values in measured.items()})
    for name, (logit_diff, loss_diff, _) in measured.items():
        assert logit_diff > 1e-2 and loss_diff > 1e-2, (name, logit_diff, loss_diff)
    # the old layout also trained each no-BOS example's first token on the previous example's last one
    targets = [int((F.pad(b["labels"], (0, 1), value=data.IGNORE)[:, 1:] != data.IGNORE).sum()) for b in (old, new)]
    assert targets[0] - targets[1] == 2  # the 2nd example of each row starts without a prompt


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_and_padding_rows_do_not_change_the_loss(models, attention):
    model = models[attention]
    items = examples(model.config.vocab_size)
    rows = data.pack(items, MAX_LEN, PAD)
    batch = data.collate(rows, PAD)
    extra = 5
    wider = {
        "input_ids": F.pad(batch["input_ids"], (0, extra), value=PAD),
        "labels": F.pad(batch["labels"], (0, extra), value=data.IGNORE),
        "position_ids": torch.cat(
            [batch["position_ids"], batch["position_ids"][:, -1:] + torch.arange(1, 1 + extra)], 1
        ),
    }
    width = wider["input_ids"].shape[1]
    padding_row = {
        "input_ids": torch.full((1, width), PAD),
        "labels": torch.full((1, width), data.IGNORE),
        "position_ids": torch.arange(width)[None],
    }
    taller = {k: torch.cat([wider[k], padding_row[k]]) for k in wider}
    unpacked = data.collate(items, PAD)  # one example a row, each padded to the longest
    with torch.no_grad():
        reference = model(**batch)
        for other in (wider, taller):
            out = model(**other)
            assert abs(float(out.loss) - float(reference.loss)) < TOL
            assert float((out.logits[:2, :20] - reference.logits).abs().max()) < TOL
        assert abs(float(model(**unpacked).loss) - float(reference.loss)) < TOL
    assert data.batch_tokens(batch) == data.batch_tokens(unpacked) == sum(n for n, _ in SHAPES)


def reference_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True):
    """flash_attn_func's contract, (batch, seq, heads, dim), computed by torch's sdpa."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                     softmax_scale=None, causal=True):  # fmt: skip
    """flash_attn_varlen_func's contract, (tokens, heads, dim) cut at cu_seqlens, computed by torch's sdpa."""
    bounds = cu_seqlens_q.tolist()
    return torch.cat([reference_flash(q[None, a:b], k[None, a:b], v[None, a:b], 0.0, softmax_scale, causal)[0]
                      for a, b in itertools.pairwise(bounds)])  # fmt: skip


def test_flash_attention_dispatch_needs_one_row(tiny_model, monkeypatch):
    """transformers' own flash_attention_2 path (masking, _flash_attention_forward's choice between the plain
    and the varlen kernel) with reference kernels in place of flash-attn's CUDA ones."""
    import transformers.modeling_flash_attention_utils as fa

    calls: list[str] = []

    def kernels(*_args, **_kwargs):
        def flash(*a, **k):
            calls.append("flash")
            return reference_flash(*a, **k)

        def varlen(*a, **k):
            calls.append("varlen")
            return reference_varlen(*a, **k)

        return (flash, varlen, None, fa._pad_input, fa._unpad_input), fa._lazy_define_process_function(varlen)

    monkeypatch.setattr(fa, "lazy_import_flash_attention", kernels)
    model = load(tiny_model, "sdpa")
    items = examples(model.config.vocab_size)
    rows = data.pack(items, MAX_LEN, PAD)
    expected = alone(model, items)  # sdpa, each example alone
    model.config._attn_implementation = "flash_attention_2"
    ((logits, _),) = alone(model, items[:1])  # one example, one row: the plain kernel
    assert float((logits - expected[0][0]).abs().max()) < TOL and set(calls) == {"flash"}

    calls.clear()
    one_row = compare(model, data.collate(rows, PAD, flatten=True), rows, items, flatten=True, reference=expected)
    assert max(one_row) < TOL and set(calls) == {"varlen"}, one_row
    calls.clear()
    two_rows = compare(model, data.collate(rows, PAD), rows, items, reference=expected)
    assert two_rows[0] > 1e-2 and set(calls) == {"flash"}, two_rows  # across examples: why collate flattens


def test_megatron_batch_keeps_positions_and_masks_the_loss_at_boundaries():
    rows = data.pack(examples(50), MAX_LEN, PAD)
    batch = data.collate(rows, PAD)
    out = shifted(batch, seq_length=24)
    assert out["tokens"].shape == out["position_ids"].shape == out["loss_mask"].shape == (2, 23)
    assert out["position_ids"][0].tolist() == [*range(9), *range(14)]  # the padding runs on
    assert out["position_ids"][1].tolist() == [*range(13), *range(10)]
    # the last token of an example predicts nothing (the next one's first token has label -100)
    assert out["loss_mask"][0, 8] == 0 and out["loss_mask"][1, 12] == 0 and out["loss_mask"][1, 13] == 1
    assert out["loss_mask"][0, 13:].sum() == 0  # padding
    with pytest.raises(ValueError, match="longer than seq_length"):
        shifted(data.collate(rows, PAD, flatten=True), seq_length=24)
