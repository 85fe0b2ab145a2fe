"""The next-token loss in chunks of tokens, so that the logits never exist whole.

transformers' causal LMs compute the logits of every position (tokens x vocabulary, bf16), upcast them to
fp32 and take the log-softmax: about 10 bytes per token and vocabulary entry at the loss's peak (measured,
tests/planner/test_activations.py), 4.9 GiB for 4,096 tokens of Llama 3's 128,256 entries. Here the model
returns its last hidden state and the loss runs over chunks of ``chunk`` tokens, each chunk's projection,
fp32 upcast and cross-entropy under non-reentrant activation checkpointing: the forward pass keeps only the
hidden state (which the head's backward needs anyway), and the backward pass recomputes one chunk's logits at
a time. The price is the head's forward computed twice (2 x hidden x vocabulary FLOPs per token more).

The same idea as Liger's fused linear cross-entropy and torchtune's chunked output loss, in plain PyTorch:
the head is called as a module, so the engines' hooks see it (FSDP2's unshard of the root, DDP's gradient hooks,
ZeRO's gradient partitioning, ZeRO-3's gather of the head's weight for each call, a LoRA adapter on the head).
ZeRO-3 partitions that weight again after each call: by the time torch's checkpoint compares what the
recomputation saved with what the forward pass saved, the weight it saved is empty again, so that comparison
(a debugging check, determinism_check) is off; the gradients are the model's own (tests/runtime/
test_chunked_loss.py, 2 ranks; an empty weight in a matmul would raise, not compute). Not under megatron-core,
which keeps its own vocab-parallel loss (contract.chunked_loss_runs).
``install`` swaps the forward of the model's causal LM (the one inside a peft wrapper) on that instance; a call
with ``labels`` (or with ``shift_labels``, targets already shifted: a Ulysses rank's slice of the sequence,
objectives.UlyssesSFT) returns the loss without logits; with ``token_logps=True`` as well it returns each
position's log-probability of its target instead (``TokenLogps``: DPO's summed log-probs, dpo.logps_of); a call
with neither (generation) runs the model's own forward.

Every micro-batch runs the same number of chunks, on every rank: ceil(micro-batch x max sequence length /
chunk), some of them shorter or empty when a batch holds fewer tokens, so that an engine whose hooks run a
collective at each call of a module sees the same calls on every rank and in every step.

The contract decides where it runs (``contract.loss_chunk_tokens``: the planner counts the same chunk); a model
whose head does more than a linear projection and an optional tanh soft-cap (Gemma 2) keeps its own loss, and
the runtime says so in its log.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kubeforge.runtime.contract import own_loss_reason

log = logging.getLogger("kubeforge.train")

IGNORE = -100
# non-reentrant checkpointing of each chunk, without comparing the recomputed tensors' shapes with the saved ones:
# ZeRO-3 has partitioned the head's weight again by then (see the module's doc)
RECOMPUTE = {"use_reentrant": False, "determinism_check": "none"}


@dataclass
class TokenLogps:
    """What the model returns for ``token_logps=True``: [rows, positions] fp32, 0 where the target is -100."""

    token_logps: torch.Tensor


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside ``model`` (a peft wrapper's base model; the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(target: Any) -> str | None:
    """Why ``target``'s loss cannot be computed here (None: it can)."""
    if not isinstance(getattr(target, "lm_head", None), torch.nn.Module) or not hasattr(target, "model"):
        return f"{type(target).__name__} has no lm_head over a base model"
    config = getattr(target, "config", None)
    reason = own_loss_reason(config.to_dict() if hasattr(config, "to_dict") else {})
    if reason:
        return f"{type(target).__name__}: {reason}"
    if "logits_to_keep" not in inspect.signature(type(target).forward).parameters:
        return f"{type(target).__name__}.forward is not a transformers causal LM's"
    return None


