"""The Megatron engine: tensor and pipeline parallel training with megatron-core (CUDA only).

The model is megatron's GPTModel with the local layer spec (no Transformer Engine
needed), built per pipeline stage; the Hugging Face weights are mapped by
``mcore.weights`` and each rank loads only its tensor-parallel slice of its stage's
layers. One optimizer step runs every micro-batch through megatron's pipeline schedule
(``get_forward_backward_func``); gradients are reduced over data-parallel replicas by
megatron's DistributedDataParallel. For export every rank writes its slice, and rank 0
reassembles the full model, maps it back to Hugging Face names and hands it to the same
exporter as the other engines.

megatron-core's forward pass calls CUDA, so this file is exercised only on GPUs
(tests/runtime/test_megatron.py marks those tests); the translation and mapping it uses
are tested on CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from kubeforge.runtime import checkpoint
from kubeforge.runtime.mcore import config as mconfig
from kubeforge.runtime.mcore import weights

IGNORE = -100
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_config(hf: dict[str, Any], overrides: dict[str, Any] | None = None, **kwargs: Any):
    """megatron's TransformerConfig from the translated keyword arguments (plus ``overrides``)."""
    from megatron.core.transformer import TransformerConfig

    args = {**mconfig.transformer_config(hf, **kwargs), **(overrides or {})}
    args["params_dtype"] = DTYPES[args["params_dtype"]]
    args["pipeline_dtype"] = DTYPES[args["pipeline_dtype"]]
    args["activation_func"] = torch.nn.functional.silu
    return TransformerConfig(**args)


def build_model(hf: dict[str, Any], config, *, pre_process: bool = True, post_process: bool = True):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(
        config,
        spec,
        pre_process=pre_process,
        post_process=post_process,
        **mconfig.gpt_model(hf, config.tensor_model_parallel_size),
    )


def load_slice(model: torch.nn.Module, full_mcore: dict[str, torch.Tensor], tp: int, tp_rank: int, pp: int,
               pp_rank: int, shape: mconfig.Shape) -> None:  # fmt: skip
    """This rank's slice into ``model``; every parameter must be covered, exactly."""
    mine = weights.shard(weights.for_stage(full_mcore, shape, pp, pp_rank), tp, tp_rank)
    result = model.load_state_dict(mine, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"Megatron weight mapping: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def shifted(batch: dict[str, torch.Tensor], seq_length: int) -> dict[str, torch.Tensor]:
    """Megatron predicts labels[t] at position t (no internal shift, unlike transformers); every
    micro-batch is padded to ``seq_length`` because pipeline stages exchange fixed shapes."""
    pad = seq_length - batch["input_ids"].shape[1]
    ids = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=0)
    labels = torch.nn.functional.pad(batch["labels"], (0, pad), value=IGNORE)
    tokens = ids[:, :-1].contiguous()
    labels = labels[:, 1:].contiguous()
    loss_mask = (labels != IGNORE).float()
    return {
        "tokens": tokens,
        "labels": labels.clamp(min=0),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens),
    }


