"""A Plan for people: the table `kubeforge plan -o table` prints."""

from __future__ import annotations

from kubeforge.planner.plan import Plan

GIB = 1024**3


def table(plan: Plan) -> str:
    lines: list[str] = []
    if not plan.feasible:
        lines.append(f"INFEASIBLE: {plan.reason}")
    else:
        lines.append(f"PLAN: {plan.reason}")
        rows = [
            ("GPU type", plan.gpu_type),
            ("Nodes x GPUs", f"{plan.nodes} x {plan.gpus_per_node} = {plan.total_gpus}"),
            ("Strategy", plan.strategy + (f" (ZeRO stage {plan.zero_stage})" if plan.zero_stage else "")),
            (
                "TP x PP x SP x DP",
                f"{plan.tensor_parallel} x {plan.pipeline_parallel} x {plan.ulysses} x {plan.data_parallel}",
            ),
            (
                "Sequence parallel",
                f"Ulysses x {plan.ulysses}"
                if plan.ulysses > 1
                else ("Megatron (within TP)" if plan.sequence_parallel else "no"),
            ),
            ("Precision", plan.precision + (", pure (bf16 master weights)" if plan.master_weights == "bf16" else "")),
            (
                "Batch",
                f"{plan.global_batch_size} = {plan.micro_batch_size} micro x "
                f"{plan.gradient_accumulation_steps} accumulation x {plan.data_parallel} data parallel",
            ),
            ("Gradient checkpointing", plan.checkpointing_policy if plan.gradient_checkpointing else "off"),
            ("Attention", plan.attention),
            ("Step time (est.)", f"{plan.estimated_step_seconds:.2f} s"),
            (
                "GPU-hours (est.)",
                "-"
                if plan.estimated_gpu_hours is None
                else f"{plan.estimated_gpu_hours:.1f} for {plan.total_steps} steps",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        mem = plan.memory
        assert mem is not None
        lines.append("  Memory per GPU (GiB):")
        for key in ("weights", "gradients", "optimizer", "gathered", "activations", "overhead"):
            lines.append(f"    {key:<12} {getattr(mem, key) / GIB:8.1f}")
        lines.append(f"    {'total':<12} {mem.total / GIB:8.1f}  of {mem.available / GIB:.1f} usable")
        if plan.offload:
            lines.append(f"  Host memory per node: {plan.host_memory_per_node / GIB:.1f} GiB")
    if plan.reasons:
        lines.append("Why:")
        lines += [f"  - {r}" for r in plan.reasons]
    if plan.alternatives:
        lines.append("Nearest feasible alternatives:")
        for alt in plan.alternatives:
            lines.append(
                f"  - {alt.change}: {alt.strategy} on {alt.total_gpus} x {alt.gpu_type}, "
                f"{alt.estimated_step_seconds:.2f} s/step"
            )
    return "\n".join(lines) + "\n"
