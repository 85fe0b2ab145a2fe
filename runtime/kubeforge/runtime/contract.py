"""The contract between the operator and the pods it starts: the ONLY thing both sides share.

The operator renders a ``Contract`` into a ConfigMap; every pod mounts it at
``CONFIG_DIR/CONFIG_FILE`` and reads it with ``load``. Everything a pod needs to run
without asking the API server is in it. The names of environment variables, mount paths,
the progress endpoint, the exit codes and the termination-message format are constants
here and nowhere else.

Sub-configs are separate models so that each part of the runtime receives only what it
uses (``train`` gets ``TrainingConfig``, the exporter gets ``OutputConfig``...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONTRACT_VERSION = "kubeforge.io/contract/v1"

# ---------------------------------------------------------------- where things are in a pod
CONFIG_DIR = "/etc/kubeforge"
CONFIG_FILE = "contract.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
PVC_ROOT = "/mnt/pvc"  # each PersistentVolumeClaim a job names is mounted at PVC_ROOT/<claim>
CACHE_DIR = "/mnt/cache"  # an emptyDir: downloads (hf://, s3://) and s3:// output staging
SHM_DIR = "/dev/shm"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_MAX_BYTES = 4096

# ---------------------------------------------------------------- environment variables
ENV_CONFIG = "KUBEFORGE_CONFIG"  # path of the contract file
ENV_HF_TOKEN = "HF_TOKEN"
ENV_HF_HOME = "HF_HOME"
ENV_NODE_RANK = "JOB_COMPLETION_INDEX"  # set by the Job controller on Indexed Jobs
ENV_POD_NAME = "KUBEFORGE_POD_NAME"
ENV_POD_IP = "KUBEFORGE_POD_IP"
ENV_TRACKING = "KUBEFORGE_TRACKING"  # experiment tracking backends, comma-separated (runtime/tracking.py)
ENV_LOG_FORMAT = "KUBEFORGE_LOG_FORMAT"  # "json": one JSON object per log line (runtime/logs.py, the operator too)

# ---------------------------------------------------------------- rank 0's progress endpoint
PROGRESS_PORT = 8642
PROGRESS_PORT_NAME = "progress"
PROGRESS_PATH = "/progress"
RENDEZVOUS_PORT = 29500

# ---------------------------------------------------------------- exit codes
EXIT_OK = 0
EXIT_USER_ERROR = 3  # bad data or config: retrying cannot help, the Job fails at once
EXIT_INFRASTRUCTURE = 1  # anything else (OOM, NCCL, node loss): the gang may restart


class ContractError(ValueError):
    """The contract file is missing or invalid; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(_Model):
    """Where something is: the user's URI, and the path inside the pod when it is mounted."""

    uri: str
    local_path: str | None = None  # set when mounted (pvc://) or a local run's path
    revision: str | None = None


class JobIdentity(_Model):
    name: str
    namespace: str = "default"
    uid: str | None = None
    kind: Literal["FineTuneJob", "QuantizeJob", "ModelService"] = "FineTuneJob"


class DataConfig(_Model):
    location: Location
    format: Literal["messages", "alpaca", "text", "preference"] = "messages"
    max_seq_length: int = Field(default=2048, gt=0)
    packing: bool = True


class LoRAConfig(_Model):
    rank: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("all-linear",)


DPOLoss = Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard"]


class DPOConfig(_Model):
    """Direct Preference Optimization (Rafailov et al. 2023); loss names as TRL's DPOConfig.loss_type
    (and ms-swift, which passes them to TRL). The reference model is the starting model: its
    log-probabilities of every pair are computed once before the first step (kept with the checkpoints)."""

    beta: float = Field(default=0.1, gt=0)
    loss_type: DPOLoss = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)  # read by robust and exo_pair only (as TRL)


class TrainingConfig(_Model):
    method: Literal["full", "lora", "qlora"]
    objective: Literal["sft", "dpo"] = "sft"
    dpo: DPOConfig = Field(default_factory=DPOConfig)  # read when objective is dpo
    lora: LoRAConfig | None = None
    epochs: float | None = None
    max_steps: int | None = None
    learning_rate: float = Field(gt=0)
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    seed: int = 42
    checkpoint_every: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"


