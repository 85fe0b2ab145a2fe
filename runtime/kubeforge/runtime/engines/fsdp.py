"""FSDP2: parameters, gradients and optimizer states sharded over all ranks from the start.

The model is built on the meta device (no memory), each decoder layer and then the root are
``fully_shard``-ed, the shards are materialised empty, and every rank reads only its rows of
each weight from the safetensors files (shards.Checkpoint): no process ever holds the whole
model. Precision policy: fp32 shards of trainable weights (the master copy), all-gathered in
the compute dtype for the matmuls (``MixedPrecisionPolicy(param_dtype=bf16)``), gradients
reduce-scattered in fp32, AdamW's moments on the fp32 shards; a LoRA base is stored (and
gathered) in the compute dtype and its adapters in fp32 (pure bf16: trained shards, their gradients
and the moments in bf16, gradients still reduced in fp32); a QLoRA base's linear weights are torchao
NF4Tensors, sharded, gathered and read in 4 bits (nf4.py). Checkpoints go through
torch.distributed.checkpoint (each rank writes its shards; QLoRA: the adapters only, the frozen base
is read again from the model folder).

fsdp-offload (contract.STRATEGIES offload "parameters", as torchtune's ``fsdp_cpu_offload`` and
Answer.AI's fsdp_qlora): ``fully_shard(..., offload_policy=CPUOffloadPolicy())`` keeps every shard, its
gradient and AdamW's moments in host memory; FSDP2 copies a layer's shards to the GPU just before
all-gathering them, and each reduce-scattered gradient back to the host, so the GPU holds only the layers
in flight, and the optimizer steps on the CPU (torch's fused CPU AdamW). The shards are materialised on
the CPU (FSDP2 refuses offloaded parameters elsewhere) and pinned on CUDA hosts (pinned pages make the
copies asynchronous; on a CPU-only run pinning needs no accelerator and is skipped). NF4Tensor shards
move to the GPU in 4 bits (torchao's ``Tensor.to`` keeps the codes, scales and factors).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kubeforge.runtime.contract import STRATEGIES
from kubeforge.runtime.engines import common, loading, nf4, shards


def build_sharded_model(setup: common.Setup) -> tuple[torch.nn.Module, int]:
    """The model, sharded, each rank holding only its shards: (model, number of sharded layers). QLoRA:
    the frozen linear weights become NF4 before sharding, and each rank quantizes its rows as it reads them."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    contract = setup.contract
    offload = offloads_parameters(contract)
    model = loading.build_empty(contract, setup.model_dir)
    if contract.training.method == "qlora":
        nf4.quantize_base(model, setup.dist.world)
    compute = loading.compute_dtype(contract)
    policy = MixedPrecisionPolicy()
    if compute != torch.float32:
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    mesh = _mesh(setup.device, setup.dist.world, offload)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    # pinned host pages only where there is a device to copy them to
    offload_policy = CPUOffloadPolicy(pin_memory=setup.device.type == "cuda") if offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload_policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload_policy)
    model.to_empty(device="cpu" if offload else setup.device)  # offloaded shards live on the host
    _load_shards(model, setup)
    if offload:
        _buffers_to(model, setup.device)  # only the parameters stay on the host: buffers go where the compute is
    loading.reset_rotary(model, setup.device)
    return model, len(layers)


