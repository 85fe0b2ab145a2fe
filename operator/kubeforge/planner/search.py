"""Plan search: enumerate layouts, keep those that fit, pick by estimated step time.

For every pool the spec allows (gpuType, nodeSelector), every GPU count up to maxGPUs
(1, 2, 4... GPUs of one node, then 1, 2, 4... whole nodes, and the pool's maximum), every
strategy (only the one the spec names, if any), Megatron TP x PP where TP is a power of
two inside one NVLink domain dividing the KV heads and PP divides the layers, every
micro-batch that divides the global batch exactly, with and without gradient
checkpointing: compute the memory (memory.py) and keep what fits under UTILISATION of
the GPU's memory (and of host memory when offloading).

Choose by estimated step time (cost.py), adding GPUs only while they pay: walking up the
GPU counts, a larger gang replaces the current choice only if it is more than TIE faster
and runs at MIN_SCALING parallel efficiency or better relative to it (shared GPUs are
not wasted for a few percent); ties go to the simplest strategy. Megatron is chosen only
when it beats the best Hugging Face-native strategy by MEGATRON_MARGIN, since it
converts the weights into and out of its own format; on each GPU count, a Ulysses layout
only where no native layout without it fits or it beats the fastest such layout by
ULYSSES_MARGIN (a few more GPUs without Ulysses can be far slower than one node with it).
Explicit spec.parallelism values are honoured or the plan is infeasible with the reason;
nothing is silently changed.

Cost (issue 11: one plan in a few ms on a 4-pool cluster). Candidates that differ only in micro-batch
and checkpointing form a Group; what does not depend on those two (model states, the memory and
step-time terms, the Layout) is computed once per group, and what does not depend on the pool either
(a Shape) once per plan. A candidate is two float formulas (memory.MemoryModel.total, and
cost.StepModel.seconds when it fits); its Layout, Memory and StepTime objects are built only for the
few that explain() and build() read, and candidates that do not fit stay plain tuples unless nothing
fits. With one pipeline stage memory only grows with the micro-batch, so once a micro-batch does not
fit without checkpointing, the larger ones are not computed. A Shape's memory totals are kept for the
other pools (pools of equal GPU counts ask the same ones). Offloading strategies are searched only when
no layout without offload fits in time (choose() would never pick one otherwise), which halves the
candidates of a typical plan; the decision sentences then compare layouts without offloading and say
so. The plans are the same as computing every candidate in full (tests/planner/test_plan_stable.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from kubeforge.api.finetune import FineTuneJobSpec
from kubeforge.inventory.pools import Inventory, Pool
from kubeforge.planner import explain
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.cost import (
    JobTerms,
    StepModel,
    StepShape,
    StepTime,
    job_terms,
    reference_pass_seconds,
    total_steps,
)
from kubeforge.planner.memory import (
    FULL,
    NONE,
    SELECTIVE,
    Activations,
    Layout,
    Memory,
    MemoryModel,
    activation_regime,
    checkpointing_fields,
    layout_like,
    loss_chunk,
    model_states,
    trainable_parameters,
)
from kubeforge.planner.plan import Alternative, MemoryPerGPU, Plan
from kubeforge.runtime.contract import ENGINE_PRECISIONS, unsupported_checkpointing, unsupported_master_weights
from kubeforge.runtime.contract import STRATEGIES as FACTS

UTILISATION = 0.90  # of GPU memory a plan may fill
HOST_UTILISATION = 0.80  # of node memory offloading may fill
TIE = 0.05  # step times within 5% count as equal
MIN_SCALING = 0.6  # more GPUs only when they run at >= 60% scaling efficiency
MEGATRON_MARGIN = 0.15  # Megatron converts weights in and out of its format: only when clearly faster
ULYSSES_MARGIN = 0.15  # Ulysses splits every sequence over a node's GPUs (all-to-alls each layer): only where needed
# simplest first; offload last, optimizer before parameters (contract.STRATEGIES says what each is)
STRATEGIES = (
    "ddp",
    "zero1",
    "zero2",
    "fsdp",
    "zero3",
    "megatron",
    "zero2-offload-optimizer",
    "zero3-offload-optimizer",
    "megatron-offload-optimizer",
    "fsdp-offload",
    "zero3-offload",
)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_MAX_HOURS = 168.0  # a week: longer estimates are infeasible unless resources.maxHours says otherwise


class Shape:
    """What a group's candidates share whatever the pool: the Layout (at the group's first micro-batch),
    the model states and memory terms, and the step-time terms that do not depend on the pool. Built once
    per plan for pools with the same choices."""

    __slots__ = (
        "_step",
        "arch",
        "engine",
        "global_batch",
        "host_per_node",
        "job",
        "layout",
        "memory",
        "offload",
        "rank",
        "ulysses",
        "world",
    )  # fmt: skip

    def __init__(
        self, arch: Architecture, global_batch: int, job: JobTerms, layout: Layout, memory: MemoryModel
    ) -> None:
        facts = FACTS[layout.strategy]
        self.arch, self.global_batch, self.job, self.layout, self.memory = arch, global_batch, job, layout, memory
        self.rank = STRATEGIES.index(layout.strategy)  # simplest first: ties in step time go to the lower
        self.engine, self.offload = facts.engine, facts.offload
        self.world, self.ulysses = layout.world, layout.ulysses
        self.host_per_node = int(memory.states.host_per_node)
        self._step: StepShape | None = None

    @property
    def step(self) -> StepShape:
        if self._step is None:
            self._step = StepShape(self.arch, self.layout, self.job)
        return self._step


class Group:
    """The candidates that differ only in micro-batch and gradient checkpointing: one pool and one Shape
    (GPU count, strategy, parallel degrees, precision)."""

    __slots__ = (
        "_step",
        "engine",
        "host_per_node",
        "layout",
        "memory",
        "offload",
        "pool",
        "rank",
        "shape",
        "ulysses",
        "world",
    )  # fmt: skip

    def __init__(self, pool: Pool, shape: Shape) -> None:
        self.pool, self.shape, self.layout, self.memory = pool, shape, shape.layout, shape.memory
        self.rank, self.engine, self.offload = shape.rank, shape.engine, shape.offload
        self.world, self.ulysses, self.host_per_node = shape.world, shape.ulysses, shape.host_per_node
        self._step: StepModel | None = None

    @property
    def step(self) -> StepModel:
        if self._step is None:
            shape = self.shape
            self._step = StepModel(shape.arch, shape.layout, self.pool, shape.global_batch, shape.job, shape.step)
        return self._step


class Candidate:
    """One layout on one pool: its group, micro-batch, checkpointing and accumulation, its memory total and
    (when it fits) its estimated seconds per step. The Layout, the Memory breakdown and the StepTime are
    built on first use: the search needs only the totals of most candidates."""

    __slots__ = (
        "_layout",
        "_memory",
        "_time",
        "fits",
        "gradient_accumulation",
        "gradient_checkpointing",
        "group",
        "memory_total",
        "micro_batch",
        "seconds",
    )  # fmt: skip

    def __init__(
        self, group: Group, micro_batch: int, checkpointing: int, accumulation: int, total: int | None,
        fits: bool, seconds: float,
    ) -> None:  # fmt: skip
        """``checkpointing``: memory.NONE, FULL or SELECTIVE (a bool reads as NONE or FULL)."""
        self.group = group
        self.micro_batch, self.gradient_checkpointing, self.gradient_accumulation = (
            micro_batch,
            checkpointing,
            accumulation,
        )
        # total: None where the search knew without computing it that the candidate does not fit
        self.memory_total, self.fits, self.seconds = total, fits, seconds  # seconds: 0.0 when it does not fit
        self._layout: Layout | None = None
        self._memory: Memory | None = None
        self._time: StepTime | None = None

    @property
    def pool(self) -> Pool:
        return self.group.pool

    @property
    def world(self) -> int:
        return self.group.world

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = layout_like(
                self.group.layout,
                micro_batch=self.micro_batch,
                gradient_accumulation=self.gradient_accumulation,
                **checkpointing_fields(self.gradient_checkpointing),
            )
        return self._layout

    @property
    def memory(self) -> Memory:
        if self._memory is None:
            self._memory = self.group.memory.at(
                self.micro_batch, self.gradient_checkpointing, self.gradient_accumulation
            )
        return self._memory

    @property
    def time(self) -> StepTime:
        """Estimated only for candidates that fit (a zero StepTime otherwise)."""
        if self._time is None:
            if self.fits:
                step = self.group.step
                self._time = StepTime(
                    *step.terms(self.micro_batch, self.gradient_checkpointing, self.gradient_accumulation)
                )
            else:
                self._time = NO_TIME
        return self._time

    @property
    def pressure(self) -> float:
        """How far over (>1) or under (<1) its limits the candidate is."""
        pool = self.group.pool
        if self.memory_total is None:
            self.memory_total = self.memory.total
        gpu = self.memory_total / max(1, UTILISATION * pool.memory_bytes)
        host = self.group.host_per_node / max(1, HOST_UTILISATION * pool.host_memory_bytes)
        return max(gpu, host)


Unfit = tuple  # (group, micro-batch, checkpointing, accumulation, memory total or None): a Candidate that does not fit


@dataclass(frozen=True)
class Request:
    """What the spec asks, resolved to plain values."""

    method: str
    seq_len: int
    global_batch: int
    strategy: str
    tensor_parallel: int | None
    pipeline_parallel: int | None
    sequence_parallel: bool | None
    sequence_parallel_size: int | None
    objective: str
    precision: str
    master_weights: str
    checkpointing: str  # auto (the planner's choice of none, selective or full) | full | selective
    max_gpus: int | None
    max_hours: float | None
    gpu_type: str
    node_selector: tuple[tuple[str, str], ...]
    lora_rank: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    epochs: float | None
    max_steps: int | None
    examples: int | None

    @classmethod
    def from_spec(cls, spec: FineTuneJobSpec) -> Request:
        lora = spec.lora
        par = spec.parallelism
        return cls(
            method=spec.method,
            seq_len=spec.dataset.max_seq_length,
            global_batch=spec.training.global_batch_size,
            strategy=par.strategy,
            tensor_parallel=par.tensor_parallel,
            pipeline_parallel=par.pipeline_parallel,
            sequence_parallel=par.sequence_parallel,
            sequence_parallel_size=par.sequence_parallel_size,
            objective=spec.training.objective,
            precision=par.precision,
            master_weights=par.master_weights,
            checkpointing=par.activation_checkpointing,
            max_gpus=spec.resources.max_gpus,
            max_hours=spec.resources.max_hours,
            gpu_type=spec.resources.gpu_type,
            node_selector=tuple(sorted(spec.resources.node_selector.items())),
            lora_rank=lora.rank if lora else 16,
            lora_targets=tuple(lora.target_modules) if lora else ("all-linear",),
            lora_dropout=lora.dropout if lora else 0.05,
            epochs=spec.training.epochs,
            max_steps=spec.training.max_steps,
            examples=spec.dataset.num_examples,
        )


def plan(spec: FineTuneJobSpec, inventory: Inventory, arch: Architecture, *, alternatives: bool = True) -> Plan:
    return plan_request(Request.from_spec(spec), inventory, arch, alternatives=alternatives)


def plan_request(req: Request, inventory: Inventory, arch: Architecture, *, alternatives: bool = True) -> Plan:
    pools, pool_notes = allowed_pools(req, inventory)
    trainable = trainable_parameters(arch, _layout_for_counting(req))
    notes = [explain.model_sentence(req, arch, trainable), *explain.inventory_notes(inventory), *pool_notes]
    if not pools:
        reason = explain.no_pool_reason(req, inventory)
        alts = _alternatives(req, inventory, arch) if alternatives else ()
        return Plan(False, reason, tuple(notes), alts)
    shared: dict = {}
    tried = strategies(req)
    in_memory = tuple(s for s in tried if FACTS[s].offload == "none")
    # never offload when a layout without it fits (choose): offloading strategies are searched only when
    # no in-memory layout fits in time, and then the whole search runs again in its own order
    for phase in (in_memory, tried) if 0 < len(in_memory) < len(tried) else (tried,):
        fitting, unfit, rejections = search_pools(req, pools, arch, phase, shared)
        in_time = _in_time(req, arch, fitting)
        if in_time:
            break
    if not fitting:
        candidates = unfit_candidates(unfit)  # every candidate, in search order
        reason = explain.infeasible_reason(req, arch, pools, candidates, rejections)
        alts = _alternatives(req, inventory, arch) if alternatives else ()
        details = explain.infeasible_details(req, arch, candidates, rejections)
        return Plan(False, reason, tuple(notes + details), alts)
    if not in_time:
        reason = explain.too_slow_reason(req, arch, fitting, run_hours(req, arch, min(fitting, key=_wall)))
        alts = _alternatives(req, inventory, arch) if alternatives else ()
        return Plan(False, reason, tuple(notes), alts)
    best = choose(in_time)
    return build(req, arch, best, in_time, notes)


def search_pools(
    req: Request, pools: list[Pool], arch: Architecture, tried: tuple[str, ...], shared: dict
) -> tuple[list[Candidate], list[Unfit], list[str]]:
    """(fitting, unfit, rejections) of the ``tried`` strategies on every pool, in search order."""
    fitting: list[Candidate] = []
    unfit: list[Unfit] = []
    rejections: list[str] = []
    for pool in pools:
        precision, why = choose_precision(req, pool)
        if precision is None:
            rejections.append(why)
            continue
        enumerate_candidates(req, pool, arch, precision, rejections, fitting, unfit, shared, tried)
    return fitting, unfit, rejections


def _in_time(req: Request, arch: Architecture, fitting: list[Candidate]) -> list[Candidate]:
    """The candidates whose whole run fits in resources.maxHours (default DEFAULT_MAX_HOURS)."""
    limit = req.max_hours or DEFAULT_MAX_HOURS
    steps = total_steps(req.epochs, req.max_steps, req.examples, req.global_batch)
    if steps is None:
        return fitting
    if req.objective != "dpo":  # within_time, whose reference pass is 0 s without DPO
        return [c for c in fitting if c.seconds * steps / 3600 <= limit]
    return [c for c in fitting if within_time(req, arch, c)]


def run_hours(req: Request, arch: Architecture, c: Candidate) -> float | None:
    """Estimated wall-clock hours of the whole run (None when the number of steps is unknown)."""
    steps = total_steps(req.epochs, req.max_steps, req.examples, req.global_batch)
    if steps is None:
        return None
    per_epoch = total_steps(1.0, None, req.examples, req.global_batch)
    return (c.time.total * steps + reference_pass_seconds(arch, c.layout, c.time, per_epoch)) / 3600


def within_time(req: Request, arch: Architecture, c: Candidate) -> bool:
    hours = run_hours(req, arch, c)
    return hours is None or hours <= (req.max_hours or DEFAULT_MAX_HOURS)


def _wall(c: Candidate) -> float:
    return c.seconds


def allowed_pools(req: Request, inventory: Inventory) -> tuple[list[Pool], list[str]]:
    notes: list[str] = []
    pools = list(inventory.pools)
    if req.gpu_type.lower() != "auto":
        wanted = req.gpu_type.lower().replace("nvidia-", "").replace("_", "-")
        pools = [p for p in pools if _matches_gpu_type(p, wanted)]
    if req.node_selector:
        pools = [p for p in pools if p.matches(dict(req.node_selector))]
    return pools, notes


def _matches_gpu_type(pool: Pool, wanted: str) -> bool:
    names = {pool.gpu.name.lower(), pool.gpu.family.lower()} | {
        v.lower().replace("nvidia-", "") for _, v in pool.selector
    }
    return wanted in names or any(n.startswith(wanted) for n in names)


def choose_precision(req: Request, pool: Pool) -> tuple[str | None, str]:
    gpu = pool.gpu
    cc = ".".join(map(str, gpu.compute_capability))
    if req.precision == "fp8":
        if gpu.supports_fp8:
            return "fp8", ""
        return None, f"{gpu.name}: fp8 needs compute capability >= 8.9 with fp8 tensor cores; it has {cc}"
    if req.precision == "bf16":
        if gpu.supports_bf16:
            return "bf16", ""
        return None, f"{gpu.name}: bf16 needs compute capability >= 8.0; it has {cc} (use fp16 or auto)"
    if req.precision == "fp16":
        return "fp16", ""
    if req.master_weights == "bf16":  # pure bf16 trains in bf16 compute only (unsupported_master_weights)
        if gpu.supports_bf16:
            return "bf16", ""
        return None, f"{gpu.name}: masterWeights bf16 needs bf16, compute capability >= 8.0; it has {cc}"
    if gpu.supports_fp8 and req.method == "full":
        return "fp8", ""
    return ("bf16", "") if gpu.supports_bf16 else ("fp16", "")


def gpu_counts(pool: Pool, max_gpus: int | None) -> Iterator[tuple[int, int]]:
    """(nodes, GPUs per node): powers of two within a node, then powers of two of whole nodes."""
    cap = max_gpus or pool.total_gpus
    seen = set()
    per_node = sorted({g for g in _powers(pool.gpus_per_node)} | {pool.gpus_per_node})
    for g in per_node:
        if g <= cap:
            seen.add((1, g))
    for n in sorted(set(_powers(pool.nodes)) | {pool.nodes}):
        if n > 1 and n * pool.gpus_per_node <= cap:
            seen.add((n, pool.gpus_per_node))
    yield from sorted(seen, key=lambda ng: ng[0] * ng[1])


def _powers(limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


MASTER_WEIGHTS_FIELD = "spec.parallelism.masterWeights"
CHECKPOINTING_FIELD = "spec.parallelism.activationCheckpointing"


def strategies(req: Request) -> tuple[str, ...]:
    if req.strategy != "auto":
        return (req.strategy,)
    if (req.tensor_parallel or 1) > 1 or (req.pipeline_parallel or 1) > 1:
        return tuple(s for s in STRATEGIES if FACTS[s].engine == "megatron")

    def allowed(strategy: str) -> bool:
        if unsupported_master_weights(strategy, "bf16", req.master_weights):  # pure bf16: no fp32-master engines
            return False
        if unsupported_checkpointing(strategy, req.method, req.checkpointing):  # selective: no megatron-core
            return False
        if FACTS[strategy].engine == "megatron":  # full fine-tuning with the next-token loss, no Ulysses degree
            return req.method == "full" and req.objective == "sft" and (req.sequence_parallel_size or 1) == 1
        return True  # QLoRA shards its NF4 base under FSDP2 (torchao's NF4Tensor) and ZeRO-3 (quant storage)

    return tuple(s for s in STRATEGIES if allowed(s))


def ulysses_options(req: Request, pool: Pool, arch: Architecture, engine: str, per_node: int) -> list[int]:
    """Ulysses degrees to try: the spec's, else 1, and (sequenceParallel not false, sft) powers of two
    inside one node that divide the attention and KV heads. Megatron has its own sequence parallelism."""
    if engine == "megatron":
        return [1]
    heads = math.gcd(arch.num_attention_heads, arch.num_key_value_heads)
    if req.sequence_parallel_size:
        u = req.sequence_parallel_size
        return [u] if u == 1 or (heads % u == 0 and per_node % u == 0) else []
    if req.sequence_parallel is False or req.objective != "sft":
        return [1]
    more = [u for u in _powers(per_node) if u > 1 and heads % u == 0]
    return more if req.sequence_parallel else [1, *more]


def model_parallel_options(req: Request, pool: Pool, arch: Architecture, world: int) -> Iterator[tuple[int, int]]:
    tps = [req.tensor_parallel] if req.tensor_parallel else [t for t in _powers(pool.nvlink_domain)]
    pps = [req.pipeline_parallel] if req.pipeline_parallel else [p for p in range(1, 17) if arch.num_layers % p == 0]
    for t in tps:
        for p in pps:
            if t * p > world or world % (t * p):
                continue
            if t > pool.nvlink_domain or arch.num_key_value_heads % t or arch.num_attention_heads % t:
                continue
            if arch.num_layers % p:
                continue
            if t * p == 1 and not req.tensor_parallel and not req.pipeline_parallel:
                continue  # megatron without model parallelism is DDP with extra steps
            yield t, p


def enumerate_candidates(
    req: Request,
    pool: Pool,
    arch: Architecture,
    precision: str,
    rejections: list[str],
    fitting: list[Candidate],
    unfit: list[Unfit],
    shared: dict | None = None,
    tried: tuple[str, ...] | None = None,
) -> None:
    """Appends, in search order, the candidates that fit to ``fitting`` and the others to ``unfit`` (they
    only matter when nothing fits: see ``unfit_candidates``). ``shared``: what does not depend on the
    pool (each group's Layout and memory terms, the job's step-time terms), kept across the pools of one
    plan. ``tried``: the strategies to search (default: every one the request allows)."""
    shared = {} if shared is None else shared
    if tried is None:
        tried = strategies(req)
    global_batch = req.global_batch
    asked = {"full": (FULL,), "selective": (SELECTIVE,)}.get(req.checkpointing)
    # none first, then (full fine-tuning outside Megatron) selective, then full: a mode is tried only where the
    # ones before it do not fit (full can fit a larger micro-batch than selective: both compete)
    modes = {
        s: asked or ((NONE, FULL) if unsupported_checkpointing(s, req.method, "selective") else (NONE, SELECTIVE, FULL))
        for s in tried
    }
    gpu_limit = UTILISATION * pool.memory_bytes
    host_limit = HOST_UTILISATION * pool.host_memory_bytes
    for nodes, per_node in gpu_counts(pool, req.max_gpus):
        world = nodes * per_node
        for strategy in tried:
            engine = FACTS[strategy].engine
            layout_precision = engine_precision(req, strategy, precision)
            if layout_precision is None:
                rejections.append(
                    f"{strategy}: its engine ({engine}) cannot train in {precision}; it trains in "
                    + ", ".join(ENGINE_PRECISIONS[engine])
                )
                continue
            why = unsupported_master_weights(
                strategy, layout_precision, req.master_weights, MASTER_WEIGHTS_FIELD
            ) or unsupported_checkpointing(strategy, req.method, req.checkpointing, CHECKPOINTING_FIELD)
            if why:
                rejections.append(why)
                continue
            megatron = engine == "megatron"
            checkpointing_options = modes[strategy]
            layouts = [(1, 1)] if not megatron else list(model_parallel_options(req, pool, arch, world))
            if megatron and not layouts and (req.strategy != "auto" or req.tensor_parallel or req.pipeline_parallel):
                rejections.append(explain.no_model_parallel(req, pool, arch, world))
            for t, p in layouts:
                if megatron:
                    sp_options = [req.sequence_parallel] if req.sequence_parallel is not None else [t > 1]
                    if True in sp_options and t == 1:
                        rejections.append("sequenceParallel with a Megatron strategy needs tensorParallel > 1")
                        continue
                    splits = [(bool(sp), 1) for sp in sp_options]
                else:
                    options_key = ("ulysses", engine, per_node)  # what ulysses_options depends on
                    options = shared.get(options_key)
                    if options is None:
                        options = shared[options_key] = ulysses_options(req, pool, arch, engine, per_node)
                    if not options:
                        rejections.append(explain.no_ulysses(req, arch, per_node))
                        continue
                    splits = [(u > 1, u) for u in options]
                fit_without = False  # auto tries Ulysses only when nothing fits without it
                for sp, u in splits:
                    if u > 1 and fit_without and not (req.sequence_parallel or req.sequence_parallel_size):
                        continue
                    d = world // (t * p * u)
                    group: Group | None = None  # built at the first micro-batch that divides the batch
                    seconds_of = None  # its step model's seconds, built at its first candidate that fits
                    # with one pipeline stage memory only grows with the micro-batch: once a micro-batch
                    # does not fit without checkpointing, no larger one does (no need to compute it)
                    lean_cannot_fit = False
                    # one pipeline stage: per checkpointing choice only the largest micro-batch that fits can be
                    # chosen (cost.StepModel: the same compute, fewer launches and micro-steps, no bubble; never
                    # slower), so only its step time is computed (the smaller ones stay out of ``fitting``)
                    largest: dict[int, tuple[int, int, int]] = {}
                    for mb in MICRO_BATCHES:
                        chunk = mb * d
                        if global_batch % chunk:
                            continue
                        accumulation = global_batch // chunk
                        if group is None:
                            group = _group(req, pool, arch, shared, strategy, nodes, per_node, t, p, sp, u,
                                           layout_precision, mb, accumulation)  # fmt: skip
                            total_of = group.memory.total
                            host_ok = group.host_per_node <= host_limit
                        lean_fits = False  # memory grows with the micro-batch: stop at the first that cannot fit
                        for checkpointing in checkpointing_options:
                            if checkpointing and lean_fits:
                                break  # recomputing the forward pass only costs time when the layout fits without it
                            if lean_cannot_fit and not checkpointing:
                                unfit.append((group, mb, NONE, accumulation, None))
                                continue
                            total = total_of(mb, checkpointing, accumulation)
                            if total <= gpu_limit and host_ok:
                                lean_fits = True
                                fit_without = fit_without or u == 1
                                if p == 1:  # a larger micro-batch is never slower: keep the largest that fits
                                    largest[checkpointing] = (mb, accumulation, total)
                                    continue
                                if seconds_of is None:
                                    seconds_of = group.step.seconds
                                seconds = seconds_of(mb, checkpointing, accumulation)
                                fitting.append(Candidate(group, mb, checkpointing, accumulation, total, True, seconds))
                            else:
                                unfit.append((group, mb, checkpointing, accumulation, total))
                                lean_cannot_fit = lean_cannot_fit or (not checkpointing and p == 1)
                        if not lean_fits:
                            break
                    for checkpointing, (mb, accumulation, total) in sorted(largest.items()):
                        assert group is not None
                        seconds = group.step.seconds(mb, checkpointing, accumulation)
                        fitting.append(Candidate(group, mb, checkpointing, accumulation, total, True, seconds))


def _group(
    req: Request, pool: Pool, arch: Architecture, shared: dict, strategy: str, nodes: int, per_node: int, t: int,
    p: int, sp: bool, u: int, precision: str, micro_batch: int, accumulation: int,
) -> Group:  # fmt: skip
    """The group of these choices on ``pool``; its Shape is shared by the pools with the same choices."""
    key = (strategy, nodes, per_node, t, p, sp, u, precision)
    shape = shared.get(key)
    if shape is None:
        base = shared.get("layout")  # the job's fields, once per plan
        if base is None:
            base = shared["layout"] = Layout(
                method=req.method,
                strategy=strategy,
                nodes=nodes,
                gpus_per_node=per_node,
                seq_len=req.seq_len,
                lora_rank=req.lora_rank,
                lora_targets=req.lora_targets,
                lora_dropout=req.lora_dropout,
                objective=req.objective,
                master_weights=req.master_weights,
            )
        layout = layout_like(
            base,
            strategy=strategy,
            nodes=nodes,
            gpus_per_node=per_node,
            tensor_parallel=t,
            pipeline_parallel=p,
            sequence_parallel=sp,
            precision=precision,
            micro_batch=micro_batch,
            gradient_checkpointing=False,
            gradient_accumulation=accumulation,
            ulysses=u,
        )
        regime = activation_regime(strategy, req.method, precision)
        chunk = loss_chunk(arch, layout)
        acts_key = ("activations", t, p, sp, u, precision == "fp32", regime, chunk)  # shared by most strategies
        acts = shared.get(acts_key)
        if acts is None:
            acts = shared[acts_key] = Activations(arch, layout)
        job_key = ("job", chunk > 0)  # the chunked loss computes the head's forward twice
        job = shared.get(job_key)
        if job is None:
            job = shared[job_key] = job_terms(arch, layout, req.global_batch)
        # model states do not depend on the micro-batch or on checkpointing
        memory = MemoryModel(arch, layout, model_states(arch, layout), acts)
        shape = shared[key] = Shape(arch, req.global_batch, job, layout, memory)
    return Group(pool, shape)


def unfit_candidates(unfit: list[Unfit]) -> list[Candidate]:
    return [Candidate(group, mb, gc, accumulation, total, False, 0.0) for group, mb, gc, accumulation, total in unfit]


NO_TIME = StepTime(0.0, 0.0, 0.0, 0.0, 0.0)


def engine_precision(req: Request, strategy: str, precision: str) -> str | None:
    """The pool's precision where the strategy's engine trains in it; with precision auto, fp8 falls
    back to bf16 for engines without a float8 path (DeepSpeed); an explicit precision is never changed."""
    able = ENGINE_PRECISIONS[FACTS[strategy].engine]
    if precision in able:
        return precision
    if req.precision == "auto" and precision == "fp8" and "bf16" in able:
        return "bf16"
    return None


def choose(fitting: list[Candidate]) -> Candidate:
    in_memory = [c for c in fitting if c.group.offload == "none"]
    if in_memory:  # never offload when a layout without it fits
        fitting = in_memory
    elif any(c.group.offload == "optimizer" for c in fitting):  # optimizer before parameters
        fitting = [c for c in fitting if c.group.offload == "optimizer"]
    # Ulysses, per GPU count, only where no native layout without it fits or where it is faster than the
    # fastest of those by ULYSSES_MARGIN (a spec that asks for it has no such candidates); then it competes
    # with Megatron and across GPU counts on speed like any native layout
    if any(c.group.ulysses > 1 for c in fitting):
        plain = fastest_without_ulysses(fitting)
        fitting = [
            c
            for c in fitting
            if c.group.ulysses == 1 or c.seconds < plain.get(c.group.world, math.inf) * (1 - ULYSSES_MARGIN)
        ]
    native = [c for c in fitting if c.group.engine != "megatron"]
    if native and len(native) < len(fitting):
        best_native = min(c.seconds for c in native)
        best_megatron = min(c.seconds for c in fitting if c.group.engine == "megatron")
        if best_megatron > best_native * (1 - MEGATRON_MARGIN):
            fitting = native
    by_gpus: dict[int, Candidate] = {}  # per GPU count the fastest, then the simplest, then the first found
    for c in fitting:
        world = c.group.world
        best = by_gpus.get(world)
        if best is None or (c.seconds, c.group.rank) < (best.seconds, best.group.rank):
            by_gpus[world] = c
    chosen: Candidate | None = None
    for gpus in sorted(by_gpus):
        c = by_gpus[gpus]
        if chosen is None or (c.seconds < chosen.seconds * (1 - TIE) and scaling(chosen, c) >= MIN_SCALING):
            chosen = c
    assert chosen is not None
    return chosen


def fastest_without_ulysses(fitting: list[Candidate]) -> dict[int, float]:
    """Per GPU count, the seconds per step of the fastest native layout (DDP, FSDP2, ZeRO) without Ulysses."""
    plain: dict[int, float] = {}
    for c in fitting:
        if c.group.ulysses == 1 and c.group.engine != "megatron":
            plain[c.group.world] = min(c.seconds, plain.get(c.group.world, math.inf))
    return plain


def scaling(fewer: Candidate, more: Candidate) -> float:
    """Parallel efficiency of moving from ``fewer`` GPUs to ``more``: 1.0 is linear speed-up."""
    return (fewer.seconds * fewer.world) / (more.seconds * more.world)


def build(req: Request, arch: Architecture, best: Candidate, fitting: list[Candidate], notes: list[str]) -> Plan:
    layout, pool = best.layout, best.pool
    mem = best.memory
    steps = total_steps(req.epochs, req.max_steps, req.examples, req.global_batch)
    reasons = tuple(notes + explain.decisions(req, arch, best, fitting)[1:])  # decisions()[0] repeats the model
    return Plan(
        feasible=True,
        reason=explain.summary(arch, best),
        reasons=reasons,
        method=req.method,
        model_parameters=arch.total_parameters,
        trainable_parameters=trainable_parameters(arch, layout),
        num_layers=arch.num_layers,
        gpu_type=pool.gpu.name,
        pool=pool.name,
        compute_capability=pool.gpu.compute_capability,
        nvlink_domain=pool.nvlink_domain,
        node_selector=pool.selector,
        nodes=layout.nodes,
        gpus_per_node=layout.gpus_per_node,
        strategy=layout.strategy,
        tensor_parallel=layout.tensor_parallel,
        pipeline_parallel=layout.pipeline_parallel,
        sequence_parallel=layout.sequence_parallel,
        ulysses=layout.ulysses,
        objective=layout.objective,
        precision=layout.precision,
        master_weights=layout.master_weights,
        global_batch_size=req.global_batch,
        micro_batch_size=layout.micro_batch,
        gradient_accumulation_steps=layout.gradient_accumulation,
        gradient_checkpointing=layout.gradient_checkpointing,
        checkpointing_policy=layout.checkpointing_policy if layout.gradient_checkpointing else "",
        attention=attention_for(pool),
        sequence_length=req.seq_len,
        loss_chunk_tokens=loss_chunk(arch, layout),
        memory=MemoryPerGPU(
            mem.weights,
            mem.gradients,
            mem.optimizer,
            mem.activations,
            mem.overhead,
            int(pool.memory_bytes * UTILISATION),
            gathered=mem.gathered,
        ),
        host_memory_per_node=mem.host_per_node,
        host_memory_available=int(pool.host_memory_bytes * HOST_UTILISATION),
        node_cpus=pool.cpus_per_node,
        node_memory_bytes=pool.host_memory_bytes,
        estimated_step_seconds=best.time.total,
        total_steps=steps,
        reference_seconds=reference_pass_seconds(
            arch, layout, best.time, total_steps(1.0, None, req.examples, req.global_batch)
        ),
    )


def _layout_for_counting(req: Request) -> Layout:
    return Layout(req.method, "ddp", 1, 1, lora_rank=req.lora_rank, lora_targets=req.lora_targets)


def attention_for(pool: Pool) -> str:
    return "flash_attention_2" if pool.gpu.compute_capability >= (8, 0) else "sdpa"


def _alternatives(req: Request, inventory: Inventory, arch: Architecture) -> tuple[Alternative, ...]:
    """The nearest feasible changes: a lighter method, fp32 masters, no GPU cap, any pool, automatic parallelism."""
    tries: list[tuple[str, Request]] = []
    lighter = ("lora", "qlora") if req.method == "full" else ("qlora",) if req.method == "lora" else ()
    # selective checkpointing serves full fine-tuning only: a lighter method leaves it to the planner
    light = replace(req, checkpointing="auto") if req.checkpointing == "selective" else req
    for method in lighter:  # Megatron trains method full only: a lighter method leaves it
        if (
            (req.strategy in FACTS and FACTS[req.strategy].engine == "megatron")
            or req.tensor_parallel
            or req.pipeline_parallel
        ):
            alt = replace(light, method=method, strategy="auto", tensor_parallel=None, pipeline_parallel=None,
                          sequence_parallel=None, sequence_parallel_size=None)  # fmt: skip
            tries.append((f"method: {method}, parallelism: auto", alt))
        else:
            tries.append((f"method: {method}", replace(light, method=method)))
    if req.master_weights != "fp32":  # mixed precision may offload, and trains on GPUs without bf16
        tries.append(("parallelism.masterWeights: fp32", replace(req, master_weights="fp32")))
    if req.checkpointing != "auto":  # the planner's choice of none or full checkpointing
        tries.append(("parallelism.activationCheckpointing: auto", replace(req, checkpointing="auto")))
    if req.max_gpus is not None:
        tries.append(("remove resources.maxGPUs", replace(req, max_gpus=None)))
    if req.gpu_type.lower() != "auto" or req.node_selector:
        tries.append(("resources.gpuType: auto, no nodeSelector", replace(req, gpu_type="auto", node_selector=())))
    explicit = (
        req.strategy != "auto"
        or req.tensor_parallel
        or req.pipeline_parallel
        or req.sequence_parallel_size
        or req.precision != "auto"
    )
    if explicit:
        auto = replace(
            req,
            strategy="auto",
            tensor_parallel=None,
            pipeline_parallel=None,
            sequence_parallel=None,
            sequence_parallel_size=None,
        )
        tries.append(("parallelism: auto", replace(auto, precision="auto")))
    out = []
    for change, alt in tries:
        result = plan_request(alt, inventory, arch, alternatives=False)
        if result.feasible:
            out.append(
                Alternative(change, result.gpu_type, result.total_gpus, result.strategy, result.estimated_step_seconds)
            )
    return tuple(out)
