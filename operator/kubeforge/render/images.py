"""Container images kubeforge runs, pinned in one place (the renderers read them from here)."""

from __future__ import annotations

REGISTRY = "ghcr.io/kubeforge"
VERSION = "0.1.0"

TRAINER_IMAGE = f"{REGISTRY}/trainer:{VERSION}"  # CUDA + torch + transformers/peft + DeepSpeed + megatron-core
TRAINER_UID = 1000  # the trainer image's non-root user
QUANTIZER_IMAGE = f"{REGISTRY}/quantizer:{VERSION}"  # torch + llm-compressor + compressed-tensors + the runtime
SERVER_IMAGE = f"{REGISTRY}/server:{VERSION}"  # torch + transformers + aiohttp: python -m kubeforge.runtime.serve
FETCHER_IMAGE = TRAINER_IMAGE  # the init container that downloads s3:// and hf:// artifacts (has the runtime)

# Serving engines, pinned: their flags in render/engines.py were written against these versions'
# documented arguments (vLLM: `vllm serve --help` / docs.vllm.ai "Engine Arguments"; SGLang:
# `python -m sglang.launch_server --help` / docs.sglang.io "Server Arguments").
VLLM_VERSION = "0.33.0"
SGLANG_VERSION = "0.5.23"
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
SGLANG_IMAGE = f"lmsysorg/sglang:v{SGLANG_VERSION}"
