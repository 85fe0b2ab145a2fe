"""FineTuneJob + Plan -> the runtime contract the pods read."""

from __future__ import annotations

from kubeforge.api.finetune import FineTuneJob
from kubeforge.api.quantize import QuantizeJob
from kubeforge.inventory.gpus import GPU_FACTS, lookup_gpu
from kubeforge.planner.plan import Plan
from kubeforge.render.mounts import location
from kubeforge.runtime.contract import (
    CalibrationConfig,
    ComputeConfig,
    Contract,
    DataConfig,
    DPOConfig,
    EvaluationConfig,
    JobIdentity,
    LoRAConfig,
    OutputConfig,
    ParallelConfig,
    QuantizeContract,
    QuantizeOutputConfig,
    TrainingConfig,
)

PLAN_SUMMARY_KEYS = (
    "gpuType", "nodes", "gpusPerNode", "totalGPUs", "strategy", "zeroStage", "offload", "tensorParallel",
    "pipelineParallel", "dataParallel", "precision", "masterWeights", "microBatchSize", "gradientAccumulationSteps",
    "gradientCheckpointing", "checkpointingPolicy", "attention", "estimatedStepSeconds",
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
            dpo=DPOConfig(**spec.training.dpo.model_dump()) if spec.training.dpo else DPOConfig(),
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
            ulysses=plan.ulysses,
        ),
        compute=ComputeConfig(
            device=device,
            precision=plan.precision,
            master_weights=plan.master_weights,  # type: ignore[arg-type]
            gradient_checkpointing=plan.gradient_checkpointing,
            checkpointing_policy=plan.checkpointing_policy or "full",  # type: ignore[arg-type]
            attention=plan.attention,
            loss_chunk_tokens=plan.loss_chunk_tokens,
            host_memory_bytes=plan.host_memory_per_node if plan.offload != "none" else 0,
            peak_tflops=peak_tflops(plan.gpu_type, plan.precision) if device == "cuda" else None,
        ),
        output=OutputConfig(location=output, merge=spec.output.merge, checkpoint_dir=checkpoints),
        plan_summary={k: summary[k] for k in PLAN_SUMMARY_KEYS if k in summary},
    )


def peak_tflops(gpu_type: str, precision: str) -> float | None:
    """One GPU's dense peak at the plan's compute precision, MFU's denominator; None for a GPU the catalog does not
    know (never a guess) or fp32. An fp8 plan is measured against the bf16 peak, as torchtitan and Megatron report
    MFU: its float8 matmuls then show as a higher MFU, not as a different yardstick."""
    facts = GPU_FACTS.get(gpu_type) or lookup_gpu(gpu_type)
    if facts is None or not facts.known or precision not in ("bf16", "fp16", "fp8"):
        return None
    return facts.peak_tflops("bf16" if precision == "fp8" else precision) or None


def _uid(job: FineTuneJob | QuantizeJob) -> str | None:
    extra = job.metadata.model_extra or {}
    uid = extra.get("uid")
    return str(uid) if uid else None


def quantize_contract(
    job: QuantizeJob, source_uri: str, default_data_uri: str | None, *, device: str
) -> QuantizeContract:
    """The quantizer's contract: the resolved source, calibration data (default: the training data), the gate."""
    spec, meta = job.spec, job.metadata
    cal = spec.calibration
    cal_uri = (cal.dataset_uri if cal else None) or default_data_uri
    calibration = None
    if spec.method != "fp8" and cal_uri:
        calibration = CalibrationConfig(
            location=location(cal_uri),
            samples=cal.samples if cal else 256,
            max_seq_length=cal.max_seq_length if cal else 2048,
        )
    evaluation = None
    if spec.evaluation is not None:
        ev = spec.evaluation
        eval_uri = ev.dataset_uri or cal_uri
        if eval_uri:
            evaluation = EvaluationConfig(
                metric=ev.metric,
                location=location(eval_uri),
                samples=ev.samples,
                max_degradation=ev.max_degradation,
                max_seq_length=cal.max_seq_length if cal else 2048,
            )
    return QuantizeContract(
        job=JobIdentity(name=meta.name or "", namespace=meta.namespace or "default", uid=_uid(job), kind="QuantizeJob"),
        source=location(source_uri),
        method=spec.method,
        calibration=calibration,
        evaluation=evaluation,
        output=QuantizeOutputConfig(location=location(spec.output.uri)),
        compute=ComputeConfig(device=device, precision="bf16" if device == "cuda" else "fp32"),
    )
