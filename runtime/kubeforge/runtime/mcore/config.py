"""A Hugging Face config.json -> megatron-core's TransformerConfig and GPTModel arguments.

Pure: returns plain dicts (the engine turns them into megatron objects), so the
translation is tested on CPU without megatron's CUDA-only forward pass. Supported: the
Llama family (Llama 2/3, Mistral, Qwen2 with its q/k/v biases) - decoder-only, RMSNorm,
SwiGLU, rotary embeddings, grouped-query attention. Anything else is refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SUPPORTED = {"llama": {"qkv_bias": False}, "mistral": {"qkv_bias": False}, "qwen2": {"qkv_bias": True}}  # model_type
VOCAB_DIVISIBLE_BY = 128  # megatron's make-vocab-size-divisible-by default (times the TP size)


class Unsupported(ValueError):
    """The model cannot run on this backend; the message names what is wrong."""


@dataclass(frozen=True)
class Shape:
    """The facts the weight mapping needs, read once from config.json."""

    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups


def shape(hf: dict[str, Any], tensor_parallel: int = 1) -> Shape:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        arch = (hf.get("architectures") or [kind])[0]
        raise Unsupported(
            f"the Megatron backend maps model types {', '.join(sorted(SUPPORTED))}; this model is {arch}. "
            "Set spec.parallelism.strategy to fsdp or a zero stage"
        )
    if _rope_type(hf) not in ("default", "llama3"):
        raise Unsupported(f"rope scaling {_rope(hf)} has no Megatron equivalent here")
    heads = int(hf["num_attention_heads"])
    groups = int(hf.get("num_key_value_heads") or heads)
    hidden = int(hf["hidden_size"])
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads", groups)):
        if value % tensor_parallel:
            raise Unsupported(f"{name}={value} does not divide by tensor parallel {tensor_parallel}")
    vocab = int(hf["vocab_size"])
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel
    return Shape(
        layers=int(hf["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        groups=groups,
        head_dim=int(hf.get("head_dim") or hidden // heads),
        ffn=int(hf["intermediate_size"]),
        vocab=vocab,
        padded_vocab=math.ceil(vocab / multiple) * multiple,
        tied=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=SUPPORTED[kind]["qkv_bias"],
    )


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes rope_parameters (with rope_theta inside); older configs rope_scaling."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _rope_type(hf: dict[str, Any]) -> str:
    rope = _rope(hf)
    return rope.get("rope_type") or rope.get("type") or "default"


def transformer_config(
    hf: dict[str, Any],
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    sequence_parallel: bool = False,
    precision: str = "bf16",
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for megatron.core.transformer.TransformerConfig (dtypes by name)."""
    s = shape(hf, tensor_parallel)
    if s.layers % pipeline_parallel:
        raise Unsupported(f"num_hidden_layers={s.layers} does not divide into {pipeline_parallel} pipeline stages")
    if hf.get("hidden_act", "silu") != "silu":
        raise Unsupported(f"hidden_act {hf.get('hidden_act')}: the mapping assumes SwiGLU (silu)")
    dtype = {"bf16": "bfloat16", "fp8": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    kwargs: dict[str, Any] = {
        "num_layers": s.layers,
        "hidden_size": s.hidden,
        "ffn_hidden_size": s.ffn,
        "num_attention_heads": s.heads,
        "num_query_groups": s.groups,
        "kv_channels": s.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "gated_linear_unit": True,
        "activation_func": "silu",
        "add_bias_linear": False,
        "add_qkv_bias": s.qkv_bias,
        "hidden_dropout": 0.0,
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        "tensor_model_parallel_size": tensor_parallel,
        "pipeline_model_parallel_size": pipeline_parallel,
        "sequence_parallel": sequence_parallel and tensor_parallel > 1,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == "bfloat16",
        "fp16": dtype == "float16",
        "bias_activation_fusion": False,  # the fused kernels need apex / TE; the local spec runs without
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
    }
    if precision == "fp8":
        kwargs["fp8"] = "hybrid"  # E4M3 forward, E5M2 gradients (Transformer Engine's recipe)
    if gradient_checkpointing:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return kwargs


def gpt_model(hf: dict[str, Any], tensor_parallel: int = 1) -> dict[str, Any]:
    """Keyword arguments for megatron.core.models.gpt.GPTModel besides config and layer spec."""
    s = shape(hf, tensor_parallel)
    rope = _rope(hf)
    kwargs: dict[str, Any] = {
        "vocab_size": s.padded_vocab,
        "max_sequence_length": int(hf.get("max_position_embeddings", 4096)),
        "position_embedding_type": "rope",
        "rotary_base": int(float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)),
        "share_embeddings_and_output_weights": s.tied,
    }
    if _rope_type(hf) == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(rope.get("factor", 8.0)))
    return kwargs
