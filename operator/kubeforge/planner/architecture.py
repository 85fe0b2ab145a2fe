"""A model's architecture, as the planner needs it, and its parameter count.

Sources, in order (``resolve``): spec.model.architecture; the built-in catalog; the
config.json in a local folder; the Hub's config.json (where the operator has network).
Fields the spec leaves out are filled from the next source that knows the model.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from kubeforge.api.finetune import ModelArchitecture, ModelSource
from kubeforge.api.uris import parse_uri
from kubeforge.runtime.contract import own_loss_reason

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """What the planner needs of a model; derived counts are computed once per instance (cached)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 0
    num_experts: int = 1
    num_experts_per_token: int = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_parameters: int = 0  # 0: computed
    own_loss: str = ""  # why the runtime keeps the model's own loss over its whole logits (contract.own_loss_reason)
    source: str = ""

    def __hash__(self) -> int:  # the dataclass's own hash (of every field), computed once: caches key on it
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in fields(self)))

    @cached_property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @cached_property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_size

    @cached_property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_size

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one layer (one expert for MoE MLPs)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @cached_property
    def attention_params_per_layer(self) -> int:
        shapes = self.module_shapes()
        weights = sum(a * b for name, (a, b) in shapes.items() if name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        return weights + bias

    @cached_property
    def mlp_params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @cached_property
    def params_per_layer(self) -> int:
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        norms = 2 * self.hidden_size
        return self.attention_params_per_layer + self.mlp_params_per_expert * self.num_experts + router + norms

    @cached_property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @cached_property
    def computed_parameters(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + head + self.num_layers * self.params_per_layer + self.hidden_size

    @cached_property
    def total_parameters(self) -> int:
        return self.num_parameters or self.computed_parameters

    @cached_property
    def active_parameters(self) -> int:
        """Parameters one token passes through (MoE: only its experts)."""
        if self.num_experts <= 1:
            return self.total_parameters
        inactive = (self.num_experts - self.num_experts_per_token) * self.mlp_params_per_expert * self.num_layers
        return self.total_parameters - inactive

    @cached_property
    def linear_parameters(self) -> int:
        """Parameters in the transformer layers' linear modules (what QLoRA quantizes to 4 bits)."""
        return self.num_layers * (
            sum(a * b for a, b in list(self.module_shapes().values())[:4])
            + self.mlp_params_per_expert * self.num_experts
        )

    @cached_property
    def largest_layer_parameters(self) -> int:
        """The largest single module (DeepSpeed's 'largest layer'): usually the embedding."""
        return max(self.embedding_params, max(a * b for a, b in self.module_shapes().values()))

    def lora_parameters(self, rank: int, targets: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
        """Trainable LoRA parameters and the target names this architecture does not know."""
        return _lora_parameters(self, rank, tuple(targets))

    def _count_lora(self, rank: int, targets: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
        shapes = self.module_shapes()
        names = LINEAR_MODULES if "all-linear" in targets else targets
        unknown = tuple(t for t in names if t not in shapes)
        per_layer = 0
        for name in names:
            a, b = shapes.get(name, (self.hidden_size, self.hidden_size))
            experts = self.num_experts if name in ("gate_proj", "up_proj", "down_proj") else 1
            per_layer += rank * (a + b) * experts
        return per_layer * self.num_layers, unknown


def from_hf_config(config: Mapping[str, Any], source: str) -> Architecture:
    """An Architecture from a transformers config.json (Llama, Qwen2/3, Mistral, Mixtral, Gemma 2/3, ...)."""
    cfg = dict(config.get("text_config") or config)  # multimodal configs keep the LM in text_config
    try:
        heads = int(cfg["num_attention_heads"])
        return Architecture(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            head_dim=int(cfg.get("head_dim") or 0),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
            num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1),
            num_experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False) or cfg.get("model_type") == "qwen2"),
            own_loss=own_loss_reason(cfg) or "",
            source=source,
        )
    except KeyError as err:
        raise ValueError(f"{source}: config.json lacks {err.args[0]!r}") from err


class ArchitectureUnknown(ValueError):
    pass


def resolve(model: ModelSource, *, local_root: Path | None = None, allow_network: bool = False) -> Architecture:
    """The architecture of spec.model, from the first source that knows it (see the module doc)."""
    from kubeforge.planner.catalog import lookup

    loc = parse_uri(model.uri)
    base: Architecture | None = None
    if loc.scheme == "hf":
        base = lookup(loc.authority)
    if base is None and loc.scheme == "local":
        path = Path(loc.path)
        if local_root is not None and not path.is_absolute():
            path = local_root / path
        config = path / "config.json"
        if config.is_file():
            base = from_hf_config(json.loads(config.read_text()), str(config))
    if base is None and loc.scheme == "hf" and allow_network:
        base = fetch_hub_config(loc.authority, model.revision or "main")
    return merge(model.architecture, base, model.uri)


def merge(spec: ModelArchitecture | None, base: Architecture | None, uri: str) -> Architecture:
    given = {k: v for k, v in (spec.model_dump() if spec else {}).items() if v is not None}
    if base is None:
        missing = [
            f.name
            for f in fields(Architecture)
            if f.name in ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
            and f.name not in given
        ]
        if missing:
            camel = ", ".join(_camel(m) for m in missing)
            raise ArchitectureUnknown(
                f"the planner does not know {uri}: it is not in the catalog and no config.json is reachable; "
                f"set spec.model.architecture ({camel})"
            )
        given.setdefault("num_key_value_heads", given["num_attention_heads"])
        return Architecture(**_known(given), source="spec.model.architecture")
    if not given:
        return base
    return replace(base, **_known(given), source=f"{base.source} + spec.model.architecture")


def _known(values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(Architecture)}
    return {k: v for k, v in values.items() if k in names}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(p.title() for p in rest)


def fetch_hub_config(repo: str, revision: str, timeout: float = 10.0) -> Architecture | None:
    """config.json from the Hub (HF_ENDPOINT, default huggingface.co); None when unreachable or absent."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/{revision}/config.json"
    request = urllib.request.Request(url, headers={"User-Agent": "kubeforge-planner"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            config = json.loads(response.read().decode())
    except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError):
        return None
    return from_hf_config(config, url)


@cache
def _lora_parameters(arch: Architecture, rank: int, targets: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    return arch._count_lora(rank, targets)
