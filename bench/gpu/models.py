"""Llama-architecture model folders of real sizes, written locally (no Hub access on the GPU machine).

Shapes follow public configs (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B) but every
model is a plain ``LlamaForCausalLM`` (no attention biases, default RoPE). Weights are bf16 (the
8B folder is 16 GB; full fine-tuning loads them as fp32 masters anyway) and are not meant to
learn anything: each tensor is a seeded block of 2^20 normal values (x 0.02) rolled by a random
offset and tiled, which writes at disk speed instead of drawing 8e9 random numbers (~65 s on
one core); norms are ones, so the loss starts near ln(vocab). Memory and speed do not depend on
the values. Shards are written one at a time (~2 GiB each): the writer never holds more.
No tokenizer: the benchmark feeds random token ids.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {  # Qwen2.5-0.5B-like
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "1b": {  # Llama-3.2-1B-like
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "3b": {  # Llama-3.2-3B-like
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "8b": {  # Llama-3.1-8B-like
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
MAX_POSITIONS = 8192
SHARD_BYTES = 2 * 1024**3
BLOCK = 1 << 20
DONE = "kubeforge-bench.json"  # written last: a folder without it is incomplete and is rewritten


def config_dict(name: str) -> dict[str, Any]:
    """The config.json of a model, as a plain dict (what the planner reads; no transformers needed)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": MAX_POSITIONS,
        **SHAPES[name],
    }


def make(name: str, root: Path) -> tuple[Path, dict[str, Any]]:
    """Write root/<name> unless it is already complete; (its folder, what was written: bytes, seconds)."""
    out = root / f"llama-{name}"
    done = out / DONE
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("shape") == SHAPES[name]:
            return out, {**info, "reused": True}
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    config = LlamaConfig(**{k: v for k, v in config_dict(name).items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # the head is the embedding: not stored twice

    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(BLOCK, generator=gen) * 0.02).to(torch.bfloat16)
    groups: list[list[str]] = [[]]
    size = 0
    for n, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            if "norm" in n:
                tensors[n] = torch.ones(shapes[n], dtype=torch.bfloat16)
            else:
                shift = int(torch.randint(0, BLOCK, (1,), generator=gen))
                tensors[n] = _tiled(base.roll(shift), shapes[n])
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    info = {"shape": SHAPES[name], "bytes": total, "seconds": round(time.monotonic() - started, 1)}
    done.write_text(json.dumps(info))
    return out, {**info, "reused": False}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tiled(block, shape: tuple[int, ...]):
    import torch

    n = _numel(shape)
    flat = torch.empty(n, dtype=block.dtype)
    whole = n // BLOCK
    if whole:
        flat[: whole * BLOCK].view(whole, BLOCK).copy_(block.expand(whole, BLOCK))
    rest = n - whole * BLOCK
    if rest:
        flat[whole * BLOCK :] = block[:rest]
    return flat.view(shape)
