"""Container images kubeforge runs, pinned in one place (the renderers read them from here)."""

from __future__ import annotations

REGISTRY = "ghcr.io/kubeforge"
VERSION = "0.1.0"

TRAINER_IMAGE = f"{REGISTRY}/trainer:{VERSION}"  # CUDA + torch + transformers/peft + DeepSpeed + megatron-core
TRAINER_UID = 1000  # the trainer image's non-root user
