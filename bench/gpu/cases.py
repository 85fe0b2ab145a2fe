"""The plans the GPU benchmark runs, and what the planner predicts for each.

Every case is one GPU, one process, sequence length 2048, no gradient accumulation (the
activation formula's in-flight micro-batches stay 1), LoRA rank 16 / alpha 32 / dropout 0.05 on
all linear layers (the planner's defaults). ``layout`` is the planner's view of the case,
``contract`` the runtime's: both are built from the same fields, so a ratio measured/predicted
compares the same plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SEQ_LEN = 2048
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
GIB = 1024**3


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a key of models.SHAPES
    method: str  # full | lora | qlora
    strategy: str  # a key of contract.STRATEGIES
    precision: str
    micro_batch: int
    gradient_checkpointing: bool = False
    master_weights: str = "fp32"  # bf16: pure bf16 (spec.parallelism.masterWeights)
    checkpointing_policy: str = "full"  # with gradient_checkpointing: full | selective (runtime/selective.py)
    seq_len: int = SEQ_LEN
    optional: bool = False  # run only when named (or with --cases all)
    note: str = ""

    def layout(self):
        from kubeforge.planner.memory import Layout

        return Layout(
            method=self.method,
            strategy=self.strategy,
            nodes=1,
            gpus_per_node=1,
            precision=self.precision,
            master_weights=self.master_weights,
            micro_batch=self.micro_batch,
            seq_len=self.seq_len,
            gradient_checkpointing=self.gradient_checkpointing,
            checkpointing_policy=self.checkpointing_policy,
            gradient_accumulation=1,
            lora_rank=LORA_RANK,
            lora_dropout=LORA_DROPOUT,
        )

    def config(self) -> dict[str, Any]:
        return asdict(self)


# fmt: off
CASES: tuple[Case, ...] = (
    Case("0.5b-full-ddp-bf16", "0.5b", "full", "ddp", "bf16", micro_batch=4),
    Case("1b-full-ddp-bf16", "1b", "full", "ddp", "bf16", micro_batch=4, note="the fp8 baseline"),
    Case("1b-full-ddp-fp8", "1b", "full", "ddp", "fp8", micro_batch=4, note="torchao Float8Linear, eager"),
    Case("3b-lora-ddp-bf16", "3b", "lora", "ddp", "bf16", micro_batch=2),
    Case("3b-full-ddp-bf16-gc", "3b", "full", "ddp", "bf16", micro_batch=4, gradient_checkpointing=True,
         note="~60 GiB of fp32 states: skipped on GPUs predicted too small"),
    Case("3b-full-ddp-pure-bf16-gc", "3b", "full", "ddp", "bf16", micro_batch=4, gradient_checkpointing=True,
         master_weights="bf16", note="the same in pure bf16: half the bytes of states"),
    Case("3b-full-ddp-bf16-sac", "3b", "full", "ddp", "bf16", micro_batch=4, gradient_checkpointing=True,
         checkpointing_policy="selective", note="selective checkpointing: memory and speed against full"),
    Case("8b-lora-ddp-bf16-gc", "8b", "lora", "ddp", "bf16", micro_batch=4, gradient_checkpointing=True),
    Case("8b-qlora-ddp-bf16-gc", "8b", "qlora", "ddp", "bf16", micro_batch=4, gradient_checkpointing=True,
         note="bitsandbytes NF4"),
    Case("3b-full-zero2-offload-bf16", "3b", "full", "zero2-offload-optimizer", "bf16", micro_batch=2,
         optional=True, note="DeepSpeed CPU Adam (JIT-built op), ~77 GB of host memory"),
)
# fmt: on
BY_NAME = {c.name: c for c in CASES}


def select(spec: str | None) -> list[Case]:
    """Cases by comma-separated names (or 'all', or 'default': every non-optional case), in table order."""
    if not spec or spec == "default":
        return [c for c in CASES if not c.optional]
    if spec == "all":
        return list(CASES)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [c for c in CASES if c.name in names]


def contract(case: Case, model_dir: Path, work: Path, steps: int, vocab_size: int, host_memory_bytes: int = 0):
    """The runtime contract of the case, as kubeforge would render it for one GPU."""
    from kubeforge.runtime.contract import (
        ComputeConfig,
        Contract,
        DataConfig,
        JobIdentity,
        Location,
        LoRAConfig,
        OutputConfig,
        ParallelConfig,
        ProgressConfig,
        TrainingConfig,
        loss_chunk_tokens,
    )

    data = work / "synthetic.jsonl"  # never read: the benchmark feeds random token ids
    out = work / "out"
    lora = LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT) if case.method != "full" else None
    return Contract(
        job=JobIdentity(name=f"bench-{case.name}".replace(".", "-")),
        model=Location(uri=str(model_dir), local_path=str(model_dir)),
        dataset=DataConfig(location=Location(uri=str(data), local_path=str(data)), max_seq_length=case.seq_len),
        training=TrainingConfig(
            method=case.method,
            lora=lora,
            max_steps=steps,
            learning_rate=1e-5,
            global_batch_size=case.micro_batch,
            micro_batch_size=case.micro_batch,
            gradient_accumulation_steps=1,
            warmup_ratio=0.0,
            lr_scheduler="constant",
        ),
        parallel=ParallelConfig(strategy=case.strategy, nodes=1, gpus_per_node=1),
        compute=ComputeConfig(
            device="cuda",
            precision=case.precision,
            master_weights=case.master_weights,  # type: ignore[arg-type]
            gradient_checkpointing=case.gradient_checkpointing,
            checkpointing_policy=case.checkpointing_policy,  # type: ignore[arg-type]
            attention="sdpa",
            host_memory_bytes=host_memory_bytes,
            # the loss in chunks, as the planner asks and memory.estimate counts (predict)
            loss_chunk_tokens=loss_chunk_tokens(vocab_size, case.strategy),
        ),
        output=OutputConfig(location=Location(uri=str(out), local_path=str(out)), checkpoint_dir=str(out / "ckpt")),
        progress=ProgressConfig(port=0),
    )


def bench_pool(gpu, host_memory_bytes: int = 0):
    """A one-GPU pool of ``gpu`` (inventory.gpus.GPUFacts), for the planner's step-time model."""
    from kubeforge.inventory.pools import Pool

    return Pool(
        gpu=gpu,
        gpus_per_node=1,
        node_names=("bench",),
        memory_mib=gpu.memory_mib,
        host_memory_bytes=host_memory_bytes,
        cpus_per_node=0.0,
        network_gbps=0.0,
        nvlink_domain=1,
        selector=(),
        source="bench",
    )


