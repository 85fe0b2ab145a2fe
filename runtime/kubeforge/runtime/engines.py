"""How a model is wrapped for its strategy, and what that changes in the training step.

Each engine answers the same few questions: which module to call, how to skip gradient
synchronisation on all but the last micro-batch, how to checkpoint and resume, and how
rank 0 gets the full (unsharded) weights for export.

- ``DDPEngine``: one process, or torch DDP; rank 0 checkpoints its (full) trainable weights.
- ``FSDPEngine``: FSDP2 ``fully_shard`` per decoder layer and at the root, so parameters,
  gradients and optimizer states are really sharded (accelerate and the HF Trainer fall
  back to DDP on CPU; this does not); checkpoints go through torch.distributed.checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kubeforge.runtime import checkpoint


class DDPEngine:
    def __init__(self, model: torch.nn.Module, world: int, device: torch.device):
        self.model = model
        self.module: torch.nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        if not last and hasattr(self.module, "no_sync"):
            with self.module.no_sync():
                yield
        else:
            yield

    def save(self, root: Path, step: int, optimizer: Any, scheduler: Any, extra: dict, main: bool) -> None:
        if main:
            checkpoint.save(root, step, self.model, optimizer, scheduler, extra)
            checkpoint.prune(root, keep=2)

    def load(self, path: Path, optimizer: Any, scheduler: Any) -> dict:
        return checkpoint.load(path, self.model, optimizer, scheduler)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None  # the model on rank 0 is already whole


class FSDPEngine:
    def __init__(self, model: torch.nn.Module, world: int, device: torch.device, precision: str):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        policy = MixedPrecisionPolicy()
        if device.type == "cuda" and precision in ("bf16", "fp16", "fp8"):
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.model = model
        self.module = model
        self.sharded_layers = len(layers)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last)
        yield

    def _state(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, root: Path, step: int, optimizer: Any, scheduler: Any, extra: dict, main: bool) -> None:
        import torch.distributed as td
        import torch.distributed.checkpoint as dcp

        final = root / f"{checkpoint.PREFIX}{step:08d}"
        tmp = root / f"{checkpoint.PREFIX}{step:08d}.tmp"
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        td.barrier()
        dcp.save(self._state(optimizer), checkpoint_id=str(tmp / "sharded"))
        td.barrier()
        if main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            checkpoint.prune(root, keep=2)
        td.barrier()

    def load(self, path: Path, optimizer: Any, scheduler: Any) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state(optimizer)
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng = torch.load(path / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        return json.loads((path / "state.json").read_text())

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every rank takes part; rank 0 gets the whole model on CPU, the others None."""
        import torch.distributed as td
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if td.get_rank() == 0 else None


def sharded_parameter_share(model: torch.nn.Module) -> float:
    """Local elements / global elements of the parameters: 1/world when really sharded."""
    local = total = 0
    for p in model.parameters():
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        total += p.numel()
    return local / max(1, total)