# ---------------------------------------------------------------- strategies and precision
# One table, read by the planner (what it may choose, what memory each layout takes) and by the
# runtime (which engine runs it): engine, ZeRO stage, and what lives in host memory.
Strategy = Literal[
    "ddp",
    "fsdp",
    "fsdp-offload",
    "zero1",
    "zero2",
    "zero2-offload-optimizer",
    "zero3",
    "zero3-offload-optimizer",
    "zero3-offload",
    "megatron",
    "megatron-offload-optimizer",
]
Precision = Literal["bf16", "fp16", "fp8", "fp32"]
Offload = Literal["none", "optimizer", "parameters"]  # "parameters": the optimizer too


@dataclass(frozen=True)
class StrategyFacts:
    engine: Literal["ddp", "fsdp", "deepspeed", "megatron"]
    zero_stage: int = 0  # DeepSpeed's stage; 0 for the other engines
    offload: Offload = "none"  # optimizer states (and master weights) or parameters too in host memory


STRATEGIES: dict[str, StrategyFacts] = {
    "ddp": StrategyFacts("ddp"),
    "fsdp": StrategyFacts("fsdp"),
    "fsdp-offload": StrategyFacts("fsdp", 0, "parameters"),  # FSDP2 CPUOffloadPolicy: shards, grads, AdamW on host
    "zero1": StrategyFacts("deepspeed", 1),
    "zero2": StrategyFacts("deepspeed", 2),
    "zero2-offload-optimizer": StrategyFacts("deepspeed", 2, "optimizer"),
    "zero3": StrategyFacts("deepspeed", 3),
    "zero3-offload-optimizer": StrategyFacts("deepspeed", 3, "optimizer"),
    "zero3-offload": StrategyFacts("deepspeed", 3, "parameters"),
    "megatron": StrategyFacts("megatron"),
    "megatron-offload-optimizer": StrategyFacts("megatron", 0, "optimizer"),
}
assert set(STRATEGIES) == set(get_args(Strategy))

