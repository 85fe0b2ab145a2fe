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
from collections.abc import Callable, Iterator
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
        import torch.distributed.checkpoint as dcp

        def shards(tmp: Path) -> None:
            dcp.save(self._state(optimizer), checkpoint_id=str(tmp / "sharded"))

        def rank0(tmp: Path) -> None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")

        _save_sharded(root, step, extra, main, shards, rank0)

    def load(self, path: Path, optimizer: Any, scheduler: Any) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state(optimizer)
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        return _restore(path)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every rank takes part; rank 0 gets the whole model on CPU, the others None."""
        import torch.distributed as td
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if td.get_rank() == 0 else None


def _save_sharded(
    root: Path,
    step: int,
    extra: dict,
    main: bool,
    shards: Callable[[Path], None],
    rank0: Callable[[Path], None] | None = None,
) -> None:
    """Every rank writes its shards into step-N.tmp; rank 0 adds RNG and step, then renames it so it counts."""
    import torch.distributed as td

    final = root / f"{checkpoint.PREFIX}{step:08d}"
    tmp = root / f"{checkpoint.PREFIX}{step:08d}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    td.barrier()
    shards(tmp)
    td.barrier()
    if main:
        if rank0 is not None:
            rank0(tmp)
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        checkpoint.prune(root, keep=2)
    td.barrier()


def _restore(path: Path) -> dict:
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((path / "state.json").read_text())


def sharded_parameter_share(model: torch.nn.Module) -> float:
    """Local elements / global elements of the parameters: 1/world when really sharded."""
    local = total = 0
    for p in model.parameters():
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        total += p.numel()
    return local / max(1, total)


ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3-offload": 3}


def deepspeed_config(contract: Any, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config for the plan (what HF's "auto" values would become, made explicit)."""
    t, strategy = contract.training, contract.parallel.strategy
    stage = ZERO_STAGES[strategy]
    bucket = hidden_size * hidden_size
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": contract.compute.device == "cuda",
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * bucket), stage3_param_persistence_threshold=10 * hidden_size)
    if strategy == "zero3-offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    precision, cuda = contract.compute.precision, contract.compute.device == "cuda"
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cuda and precision in ("bf16", "fp8")},
        "fp16": {"enabled": cuda and precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO: the engine owns accumulation, clipping, the optimizer and scheduler steps."""

    owns_step = True

    def __init__(self, model: torch.nn.Module, contract: Any, hidden_size: int, optimizer: Any, scheduler: Any):
        import deepspeed

        self.config = deepspeed_config(contract, hidden_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        self.model = model
        self.module = self.engine

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        yield  # DeepSpeed knows the accumulation boundary from its config

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def save(self, root: Path, step: int, optimizer: Any, scheduler: Any, extra: dict, main: bool) -> None:
        # DeepSpeed's checkpoint holds the optimizer and the scheduler it was given
        _save_sharded(root, step, extra, main, lambda tmp: self.engine.save_checkpoint(str(tmp), tag="deepspeed"))

    def load(self, path: Path, optimizer: Any, scheduler: Any) -> dict:
        self.engine.load_checkpoint(str(path), tag="deepspeed")
        return _restore(path)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """ZeRO-3 partitions parameters: gather them (every rank takes part); rank 0 keeps a CPU copy."""
        import deepspeed
        import torch.distributed as td

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = (
                {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                if td.get_rank() == 0
                else None
            )
        return full