def predict(case: Case, config: dict[str, Any], gpu) -> dict[str, Any]:
    """What the planner says about the case: memory.estimate's breakdown (bytes), FLOPs per token and
    cost.step_time on ``gpu`` (GPUFacts)."""
    from kubeforge.planner import cost, memory
    from kubeforge.planner.architecture import from_hf_config

    arch = from_hf_config(config, f"bench/gpu {case.model}")
    layout = case.layout()
    mem = memory.estimate(arch, layout)
    step = cost.step_time(arch, layout, bench_pool(gpu), global_batch=case.micro_batch)
    tokens = case.micro_batch * case.seq_len
    no_recompute = cost.flops_per_token(arch, _without_recompute(layout))
    return {
        "parameters": arch.total_parameters,
        "trainable_parameters": memory.trainable_parameters(arch, layout),
        "memory": {
            "weights": mem.weights,
            "gradients": mem.gradients,
            "optimizer": mem.optimizer,
            "gathered": mem.gathered,
            "activations": mem.activations,
            "overhead": mem.overhead,
            "model_states": mem.model_states,
            "total": mem.total,
            "host_per_node": mem.host_per_node,
        },
        "flops_per_token": cost.flops_per_token(arch, layout),  # with checkpointing's and the loss's recomputation
        "model_flops_per_token": no_recompute,  # without it (the usual MFU numerator)
        "step_seconds": step.total,
        "tokens_per_second": tokens / step.total,
        "gpu": gpu.name,
    }


def _without_recompute(layout):
    from dataclasses import replace

    return replace(layout, gradient_checkpointing=False, chunked_loss=False)
