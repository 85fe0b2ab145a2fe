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
converts the weights into and out of its own format. Explicit spec.parallelism values
are honoured or the plan is infeasible with the reason; nothing is silently changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from kubeforge.api.finetune import FineTuneJobSpec
from kubeforge.inventory.pools import Inventory, Pool
from kubeforge.planner import explain
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.cost import StepTime, reference_pass_seconds, step_time, total_steps
from kubeforge.planner.memory import Layout, Memory, estimate, model_states, trainable_parameters
from kubeforge.planner.plan import Alternative, MemoryPerGPU, Plan
from kubeforge.runtime.contract import ENGINE_PRECISIONS
from kubeforge.runtime.contract import STRATEGIES as FACTS

UTILISATION = 0.90  # of GPU memory a plan may fill
HOST_UTILISATION = 0.80  # of node memory offloading may fill
TIE = 0.05  # step times within 5% count as equal
MIN_SCALING = 0.6  # more GPUs only when they run at >= 60% scaling efficiency
MEGATRON_MARGIN = 0.15  # Megatron converts weights in and out of its format: only when clearly faster
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
    "zero3-offload",
)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_MAX_HOURS = 168.0  # a week: longer estimates are infeasible unless resources.maxHours says otherwise


@dataclass(frozen=True)
class Candidate:
    pool: Pool
    layout: Layout
    memory: Memory
    time: StepTime  # estimated only for candidates that fit (a zero StepTime otherwise)
    fits: bool

    @property
    def pressure(self) -> float:
        """How far over (>1) or under (<1) its limits the candidate is."""
        gpu = self.memory.total / max(1, UTILISATION * self.pool.memory_bytes)
        host = self.memory.host_per_node / max(1, HOST_UTILISATION * self.pool.host_memory_bytes)
        return max(gpu, host)


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
    candidates: list[Candidate] = []
    rejections: list[str] = []
    for pool in pools:
        precision, why = choose_precision(req, pool)
        if precision is None:
            rejections.append(why)
            continue
        candidates.extend(enumerate_candidates(req, pool, arch, precision, rejections))
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        reason = explain.infeasible_reason(req, arch, pools, candidates, rejections)
        alts = _alternatives(req, inventory, arch) if alternatives else ()
        details = explain.infeasible_details(req, arch, candidates, rejections)
        return Plan(False, reason, tuple(notes + details), alts)
    in_time = [c for c in fitting if within_time(req, arch, c)]
    if not in_time:
        reason = explain.too_slow_reason(req, arch, fitting, run_hours(req, arch, min(fitting, key=_wall)))
        alts = _alternatives(req, inventory, arch) if alternatives else ()
        return Plan(False, reason, tuple(notes), alts)
    best = choose(in_time)
    return build(req, arch, best, in_time, notes)


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
    return c.time.total


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


def strategies(req: Request) -> tuple[str, ...]:
    if req.strategy != "auto":
        return (req.strategy,)
    if (req.tensor_parallel or 1) > 1 or (req.pipeline_parallel or 1) > 1:
        return tuple(s for s in STRATEGIES if FACTS[s].engine == "megatron")

    def allowed(strategy: str) -> bool:
        if FACTS[strategy].engine == "megatron":  # full fine-tuning with the next-token loss, no Ulysses degree
            return req.method == "full" and req.objective == "sft" and (req.sequence_parallel_size or 1) == 1
        return not (strategy == "fsdp" and req.method == "qlora")  # the runtime shards NF4 with ZeRO-3 only

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
    req: Request, pool: Pool, arch: Architecture, precision: str, rejections: list[str]
) -> Iterator[Candidate]:
    for nodes, per_node in gpu_counts(pool, req.max_gpus):
        world = nodes * per_node
        for strategy in strategies(req):
            engine = FACTS[strategy].engine
            layout_precision = engine_precision(req, strategy, precision)
            if layout_precision is None:
                rejections.append(
                    f"{strategy}: its engine ({engine}) cannot train in {precision}; it trains in "
                    + ", ".join(ENGINE_PRECISIONS[engine])
                )
                continue
            megatron = engine == "megatron"
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
                    options = ulysses_options(req, pool, arch, engine, per_node)
                    if not options:
                        rejections.append(explain.no_ulysses(req, arch, per_node))
                        continue
                    splits = [(u > 1, u) for u in options]
                fit_without = False  # auto tries Ulysses only when nothing fits without it
                for sp, u in splits:
                    if u > 1 and fit_without and not (req.sequence_parallel or req.sequence_parallel_size):
                        continue
                    d = world // (t * p * u)
                    states = None  # the same for every micro-batch and checkpointing choice
                    for mb in MICRO_BATCHES:
                        if req.global_batch % (mb * d):
                            continue
                        accumulation = req.global_batch // (mb * d)
                        lean_fits = False  # memory grows with the micro-batch: stop at the first that cannot fit
                        for checkpointing in (False, True):
                            if checkpointing and lean_fits:
                                break  # recomputing the forward pass only costs time when the layout fits without it
                            layout = Layout(
                                method=req.method,
                                strategy=strategy,
                                nodes=nodes,
                                gpus_per_node=per_node,
                                tensor_parallel=t,
                                pipeline_parallel=p,
                                sequence_parallel=sp,
                                precision=layout_precision,
                                micro_batch=mb,
                                seq_len=req.seq_len,
                                gradient_checkpointing=checkpointing,
                                gradient_accumulation=accumulation,
                                lora_rank=req.lora_rank,
                                lora_targets=req.lora_targets,
                                lora_dropout=req.lora_dropout,
                                ulysses=u,
                                objective=req.objective,
                            )
                            states = states or model_states(arch, layout)
                            memory = estimate(arch, layout, states)
                            ok = fits(pool, memory)
                            fit_without = fit_without or (ok and u == 1)
                            lean_fits = lean_fits or ok
                            time = step_time(arch, layout, pool, req.global_batch) if ok else NO_TIME
                            yield Candidate(pool, layout, memory, time, ok)
                        if not lean_fits:
                            break


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