# Which precisions each engine really trains in. fp8 = bf16 compute with float8 matmuls in the
# linear layers: torchao's Float8Linear (DDP, FSDP2 with float8 all-gather) or Transformer Engine
# (Megatron). DeepSpeed's engine has no float8 path, so a ZeRO plan never says fp8.
ENGINE_PRECISIONS: dict[str, tuple[str, ...]] = {
    "ddp": ("fp32", "bf16", "fp16", "fp8"),
    "fsdp": ("fp32", "bf16", "fp16", "fp8"),
    "deepspeed": ("fp32", "bf16", "fp16"),
    "megatron": ("bf16", "fp16", "fp8"),
}

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
NF4_BYTES = 0.5 + 0.127 / 8  # bitsandbytes NF4: 4-bit weights + double-quantized absmax constants (blocksize 64)


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtype each kind of tensor is kept in: one policy for every engine and for the planner.

    Mixed precision as in Micikevicius et al. 2018 ("Mixed Precision Training"): trainable weights,
    their gradients (as reduced and as the optimizer reads them) and Adam's two moments in fp32;
    matmuls and activations in ``compute``. Frozen weights (a LoRA base) stay in ``compute`` (QLoRA:
    NF4). Trainable LoRA adapters are fp32 like any trainable weight.

    Pure bf16 (``master_weights`` bf16, opt-in: torchtune's default ``dtype: bf16``): the trained
    weights, their gradients and Adam's moments in bf16, 8 bytes per trained parameter instead of 16.
    An AdamW update smaller than 2^-8 of a weight rounds away, so it is never the default.
    """

    compute: Literal["bf16", "fp16", "fp32"]
    float8: bool  # linear layers multiply in float8 (fp8 plans)
    frozen: Literal["bf16", "fp16", "fp32", "nf4"]
    master: str = "fp32"
    gradients: str = "fp32"
    optimizer: str = "fp32"  # each of Adam's two moments

    def bytes(self, kind: str) -> float:
        dtype = getattr(self, kind)
        return NF4_BYTES if dtype == "nf4" else BYTES[dtype]


@functools.cache
def precision_policy(precision: str, method: str, master_weights: str = "fp32") -> PrecisionPolicy:
    compute = "bf16" if precision == "fp8" else precision
    frozen = "nf4" if method == "qlora" else compute
    m = master_weights  # fp32, or bf16 for pure bf16 (unsupported_master_weights says where it runs)
    return PrecisionPolicy(compute, precision == "fp8", frozen, m, m, m)  # type: ignore[arg-type]


# Pure bf16 (master_weights bf16) runs where the engine steps bf16 weights with bf16 moments on the GPU:
# torch's AdamW under DDP and FSDP2, DeepSpeed ZeRO-1/2/3 with bf16_master_weights_and_grads and
# bf16_optimizer_states. Megatron's distributed optimizer and the offloading strategies (the host's Adam) keep
# fp32 masters. bf16 compute only: fp16 would need loss scaling, fp8's float8 matmuls are not verified on bf16
# weights, fp32 compute (a CPU) keeps fp32 weights.
MasterWeights = Literal["fp32", "bf16"]


def unsupported_master_weights(
    strategy: str, precision: str, master_weights: str, field: str = "compute.master_weights"
) -> str | None:
    """Why ``master_weights`` cannot train under this strategy and precision (one sentence naming ``field``,
    the spec's or the contract's), or None."""
    if master_weights == "fp32":
        return None
    facts = STRATEGIES[strategy]
    if precision != "bf16":
        return f"{field} {master_weights} (pure bf16) needs bf16 compute, not precision {precision}"
    if facts.engine == "megatron" or facts.offload != "none":
        return (
            f"{field} {master_weights} (pure bf16): strategy {strategy} keeps fp32 master weights "
            "(ddp, fsdp and zero1/2/3 train in pure bf16)"
        )
    return None


def unsupported_precision(strategy: str, precision: str) -> str | None:
    """Why an engine cannot train in ``precision`` (one sentence naming the fields), or None."""
    engine = STRATEGIES[strategy].engine
    if precision in ENGINE_PRECISIONS[engine]:
        return None
    able = ", ".join(ENGINE_PRECISIONS[engine])
    return f"compute.precision {precision}: strategy {strategy} ({engine}) cannot train in it; it trains in {able}"


# The loss in chunks of tokens (runtime/chunked_loss.py) instead of the model's whole logits: each chunk holds at
# most LOSS_CHUNK_ELEMENTS logits (2^25: 0.25 GiB of the fp32 logits and log-softmax it keeps at its peak), for SFT
# (Ulysses' sequence slices too) and DPO's log-probs, under every engine but megatron-core, which keeps its own
# vocab-parallel loss. Under DeepSpeed ZeRO-3 too: DeepSpeed gathers the head's weight for each call and partitions
# it again after, also around a chunk's recomputation (chunked_loss.py; tests/runtime/test_chunked_loss.py holds
# every gradient to the model's own loss's there).
LOSS_CHUNK_ELEMENTS = 2**25

# Selective activation checkpointing (runtime/selective.py) keeps every second matmul's output of a layer: the
# planner counts what that keeps of a trained layer's seven matmuls (memory.selective_outputs); an adapter adds two
# matmuls to each adapted module, and what the alternation then keeps is not counted, so it serves full
# fine-tuning only; megatron-core has its own recompute (full, per layer).
CheckpointingPolicy = Literal["full", "selective"]


def unsupported_checkpointing(strategy: str, method: str, policy: str, field: str = "compute.checkpointing_policy"):
    """Why ``policy`` cannot checkpoint this strategy and method (one sentence naming ``field``), or None."""
    if policy != "selective":
        return None
    if method != "full":
        return (
            f"{field} selective serves method full only: with {method} each adapter adds two matmuls to a layer, "
            "and what keeping every second matmul's output then holds is not what the planner counts"
        )
    if STRATEGIES[strategy].engine == "megatron":
        return f"{field} selective: strategy {strategy} (megatron-core) recomputes whole layers only"
    return None


# The CUDA caching allocator's setting in every training process (the pod's env, and train.main's default for
# local runs; a value the user sets wins): expandable segments grow one mapping instead of caching blocks of
# fixed sizes, so less memory sits reserved but unused. Published peaks of reserved over active bytes for the
# same runs, default -> expandable (Giles Thomas's fine-tuning sweeps, github.com/gpjt/fine-tune-2024-04 at
# 5a205a7: active_bytes.all.peak and reserved_bytes.all.peak per rank): Qwen1.5-0.5B full, 1 GPU, sequence
# 1-2048: 1.39 -> 1.19; Llama-3-8B full, ZeRO-3 on 8 GPUs: 1.27 -> 1.15; the same with checkpointing, batch
# 1-14: 1.38 -> 1.29; ZeRO-2 with the optimizer on the host: 1.24 -> 1.04. The planner's allocator term
# (memory.FRAGMENTATION) is measured under this setting.
CUDA_ALLOC_CONF = "expandable_segments:True"


def chunked_loss_runs(strategy: str) -> bool:
    """Whether the runtime computes the loss in chunks under ``strategy`` (the planner counts it so)."""
    return STRATEGIES[strategy].engine != "megatron"


# configuration keys of heads that scale or otherwise change the logits (Cohere, Granite, ...): the model's own
# loss knows what to do with them, the chunked loss does not
SCALED_HEADS = ("logit_scale", "logits_scaling", "output_logits_scale", "mup_width_scale")


def own_loss_reason(config: Mapping[str, Any]) -> str | None:
    """Why a model with this config.json keeps its own loss (its head scales the logits, or its loss adds the
    router's auxiliary loss), None where the chunked loss reproduces it: the runtime does not install the chunked
    loss on such a model, and the planner counts its whole logits (Architecture.own_loss)."""
    scaled = [k for k in SCALED_HEADS if config.get(k) not in (None, 1, 1.0)]
    if scaled:
        return f"it scales its logits ({', '.join(scaled)})"
    if config.get("output_router_logits"):
        return "it adds its router's auxiliary loss"
    return None


def loss_chunk_tokens(vocab_size: int, strategy: str) -> int:
    """Tokens per chunk of the chunked loss for a plan (a power of two), 0 where the model's own loss runs."""
    if not chunked_loss_runs(strategy):
        return 0
    return 1 << max(0, (LOSS_CHUNK_ELEMENTS // max(1, vocab_size)).bit_length() - 1)


class ParallelConfig(_Model):
    strategy: Strategy
    nodes: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(default=1, gt=0)
    tensor_parallel: int = Field(default=1, gt=0)
    pipeline_parallel: int = Field(default=1, gt=0)
    sequence_parallel: bool = False  # Megatron's: activations split along the sequence within a TP group
    ulysses: int = Field(default=1, gt=0)  # DeepSpeed-Ulysses degree (DDP, FSDP, ZeRO): consecutive ranks
    # split each sequence and exchange attention heads all-to-all; they read the same samples

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel * self.ulysses)


class ComputeConfig(_Model):
    device: Literal["cuda", "cpu"] = "cuda"
    precision: Precision = "bf16"
    master_weights: MasterWeights = "fp32"  # bf16: pure bf16 (precision_policy)
    gradient_checkpointing: bool = False
    checkpointing_policy: CheckpointingPolicy = "full"  # with gradient_checkpointing: selective.py
    attention: Literal["flash_attention_2", "sdpa", "eager"] = "sdpa"
    loss_chunk_tokens: int = Field(default=0, ge=0)  # the loss (SFT, DPO's log-probs) in chunks of this many tokens
    # (chunked_loss.py); 0: the model's own loss over its whole logits. The planner counts the same (loss_chunk_tokens).
    host_memory_bytes: int = Field(default=0, ge=0)  # what the plan offloads to host memory on each node
    peak_tflops: float | None = Field(default=None, gt=0)  # one device's dense peak at the compute precision
    # (the planner's GPU catalog), the denominator of MFU; None on CPU or an unknown GPU: no MFU is exported


class OutputConfig(_Model):
    location: Location
    merge: bool = True
    checkpoint_dir: str  # resumable checkpoints: on the output volume; for s3:// outputs a local copy of
    # <output>/checkpoints (checkpoint_store), so that a replaced pod resumes


class ProgressConfig(_Model):
    port: int = PROGRESS_PORT
    path: str = PROGRESS_PATH


class Contract(_Model):
    """Everything a training pod needs, as the operator (or `kubeforge run`) decided it."""

    version: Literal["kubeforge.io/contract/v1"] = CONTRACT_VERSION
    job: JobIdentity
    model: Location
    dataset: DataConfig
    training: TrainingConfig
    parallel: ParallelConfig
    compute: ComputeConfig
    output: OutputConfig
    progress: ProgressConfig = ProgressConfig()
    plan_summary: dict[str, Any] = Field(default_factory=dict)  # the planner's choices, for the artifact manifest

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


DataFormat = Literal["messages", "alpaca", "text"]
QuantizeMethod = Literal["fp8", "w4a16-gptq", "w4a16-awq", "w8a8-int8"]


class CalibrationConfig(_Model):
    location: Location
    format: DataFormat = "messages"
    samples: int = Field(default=256, gt=0)
    max_seq_length: int = Field(default=2048, gt=0)


class EvaluationConfig(_Model):
    metric: Literal["perplexity", "exact-match"] = "perplexity"
    location: Location
    format: DataFormat = "messages"
    samples: int = Field(default=128, gt=0)
    max_seq_length: int = Field(default=2048, gt=0)
    max_degradation: float = Field(ge=0, le=1)


class QuantizeOutputConfig(_Model):
    location: Location


class QuantizeContract(_Model):
    """Everything a quantization pod needs: the source artifact, the method, the data, the gate."""

    version: Literal["kubeforge.io/contract/v1"] = CONTRACT_VERSION
    job: JobIdentity
    source: Location
    method: QuantizeMethod
    calibration: CalibrationConfig | None = None
    evaluation: EvaluationConfig | None = None
    output: QuantizeOutputConfig
    compute: ComputeConfig = ComputeConfig()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def load_quantize(path: str | Path | None = None) -> QuantizeContract:
    return load(path, QuantizeContract)


def load(path: str | Path | None = None, kind: type[Any] = Contract) -> Any:
    """Read and validate the contract; ContractError names the file and every bad field."""
    path = Path(path or CONFIG_PATH)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ContractError(f"{path}: no contract file (is the ConfigMap mounted at {CONFIG_DIR}?)") from err
    except json.JSONDecodeError as err:
        raise ContractError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from err
    return parse(raw, str(path), kind)


def parse(raw: Any, source: str = "contract", kind: type[Any] = Contract) -> Any:
    if isinstance(raw, dict) and raw.get("version") not in (None, CONTRACT_VERSION):
        raise ContractError(f"{source}: contract version {raw.get('version')!r}; this runtime reads {CONTRACT_VERSION}")
    try:
        return kind.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False))
        raise ContractError(f"{source}: invalid contract: {problems}") from err


def termination_message(summary: dict[str, Any]) -> str:
    """The JSON a pod writes to TERMINATION_MESSAGE_PATH: at most 4 KiB, trimmed field by field."""
    text = json.dumps(summary, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES:
        return text
    trimmed = dict(summary)
    for key in sorted(trimmed, key=lambda k: len(json.dumps(trimmed[k])), reverse=True):
        if key in ("uri", "digest", "status"):
            continue
        trimmed.pop(key)
        trimmed["truncated"] = True
        text = json.dumps(trimmed, sort_keys=True, separators=(",", ":"))
        if len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES:
            return text
    return json.dumps({"status": summary.get("status", "unknown"), "truncated": True})


def read_termination_message(text: str | None) -> dict[str, Any] | None:
    """The operator's side: the summary a pod left, or None when there is none or it is not ours."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- a ModelService's LoRA adapters
# The operator writes the adapter list into a ConfigMap mounted at ADAPTERS_CONFIG_DIR (a whole-volume
# mount, no subPath: the kubelet updates it in place); the adapter sidecar (kubeforge.runtime.adapters)
# fetches each adapter into ADAPTERS_DIR and keeps the engine's loaded set equal to the list through the
# engine's runtime LoRA API, so a change of list restarts nothing. Before the engine starts, the sidecar
# writes ADAPTERS_RANK_FILE: the --max-lora-rank the engine starts with.
ADAPTERS_CONFIG_DIR = f"{CONFIG_DIR}/adapters"
ADAPTERS_CONFIG_FILE = "adapters.json"
ADAPTERS_DIR = "/mnt/adapters"
ADAPTERS_RANK_FILE = "max-lora-rank"
ADAPTERS_PORT = 8001  # the sidecar's /started (startup probe), /ready (readiness) and /status
ADAPTERS_PORT_NAME = "adapters"
ADAPTERS_STARTED_PATH = "/started"
ADAPTERS_READY_PATH = "/ready"
# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py MaxLoRARanks: the same set from 0.14
# to the current docs)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ServedAdapter(_Model):
    """One adapter the engine serves, under ``name`` (the model name clients ask for)."""

    name: str
    location: Location  # local_path set when mounted (pvc://); hf:// and s3:// are fetched by the sidecar
    digest: str | None = None  # a new digest (a FineTuneJob's new artifact) reloads the adapter


class AdapterSet(_Model):
    """The ConfigMap's ADAPTERS_CONFIG_FILE: every adapter the replicas serve now."""

    adapters: tuple[ServedAdapter, ...] = ()


def engine_lora_rank(engine: str, rank: int) -> int | None:
    """The --max-lora-rank an engine starts with to serve adapters up to ``rank``: vLLM's smallest allowed
    value that holds it (None above 512: vLLM cannot serve it), SGLang's next power of two (any value works;
    rounding keeps a slightly larger adapter from needing a restart), None for the transformers server
    (peft takes any rank)."""
    if engine == "vllm":
        return next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if engine == "sglang":
        return max(8, 1 << max(rank - 1, 0).bit_length())
    return None
