"""Hugging Face <-> megatron-core weights for the Llama family, and tensor-parallel sharding.

Megatron fuses what Hugging Face keeps apart:

- ``linear_qkv`` holds, for each key/value group in turn, that group's query heads, then
  its key head, then its value head (so a tensor-parallel split along rows keeps whole
  groups together);
- ``linear_fc1`` holds gate then up (SwiGLU); under tensor parallelism each rank holds its
  slice of gate followed by its slice of up;
- the vocabulary is padded to a multiple of 128 x TP (padding rows are zeros, dropped on
  the way back).

Names are those of megatron's local layer spec (no Transformer Engine fusion of the
norms into the linear layers). Pure torch; no megatron import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubeforge.runtime.mcore.config import Shape

Tensor = Any  # torch.Tensor, kept lazy so that importing this module needs no torch


def _layer_map(i: int) -> dict[str, str]:
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {
        hf + "input_layernorm.weight": mc + "input_layernorm.weight",
        hf + "post_attention_layernorm.weight": mc + "pre_mlp_layernorm.weight",
        hf + "self_attn.o_proj.weight": mc + "self_attention.linear_proj.weight",
        hf + "mlp.down_proj.weight": mc + "mlp.linear_fc2.weight",
    }


def _qkv(q: Tensor, k: Tensor, v: Tensor, s: Shape) -> Tensor:
    """[q; k; v] per group; works for weights (rows x hidden) and biases (rows)."""
    rest = q.shape[1:]
    q = q.reshape(s.groups, s.heads_per_group * s.head_dim, *rest)
    k = k.reshape(s.groups, s.head_dim, *rest)
    v = v.reshape(s.groups, s.head_dim, *rest)
    import torch

    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(qkv: Tensor, s: Shape) -> tuple[Tensor, Tensor, Tensor]:
    rest = qkv.shape[1:]
    per_group = (s.heads_per_group + 2) * s.head_dim
    grouped = qkv.reshape(-1, per_group, *rest)
    q_rows = s.heads_per_group * s.head_dim
    q = grouped[:, :q_rows].reshape(-1, *rest)
    k = grouped[:, q_rows : q_rows + s.head_dim].reshape(-1, *rest)
    v = grouped[:, q_rows + s.head_dim :].reshape(-1, *rest)
    return q, k, v


def _pad_vocab(weight: Tensor, s: Shape) -> Tensor:
    import torch

    if weight.shape[0] == s.padded_vocab:
        return weight
    pad = weight.new_zeros(s.padded_vocab - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


def hf_to_mcore(
    hf: Mapping[str, Tensor], s: Shape, layers: range | None = None, *, first: bool = True, last: bool = True
) -> dict[str, Tensor]:
    """A (unsharded) Hugging Face state dict -> megatron GPTModel names and layouts. ``layers``,
    ``first`` and ``last`` restrict it to one pipeline stage's part (its layers, the embedding on
    the first stage, the final norm and output layer on the last), so that a lazy ``hf`` reads
    only those tensors."""
    import torch

    out: dict[str, Tensor] = {}
    if first:
        out["embedding.word_embeddings.weight"] = _pad_vocab(hf["model.embed_tokens.weight"], s)
    for i in layers if layers is not None else range(s.layers):
        for src, dst in _layer_map(i).items():
            out[dst] = hf[src]
        a = f"model.layers.{i}.self_attn."
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = _qkv(
            hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], s
        )
        if s.qkv_bias:
            out[f"decoder.layers.{i}.self_attention.linear_qkv.bias"] = _qkv(
                hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], s
            )
        m = f"model.layers.{i}.mlp."
        out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat(
            [hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]
        )
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not s.tied:
            out["output_layer.weight"] = _pad_vocab(hf["lm_head.weight"], s)
    return out


def mcore_to_hf(mc: dict[str, Tensor], s: Shape) -> dict[str, Tensor]:
    """The inverse of hf_to_mcore (megatron's _extra_state entries are ignored)."""
    out: dict[str, Tensor] = {"model.embed_tokens.weight": mc["embedding.word_embeddings.weight"][: s.vocab]}
    for i in range(s.layers):
        for src, dst in _layer_map(i).items():
            out[src] = mc[dst]
        a = f"model.layers.{i}.self_attn."
        q, k, v = _split_qkv(mc[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], s)
        out.update({a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v})
        if s.qkv_bias:
            q, k, v = _split_qkv(mc[f"decoder.layers.{i}.self_attention.linear_qkv.bias"], s)
            out.update({a + "q_proj.bias": q, a + "k_proj.bias": k, a + "v_proj.bias": v})
        gate, up = mc[f"decoder.layers.{i}.mlp.linear_fc1.weight"].chunk(2)
        out.update({f"model.layers.{i}.mlp.gate_proj.weight": gate, f"model.layers.{i}.mlp.up_proj.weight": up})
    out["model.norm.weight"] = mc["decoder.final_layernorm.weight"]
    if not s.tied:
        out["lm_head.weight"] = mc["output_layer.weight"][: s.vocab]
    return out


# ------------------------------------------------------------------ tensor parallelism
# rows: split along dim 0 (column-parallel layers, vocab-parallel embeddings);
# columns: split along dim 1 (row-parallel layers); whole: replicated (norms).
def _split_kind(name: str) -> str:
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")):
        return "rows"
    if name.endswith("linear_fc1.weight"):
        return "glu"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "columns"
    return "whole"


def shard(mc: dict[str, Tensor], tp: int, rank: int) -> dict[str, Tensor]:
    """Rank ``rank``'s slice of a full megatron state dict under tensor parallel ``tp``."""
    import torch

    out = {}
    for name, tensor in mc.items():
        kind = _split_kind(name)
        if kind == "rows":
            out[name] = tensor.chunk(tp, dim=0)[rank]
        elif kind == "columns":
            out[name] = tensor.chunk(tp, dim=1)[rank]
        elif kind == "glu":
            gate, up = tensor.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
        else:
            out[name] = tensor
    return out


def unshard(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The full state dict from every rank's slice (in rank order)."""
    import torch

    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        kind = _split_kind(name)
        if kind == "rows":
            out[name] = torch.cat(parts, dim=0)
        elif kind == "columns":
            out[name] = torch.cat(parts, dim=1)
        elif kind == "glu":
            halves = [p.chunk(2, dim=0) for p in parts]
            out[name] = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        else:
            out[name] = parts[0]
    return out


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The global layer indices pipeline stage ``stage`` holds (equal split)."""
    per = num_layers // pp
    return range(stage * per, (stage + 1) * per)


def for_stage(mc: dict[str, Tensor], s: Shape, pp: int, stage: int) -> dict[str, Tensor]:
    """The entries pipeline stage ``stage`` holds, its layers renumbered from 0 as megatron does."""
    layers = stage_layers(s.layers, pp, stage)
    out = {}
    for name, tensor in mc.items():
        if name.startswith("decoder.layers."):
            index = int(name.split(".")[2])
            if index in layers:
                out[name.replace(f"decoder.layers.{index}.", f"decoder.layers.{index - layers.start}.", 1)] = tensor
        else:
            first, last = name.startswith("embedding."), name.startswith(("decoder.final_layernorm", "output_layer"))
            if (first and stage == 0) or (last and stage == pp - 1):
                out[name] = tensor
    return out


def join_stages(stages: list[dict[str, Tensor]], s: Shape) -> dict[str, Tensor]:
    """The inverse of for_stage over every stage: layers renumbered back to global indices."""
    out: dict[str, Tensor] = {}
    pp = len(stages)
    for stage, state in enumerate(stages):
        first = stage_layers(s.layers, pp, stage).start
        for name, tensor in state.items():
            if name.startswith("decoder.layers."):
                index = int(name.split(".")[2])
                name = name.replace(f"decoder.layers.{index}.", f"decoder.layers.{index + first}.", 1)
            out.setdefault(name, tensor)
    return out
