"""Resumable checkpoints: the trainable weights, optimizer, scheduler, step and RNG states.

A checkpoint is written into ``step-NNNNNNNN.tmp`` and renamed when complete, so a gang
killed mid-write resumes from the previous one: only directories without the suffix
that hold ``state.json`` count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

PREFIX = "step-"


def save(root: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, extra: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{PREFIX}{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(trainable, tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune(root: Path, keep: int = 2) -> None:
    """Keep the newest ``keep`` complete checkpoints (and drop abandoned .tmp ones)."""
    if not root.is_dir():
        return
    for tmp in root.glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    for old in complete[:-keep] if keep else complete:
        shutil.rmtree(old, ignore_errors=True)


def latest(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    complete = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
        and (p / "state.json").exists()
    ]  # fmt: skip
    return max(complete, key=lambda p: p.name) if complete else None


def load(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    trainable = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n in trainable if n not in params]
    if missing:
        raise RuntimeError(f"{path}: checkpoint does not match the model ({len(missing)} unknown parameters)")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((path / "state.json").read_text())
