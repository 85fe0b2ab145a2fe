"""Engines: how a model is loaded, wrapped, stepped, checkpointed and exported for its strategy.

Every engine answers the same questions (``Engine``), so the training loop in train.py never
asks which one it has:

- ``ddp.DDPEngine``: one process or torch DDP; each rank holds the whole model.
- ``fsdp.FSDPEngine``: FSDP2, built on the meta device; each rank reads only its shards (QLoRA:
  and quantizes them to torchao's NF4Tensor, which FSDP2 shards and gathers in 4 bits, nf4.py);
  fsdp-offload keeps the shards, gradients and optimizer states in host memory (CPUOffloadPolicy).
- ``zero.DeepSpeedEngine``: ZeRO-1/2/3 with optimizer or parameter offload; ZeRO-3 builds
  partitioned and reads only each rank's range.
- ``kubeforge.runtime.mcore.engine.MegatronEngine``: tensor and pipeline parallelism (CUDA).

``check`` refuses, before any weights load, a contract the chosen engine cannot honour.
``build`` is the one factory, keyed by contract.STRATEGIES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from kubeforge.runtime.contract import (
    STRATEGIES,
    Contract,
    unsupported_checkpointing,
    unsupported_master_weights,
    unsupported_precision,
)
from kubeforge.runtime.engines.common import Dist, Setup
from kubeforge.runtime.entry import UserError

__all__ = ["Dist", "Engine", "Setup", "build", "check"]


class Engine(Protocol):
    model: torch.nn.Module  # the unwrapped model (possibly sharded)
    dp_rank: int  # which slice of each global batch this rank reads

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        """Forward, backward and optimizer step over one step's micro-batches; this rank's mean loss."""

    def save(self, root: Path, step: int, extra: dict, main: bool) -> None:
        """A resumable checkpoint (every rank calls it)."""

    def load(self, path: Path) -> dict:
        """Resume from a checkpoint; its state.json (step, losses)."""

    def full_state_dict(self, staging: Path) -> dict[str, torch.Tensor] | None:
        """The whole model in Hugging Face names on rank 0 (None elsewhere, or when it is already whole)."""

    def describe(self) -> str:
        """One line for the log: what this rank holds."""


def check(contract: Contract, *, cuda: bool, host_memory_bytes: int | None = None) -> None:
    """UserError (one sentence naming the field) for a plan this runtime cannot honour."""
    strategy, precision, method = contract.parallel.strategy, contract.compute.precision, contract.training.method
    engine = STRATEGIES[strategy].engine
    if engine == "megatron" and contract.compute.device != "cuda":
        raise UserError(
            f"parallel.strategy {strategy} needs CUDA GPUs (megatron-core's forward pass calls CUDA); "
            "on CPU use ddp, fsdp or a zero stage"
        )
    if engine == "megatron" and method != "full":
        raise UserError(f"parallel.strategy {strategy} trains training.method full only, not {method}")
    _check_objective(contract, engine)
    _check_ulysses(contract, engine)
    if contract.compute.device == "cuda" and not cuda:
        raise UserError("compute.device cuda: the plan needs a CUDA GPU and none is visible")
    why = (
        unsupported_precision(strategy, precision)
        or unsupported_master_weights(strategy, precision, contract.compute.master_weights)
        or unsupported_checkpointing(strategy, method, contract.compute.checkpointing_policy)
    )
    if why:
        raise UserError(why)
    if precision == "fp8" and method != "full":
        raise UserError(f"compute.precision fp8 trains training.method full only, not {method}")
    if precision == "fp8" and engine in ("ddp", "fsdp"):
        from kubeforge.runtime.engines import float8

        if not float8.available():
            raise UserError("compute.precision fp8 needs torchao in the trainer image (pip install torchao)")
    if method == "qlora" and engine == "fsdp" and _sharded(contract.parallel.strategy, contract.parallel.world_size):
        from kubeforge.runtime.engines import nf4

        if not nf4.available():
            raise UserError(
                f"training.method qlora with parallel.strategy {strategy} needs torchao in the trainer image "
                "(FSDP2 shards its NF4Tensor base weights; pip install torchao), or use ddp or a zero stage"
            )
    need = contract.compute.host_memory_bytes
    have = host_memory_bytes if host_memory_bytes is not None else available_host_memory()
    if need and have and need > have:
        raise UserError(
            f"compute.hostMemoryBytes: the plan offloads {need / 2**30:.1f} GiB to host memory on this node, "
            f"which has {have / 2**30:.1f} GiB available"
        )


def _sharded(strategy: str, world: int) -> bool:
    """Whether an fsdp strategy runs FSDP2 (plain fsdp alone on one device is DDP's whole model; fsdp-offload
    still shards over a one-rank mesh, so that its parameters live in host memory)."""
    return world > 1 or STRATEGIES[strategy].offload != "none"


def _check_objective(contract: Contract, engine: str) -> None:
    t, strategy, fmt = contract.training, contract.parallel.strategy, contract.dataset.format
    if (t.objective == "dpo") != (fmt == "preference"):
        raise UserError(
            f"training.objective {t.objective} with dataset.format {fmt}: objective dpo reads format preference "
            "(prompt, chosen, rejected), and format preference is for objective dpo"
        )
    if t.objective != "dpo":
        return
    if engine == "megatron":
        raise UserError(
            f"training.objective dpo: parallel.strategy {strategy} trains objective sft only; "
            "use ddp, fsdp or a zero stage"
        )
    if contract.parallel.ulysses > 1:
        raise UserError(
            f"training.objective dpo with parallel.ulysses {contract.parallel.ulysses}: sequence parallelism does "
            "not run with dpo in this runtime; use parallel.ulysses 1"
        )
    d = t.dpo
    if d.loss_type == "exo_pair" and d.label_smoothing <= 0:
        raise UserError(
            "training.dpo.labelSmoothing: loss type exo_pair needs it above 0 (EXO's epsilon; 1e-3 is the "
            "paper's value): at 0 the loss is infinite"
        )
    if d.label_smoothing > 0 and d.loss_type not in ("robust", "exo_pair"):
        raise UserError(
            f"training.dpo.labelSmoothing {d.label_smoothing}: loss type {d.loss_type} does not use it (as in TRL, "
            "only robust and exo_pair do); use loss type robust for noisy preference labels, or set it to 0"
        )


def _check_ulysses(contract: Contract, engine: str) -> None:
    u, world = contract.parallel.ulysses, contract.parallel.world_size
    if u == 1:
        return
    if engine == "megatron":
        raise UserError(
            f"parallel.ulysses {u}: strategy {contract.parallel.strategy} has Megatron's own sequence parallelism; "
            "Ulysses runs with ddp, fsdp or a zero stage"
        )
    if world % u or contract.parallel.gpus_per_node % u:
        raise UserError(
            f"parallel.ulysses {u} must divide the {world} processes and the {contract.parallel.gpus_per_node} "
            "per node (a group stays inside one node)"
        )


def available_host_memory() -> int | None:
    """MemAvailable, capped by the cgroup's memory limit (what a pod may really use)."""
    try:
        text = Path("/proc/meminfo").read_text()
        have = int(next(line.split()[1] for line in text.splitlines() if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration, ValueError):
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            have = min(have, int(value))
    return have


def build(setup: Setup) -> Engine:
    """The contract's engine; with parallel.ulysses > 1, its model attends through Ulysses' all-to-all and
    its data-parallel rank is its sequence-parallel group's (peers read the same samples)."""
    engine = _build(setup)
    degree = setup.contract.parallel.ulysses
    if degree > 1:
        from kubeforge.runtime import ulysses

        engine.dp_rank = ulysses.setup(engine.model, setup.dist, degree).dp_rank
    return engine


def _build(setup: Setup) -> Engine:
    engine = STRATEGIES[setup.contract.parallel.strategy].engine
    if engine == "megatron":
        from kubeforge.runtime.mcore.engine import MegatronEngine

        return MegatronEngine(setup)
    if engine == "deepspeed":
        from kubeforge.runtime.engines.zero import DeepSpeedEngine

        return DeepSpeedEngine(setup)
    if engine == "fsdp" and _sharded(setup.contract.parallel.strategy, setup.dist.world):
        from kubeforge.runtime.engines.fsdp import FSDPEngine

        if setup.dist.world == 1:  # FSDP2's device mesh wants a process group, even alone
            from kubeforge.runtime.train import _init_process_group

            _init_process_group(setup.dist, setup.device)
        return FSDPEngine(setup)
    from kubeforge.runtime.engines.ddp import DDPEngine

    return DDPEngine(setup)
