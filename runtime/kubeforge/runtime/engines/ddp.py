"""DDP (and one process): every rank holds the whole model in the precision policy's dtypes.

Full fine-tuning: fp32 weights (the master copy), fp32 gradients as views into DDP's reduction
buckets (``gradient_as_bucket_view``: no second copy), AdamW's moments in fp32, matmuls under
autocast in the compute dtype. LoRA: the frozen base in the compute dtype, fp32 adapters.
Rank 0 checkpoints the trainable weights, the optimizer and the schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from kubeforge.runtime import checkpoint
from kubeforge.runtime.engines import common, loading


class DDPEngine:
    def __init__(self, setup: common.Setup):
        self.setup = setup
        self.contract = setup.contract
        self.device = setup.device
        self.model = loading.load_whole(setup.contract, setup.model_dir, setup.device)
        self.module: torch.nn.Module = self.model
        if setup.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(
                self.model,
                device_ids=[setup.device.index] if setup.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        self.dp_rank = setup.dist.rank
        self.params = common.trainable(self.model)
        self.optimizer, self.scheduler = common.optimizer_and_scheduler(self.params, setup)

    @contextlib.contextmanager
    def _sync(self, last: bool) -> Iterator[None]:
        if not last and hasattr(self.module, "no_sync"):
            with self.module.no_sync():
                yield
        else:
            yield

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        loss = common.accumulate(self.module, micro_batches, self.device, self.contract, self._sync)
        common.optimizer_step(self.params, self.optimizer, self.scheduler)
        return loss

    def save(self, root: Path, step: int, extra: dict, main: bool) -> None:
        if main:
            checkpoint.save(root, step, self.model, self.optimizer, self.scheduler, extra)
            checkpoint.prune(root, keep=2)

    def load(self, path: Path) -> dict:
        return checkpoint.load(path, self.model, self.optimizer, self.scheduler)

    def full_state_dict(self, staging: Path) -> dict[str, torch.Tensor] | None:
        return None  # the model on rank 0 is already whole

    def describe(self) -> str:
        return "ddp" if self.setup.dist.world > 1 else "one process"
