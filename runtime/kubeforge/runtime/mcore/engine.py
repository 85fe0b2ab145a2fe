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
from collections.abc import Mapping
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
    micro-batch is padded to ``seq_length`` because pipeline stages exchange fixed shapes.

    Packed rows (data.collate, rows layout): the position ids restart at each example and the padding's
    continue the row's last example; data.collate already sets -100 at each example's first token, so
    after the shift ``loss_mask`` is 0 wherever the next token starts another example: no loss crosses a
    boundary. The attention does, though. With the GPT model built here (local layer spec, RoPE) megatron-
    core 0.16 uses ``position_ids`` only for learned absolute position embeddings: RoPE runs on over the
    whole row (GPTModel._preprocess: ``rotary_pos_emb(rotary_seq_len)``) and the local DotProductAttention
    applies one causal mask per row (it asserts ``packed_seq_params is None``). Keeping packed examples
    apart needs the THD format, which runs only with Transformer Engine on a GPU:

    - the layer spec ``get_gpt_layer_with_transformer_engine_spec`` (TEDotProductAttention) instead of
      ``get_gpt_layer_local_spec``;
    - ``model(tokens, position_ids, None, labels=labels, packed_seq_params=PackedSeqParams(qkv_format="thd",
      cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m))`` with ``cu`` the int32 offsets
      of every example in the row (0, ends of each example, the row's length: the padding as one more
      sequence) and ``m`` the longest; TE then runs its varlen kernel with mask type padding_causal, and
      RoPE restarts per sequence (apply_rotary_pos_emb with cu_seqlens);
    - one sequence row per micro-batch (micro-batch size 1: attention squeezes the batch dimension for
      THD), and with context parallelism ``cu_seqlens_*_padded`` with every example padded to a multiple of
      2 x cp (megatron.core.utils.get_thd_batch_on_this_cp_rank).
    """
    width = batch["input_ids"].shape[1]
    if width > seq_length:
        raise ValueError(f"a micro-batch row of {width} tokens is longer than seq_length {seq_length}")
    pad = seq_length - width
    ids = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=0)
    labels = torch.nn.functional.pad(batch["labels"], (0, pad), value=IGNORE)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(width, device=ids.device).expand_as(batch["input_ids"])
    run_on = positions[:, -1:] + torch.arange(1, pad + 1, device=ids.device)  # the padding continues the last run
    positions = torch.cat([positions, run_on], dim=1)
    tokens = ids[:, :-1].contiguous()
    labels = labels[:, 1:].contiguous()
    loss_mask = (labels != IGNORE).float()
    return {
        "tokens": tokens,
        "labels": labels.clamp(min=0),
        "loss_mask": loss_mask,
        "position_ids": positions[:, :-1].contiguous(),
    }


class _LazyCheckpoint(Mapping):
    """Hugging Face tensors read from the safetensors files on first use, so a pipeline stage reads
    only the weights it holds."""

    def __init__(self, model_dir: Path):
        from kubeforge.runtime.engines.shards import Checkpoint

        self.ckpt = Checkpoint(model_dir)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.ckpt:
            raise KeyError(name)
        return self.ckpt.rows(name, 0, self.ckpt.shape(name)[0] if self.ckpt.shape(name) else 1)

    def __iter__(self):
        return iter(self.ckpt.files)

    def __len__(self) -> int:
        return len(self.ckpt.files)


class MegatronEngine:
    """The Engine protocol (kubeforge.runtime.engines) over megatron-core.

    Each rank reads only its pipeline stage's weights from the safetensors files and keeps its
    tensor-parallel slice. The optimizer is megatron's distributed optimizer (fp32 master weights
    and Adam states sharded over data-parallel replicas, bf16 compute); strategy
    megatron-offload-optimizer keeps them in host memory and steps them there
    (``optimizer_cpu_offload``).
    """

    def __init__(self, setup: Any):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from transformers import AutoConfig

        from kubeforge.runtime.contract import STRATEGIES

        contract, device = setup.contract, setup.device
        self.setup = setup
        p = contract.parallel
        self.tp, self.pp = p.tensor_parallel, p.pipeline_parallel
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(self.tp, self.pp)
        tensor_parallel.model_parallel_cuda_manual_seed(contract.training.seed)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        hf_config = AutoConfig.from_pretrained(setup.model_dir).to_dict()
        self.shape = mconfig.shape(hf_config, self.tp)
        self.hf_config = hf_config
        self.seq_length = contract.dataset.max_seq_length
        self.config = build_config(
            hf_config,
            tensor_parallel=self.tp,
            pipeline_parallel=self.pp,
            sequence_parallel=p.sequence_parallel,
            precision=contract.compute.precision,
            gradient_checkpointing=contract.compute.gradient_checkpointing,
        )
        first, last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        model = build_model(hf_config, self.config, pre_process=first, post_process=last)
        layers = weights.stage_layers(self.shape.layers, self.pp, self.pp_rank)
        stage = weights.hf_to_mcore(_LazyCheckpoint(setup.model_dir), self.shape, layers, first=first, last=last)
        load_slice(model, stage, self.tp, self.tp_rank, self.pp, self.pp_rank, self.shape)
        del stage
        model.to(device)
        self.model = model
        self.module = DistributedDataParallel(
            self.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
            module=model,
        )
        self.device = device
        self.optimizer, self.scheduler = self._optimizer(STRATEGIES[contract.parallel.strategy].offload == "optimizer")

    def _optimizer(self, offload: bool) -> tuple[Any, Any]:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from kubeforge.runtime.engines.common import schedule

        t = self.setup.contract.training
        config = OptimizerConfig(
            optimizer="adam",
            lr=t.learning_rate,
            weight_decay=t.weight_decay,
            bf16=self.config.bf16,
            fp16=self.config.fp16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=True,
            clip_grad=1.0,
            optimizer_cpu_offload=offload,
            optimizer_offload_fraction=1.0 if offload else 0.0,
        )
        optimizer = get_megatron_optimizer(config, [self.module])
        return optimizer, schedule(optimizer, self.setup)

    def describe(self) -> str:
        return f"megatron: tp {self.tp_rank}/{self.tp}, pp {self.pp_rank}/{self.pp}, dp rank {self.dp_rank}"

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        """One optimizer step over ``micro_batches``. Only the last pipeline stage computes the loss; it
        returns loss x pp, so that the mean over all ranks is the last stage's mean."""
        loss = self._forward_backward(micro_batches, self.seq_length)
        self.optimizer.step()  # clips over the model-parallel group (clip_grad) and steps the fp32 masters
        self.scheduler.step()
        return loss * self.pp

    def _forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], seq_length: int) -> float:
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

    # ------------------------------------------------------------------ checkpoints and export
    def _slice_file(self, folder: Path) -> Path:
        return folder / f"mp_tp{self.tp_rank:02d}_pp{self.pp_rank:02d}.pt"

    def save(self, root: Path, step: int, extra: dict, main: bool) -> None:
        from kubeforge.runtime.engines.common import save_sharded

        optimizer, scheduler = self.optimizer, self.scheduler

        def shards(tmp: Path) -> None:
            if self.dp_rank == 0:
                tmp.mkdir(parents=True, exist_ok=True)
                torch.save({"model": self.model.state_dict(), "optimizer": optimizer.state_dict()},
                           self._slice_file(tmp))  # fmt: skip

        save_sharded(
            root, step, extra, main, shards, lambda tmp: torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        )
        if main:
            checkpoint.prune(root, keep=2)

    def load(self, path: Path) -> dict:
        from kubeforge.runtime.engines.common import restore

        optimizer, scheduler = self.optimizer, self.scheduler

        state = torch.load(self._slice_file(path), map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        return restore(path)

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
