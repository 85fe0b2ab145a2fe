"""What every probe of a CPU gang does first and last: read the contract, join the gloo process group and build
the Setup; wait for the others and leave the group."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def join(contract_path: str, total_steps: int = 1) -> tuple[Any, Any]:
    """(the contract, the engines' Setup on the CPU) for this torchrun process, its process group joined."""
    import torch

    from kubeforge.runtime.contract import load
    from kubeforge.runtime.engines import Setup
    from kubeforge.runtime.train import _dist_env, _init_process_group

    contract = load(contract_path)
    dist = _dist_env()
    device = torch.device("cpu")
    _init_process_group(dist, device)
    return contract, Setup(contract, dist, device, Path(contract.model.local_path), total_steps=total_steps)


def leave() -> None:
    """Wait for every rank (rank 0 may still be writing what the test reads), then leave the process group."""
    import torch.distributed as td

    td.barrier()
    td.destroy_process_group()
