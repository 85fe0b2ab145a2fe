"""FSDP2: parameters, gradients and optimizer states sharded over all ranks from the start.

The model is built on the meta device (no memory), each decoder layer and then the root are
``fully_shard``-ed, the shards are materialised empty, and every rank reads only its rows of
each weight from the safetensors files (shards.Checkpoint): no process ever holds the whole
model. Precision policy: fp32 shards of trainable weights (the master copy), all-gathered in
the compute dtype for the matmuls (``MixedPrecisionPolicy(param_dtype=bf16)``), gradients
reduce-scattered in fp32, AdamW's moments on the fp32 shards; a LoRA base is stored (and
gathered) in the compute dtype and its adapters in fp32. Checkpoints go through
torch.distributed.checkpoint (each rank writes its shards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kubeforge.runtime.engines import common, loading, shards


def build_sharded_model(setup: common.Setup) -> tuple[torch.nn.Module, int]:
    """The model, sharded, each rank holding only its shards: (model, number of sharded layers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    contract = setup.contract
    model = loading.build_empty(contract, setup.model_dir)
    compute = loading.compute_dtype(contract)
    policy = MixedPrecisionPolicy()
    if compute != torch.float32:
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    mesh = init_device_mesh(setup.device.type, (setup.dist.world,))
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=setup.device)
    _load_shards(model, setup)
    loading.reset_rotary(model, setup.device)
    return model, len(layers)


def _load_shards(model: torch.nn.Module, setup: common.Setup) -> None:
    """Each rank copies its rows of every weight (FSDP2 shards dim 0 in chunks of ceil(R/N))."""
    ckpt = shards.Checkpoint(setup.model_dir)
    adapters = loading.lora_values(model, setup.contract.training.seed)
    rank, world = setup.dist.rank, setup.dist.world
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            rows = param.shape[0] if param.dim() else 1
            start = rank * -(-rows // world)
            stop = start + (local.shape[0] if local.dim() else 1)
            if local.numel() == 0:
                continue
            if name in adapters:
                local.copy_(adapters[name][start:stop].reshape(local.shape))
            else:
                ckpt.copy_rows(_checkpoint_key(loading.hf_name(name), ckpt, tied), start, stop, local)


class FSDPEngine:
    def __init__(self, setup: common.Setup):
        self.setup = setup
        self.contract = setup.contract
        self.device = setup.device
        model, self.sharded_layers = build_sharded_model(setup)
        self.model = self.module = model
        self.dp_rank = setup.dist.rank
        self.params = common.trainable(model)
        self.optimizer, self.scheduler = common.optimizer_and_scheduler(self.params, setup)

    @contextlib.contextmanager
    def _sync(self, last: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last)
        yield

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        loss = common.accumulate(self.module, micro_batches, self.device, self.contract, self._sync)
        common.optimizer_step(self.params, self.optimizer, self.scheduler)
        return loss

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, root: Path, step: int, extra: dict, main: bool) -> None:
        import torch.distributed.checkpoint as dcp

        def shards_of_this_rank(tmp: Path) -> None:
            dcp.save(self._state(), checkpoint_id=str(tmp / "sharded"))

        def rank0(tmp: Path) -> None:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")

        common.save_sharded(root, step, extra, main, shards_of_this_rank, rank0)

    def load(self, path: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        return common.restore(path)

    def full_state_dict(self, staging: Path) -> dict[str, torch.Tensor] | None:
        """Every rank takes part; rank 0 gets the whole model on CPU, the others None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.setup.dist.main else None

    def describe(self) -> str:
        share = 100 * common.local_share(self.model)
        return f"fsdp: {self.sharded_layers} layers sharded; this rank holds {share:.0f}% of the parameters"


def _checkpoint_key(name: str, ckpt: shards.Checkpoint, tied: bool) -> str:
    if name in ckpt:
        return name
    if tied and name.endswith("lm_head.weight"):
        for key in ("model.embed_tokens.weight", "transformer.wte.weight"):
            if key in ckpt:
                return key
    raise RuntimeError(f"{ckpt.folder}: no weight {name!r} in the checkpoint")
