"""What the engines share: the optimizer and schedule, the micro-batch loop, sharded checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubeforge.runtime import checkpoint, objectives
from kubeforge.runtime.contract import Contract

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def return_freed_memory(threshold: int = 1024**2) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with mmap, so that a freed weight
    (a module built whole before it is sharded, a slice read in flight) goes back to the OS instead
    of staying in the heap; glibc's default raises this threshold as large blocks are freed, which
    kept up to 0.25x of a model's bytes resident after loading (tests/runtime/test_sharded_loading.py)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc
        return False


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Setup:
    """What building an engine needs besides the contract."""

    contract: Contract
    dist: Dist
    device: torch.device
    model_dir: Path
    total_steps: int


def adamw(params: list[torch.nn.Parameter], setup: Setup) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fp32, or bf16 under pure bf16): its two moments take their dtype."""
    t = setup.contract.training
    fused = setup.device.type == "cuda" and len({p.dtype for p in params}) == 1
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused or None)


def schedule(optimizer: Any, setup: Setup) -> Any:
    from transformers import get_scheduler

    t = setup.contract.training
    return get_scheduler(
        t.lr_scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * setup.total_steps),
        num_training_steps=setup.total_steps,
    )


def optimizer_and_scheduler(params: list[torch.nn.Parameter], setup: Setup) -> tuple[Any, Any]:
    optimizer = adamw(params, setup)
    return optimizer, schedule(optimizer, setup)


def autocast(contract: Contract, device: torch.device):
    """Matmuls in the compute dtype while the weights stay fp32 (torch AMP), on GPUs and CPUs."""
    from kubeforge.runtime.engines.loading import compute_dtype

    dtype = compute_dtype(contract)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def accumulate(
    module: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    contract: Contract,
    sync: Callable[[bool], contextlib.AbstractContextManager[None]],
) -> float:
    """Forward and backward over the micro-batches of one step (the loss: the contract's objective); the mean
    loss on this rank, carrying the objective's mean metrics (objectives.StepLoss)."""
    objective = objectives.for_contract(contract)
    total = 0.0
    metrics = []
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with sync(i == len(micro_batches) - 1):
            with autocast(contract, device):
                loss, found = objective(module, batch)
                loss = loss / len(micro_batches)
            loss.backward()
        total += float(loss.detach())
        metrics.append(found)
    return objectives.StepLoss(total, objectives.mean_metrics(metrics))


def optimizer_step(params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any) -> None:
    """Clip to norm 1, step, advance the schedule; gradients are zeroed in place (DDP's bucket views stay)."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=False)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_sharded(
    root: Path,
    step: int,
    extra: dict,
    main: bool,
    shards: Callable[[Path], None],
    rank0: Callable[[Path], None] | None = None,
) -> Path:
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
    return final


def restore(path: Path) -> dict:
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((path / "state.json").read_text())


def local_share(model: torch.nn.Module) -> float:
    """Local elements / global elements of the parameters: 1/world when really sharded."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3
            local += p.ds_tensor.numel()
            total += p.ds_numel
            continue
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        total += p.numel()
    return local / max(1, total)


@contextlib.contextmanager
def no_context(_last: bool) -> Iterator[None]:
    yield
