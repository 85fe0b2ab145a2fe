"""Architectures of popular open models, copied from their config.json on the Hub.

Keys are Hub repository ids, matched case-insensitively; instruct/chat variants share
their base model's architecture (``-Instruct``, ``-it``, ``-Chat`` and ``-Base`` are
stripped before lookup).
"""

from __future__ import annotations

import re

from kubeforge.planner.architecture import Architecture


def _a(layers, hidden, heads, kv, inter, vocab, *, head_dim=0, max_pos=0, experts=1, top_k=1, tied=False, bias=False):
    return dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        num_experts=experts,
        num_experts_per_token=top_k,
        tie_word_embeddings=tied,
        attention_bias=bias,
    )


_LLAMA3 = 128256
_QWEN3 = 151936
_CATALOG: dict[str, dict] = {
    # Meta Llama 3.x
    "meta-llama/Llama-3.2-1B": _a(16, 2048, 32, 8, 8192, _LLAMA3, head_dim=64, max_pos=131072, tied=True),
    "meta-llama/Llama-3.2-3B": _a(28, 3072, 24, 8, 8192, _LLAMA3, head_dim=128, max_pos=131072, tied=True),
    "meta-llama/Llama-3.1-8B": _a(32, 4096, 32, 8, 14336, _LLAMA3, max_pos=131072),
    "meta-llama/Meta-Llama-3-8B": _a(32, 4096, 32, 8, 14336, _LLAMA3, max_pos=8192),
    "meta-llama/Llama-3.1-70B": _a(80, 8192, 64, 8, 28672, _LLAMA3, max_pos=131072),
    "meta-llama/Llama-3.3-70B": _a(80, 8192, 64, 8, 28672, _LLAMA3, max_pos=131072),
    "meta-llama/Meta-Llama-3-70B": _a(80, 8192, 64, 8, 28672, _LLAMA3, max_pos=8192),
    "meta-llama/Llama-3.1-405B": _a(126, 16384, 128, 8, 53248, _LLAMA3, max_pos=131072),
    # Qwen3 (dense)
    "Qwen/Qwen3-0.6B": _a(28, 1024, 16, 8, 3072, _QWEN3, head_dim=128, max_pos=40960, tied=True),
    "Qwen/Qwen3-1.7B": _a(28, 2048, 16, 8, 6144, _QWEN3, head_dim=128, max_pos=40960, tied=True),
    "Qwen/Qwen3-4B": _a(36, 2560, 32, 8, 9728, _QWEN3, head_dim=128, max_pos=40960, tied=True),
    "Qwen/Qwen3-8B": _a(36, 4096, 32, 8, 12288, _QWEN3, head_dim=128, max_pos=40960),
    "Qwen/Qwen3-14B": _a(40, 5120, 40, 8, 17408, _QWEN3, head_dim=128, max_pos=40960),
    "Qwen/Qwen3-32B": _a(64, 5120, 64, 8, 25600, _QWEN3, head_dim=128, max_pos=40960),
    # Qwen2.5
    "Qwen/Qwen2.5-7B": _a(28, 3584, 28, 4, 18944, 152064, max_pos=131072, bias=True),
    "Qwen/Qwen2.5-72B": _a(80, 8192, 64, 8, 29568, 152064, max_pos=131072, bias=True),
    # Mistral
    "mistralai/Mistral-7B-v0.3": _a(32, 4096, 32, 8, 14336, 32768, max_pos=32768),
    "mistralai/Mistral-7B-v0.1": _a(32, 4096, 32, 8, 14336, 32000, max_pos=32768),
    "mistralai/Mixtral-8x7B-v0.1": _a(32, 4096, 32, 8, 14336, 32000, max_pos=32768, experts=8, top_k=2),
    # Gemma 2 / 3 (Gemma 3 4B+ are multimodal; the language model is what we train)
    "google/gemma-2-2b": _a(26, 2304, 8, 4, 9216, 256000, head_dim=256, max_pos=8192, tied=True),
    "google/gemma-2-9b": _a(42, 3584, 16, 8, 14336, 256000, head_dim=256, max_pos=8192, tied=True),
    "google/gemma-2-27b": _a(46, 4608, 32, 16, 36864, 256000, head_dim=128, max_pos=8192, tied=True),
    "google/gemma-3-1b-pt": _a(26, 1152, 4, 1, 6912, 262144, head_dim=256, max_pos=32768, tied=True),
    "google/gemma-3-4b-pt": _a(34, 2560, 8, 4, 10240, 262208, head_dim=256, max_pos=131072, tied=True),
    "google/gemma-3-12b-pt": _a(48, 3840, 16, 8, 15360, 262208, head_dim=256, max_pos=131072, tied=True),
    "google/gemma-3-27b-pt": _a(62, 5376, 32, 16, 21504, 262208, head_dim=128, max_pos=131072, tied=True),
}

# Published parameter counts, for tests of the computed counts (billions).
NOMINAL_BILLIONS: dict[str, float] = {
    "meta-llama/Llama-3.2-1B": 1.24,
    "meta-llama/Llama-3.2-3B": 3.21,
    "meta-llama/Llama-3.1-8B": 8.03,
    "meta-llama/Llama-3.1-70B": 70.6,
    "meta-llama/Llama-3.1-405B": 405.9,
    "Qwen/Qwen3-0.6B": 0.6,
    "Qwen/Qwen3-1.7B": 1.7,
    "Qwen/Qwen3-4B": 4.0,
    "Qwen/Qwen3-8B": 8.2,
    "Qwen/Qwen3-14B": 14.8,
    "Qwen/Qwen3-32B": 32.8,
    "Qwen/Qwen2.5-7B": 7.6,
    "Qwen/Qwen2.5-72B": 72.7,
    "mistralai/Mistral-7B-v0.3": 7.25,
    "mistralai/Mixtral-8x7B-v0.1": 46.7,
    "google/gemma-2-2b": 2.6,
    "google/gemma-2-9b": 9.24,
    "google/gemma-2-27b": 27.2,
    "google/gemma-3-1b-pt": 1.0,
}

_SUFFIX = re.compile(r"-(instruct|it|chat|base)(-\d+)?$", re.IGNORECASE)
_BY_LOWER = {k.lower(): k for k in _CATALOG}


def canonical(repo: str) -> str | None:
    name = repo.lower()
    if name in _BY_LOWER:
        return _BY_LOWER[name]
    stripped = _SUFFIX.sub("", name)
    for candidate in (stripped, stripped + "-pt", re.sub(r"-it$", "-pt", name)):
        if candidate in _BY_LOWER:
            return _BY_LOWER[candidate]
    return None


def lookup(repo: str) -> Architecture | None:
    key = canonical(repo)
    if key is None:
        return None
    return Architecture(**_CATALOG[key], source=f"built-in catalog ({key})")


def names() -> list[str]:
    return sorted(_CATALOG)
