"""A Llama-architecture model folder of a given size: config.json and sharded safetensors of random
weights, written one shard at a time (the writer never holds more than one shard)."""

from __future__ import annotations

import json
from pathlib import Path


def make(out: Path, *, hidden: int = 2048, layers: int = 8, vocab: int = 32000, shards: int = 4) -> int:
    """Write the folder (if not there yet); the bytes of its weights."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    index = out / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["metadata"]["total_size"]
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        if not part:
            continue
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: torch.randn(shapes[n], generator=gen) * 0.02 for n in part}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(part, file))
        del tensors
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total
