"""Selective activation checkpointing: keep what the expensive operations produced, recompute the rest.

Full checkpointing (``compute.checkpointing_policy`` full) keeps only each decoder layer's input and runs the
whole layer's forward pass again in the backward pass: a third more matmul work. Selective keeps, besides the
input, the attention kernel's output and every second matmul's (the 1st, 3rd, 5th, ... of each layer: in a
Llama layer q, v, gate and down; k, o and up are recomputed), and recomputes everything between them (norms,
rotary embeddings, activations, residual adds, dtype casts): torchtitan's per-op policy
(``selective_ac_option = "op"``, whose published runs the planner is held to), written here on torch's
selective checkpoint contexts (``torch.utils.checkpoint.create_selective_checkpoint_contexts``).
memory.selective_outputs counts what it keeps, cost.selective_recompute what it recomputes; both measured on
the runtime's modules (tests/planner/test_activations.py, tests/runtime/test_selective_checkpointing.py).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

# matmuls (the linear layers: mm without a bias, addmm with one) and attention kernels, on GPUs and CPUs
MATMULS = ("mm.default", "addmm.default")
ATTENTION = (
    "_scaled_dot_product_flash_attention.default",
    "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_cudnn_attention.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
)


def _ops(names: tuple[str, ...]) -> frozenset[Any]:
    import torch

    ops = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(torch.ops.aten, packet, None)
        if op is not None and hasattr(op, overload):
            ops.add(getattr(op, overload))
    return frozenset(ops)


@functools.cache
def _matmuls() -> frozenset[Any]:
    return _ops(MATMULS)


@functools.cache
def _attention() -> frozenset[Any]:
    import torch

    ops = set(_ops(ATTENTION))
    flash = getattr(getattr(torch.ops, "flash_attn", None), "_flash_attn_forward", None)  # flash-attn >= 2.6
    if flash is not None:
        ops.add(flash.default)
    return frozenset(ops)


def _policy(counts: dict[str, int]):
    """The policy of one checkpointed layer: the matmuls are counted separately in the forward pass and in its
    recomputation, so that both see the same ones kept."""
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        if op in _matmuls():
            key = "recompute" if ctx.is_recompute else "forward"
            counts[key] += 1
            return CheckpointPolicy.MUST_SAVE if counts[key] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in _attention() else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def context_fn() -> Any:
    """The contexts torch.utils.checkpoint runs one layer's selective forward pass and its recomputation in."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy(defaultdict(int)))


def checkpoint_kwargs(policy: str) -> dict[str, Any]:
    """torch.utils.checkpoint's keyword arguments for a checkpointing policy (full | selective)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = context_fn
    return kwargs
