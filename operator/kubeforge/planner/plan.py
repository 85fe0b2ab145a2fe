"""The Plan: every choice the planner made, the memory it expects, and why.

Frozen and self-validating: a feasible Plan that breaks a hard rule cannot be built.
``to_json`` gives the documented keys (`kubeforge plan -o json`, status.plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubeforge.runtime.contract import STRATEGIES, unsupported_checkpointing, unsupported_master_weights


class PlanError(ValueError):
    """A Plan that breaks a hard rule: a planner bug, never a user error."""


@dataclass(frozen=True)
class MemoryPerGPU:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    available: int
    gathered: int = 0  # unsharded copies of the modules in flight (FSDP, ZeRO-3): transient, at the peak

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.overhead

    def to_json(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "gathered": self.gathered,
            "activations": self.activations,
            "overhead": self.overhead,
            "total": self.total,
            "available": self.available,
        }


@dataclass(frozen=True)
class Alternative:
    change: str  # what to change, in the spec's words, e.g. "method: qlora"
    gpu_type: str
    total_gpus: int
    strategy: str
    estimated_step_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "gpuType": self.gpu_type,
            "totalGPUs": self.total_gpus,
            "strategy": self.strategy,
            "estimatedStepSeconds": round(self.estimated_step_seconds, 3),
        }


@dataclass(frozen=True)
class Plan:
    feasible: bool
    reason: str
    reasons: tuple[str, ...] = ()
    alternatives: tuple[Alternative, ...] = ()
    method: str = ""
    model_parameters: int = 0
    trainable_parameters: int = 0
    num_layers: int = 0
    gpu_type: str = ""
    pool: str = ""  # the pool's name: GPU, nodes and GPUs per node
    compute_capability: tuple[int, int] = (0, 0)
    nvlink_domain: int = 0
    node_selector: tuple[tuple[str, str], ...] = ()
    nodes: int = 0
    gpus_per_node: int = 0
    strategy: str = ""
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    ulysses: int = 1  # DeepSpeed-Ulysses degree (non-Megatron engines)
    objective: str = "sft"
    precision: str = ""
    master_weights: str = "fp32"  # bf16: pure bf16 (contract.precision_policy)
    global_batch_size: int = 0
    micro_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    gradient_checkpointing: bool = False
    checkpointing_policy: str = ""  # with gradient_checkpointing: full | selective (runtime/selective.py)
    attention: str = ""
    sequence_length: int = 0
    loss_chunk_tokens: int = 0  # the loss (SFT, DPO's log-probs) in chunks of this many tokens; 0: the model's own
    memory: MemoryPerGPU | None = None
    host_memory_per_node: int = 0
    host_memory_available: int = 0
    node_cpus: float = 0.0  # allocatable on the pool's smallest node
    node_memory_bytes: int = 0
    estimated_step_seconds: float = 0.0
    total_steps: int | None = None
    reference_seconds: float = 0.0  # DPO: the reference log-probabilities, computed once before training
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.feasible:
            self._check()
        elif not self.reason:
            raise PlanError("an infeasible plan needs a reason")

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.total_gpus // max(1, self.tensor_parallel * self.pipeline_parallel * self.ulysses)

    @property
    def zero_stage(self) -> int:
        return STRATEGIES[self.strategy].zero_stage if self.strategy in STRATEGIES else 0

    @property
    def offload(self) -> str:
        """What lives in host memory: none, optimizer (states and fp32 masters) or parameters (and optimizer)."""
        return STRATEGIES[self.strategy].offload if self.strategy in STRATEGIES else "none"

    @property
    def estimated_gpu_hours(self) -> float | None:
        if self.total_steps is None:
            return None
        return (self.estimated_step_seconds * self.total_steps + self.reference_seconds) * self.total_gpus / 3600

    def _check(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise PlanError(f"plan breaks a hard rule: {what}")

        need(self.nodes >= 1 and self.gpus_per_node >= 1, "at least one GPU")
        need(
            self.tensor_parallel * self.pipeline_parallel * self.ulysses * self.data_parallel == self.total_gpus,
            "tp x pp x ulysses x dp = GPUs",
        )
        need(
            self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel == self.global_batch_size,
            "global batch = micro-batch x gradient accumulation x data parallel",
        )
        need(self.tensor_parallel <= max(1, self.nvlink_domain), "tensor parallel inside one NVLink domain")
        need(self.num_layers % self.pipeline_parallel == 0, "pipeline stages divide the layers")
        need(self.precision != "fp8" or self.compute_capability >= (8, 9), "fp8 needs compute capability >= 8.9")
        need(self.precision != "bf16" or self.compute_capability >= (8, 0), "bf16 needs compute capability >= 8.0")
        need(self.precision != "fp32" or self.gpu_type == "cpu", "fp32 only on CPU")
        need(
            self.gradient_checkpointing == bool(self.checkpointing_policy)
            and not unsupported_checkpointing(self.strategy, self.method, self.checkpointing_policy),
            "a checkpointing policy (full; selective: full fine-tuning, no Megatron) exactly when checkpointing",
        )
        need(
            self.master_weights == "fp32" or not unsupported_master_weights(self.strategy, self.precision, "bf16"),
            "pure bf16 (masterWeights bf16) needs bf16 compute and an engine that steps bf16 weights",
        )
        need(self.memory is not None and self.memory.total <= self.memory.available, "fits in GPU memory")
        need(self.offload == "none" or self.host_memory_per_node <= self.host_memory_available, "fits in host memory")
        megatron = self.strategy in STRATEGIES and STRATEGIES[self.strategy].engine == "megatron"
        need(
            self.sequence_parallel is False or (self.tensor_parallel > 1 if megatron else self.ulysses > 1),
            "sequence parallel needs tensor parallel (Megatron) or a Ulysses degree above 1",
        )
        need(self.ulysses == 1 or not megatron, "Ulysses only on the non-Megatron engines")
        need(self.gpus_per_node % self.ulysses == 0, "a Ulysses group stays inside one node")
        need(self.ulysses == 1 or self.objective != "dpo", "dpo trains without Ulysses")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "feasible": self.feasible,
            "reason": self.reason,
            "alternatives": [a.to_json() for a in self.alternatives],
            "reasons": list(self.reasons),
        }
        if not self.feasible:
            return out
        assert self.memory is not None
        out.update(
            {
                "gpuType": self.gpu_type,
                "pool": self.pool,
                "nodes": self.nodes,
                "gpusPerNode": self.gpus_per_node,
                "totalGPUs": self.total_gpus,
                "strategy": self.strategy,
                "zeroStage": self.zero_stage,
                "offload": self.offload,
                "tensorParallel": self.tensor_parallel,
                "pipelineParallel": self.pipeline_parallel,
                "dataParallel": self.data_parallel,
                "sequenceParallel": self.sequence_parallel,
                "ulysses": self.ulysses,
                "objective": self.objective,
                "precision": self.precision,
                "masterWeights": self.master_weights,
                "microBatchSize": self.micro_batch_size,
                "gradientAccumulationSteps": self.gradient_accumulation_steps,
                "gradientCheckpointing": self.gradient_checkpointing,
                "checkpointingPolicy": self.checkpointing_policy or None,
                "attention": self.attention,
                "lossChunkTokens": self.loss_chunk_tokens,
                "memoryPerGPU": self.memory.to_json(),
                "hostMemoryPerNode": self.host_memory_per_node,
                "estimatedStepSeconds": round(self.estimated_step_seconds, 4),
                "estimatedGPUHours": (None if self.estimated_gpu_hours is None else round(self.estimated_gpu_hours, 3)),
                "totalSteps": self.total_steps,
                "method": self.method,
                "modelParameters": self.model_parameters,
                "trainableParameters": self.trainable_parameters,
                "globalBatchSize": self.global_batch_size,
                "sequenceLength": self.sequence_length,
                "nodeSelector": dict(self.node_selector),
            }
        )
        # the reasons go last, for people reading the JSON top to bottom
        out["reasons"] = out.pop("reasons")
        return out