class MegatronEngine:
    def __init__(self, contract: Any, hf_config: dict[str, Any], model_dir: Path, device: torch.device):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        p = contract.parallel
        self.tp, self.pp = p.tensor_parallel, p.pipeline_parallel
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(self.tp, self.pp)
        tensor_parallel.model_parallel_cuda_manual_seed(contract.training.seed)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.shape = mconfig.shape(hf_config, self.tp)
        self.hf_config = hf_config
        self.config = build_config(
            hf_config,
            tensor_parallel=self.tp,
            pipeline_parallel=self.pp,
            sequence_parallel=p.sequence_parallel,
            precision=contract.compute.precision,
            gradient_checkpointing=contract.compute.gradient_checkpointing,
        )
        model = build_model(
            hf_config, self.config, pre_process=self.pp_rank == 0, post_process=self.pp_rank == self.pp - 1
        )
        from safetensors.torch import load_file

        full: dict[str, torch.Tensor] = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            full.update(load_file(str(file)))
        load_slice(model, weights.hf_to_mcore(full, self.shape), self.tp, self.tp_rank, self.pp, self.pp_rank,
                   self.shape)  # fmt: skip
        model.to(device)
        self.model = model
        self.module = DistributedDataParallel(
            self.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model
        )
        self.device = device

    def parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], seq_length: int) -> float:
        """One optimizer step's forward and backward over ``micro_batches``; the mean loss (last stage)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.module.zero_grad_buffer()
        batches = iter([shifted({k: v.to(self.device) for k, v in b.items()}, seq_length) for b in micro_batches])

        def forward_step(iterator, model):
            b = next(iterator)
            output = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

            def loss_func(per_token: torch.Tensor):
                mask = b["loss_mask"]
                loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
                return loss, {"loss": loss.detach()}

            return output, loss_func

        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=[self.module],
            num_microbatches=len(micro_batches),
            seq_length=seq_length - 1,
            micro_batch_size=micro_batches[0]["input_ids"].shape[0],
            forward_only=False,
        )
        self.module.finish_grad_sync()
        losses = [r["loss"] for r in results] if results else []
        return float(torch.stack(losses).mean()) if losses else 0.0

    def clip_and_prepare(self, max_norm: float) -> float:
        """Megatron's DDP accumulates into ``main_grad``: hand it to the torch optimizer as ``.grad``,
        clipped by the norm over the whole model (every tensor-parallel slice and pipeline stage once)."""
        import torch.distributed as td
        from megatron.core import parallel_state as ps

        params = self.parameters()
        squares = torch.zeros((), device=self.device, dtype=torch.float32)
        for p in params:
            p.grad = p.main_grad.to(p.dtype)
            if getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0:
                squares += p.main_grad.float().pow(2).sum()
        td.all_reduce(squares, group=ps.get_model_parallel_group())
        norm = float(squares.sqrt())
        if norm > max_norm:
            for p in params:
                p.grad.mul_(max_norm / (norm + 1e-6))
        return norm

    # ------------------------------------------------------------------ checkpoints and export
    def _slice_file(self, folder: Path) -> Path:
        return folder / f"mp_tp{self.tp_rank:02d}_pp{self.pp_rank:02d}.pt"

    def save(self, root: Path, step: int, optimizer: Any, scheduler: Any, extra: dict, main: bool) -> None:
        from kubeforge.runtime.engines import _save_sharded

        def shards(tmp: Path) -> None:
            if self.dp_rank == 0:
                tmp.mkdir(parents=True, exist_ok=True)
                torch.save({"model": self.model.state_dict(), "optimizer": optimizer.state_dict()},
                           self._slice_file(tmp))  # fmt: skip

        _save_sharded(
            root, step, extra, main, shards, lambda tmp: torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        )
        if main:
            checkpoint.prune(root, keep=2)

    def load(self, path: Path, optimizer: Any, scheduler: Any) -> dict:
        from kubeforge.runtime.engines import _restore

        state = torch.load(self._slice_file(path), map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        return _restore(path)

    def full_state_dict(self, staging: Path) -> dict[str, torch.Tensor] | None:
        """Every model-parallel slice through ``staging`` (a shared volume); rank 0 gets HF weights."""
        import torch.distributed as td

        if td.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        td.barrier()
        if self.dp_rank == 0:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
            torch.save(state, self._slice_file(staging))
        td.barrier()
        if td.get_rank() != 0:
            return None
        stages = []
        for stage in range(self.pp):
            slices = [torch.load(staging / f"mp_tp{t:02d}_pp{stage:02d}.pt", weights_only=True) for t in range(self.tp)]
            stages.append(weights.unshard(slices))
        full = weights.join_stages(stages, self.shape)
        shutil.rmtree(staging, ignore_errors=True)
        return weights.mcore_to_hf(full, self.shape)