def install(model: Any, chunk: int, max_tokens: int) -> bool:
    """Compute ``model``'s loss in chunks of at most ``chunk`` tokens from now on, ceil(max_tokens / chunk) of them
    per call (``max_tokens``: the most tokens a micro-batch holds); False (and a log line) where the model's head
    is not one this module reproduces."""
    if chunk <= 0:
        return False
    target = causal_lm(model)
    why = unsupported(target)
    if why is not None:
        log.warning("chunked loss: %s; the model's own loss runs, with its logits whole", why)
        return False
    original = target.forward
    softcap = getattr(target.config, "final_logit_softcapping", None)
    chunks = max(1, math.ceil(max_tokens / chunk))

    def forward(*args: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if (labels is None and kwargs.get("shift_labels") is None) or args:
            return original(*args, labels=labels, **kwargs)
        per_token = kwargs.pop("token_logps", False)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        targets = kwargs.pop("shift_labels", None)
        if targets is None:
            targets = targets_of(labels)
        items = kwargs.pop("num_items_in_batch", None)
        for key in ("logits_to_keep", "return_dict", "output_attentions", "output_hidden_states"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        outputs = target.model(**kwargs)
        if per_token:
            return TokenLogps(token_logps(target.lm_head, outputs.last_hidden_state, targets, chunks, softcap))
        loss = cross_entropy(target.lm_head, outputs.last_hidden_state, targets, chunks, softcap, items)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    forward.loss_chunks = chunks  # type: ignore[attr-defined]
    target.forward = forward
    log.info("chunked loss: %s's loss in %d chunks of at most %d tokens", type(target).__name__, chunks, chunk)
    return True


def targets_of(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target: the labels shifted left by one, -100 after the last (transformers' shift)."""
    return F.pad(labels, (0, 1), value=IGNORE)[..., 1:]


def chunks_of(module: Any) -> int:
    """How many chunks ``module``'s loss runs in (0: the model's own loss), through DDP's and DeepSpeed's
    wrappers (``.module``) and peft's."""
    while isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return int(getattr(getattr(causal_lm(module), "forward", None), "loss_chunks", 0))


def cross_entropy(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunks: int,
    softcap: float | None = None,
    num_items: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss over ``head(hidden)`` given each position's target (the labels shifted
    left by one; -100 ignored): the sum over ``num_items`` when given, else the mean over the targeted
    positions, in ``chunks`` consecutive runs of positions (as equal as they divide; empty ones where there are
    fewer positions), one at a time."""
    targets = targets.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.size(-1))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for part, part_targets in zip(flat.tensor_split(chunks), targets.tensor_split(chunks), strict=True):
        total = total + checkpoint(_chunk_loss, head, part, part_targets, softcap, **RECOMPUTE)
    if num_items is None:
        return total / (targets != IGNORE).sum()
    return total / (num_items.to(total.device) if torch.is_tensor(num_items) else num_items)


def token_logps(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunks: int, softcap: float | None = None
) -> torch.Tensor:
    """Each position's log-probability of its target under ``head(hidden)`` (fp32, shaped like ``targets``; 0
    where the target is -100), in ``chunks`` runs of positions as ``cross_entropy``."""
    flat = hidden.reshape(-1, hidden.size(-1))
    wanted = targets.reshape(-1).to(hidden.device)
    parts = [
        checkpoint(_chunk_logps, head, part, part_targets, softcap, **RECOMPUTE)
        for part, part_targets in zip(flat.tensor_split(chunks), wanted.tensor_split(chunks), strict=True)
    ]
    return torch.cat(parts).view(targets.shape)


def _logits(head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """One chunk's logits in fp32, soft-capped where the model caps them (Gemma 2: tanh(x / cap) x cap)."""
    logits = head(hidden).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _chunk_logps(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    logits = _logits(head, hidden, softcap)
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * (targets != IGNORE)


def _chunk_loss(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    return F.cross_entropy(_logits(head, hidden, softcap), targets, ignore_index=IGNORE, reduction="sum")
