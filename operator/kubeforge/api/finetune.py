"""FineTuneJob: train a base model on a dataset and export the result."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field

from kubeforge.api.base import (
    ArtifactStatus,
    CommonStatus,
    Credentials,
    DNSLabel,
    Immutable,
    KubeModel,
    Placement,
    Rule,
    SecretRef,
)
from kubeforge.api.meta import ObjectMeta
from kubeforge.api.uris import OutputUri, Uri
from kubeforge.runtime.contract import (
    STRATEGIES,
    CheckpointingPolicy,
    DPOLoss,
    MasterWeights,
    unsupported_checkpointing,
    unsupported_master_weights,
)
from kubeforge.runtime.contract import Strategy as RuntimeStrategy

Positive = Annotated[int, Field(gt=0)]

Method = Literal["full", "lora", "qlora"]
MEGATRON = ("megatron", "megatron-offload-optimizer")
Strategy = Literal[("auto", *get_args(RuntimeStrategy))]  # the runtime's strategies (contract.STRATEGIES), or auto
Precision = Literal["auto", "bf16", "fp16", "fp8"]
ActivationCheckpointing = Literal[("auto", *get_args(CheckpointingPolicy))]  # the runtime's policies, or the planner's
# the strategies each opt-in does not run under (contract.unsupported_master_weights, unsupported_checkpointing)
FP32_MASTERS = tuple(s for s in STRATEGIES if unsupported_master_weights(s, "bf16", "bf16"))
NO_SELECTIVE = tuple(s for s in STRATEGIES if unsupported_checkpointing(s, "full", "selective"))
FineTunePhase = Literal["Pending", "Waiting", "Running", "Succeeded", "Failed"]


class ModelArchitecture(KubeModel):
    """The architecture, for models the planner cannot look up (all optional)."""

    num_parameters: Positive | None = Field(default=None, description="Total parameter count.")
    num_layers: Positive | None = Field(default=None, description="Transformer blocks.")
    hidden_size: Positive | None = Field(default=None, description="Width of the residual stream.")
    num_attention_heads: Positive | None = Field(default=None, description="Query heads per layer.")
    num_key_value_heads: Positive | None = Field(
        default=None, description="Key/value heads per layer (GQA; default: numAttentionHeads)."
    )
    head_dim: Positive | None = Field(
        default=None, description="Width of one head (default: hiddenSize / numAttentionHeads)."
    )
    intermediate_size: Positive | None = Field(default=None, description="Width of the MLP (per expert).")
    vocab_size: Positive | None = Field(default=None, description="Tokens in the vocabulary.")
    max_position_embeddings: Positive | None = Field(
        default=None, description="Longest sequence the model was trained for."
    )
    num_experts: Positive | None = Field(default=None, description="Experts per MoE layer (1 or unset: dense).")
    num_experts_per_token: Positive | None = Field(default=None, description="Experts each token is routed to (MoE).")

    rules = (
        Rule(
            cel="!has(self.numKeyValueHeads) || !has(self.numAttentionHeads) "
            "|| self.numAttentionHeads % self.numKeyValueHeads == 0",
            message="must divide numAttentionHeads",
            check=lambda a: (
                a.num_key_value_heads is None
                or a.num_attention_heads is None
                or a.num_attention_heads % a.num_key_value_heads == 0
            ),
            field=".numKeyValueHeads",
        ),
        Rule(
            cel="!has(self.numExpertsPerToken) || (has(self.numExperts) && self.numExpertsPerToken <= self.numExperts)",
            message="needs numExperts, and may not exceed it",
            check=lambda a: (
                a.num_experts_per_token is None
                or (a.num_experts is not None and a.num_experts_per_token <= a.num_experts)
            ),
            field=".numExpertsPerToken",
        ),
    )


class ModelSource(KubeModel):
    """The base model: where its weights are, and its architecture when the planner cannot look it up."""

    uri: Uri = Field(description="hf://org/name, pvc://claim/path, s3://bucket/prefix, or a local path.")
    revision: str | None = Field(
        default=None, max_length=128, description="Hub revision (branch, tag or commit) for hf:// models."
    )
    architecture: ModelArchitecture | None = Field(
        default=None, description="Architecture facts for models the planner cannot look up."
    )

    rules = (
        Rule(
            cel="!has(self.revision) || self.uri.startsWith('hf://')",
            message="only applies to hf:// models",
            check=lambda m: m.revision is None or m.uri.startswith("hf://"),
            field=".revision",
        ),
    )


class Dataset(KubeModel):
    """The training data: JSON lines, their format, and how sequences are built from them."""

    uri: Uri = Field(description="JSON lines file or folder: pvc://, s3://, hf:// or a local path.")
    format: Literal["messages", "alpaca", "text", "preference"] = Field(
        default="messages",
        description=(
            "messages: {messages: [{role, content}]}; alpaca: {instruction, input, output}; "
            "text: {text}; preference: {prompt, chosen, rejected} (for objective dpo)."
        ),
    )
    max_seq_length: int = Field(
        default=2048, gt=0, le=1048576, description="Longest sequence in tokens; longer examples are refused."
    )
    packing: bool = Field(default=True, description="Pack several examples into each sequence.")
    num_examples: int | None = Field(
        default=None, gt=0, description="About how many examples the dataset holds (for the planner's job estimate)."
    )


class LoRA(KubeModel):
    """Low-rank adapters (Hu et al. 2021): only these train; the base stays frozen."""

    rank: int = Field(default=16, gt=0, le=4096, description="Rank r of each adapter's two matrices.")
    alpha: int = Field(default=32, gt=0, le=8192, description="Scaling: the update is multiplied by alpha / rank.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapters' input while training.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128, description="A module name.")]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt, or 'all-linear'.",
    )


class DPO(KubeModel):
    """Direct Preference Optimization (Rafailov et al. 2023), loss names as TRL's and ms-swift's loss_type.
    The reference model is the starting model: its log-probabilities are computed once before training."""

    beta: float = Field(default=0.1, gt=0, le=100, description="Strength of the KL penalty to the reference model.")
    loss_type: DPOLoss = Field(
        default="sigmoid",
        description="sigmoid (DPO), hinge (SLiC), ipo, robust (with labelSmoothing), exo_pair, nca_pair, "
        "apo_zero, apo_down, sppo_hard.",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is flipped: loss types robust (Chowdhury et al. "
        "2024) and exo_pair (its epsilon, required above 0) read it, as in TRL; the others refuse it.",
    )

    rules = (
        Rule(
            cel="!has(self.labelSmoothing) || self.labelSmoothing == 0.0 || "
            "(has(self.lossType) && self.lossType in ['robust', 'exo_pair'])",
            message="only loss types robust and exo_pair use labelSmoothing",
            check=lambda d: d.label_smoothing == 0 or d.loss_type in ("robust", "exo_pair"),
            field=".labelSmoothing",
        ),
        Rule(
            cel="!has(self.lossType) || self.lossType != 'exo_pair' || "
            "(has(self.labelSmoothing) && self.labelSmoothing > 0.0)",
            message="loss type exo_pair needs labelSmoothing above 0 (EXO's epsilon, e.g. 0.001)",
            check=lambda d: d.loss_type != "exo_pair" or d.label_smoothing > 0,
            field=".labelSmoothing",
        ),
    )


class Training(KubeModel):
    """The objective, how long to train, and the optimizer's schedule."""

    objective: Literal["sft", "dpo"] = Field(
        default="sft", description="sft: next-token loss; dpo: preference optimisation (format preference)."
    )
    dpo: DPO | None = Field(default=None, description="DPO settings (objective dpo).")
    epochs: float | None = Field(
        default=None, gt=0, le=1000, description="Passes over the data (default 1 unless maxSteps is set)."
    )
    max_steps: Positive | None = Field(default=None, description="Optimizer steps; instead of epochs.")
    learning_rate: float | None = Field(
        default=None, gt=0, lt=1, description="Default: 2e-4 for lora/qlora, 1e-5 for full."
    )
    global_batch_size: int = Field(default=32, gt=0, le=65536, description="Sequences per optimizer step.")
    seed: int = Field(default=42, ge=0, description="Seeds data order, dropout and initialisation.")
    checkpoint_every: Positive | None = Field(
        default=None, description="Save a resumable checkpoint every N steps (default: once per epoch)."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of the steps with a linear warm-up.")
    weight_decay: float = Field(default=0.0, ge=0, lt=1, description="AdamW's decoupled weight decay.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="How the learning rate decays after the warm-up."
    )

    def learning_rate_for(self, method: str) -> float:
        """The rate to use: the spec's, else 2e-4 for lora/qlora and 1e-5 for full (as documented)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-5 if method == "full" else 2e-4

    def epochs_or_default(self) -> float | None:
        """Epochs to run: the spec's, else 1 unless maxSteps bounds the run."""
        if self.epochs is None and self.max_steps is None:
            return 1.0
        return self.epochs

    rules = (
        Rule(
            cel="!has(self.dpo) || (has(self.objective) && self.objective == 'dpo')",
            message="only applies to objective dpo",
            check=lambda t: t.dpo is None or t.objective == "dpo",
            field=".dpo",
        ),
        Rule(
            cel="!(has(self.epochs) && has(self.maxSteps))",
            message="set epochs or maxSteps, not both",
            check=lambda t: not (t.epochs is not None and t.max_steps is not None),
            field=".maxSteps",
        ),
    )


class FineTuneResources(Placement):
    """Which GPUs the job may use, and how its pods are scheduled."""

    max_gpus: Positive | None = Field(
        default=None, alias="maxGPUs", description="Most GPUs the job may use (default: no limit)."
    )
    max_hours: float | None = Field(
        default=None,
        gt=0,
        le=8760,
        description="Longest estimated run the planner accepts, in hours (default: 168, a week); a plan estimated "
        "to take longer is infeasible, with the time in the reason. Needs maxSteps or dataset.numExamples.",
    )
    queue: DNSLabel | None = Field(default=None, description="Kueue LocalQueue: the gang is admitted all-or-nothing.")
    gang: Literal["auto", "job", "jobset"] = Field(
        default="auto",
        description="How the pods run: an Indexed Job, or a JobSet; auto uses JobSet when its CRD is installed.",
    )


class Parallelism(KubeModel):
    """How the job is split over GPUs; auto (the default everywhere) lets the planner choose."""

    strategy: Strategy = Field(default="auto", description="auto lets the planner choose.")
    tensor_parallel: Positive | None = Field(default=None, description="Megatron tensor parallel degree.")
    pipeline_parallel: Positive | None = Field(default=None, description="Megatron pipeline stages.")
    sequence_parallel: bool | None = Field(
        default=None,
        description=(
            "Split each sequence over several GPUs. Megatron strategies: Megatron sequence parallelism inside the "
            "tensor-parallel group. Other strategies: DeepSpeed-Ulysses (attention heads exchanged all-to-all). "
            "Default: the planner's choice (Ulysses only when activations at maxSeqLength do not fit otherwise)."
        ),
    )
    sequence_parallel_size: Positive | None = Field(
        default=None,
        description="Ulysses degree: GPUs of one node that share each sequence (non-Megatron strategies; "
        "default: the planner's choice).",
    )
    precision: Precision = Field(default="auto", description="auto: fp8 on Hopper+, bf16 on Ampere+, else fp16.")
    master_weights: MasterWeights = Field(
        default="fp32",
        description=(
            "The dtype of the trained weights, their gradients and AdamW's moments. fp32: mixed precision with fp32 "
            "master weights (16 bytes per trained parameter). bf16: pure bf16, as torchtune's recipes train (8 "
            "bytes per trained parameter; an update smaller than 1/256 of a weight is lost). bf16 needs precision "
            "bf16 or auto (then bf16, never fp8) and strategy auto, ddp, fsdp, zero1, zero2 or zero3."
        ),
    )

    activation_checkpointing: ActivationCheckpointing = Field(
        default="auto",
        description=(
            "auto: the planner checkpoints only where the activations do not fit otherwise, selectively or fully, "
            "whichever is estimated faster. full: each decoder layer keeps only its input and runs its forward pass "
            "again in the backward pass. selective: each layer also keeps the attention kernel's output and every "
            "second matmul's, and recomputes the rest (torchtitan's per-op policy): more memory than full, about a "
            "third of its recomputation; method full and a non-Megatron strategy only."
        ),
    )

    rules = (
        Rule(
            cel="self.strategy in ['auto', 'megatron', 'megatron-offload-optimizer'] || "
            "((!has(self.tensorParallel) || self.tensorParallel == 1) "
            "&& (!has(self.pipelineParallel) || self.pipelineParallel == 1))",
            message="tensorParallel and pipelineParallel above 1 need strategy megatron (or auto)",
            check=lambda p: (
                p.strategy in ("auto", *MEGATRON) or ((p.tensor_parallel or 1) == 1 and (p.pipeline_parallel or 1) == 1)
            ),
            field=".strategy",
        ),
        Rule(
            cel="!has(self.sequenceParallelSize) || self.sequenceParallelSize == 1 || "
            "(!(self.strategy in ['megatron', 'megatron-offload-optimizer']) "
            "&& (!has(self.sequenceParallel) || self.sequenceParallel) "
            "&& (!has(self.tensorParallel) || self.tensorParallel == 1) "
            "&& (!has(self.pipelineParallel) || self.pipelineParallel == 1))",
            message="sequenceParallelSize above 1 is the Ulysses degree: it needs a non-Megatron strategy "
            "(no tensorParallel or pipelineParallel above 1) and sequenceParallel not false",
            check=lambda p: (
                (p.sequence_parallel_size or 1) == 1
                or (
                    p.strategy not in MEGATRON
                    and p.sequence_parallel is not False
                    and (p.tensor_parallel or 1) == 1
                    and (p.pipeline_parallel or 1) == 1
                )
            ),
            field=".sequenceParallelSize",
        ),
        Rule(
            cel="self.masterWeights == 'fp32' || (self.precision in ['auto', 'bf16'] "
            f"&& !(self.strategy in [{', '.join(repr(s) for s in FP32_MASTERS)}]))",
            message="masterWeights bf16 (pure bf16) needs precision bf16 or auto and a strategy that steps bf16 "
            "weights on the GPU (auto, ddp, fsdp, zero1, zero2, zero3)",
            check=lambda p: (
                p.master_weights == "fp32" or (p.precision in ("auto", "bf16") and p.strategy not in FP32_MASTERS)
            ),
            field=".masterWeights",
        ),
        Rule(
            cel="!has(self.activationCheckpointing) || self.activationCheckpointing != 'selective' || "
            f"(!(self.strategy in [{', '.join(repr(s) for s in NO_SELECTIVE)}]) "
            "&& (!has(self.tensorParallel) || self.tensorParallel == 1) "
            "&& (!has(self.pipelineParallel) || self.pipelineParallel == 1))",
            message="activationCheckpointing selective needs a non-Megatron strategy (megatron-core recomputes whole "
            "layers; no tensorParallel or pipelineParallel above 1)",
            check=lambda p: (
                p.activation_checkpointing != "selective"
                or (
                    p.strategy not in NO_SELECTIVE and (p.tensor_parallel or 1) == 1 and (p.pipeline_parallel or 1) == 1
                )
            ),
            field=".activationCheckpointing",
        ),
    )


class Output(KubeModel):
    """Where the exported model goes."""

    uri: OutputUri = Field(description="Where the artifact goes: pvc://claim/path, s3://bucket/prefix or a local path.")
    merge: bool = Field(default=True, description="Merge adapters into the weights (lora/qlora).")


class Tracking(KubeModel):
    """Experiment tracking by the trainer's rank 0: step, loss, learning rate, tokens/s, MFU, DPO metrics, and
    the run config once."""

    backend: Literal["tensorboard", "wandb", "mlflow", "none"] = Field(
        default="tensorboard",
        description="tensorboard: event files in <output>/tensorboard (the default, also without spec.tracking); "
        "wandb: Weights & Biases, and the event files too; mlflow: MLflow, and the event files too; none: nothing.",
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret whose keys become the trainer's environment: WANDB_API_KEY (optionally WANDB_PROJECT, "
        "WANDB_ENTITY, WANDB_BASE_URL, WANDB_MODE) for wandb; MLFLOW_TRACKING_URI (optionally "
        "MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, MLFLOW_EXPERIMENT_NAME) "
        "for mlflow.",
    )

    rules = (
        Rule(
            cel="has(self.secretRef) || !has(self.backend) || self.backend in ['tensorboard', 'none']",
            message="backends wandb and mlflow read their key or URI from a Secret: name it in secretRef",
            check=lambda t: t.secret_ref is not None or t.backend in ("tensorboard", "none"),
            field=".secretRef",
        ),
    )

    def backends(self) -> str:
        """The trainer's KUBEFORGE_TRACKING: TensorBoard's event files stay on beside another backend."""
        return self.backend if self.backend in ("tensorboard", "none") else f"tensorboard,{self.backend}"


class FineTuneJobSpec(KubeModel):
    """What to train, on what, how, and where the result goes."""

    model: Annotated[ModelSource, Immutable()]
    dataset: Annotated[Dataset, Immutable()]
    method: Annotated[Method, Immutable()] = Field(
        default="lora",
        description="full: every weight trains; lora: adapters on a frozen base; qlora: on a 4-bit base.",
    )
    lora: LoRA | None = Field(default=None, description="LoRA settings (method lora or qlora).")
    training: Training = Field(default_factory=Training)
    resources: FineTuneResources = Field(default_factory=FineTuneResources)
    parallelism: Parallelism = Field(default_factory=Parallelism)
    output: Annotated[Output, Immutable()]
    image: str | None = Field(default=None, max_length=512, description="Trainer image override.")
    credentials: Credentials | None = None
    tracking: Tracking | None = Field(
        default=None, description="Experiment tracking (default: TensorBoard event files beside the checkpoints)."
    )

    rules = (
        Rule(
            cel="!has(self.lora) || self.method in ['lora', 'qlora']",
            message="only applies to method lora or qlora",
            check=lambda s: s.lora is None or s.method in ("lora", "qlora"),
            field=".lora",
        ),
        Rule(
            cel="self.method == 'full' || !has(self.parallelism) || ("
            "(!has(self.parallelism.strategy) || !self.parallelism.strategy.startsWith('megatron')) "
            "&& (!has(self.parallelism.tensorParallel) || self.parallelism.tensorParallel == 1) "
            "&& (!has(self.parallelism.pipelineParallel) || self.parallelism.pipelineParallel == 1))",
            message="Megatron (strategy megatron, tensorParallel or pipelineParallel above 1) trains method full "
            "only; lora and qlora run with fsdp or a zero stage",
            check=lambda s: (
                s.method == "full"
                or (
                    s.parallelism.strategy not in MEGATRON
                    and (s.parallelism.tensor_parallel or 1) == 1
                    and (s.parallelism.pipeline_parallel or 1) == 1
                )
            ),
            field=".parallelism.strategy",
        ),
        Rule(
            cel="self.method == 'full' || !has(self.parallelism) || !has(self.parallelism.activationCheckpointing) "
            "|| self.parallelism.activationCheckpointing != 'selective'",
            message="activationCheckpointing selective serves method full only: with lora or qlora each adapter adds "
            "two matmuls to a layer, and what keeping every second matmul's output then holds is not what the planner "
            "counts",
            check=lambda s: s.method == "full" or s.parallelism.activation_checkpointing != "selective",
            field=".parallelism.activationCheckpointing",
        ),
        Rule(
            cel="!has(self.dataset.format) || !has(self.training) || !has(self.training.objective) || "
            "((self.dataset.format == 'preference') == (self.training.objective == 'dpo'))",
            message="format preference goes with training.objective dpo, and dpo needs format preference",
            check=lambda s: (s.dataset.format == "preference") == (s.training.objective == "dpo"),
            field=".dataset.format",
        ),
        Rule(
            cel="!has(self.training) || !has(self.training.objective) || self.training.objective != 'dpo' || "
            "!has(self.parallelism) || ((!has(self.parallelism.strategy) || "
            "!self.parallelism.strategy.startsWith('megatron')) "
            "&& (!has(self.parallelism.tensorParallel) || self.parallelism.tensorParallel == 1) "
            "&& (!has(self.parallelism.pipelineParallel) || self.parallelism.pipelineParallel == 1) "
            "&& (!has(self.parallelism.sequenceParallel) || !self.parallelism.sequenceParallel) "
            "&& (!has(self.parallelism.sequenceParallelSize) || self.parallelism.sequenceParallelSize == 1))",
            message="objective dpo trains with ddp, fsdp or a zero stage (no tensorParallel or pipelineParallel "
            "above 1), without sequence parallelism",
            check=lambda s: (
                s.training.objective != "dpo"
                or (
                    s.parallelism.strategy not in MEGATRON
                    and (s.parallelism.tensor_parallel or 1) == 1
                    and (s.parallelism.pipeline_parallel or 1) == 1
                    and not s.parallelism.sequence_parallel
                    and (s.parallelism.sequence_parallel_size or 1) == 1
                )
            ),
            field=".parallelism",
        ),
    )


class Progress(KubeModel):
    """What rank 0 of the trainer reports."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    percent: int | None = Field(default=None, ge=0, le=100, description="step / totalSteps in percent.")
    epoch: float | None = Field(default=None, ge=0, description="Passes over the data so far.")
    loss: float | None = Field(default=None, description="Training loss of the last step (mean over ranks).")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Training tokens per second, all ranks.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds until the last step.")
    updated_at: str | None = Field(
        default=None, description="When the operator last read it.", json_schema_extra={"format": "date-time"}
    )


class FineTuneArtifact(ArtifactStatus):
    """The exported model and its training metrics."""

    metrics: dict[str, Annotated[float, Field(description="A metric's value.")]] = Field(
        default_factory=dict, description="Final metrics: train_loss, first_loss, steps, tokens_per_second, ..."
    )


class FineTuneJobStatus(CommonStatus):
    """What the operator observed: plan, progress and the exported artifact."""

    phase: FineTunePhase | None = Field(
        default=None, description="Pending, Waiting (for its inputs or GPUs), Running, Succeeded or Failed."
    )
    plan: dict[str, Any] | None = Field(
        default=None,
        description="The planner's decision (see `kubeforge plan -o json`).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    progress: Progress | None = Field(default=None, description="Training progress while it runs.")
    artifact: FineTuneArtifact | None = Field(default=None, description="The exported model, once succeeded.")
    start_time: str | None = Field(
        default=None, description="When the training pods started.", json_schema_extra={"format": "date-time"}
    )
    completion_time: str | None = Field(
        default=None, description="When it succeeded or failed.", json_schema_extra={"format": "date-time"}
    )


class FineTuneJob(KubeModel):
    """Train a base model on a dataset (full, LoRA or QLoRA) on the GPUs the planner picks, and export it."""

    api_version: Literal["kubeforge.io/v1alpha1"] = "kubeforge.io/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
