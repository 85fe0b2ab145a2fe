"""FineTuneJob + Plan -> the runtime contract the pods read."""

from __future__ import annotations

from kubeforge.api.finetune import FineTuneJob
from kubeforge.planner.plan import Plan
from kubeforge.render.mounts import location
from kubeforge.runtime.contract import (
    ComputeConfig,
    Contract,
    DataConfig,
    JobIdentity,
    LoRAConfig,
    OutputConfig,
    ParallelConfig,
    TrainingConfig,
)

PLAN_SUMMARY_KEYS = (
    "gpuType", "nodes", "gpusPerNode", "totalGPUs", "strategy", "zeroStage", "offload", "tensorParallel",
    "pipelineParallel", "dataParallel", "precision", "microBatchSize", "gradientAccumulationSteps",
    "gradientCheckpointing", "attention", "estimatedStepSeconds",
)  # fmt: skip


def finetune_contract(job: FineTuneJob, plan: Plan, *, device: str = "cuda") -> Contract:
    spec, meta = job.spec, job.metadata
    lora = spec.lora
    if spec.method in ("lora", "qlora") and lora is None:
        from kubeforge.api.finetune import LoRA

        lora = LoRA()
    output = location(spec.output.uri)
    checkpoints = f"{output.local_path}/checkpoints" if output.local_path else "/mnt/cache/output/checkpoints"
    summary = plan.to_json()
    return Contract(
        job=JobIdentity(name=meta.name or "", namespace=meta.namespace or "default", uid=_uid(job)),
        model=location(spec.model.uri, spec.model.revision),
        dataset=DataConfig(
            location=location(spec.dataset.uri),
            format=spec.dataset.format,
            max_seq_length=spec.dataset.max_seq_length,
            packing=spec.dataset.packing,
        ),
        training=TrainingConfig(
            method=spec.method,
            objective=spec.training.objective,
            lora=None
            if lora is None
            else LoRAConfig(
                rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules)
            ),
            epochs=spec.training.epochs_or_default(),
            max_steps=spec.training.max_steps,
            learning_rate=spec.training.learning_rate_for(spec.method),
            global_batch_size=plan.global_batch_size,
            micro_batch_size=plan.micro_batch_size,
            gradient_accumulation_steps=plan.gradient_accumulation_steps,
            seed=spec.training.seed,
            checkpoint_every=spec.training.checkpoint_every,
            warmup_ratio=spec.training.warmup_ratio,
            weight_decay=spec.training.weight_decay,
            lr_scheduler=spec.training.lr_scheduler,
        ),
        parallel=ParallelConfig(
            strategy=plan.strategy,
            nodes=plan.nodes,
            gpus_per_node=plan.gpus_per_node,
            tensor_parallel=plan.tensor_parallel,
            pipeline_parallel=plan.pipeline_parallel,
            sequence_parallel=plan.sequence_parallel,
        ),
        compute=ComputeConfig(
            device=device,
            precision=plan.precision,
            gradient_checkpointing=plan.gradient_checkpointing,
            attention=plan.attention,
            liger_kernels=device == "cuda",
        ),
        output=OutputConfig(location=output, merge=spec.output.merge, checkpoint_dir=checkpoints),
        plan_summary={k: summary[k] for k in PLAN_SUMMARY_KEYS if k in summary},
    )


def _uid(job: FineTuneJob) -> str | None:
    extra = job.metadata.model_extra or {}
    uid = extra.get("uid")
    return str(uid) if uid else None