def fits(pool: Pool, memory: Memory) -> bool:
    gpu_ok = memory.total <= UTILISATION * pool.memory_bytes
    host_ok = memory.host_per_node <= HOST_UTILISATION * pool.host_memory_bytes
    return gpu_ok and host_ok


def choose(fitting: list[Candidate]) -> Candidate:
    in_memory = [c for c in fitting if FACTS[c.layout.strategy].offload == "none"]
    if in_memory:  # never offload when a layout without it fits
        fitting = in_memory
    elif any(FACTS[c.layout.strategy].offload == "optimizer" for c in fitting):  # optimizer before parameters
        fitting = [c for c in fitting if FACTS[c.layout.strategy].offload == "optimizer"]
    # Ulysses only where the native engines' activations do not fit otherwise (a spec that asks for it
    # has no such candidates); then it competes with Megatron on speed like any native layout
    if any(c.layout.ulysses == 1 and FACTS[c.layout.strategy].engine != "megatron" for c in fitting):
        fitting = [c for c in fitting if c.layout.ulysses == 1]
    native = [c for c in fitting if FACTS[c.layout.strategy].engine != "megatron"]
    if native and len(native) < len(fitting):
        best_native = min(c.time.total for c in native)
        best_megatron = min(c.time.total for c in fitting if FACTS[c.layout.strategy].engine == "megatron")
        if best_megatron > best_native * (1 - MEGATRON_MARGIN):
            fitting = native
    by_gpus: dict[int, Candidate] = {}
    for c in sorted(fitting, key=lambda c: (c.time.total, STRATEGIES.index(c.layout.strategy))):
        by_gpus.setdefault(c.layout.world, c)
    chosen: Candidate | None = None
    for gpus in sorted(by_gpus):
        c = by_gpus[gpus]
        if chosen is None or (c.time.total < chosen.time.total * (1 - TIE) and scaling(chosen, c) >= MIN_SCALING):
            chosen = c
    assert chosen is not None
    return chosen


def scaling(fewer: Candidate, more: Candidate) -> float:
    """Parallel efficiency of moving from ``fewer`` GPUs to ``more``: 1.0 is linear speed-up."""
    return (fewer.time.total * fewer.layout.world) / (more.time.total * more.layout.world)


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
        global_batch_size=req.global_batch,
        micro_batch_size=layout.micro_batch,
        gradient_accumulation_steps=layout.gradient_accumulation,
        gradient_checkpointing=layout.gradient_checkpointing,
        attention=attention_for(pool),
        sequence_length=req.seq_len,
        memory=MemoryPerGPU(
            mem.weights,
            mem.gradients,
            mem.optimizer,
            mem.activations,
            mem.overhead,
            int(pool.memory_bytes * UTILISATION),
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
    """The nearest feasible changes: a lighter method, no GPU cap, any pool, automatic parallelism."""
    tries: list[tuple[str, Request]] = []
    lighter = ("lora", "qlora") if req.method == "full" else ("qlora",) if req.method == "lora" else ()
    for method in lighter:  # Megatron trains method full only: a lighter method leaves it
        if (
            (req.strategy in FACTS and FACTS[req.strategy].engine == "megatron")
            or req.tensor_parallel
            or req.pipeline_parallel
        ):
            alt = replace(req, method=method, strategy="auto", tensor_parallel=None, pipeline_parallel=None,
                          sequence_parallel=None, sequence_parallel_size=None)  # fmt: skip
            tries.append((f"method: {method}, parallelism: auto", alt))
        else:
            tries.append((f"method: {method}", replace(req, method=method)))
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
