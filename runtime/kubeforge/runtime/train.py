"""`python -m kubeforge.runtime.train --config CONTRACT`, launched by torchrun (or alone).

    read the contract -> read and tokenize the data (fail fast) -> load the model (LoRA /
    QLoRA adapters, gradient checkpointing) -> wrap it for the strategy -> train with
    gradient accumulation, resuming from the latest checkpoint -> rank 0 exports the
    artifact and leaves a JSON summary in the termination message.

Exit codes (contract): EXIT_USER_ERROR for bad data or config (the Job fails at once),
EXIT_INFRASTRUCTURE for anything else (the gang may be restarted and resumes).

DDP (and a single process), FSDP2 and DeepSpeed ZeRO-1/2/3 (with CPU offload) run on CPU
(gloo) and GPUs (NCCL); Megatron tensor/pipeline parallelism (mcore/) only on GPUs.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeforge.runtime import checkpoint, data, entry, export, fetch
from kubeforge.runtime import progress as progress_mod
from kubeforge.runtime.contract import (
    Contract,
    load,
)
from kubeforge.runtime.engines import ZERO_STAGES, DDPEngine, DeepSpeedEngine, FSDPEngine
from kubeforge.runtime.entry import UserError

if TYPE_CHECKING:
    from kubeforge.runtime.mcore.engine import MegatronEngine

log = logging.getLogger("kubeforge.train")


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def main(argv: list[str] | None = None) -> int:
    dist = _dist_env()
    return entry.main(
        "python -m kubeforge.runtime.train",
        argv,
        load,
        lambda contract: run(contract, dist),
        rank=dist.rank,
        cleanup=_destroy_process_group,
    )


def _dist_env() -> Dist:
    return Dist(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def _destroy_process_group() -> None:
    try:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
    except Exception:  # the process is ending anyway
        pass


def run(contract: Contract, dist: Dist) -> dict[str, Any]:
    import torch

    megatron = contract.parallel.strategy == "megatron"
    if megatron and contract.compute.device != "cuda":
        raise UserError(
            "strategy megatron needs CUDA GPUs (megatron-core's forward pass calls CUDA); "
            "on CPU use ddp, fsdp or a zero stage"
        )
    if megatron and contract.training.method != "full":
        raise UserError(f"strategy megatron trains method full only, not {contract.training.method}")
    if dist.world != contract.parallel.world_size:
        raise UserError(f"the contract plans {contract.parallel.world_size} processes; torchrun started {dist.world}")
    started = time.monotonic()
    device = _device(contract, dist)
    seed = contract.training.seed
    random.seed(seed)
    torch.manual_seed(seed)

    # 1. data, before any model or GPU time
    from transformers import AutoConfig, AutoTokenizer

    model_dir = fetch.local_path(contract.model)
    data_path = fetch.local_path(contract.dataset.location)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(model_dir)
    max_len = contract.dataset.max_seq_length
    data.check_model_length(max_len, getattr(config, "max_position_embeddings", None))
    examples = data.read_examples(data_path, contract.dataset.format, tokenizer)
    items = data.tokenize(examples, tokenizer, max_len, str(data_path))
    if contract.dataset.packing:
        items = data.pack(items, max_len, tokenizer.pad_token_id)
    log.info("data: %d examples -> %d sequences (packing %s)", len(examples), len(items), contract.dataset.packing)

    # 2. the model
    _init_process_group(dist, device, even_alone=megatron)
    zero = contract.parallel.strategy in ZERO_STAGES
    engine: DDPEngine | FSDPEngine | DeepSpeedEngine | MegatronEngine
    if megatron:
        from kubeforge.runtime.mcore.engine import MegatronEngine

        engine = MegatronEngine(contract, config.to_dict(), model_dir, device)
        model = engine.model
    else:
        model = _model(contract, model_dir, device)
    if contract.parallel.strategy == "fsdp" and dist.world > 1:
        engine = FSDPEngine(model, dist.world, device, contract.compute.precision)
    elif not zero and not megatron:
        engine = DDPEngine(model, dist.world, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "model: %s parameters on this rank, %s trainable (%s, %s)",
        f"{sum(p.numel() for p in model.parameters()):,}",
        f"{sum(p.numel() for p in trainable):,}",
        contract.training.method,
        contract.parallel.strategy,
    )

    # 3. schedule
    t = contract.training
    dp = contract.parallel.data_parallel
    dp_rank = engine.dp_rank if megatron else dist.rank  # tensor/pipeline peers read the same samples
    steps_per_epoch = max(1, math.ceil(len(items) / t.global_batch_size))
    total = t.max_steps or max(1, math.ceil((t.epochs or 1.0) * steps_per_epoch))
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * total), num_training_steps=total
    )
    if zero:
        _init_process_group(dist, device, even_alone=True)  # DeepSpeed needs a process group
        engine = DeepSpeedEngine(model, contract, config.hidden_size, optimizer, scheduler)
    if isinstance(engine, FSDPEngine):
        from kubeforge.runtime.engines import sharded_parameter_share

        log.info(
            "fsdp: %d layers sharded; this rank holds %.0f%% of the parameters",
            engine.sharded_layers,
            100 * sharded_parameter_share(model),
        )
    wrapped = engine.module
    ckpt_root = Path(contract.output.checkpoint_dir)
    start, losses = 0, []
    found = checkpoint.latest(ckpt_root)
    if found is not None:
        state = engine.load(found, optimizer, scheduler)
        start, losses = int(state["step"]), list(state.get("losses", []))
        log.info("resuming from %s at step %d", found, start)
    every = t.checkpoint_every or steps_per_epoch

    tracker = progress_mod.Progress(total, start)
    server = (
        progress_mod.serve(tracker, contract.progress.port, contract.progress.path)
        if (dist.main and contract.progress.port)
        else None
    )

    # 4. train
    mb, accum = t.micro_batch_size, t.gradient_accumulation_steps
    for step in range(start, total):
        wrapped.train()
        order = _epoch_order(len(items), seed, step // steps_per_epoch)
        within = (step % steps_per_epoch) * t.global_batch_size
        batch_ids = [order[(within + i) % len(order)] for i in range(t.global_batch_size)]
        step_loss, step_tokens = 0.0, 0
        chunks = [
            [items[i] for i in batch_ids[(micro * dp + dp_rank) * mb : (micro * dp + dp_rank + 1) * mb]]
            for micro in range(accum)
        ]
        if megatron:
            micro_batches = [data.collate(chunk, tokenizer.pad_token_id) for chunk in chunks]
            step_loss = engine.train_step(micro_batches, max_len)
            step_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
            engine.clip_and_prepare(1.0)
        for micro, chunk in enumerate(chunks if not megatron else []):
            batch = {k: v.to(device) for k, v in data.collate(chunk, tokenizer.pad_token_id).items()}
            with engine.micro_batch(last=micro == accum - 1), _autocast(contract, device):
                loss = wrapped(**batch).loss
                if isinstance(engine, DeepSpeedEngine):
                    engine.backward(loss)  # scales by 1/accumulation and steps at the boundary itself
                    loss = loss / accum
                else:
                    loss = loss / accum
                    loss.backward()
            step_loss += float(loss.detach())
            step_tokens += int(batch["attention_mask"].sum())
        if not isinstance(engine, DeepSpeedEngine):
            if not megatron:  # the Megatron engine clipped over its model-parallel group
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss = _mean_across(step_loss, dist, device) * (contract.parallel.pipeline_parallel if megatron else 1)
        losses.append(round(step_loss, 6))
        tracker.update(step + 1, step_loss, step_tokens * dp, (step + 1) / steps_per_epoch)
        if dist.main and ((step + 1) % max(1, total // 20) == 0 or step + 1 == total or step == start):
            log.info("%s", tracker.line())
        if (step + 1) % every == 0 or step + 1 == total:  # the last one lets a longer run continue
            _barrier(dist)
            engine.save(ckpt_root, step + 1, optimizer, scheduler, {"losses": losses}, dist.main)
            _barrier(dist)

    # 5. export
    _barrier(dist)
    # sharded engines gather on every rank; rank 0 keeps the result
    full = engine.full_state_dict(ckpt_root / "export-staging") if megatron else engine.full_state_dict()
    summary: dict[str, Any] = {"status": "succeeded"}
    if dist.main:
        if full is not None:
            model = _model(contract, model_dir, torch.device("cpu"))
            model.load_state_dict(full, strict=not megatron or not model.config.tie_word_embeddings)
        if contract.training.method == "qlora" and contract.output.merge:
            model = _dequantized(contract, model_dir, model)
        summary = _export(
            contract, model, tokenizer, data_path, losses, total, tracker, time.monotonic() - started, start
        )
        checkpoint.prune(ckpt_root, keep=1)
    if server is not None:
        server.shutdown()
    _barrier(dist)
    return summary


def _export(contract, model, tokenizer, data_path, losses, total, tracker, seconds, resumed_from) -> dict[str, Any]:
    out_location = contract.output.location
    out = Path(out_location.local_path) if out_location.local_path else Path(contract.output.checkpoint_dir).parent
    model.eval()
    if hasattr(model, "float") and contract.compute.device == "cpu":
        model = model.float()
    merged = export.save_weights(model, tokenizer, out, method=contract.training.method, merge=contract.output.merge)
    metrics = {
        "train_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "steps": total,
        "resumed_from_step": resumed_from,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": tracker.snapshot()["tokensPerSecond"],
    }
    export.write_manifest(
        out,
        {
            "baseModel": contract.model.uri,
            "method": contract.training.method,
            "merged": merged,
            "job": contract.job.model_dump(),
            "plan": contract.plan_summary,
            "dataset": {"uri": contract.dataset.location.uri, "digest": data.digest(data_path)},
            "metrics": {k: v for k, v in metrics.items() if v is not None},
            "losses": losses,
        },
    )
    return export.publish(out, out_location.uri, metrics)


def _device(contract: Contract, dist: Dist):
    import torch

    if contract.compute.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("the plan needs a CUDA GPU and none is visible")
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def _init_process_group(dist: Dist, device, *, even_alone: bool = False) -> None:
    if dist.world == 1 and not even_alone:
        return
    import torch.distributed as td

    if dist.world == 1:  # one process without torchrun (DeepSpeed still wants a process group)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if not td.is_initialized():
        td.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30)
        )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model(contract: Contract, model_dir: Path, device):
    import torch
    from transformers import AutoModelForCausalLM

    precision = contract.compute.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16, "fp32": torch.float32}[precision]
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": contract.compute.attention}
    if contract.training.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if contract.compute.liger_kernels:
        apply_liger(model, device.type)
    if contract.training.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=contract.compute.gradient_checkpointing
        )
    elif contract.compute.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if contract.training.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = contract.training.lora
        assert lora is not None
        targets: Any = "all-linear" if "all-linear" in lora.target_modules else list(lora.target_modules)
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
        if contract.compute.gradient_checkpointing:
            model.enable_input_require_grads()
    if contract.training.method != "qlora":
        model.to(device)
    return model


def apply_liger(model, device_type: str) -> bool:
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) as the plan
    asks: only on CUDA and only where liger-kernel is installed; otherwise say so and go on."""
    if device_type != "cuda":
        log.info("liger kernels: skipped (Triton kernels need a CUDA GPU)")
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.warning("liger kernels: the plan asks for them but liger-kernel is not installed; training without")
        return False
    _apply_liger_kernel_to_instance(model=model)
    log.info("liger kernels: applied to %s", type(model).__name__)
    return True


def _dequantized(contract: Contract, model_dir: Path, qlora_model):
    """The trained adapter on the base model in full precision: merging into 4-bit weights would
    round the update away (and bitsandbytes cannot save a merged 4-bit model for vLLM)."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    training = contract.training.model_copy(update={"method": "lora"})
    plain = _model(contract.model_copy(update={"training": training}), model_dir, torch.device("cpu"))
    set_peft_model_state_dict(plain, get_peft_model_state_dict(qlora_model))
    return plain


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _mean_across(value: float, dist: Dist, device) -> float:
    if dist.world == 1:
        return value
    import torch
    import torch.distributed as td

    tensor = torch.tensor([value], device=device)
    td.all_reduce(tensor)
    return float(tensor.item()) / dist.world


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


def _autocast(contract: Contract, device):
    import torch

    if device.type == "cuda" and contract.compute.precision in ("bf16", "fp16", "fp8"):
        dtype = torch.float16 if contract.compute.precision == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    return _nullcontext()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())