def _mesh(device: torch.device, world: int, offload: bool) -> Any:
    """The ranks' device mesh. Offloaded, the shards and their gradients are host tensors, and the DTensor
    collectives on them (gradient clipping's norm) need a CPU backend beside NCCL: a group with both, as
    torchtune's fsdp_cpu_offload initialises its process group ("cuda:nccl,cpu:gloo")."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if not offload:
        return init_device_mesh(device.type, (world,))
    import torch.distributed as td

    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "cpu:gloo"
    return DeviceMesh.from_group(td.new_group(backend=backend), device.type)


def offloads_parameters(contract: Any) -> bool:
    """Whether the plan keeps the shards, their gradients and the optimizer states in host memory."""
    return STRATEGIES[contract.parallel.strategy].offload == "parameters"


def _host_threads(setup: common.Setup) -> None:
    """On a GPU node, the host's AdamW gets this process's share of the node's cores (torchrun starts each
    process with one thread), as torchtune does for fsdp_cpu_offload; a CPU run keeps its threads."""
    if setup.device.type != "cuda":
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // setup.contract.parallel.gpus_per_node))


def _buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


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
            elif nf4.is_nf4(local):  # filled in place: the very shard FSDP2 all-gathers, not a view of it
                rows = ckpt.rows(_checkpoint_key(loading.hf_name(name), ckpt, tied), start, stop)
                nf4.load_rows(param._local_tensor, rows, param.device_mesh.get_group(), setup.device)
            else:
                ckpt.copy_rows(_checkpoint_key(loading.hf_name(name), ckpt, tied), start, stop, local)


class FSDPEngine:
    def __init__(self, setup: common.Setup):
        self.setup = setup
        self.contract = setup.contract
        self.device = setup.device
        model, self.sharded_layers = build_sharded_model(setup)
        self.model = self.module = model
        self.frozen_only = setup.contract.training.method == "qlora"  # checkpoints and export: adapters only
        self.dp_rank = setup.dist.rank
        self.params = common.trainable(model)
        self.offload = offloads_parameters(setup.contract)
        if self.offload:  # the shards and their gradients are on the host: AdamW steps there, fused
            _host_threads(setup)
            t = setup.contract.training
            self.optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                               fused=True)  # fmt: skip
            self.scheduler = common.schedule(self.optimizer, setup)
        else:
            self.optimizer, self.scheduler = common.optimizer_and_scheduler(self.params, setup)

    @contextlib.contextmanager
    def _sync(self, last: bool) -> Iterator[None]:
        # offloaded: reduce-scatter every micro-batch, so that each gradient goes to the host at once (without
        # sync FSDP2 accumulates the unsharded gradients on the GPU, which the offload is there to avoid)
        self.module.set_requires_gradient_sync(last or self.offload)
        yield

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        loss = common.accumulate(self.module, micro_batches, self.device, self.contract, self._sync)
        common.optimizer_step(self.params, self.optimizer, self.scheduler)
        return loss

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=self.frozen_only)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
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
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        options = StateDictOptions(ignore_frozen_params=self.frozen_only, strict=not self.frozen_only)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)  # fmt: skip
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        return common.restore(path)

    def full_state_dict(self, staging: Path) -> dict[str, torch.Tensor] | None:
        """Every rank takes part; rank 0 gets the whole model on CPU, the others None. QLoRA: the adapters only
        (train.py puts them on the full-precision base, as for every QLoRA engine)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.frozen_only)
        full = get_model_state_dict(self.model, options=options)
        return full if self.setup.dist.main else None

    def describe(self) -> str:
        share = 100 * common.local_share(self.model)
        base = ""
        if self.frozen_only:
            quantized = sum(1 for p in self.model.parameters() if nf4.is_nf4(getattr(p, "_local_tensor", p)))
            base = f", {quantized} base weights in NF4"
        where = " in host memory (parameters, gradients and optimizer states offloaded)" if self.offload else ""
        return (f"{self.contract.parallel.strategy}: {self.sharded_layers} layers sharded{base}; this rank holds "
                f"{share:.0f}% of the parameters{where}")  # fmt: skip


def _checkpoint_key(name: str, ckpt: shards.Checkpoint, tied: bool) -> str:
    if name in ckpt:
        return name
    if tied and name.endswith("lm_head.weight"):
        for key in ("model.embed_tokens.weight", "transformer.wte.weight"):
            if key in ckpt:
                return key
    raise RuntimeError(f"{ckpt.folder}: no weight {name!r} in the checkpoint")
