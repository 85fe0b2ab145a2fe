"""`python -m kubeforge.runtime.train --config CONTRACT`, launched by torchrun (or alone).

    read the contract -> read and tokenize the data (fail fast) -> load the model (LoRA /
    QLoRA adapters, gradient checkpointing) -> wrap it for the strategy -> train with
    gradient accumulation, resuming from the latest checkpoint -> rank 0 exports the
    artifact and leaves a JSON summary in the termination message.

Exit codes (contract): EXIT_USER_ERROR for bad data or config (the Job fails at once),
EXIT_INFRASTRUCTURE for anything else (the gang may be restarted and resumes).

DDP (and a single process), FSDP2 and DeepSpeed ZeRO-1/2/3 (with CPU offload) run on CPU
(gloo) and GPUs (NCCL); Megatron tensor/pipeline parallelism (mcore/) only on GPUs.

Objectives (training.objective, objectives.py): sft, the next-token loss; dpo (not on Megatron), on
preference pairs (preference.py), with the reference log-probs of every pair computed from the
starting model before the first step and kept with the checkpoints (dpo.py).
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from kubeforge.runtime import (
    checkpoint,
    checkpoint_store,
    data,
    dpo,
    engines,
    entry,
    export,
    fetch,
    objectives,
    preference,
    tracking,
)
from kubeforge.runtime import progress as progress_mod
from kubeforge.runtime.contract import CUDA_ALLOC_CONF, STRATEGIES, Contract, load
from kubeforge.runtime.engines import Dist, Setup
from kubeforge.runtime.engines.loading import load_whole
from kubeforge.runtime.entry import UserError

log = logging.getLogger("kubeforge.train")


def main(argv: list[str] | None = None) -> int:
    allocator_config()
    dist = _dist_env()
    return entry.main(
        "python -m kubeforge.runtime.train",
        argv,
        load,
        lambda contract: run(contract, dist),
        rank=dist.rank,
        cleanup=_destroy_process_group,
    )


def allocator_config() -> str:
    """The caching allocator's setting (contract.CUDA_ALLOC_CONF) unless the environment sets one; before CUDA
    starts, which reads it once. Returns the setting in force."""
    return os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


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

    engines.check(contract, cuda=torch.cuda.is_available())
    engines.common.return_freed_memory()
    if dist.world != contract.parallel.world_size:
        raise UserError(f"the contract plans {contract.parallel.world_size} processes; torchrun started {dist.world}")
    tracking.check()  # a tracker asked for but not installed or configured fails here, before any work
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
    if contract.parallel.ulysses > 1:  # the heads must split over the group: refuse before loading weights
        from kubeforge.runtime import ulysses

        ulysses.check_config(config, contract.parallel.ulysses)
    items = _training_items(contract, data_path, tokenizer, max_len)

    # 2. the engine: loads (each rank its share), wraps, and owns the optimizer and schedule
    t = contract.training
    steps_per_epoch = max(1, math.ceil(len(items) / t.global_batch_size))
    total = t.max_steps or max(1, math.ceil((t.epochs or 1.0) * steps_per_epoch))
    if dist.world > 1 or STRATEGIES[contract.parallel.strategy].engine in ("deepspeed", "megatron"):
        _init_process_group(dist, device)  # DeepSpeed and Megatron want a process group even alone
    ckpt_root = Path(contract.output.checkpoint_dir)
    store = checkpoint_store.remote_uri(contract.output.location.uri)
    if store and dist.local_rank == 0:  # a replaced pod finds the durable checkpoints again (one process per node)
        checkpoint_store.restore(ckpt_root, store, trust_local=contract.parallel.nodes == 1)
    _barrier(dist)
    engine = engines.build(Setup(contract, dist, device, model_dir, total))
    log.info(
        "model: %s parameters, %s trainable (%s, %s); %s",
        f"{config_parameters(engine.model):,}",
        f"{sum(p.numel() for p in engine.model.parameters() if p.requires_grad):,}",
        t.method,
        contract.parallel.strategy,
        engine.describe(),
    )

    # 3. resume
    start, losses, history = 0, [], {}
    found = checkpoint.latest(ckpt_root)
    if found is not None:
        state = engine.load(found)
        start, losses, history = int(state["step"]), list(state.get("losses", [])), dict(state.get("metrics", {}))
        log.info("resuming from %s at step %d", found, start)
    # flash attention keeps packed examples apart only in a one-row batch (data.collate's docstring)
    flatten = (
        contract.compute.attention == "flash_attention_2"
        and STRATEGIES[contract.parallel.strategy].engine != "megatron"
    )
    collate = functools.partial(data.collate, pad_id=tokenizer.pad_token_id, flatten=flatten)
    if t.objective == "dpo":  # the reference log-probs, before the first step (or read back when resuming)
        collate = dpo.start(engine, items, contract, dist=dist, device=device, pad_id=tokenizer.pad_token_id,
                            root=ckpt_root, resumed_from=found, data_path=data_path)  # fmt: skip
    every = t.checkpoint_every or steps_per_epoch
    mfu = progress_mod.mfu_inputs(contract, config, engine.model) if dist.main else {}
    sink = tracking.start(contract, main=dist.main, first_step=start)
    tracker = progress_mod.Progress(total, start, **mfu, sink=sink)
    server = (
        progress_mod.serve(tracker, contract.progress.port, contract.progress.path, job=contract.job)
        if (dist.main and contract.progress.port)
        else None
    )

    # 4. train
    dp = contract.parallel.data_parallel
    for step in range(start, total):
        engine.model.train()
        micro_batches = _micro_batches(items, step, steps_per_epoch, t, dp, engine.dp_rank, seed, collate)
        step_loss, step_metrics = objectives.reduce_step(engine.train_step(micro_batches), dist.world, device)
        step_tokens = sum(objectives.tokens(b) for b in micro_batches)
        losses.append(round(step_loss, 6))
        for name, value in step_metrics.items():
            history.setdefault(name, []).append(round(value, 6))
        lr = progress_mod.learning_rate(getattr(engine, "optimizer", None))  # after the step, as Trainer logs it
        tracker.update(step + 1, step_loss, step_tokens * dp, (step + 1) / steps_per_epoch, step_metrics, lr)
        if dist.main and ((step + 1) % max(1, total // 20) == 0 or step + 1 == total or step == start):
            log.info("%s", tracker.line())
        if (step + 1) % every == 0 or step + 1 == total:  # the last one lets a longer run continue
            _barrier(dist)
            engine.save(ckpt_root, step + 1, {"losses": losses, "metrics": history}, dist.main)
            _barrier(dist)
            if t.objective == "dpo" and dist.main:  # the reference travels with each checkpoint
                dpo.copy_into(ckpt_root / f"{checkpoint.PREFIX}{step + 1:08d}", ckpt_root)
            if store:
                _push_checkpoint(ckpt_root, store, step + 1, dist)

    # 5. export: sharded engines gather on every rank; rank 0 keeps the result
    sink.close()  # the event files are complete before the artifact's manifest lists them
    _barrier(dist)
    full = engine.full_state_dict(ckpt_root / "export-staging")
    summary: dict[str, Any] = {"status": "succeeded"}
    if dist.main:
        model = engine.model
        if contract.training.method == "qlora":  # adapters onto the full-precision base (see _dequantized)
            if full is not None or contract.output.merge:
                model = _dequantized(contract, model_dir, model, full)
        elif full is not None:
            model = _whole_cpu_model(contract, model_dir)
            tied = getattr(model.config, "tie_word_embeddings", False)
            model.load_state_dict(_hf_names(full), strict=not tied)
        summary = _export(
            contract, model, tokenizer, data_path, losses, total, tracker, time.monotonic() - started, start, history
        )
        checkpoint.prune(ckpt_root, keep=1)
        if store:
            checkpoint_store.prune_remote(store, keep=1)  # the last one lets a longer run continue
    if server is not None:
        server.shutdown()
    _barrier(dist)
    return summary


def _push_checkpoint(root: Path, store: str, step: int, dist: Dist) -> None:
    """Each node uploads its ranks' files; once every node is done, rank 0 marks the step complete."""
    if dist.local_rank == 0:
        checkpoint_store.push(root / f"{checkpoint.PREFIX}{step:08d}", store)
        checkpoint.prune(root, keep=2)  # nodes other than rank 0's keep .tmp folders otherwise
    _barrier(dist)
    if dist.main:
        checkpoint_store.mark_complete(store, step)
        checkpoint_store.prune_remote(store, keep=2)


def _training_items(contract: Contract, data_path: Path, tokenizer, max_len: int) -> list[Any]:
    """What the steps sample from: tokenized (and packed) sequences for sft, preference pairs for dpo."""
    if contract.training.objective == "dpo":
        pairs = preference.read_pairs(data_path, tokenizer, max_len)
        log.info("data: %d preference pairs (packing does not apply to pairs)", len(pairs))
        return pairs
    examples = data.read_examples(data_path, contract.dataset.format, tokenizer)
    items = data.tokenize(examples, tokenizer, max_len, str(data_path))
    packing = contract.dataset.packing and STRATEGIES[contract.parallel.strategy].engine != "megatron"
    if packing:
        items = data.pack(items, max_len, tokenizer.pad_token_id)
    elif contract.dataset.packing:  # see mcore/engine.py: keeping packed examples apart needs TE's THD format
        log.info("data: packing off on Megatron (its local attention would attend across packed examples)")
    log.info("data: %d examples -> %d sequences (packing %s)", len(examples), len(items), packing)
    return items


def _micro_batches(items, step, steps_per_epoch, t, dp, dp_rank, seed, collate) -> list[dict[str, Any]]:
    """This rank's micro-batches of one step: the global batch in a seeded per-epoch order, split over
    data-parallel ranks (tensor and pipeline peers read the same samples). An item is a sequence (sft) or a
    preference pair (dpo: micro_batch_size pairs make a micro-batch of twice as many rows)."""
    order = _epoch_order(len(items), seed, step // steps_per_epoch)
    within = (step % steps_per_epoch) * t.global_batch_size
    ids = [order[(within + i) % len(order)] for i in range(t.global_batch_size)]
    mb = t.micro_batch_size
    chunks = [
        [items[i] for i in ids[(micro * dp + dp_rank) * mb : (micro * dp + dp_rank + 1) * mb]]
        for micro in range(t.gradient_accumulation_steps)
    ]
    return [collate(chunk) for chunk in chunks]


def config_parameters(model) -> int:
    """Parameters of the whole model, however it is sharded."""
    total = 0
    for p in model.parameters():
        total += getattr(p, "ds_numel", None) or p.numel()
    return total


def _hf_names(state: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def _whole_cpu_model(contract: Contract, model_dir: Path):
    """The model rank 0 exports from: whole, on the CPU, without float8 or the chunked loss."""
    import torch

    compute = contract.compute.model_copy(update={"loss_chunk_tokens": 0, "precision": "fp32"})
    return load_whole(contract.model_copy(update={"compute": compute}), model_dir, torch.device("cpu"))


def _export(contract, model, tokenizer, data_path, losses, total, tracker, seconds, resumed_from,
            history) -> dict[str, Any]:  # fmt: skip
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
        **{name: values[-1] for name, values in history.items() if values},  # the last step's (dpo: TRL's names)
    }
    extra = {}
    if contract.training.objective == "dpo":
        d = contract.training.dpo
        extra["dpo"] = {"beta": d.beta, "lossType": d.loss_type, "labelSmoothing": d.label_smoothing,
                        "metrics": history}  # fmt: skip
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
            **extra,
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


def _init_process_group(dist: Dist, device) -> None:
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


def _dequantized(contract: Contract, model_dir: Path, qlora_model, gathered: dict[str, Any] | None = None):
    """The trained adapter on the base model in full precision: merging into 4-bit weights would
    round the update away (and bitsandbytes cannot save a merged 4-bit model for vLLM). The adapter
    comes from the model, or from a sharded engine's gathered state (its LoRA entries)."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    training = contract.training.model_copy(update={"method": "lora"})
    compute = contract.compute.model_copy(update={"loss_chunk_tokens": 0, "precision": "fp32"})
    plain = load_whole(contract.model_copy(update={"training": training, "compute": compute}), model_dir,
                       torch.device("cpu"))  # fmt: skip
    if gathered is None:
        set_peft_model_state_dict(plain, get_peft_model_state_dict(qlora_model))
        return plain
    adapters = {k: v.float() for k, v in gathered.items() if ".lora_" in k}
    result = plain.load_state_dict(adapters, strict=False)
    if result.unexpected_keys or not adapters:
        raise RuntimeError(f"QLoRA export: the gathered adapters do not match the model ({result.unexpected_keys[:3]})")
    return plain


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


if __name__ == "__main__":
    sys.exit(main())
