"""Plain sentences for the planner's decisions: one per decision, with the numbers behind it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from kubeforge.inventory.pools import Inventory, Pool
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.cost import selective_recompute
from kubeforge.planner.memory import Layout, estimate
from kubeforge.runtime.contract import STRATEGIES

if TYPE_CHECKING:
    from kubeforge.planner.search import Candidate, Request

GIB = 1024**3
NAMES = {
    "ddp": "DDP",
    "zero1": "ZeRO-1",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "zero2-offload-optimizer": "ZeRO-2 with the optimizer offloaded to CPU",
    "zero3-offload-optimizer": "ZeRO-3 with the optimizer offloaded to CPU",
    "zero3-offload": "ZeRO-3 with parameters and optimizer offloaded to CPU",
    "fsdp": "FSDP",
    "fsdp-offload": "FSDP with parameters, gradients and optimizer offloaded to CPU",
    "megatron": "Megatron",
    "megatron-offload-optimizer": "Megatron with the optimizer offloaded to CPU",
}


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def inventory_notes(inventory: Inventory) -> list[str]:
    notes = []
    if inventory.excluded:
        listed = ", ".join(f"{name} ({why})" for name, why in inventory.excluded[:5])
        more = f" and {len(inventory.excluded) - 5} more" if len(inventory.excluded) > 5 else ""
        notes.append(f"{len(inventory.excluded)} node(s) do not count: {listed}{more}.")
    for pool in inventory.pools:
        if not pool.gpu.known:
            notes.append(
                f"GPU product {pool.gpu.name!r} is not in kubeforge's table: its memory comes from the node "
                f"label ({gib(pool.memory_bytes)}), bf16 is assumed only from its compute capability, fp8 "
                "never, and its throughput is guessed low."
            )
    return notes


def no_pool_reason(req: Request, inventory: Inventory) -> str:
    if not inventory.pools:
        return "the cluster has no schedulable GPU nodes"
    have = "; ".join(p.name for p in inventory.pools)
    asked = []
    if req.gpu_type.lower() != "auto":
        asked.append(f"gpuType {req.gpu_type!r}")
    if req.node_selector:
        asked.append("nodeSelector " + ", ".join(f"{k}={v}" for k, v in req.node_selector))
    return f"no GPU pool matches {' and '.join(asked)}; the cluster has: {have}"


def no_model_parallel(req: Request, pool: Pool, arch: Architecture, world: int) -> str:
    t, p = req.tensor_parallel, req.pipeline_parallel
    if t and t > pool.nvlink_domain:
        link = "no NVLink" if pool.nvlink_domain == 1 else f"NVLink domains of {pool.nvlink_domain} GPUs"
        return f"tensorParallel {t} exceeds one NVLink domain on {pool.gpu.name} ({link})"
    if t and (arch.num_key_value_heads % t or arch.num_attention_heads % t):
        return f"tensorParallel {t} does not divide the model's {arch.num_key_value_heads} key/value heads"
    if p and arch.num_layers % p:
        return f"pipelineParallel {p} does not divide the model's {arch.num_layers} layers"
    return f"no tensor x pipeline split fits {world} GPU(s) of {pool.gpu.name}"


def too_slow_reason(req: Request, arch: Architecture, fitting: list[Candidate], hours: float | None) -> str:
    """Every fitting layout takes longer than resources.maxHours (default a week)."""
    from kubeforge.planner.search import DEFAULT_MAX_HOURS

    fastest = min(fitting, key=lambda c: c.seconds)
    limit = req.max_hours or DEFAULT_MAX_HOURS
    source = "resources.maxHours" if req.max_hours else "the default limit (set resources.maxHours to allow more)"
    return (
        f"{req.method} fine-tuning of a {params(arch.total_parameters)}-parameter model fits, but the fastest layout "
        f"({summary(arch, fastest)}) is estimated at {hours or 0:.0f} hours ({(hours or 0) / 24:.1f} days), "
        f"over {limit:g} hours, {source}"
    )


def no_ulysses(req: Request, arch: Architecture, per_node: int) -> str:
    """Why no Ulysses degree works on nodes of ``per_node`` GPUs."""
    heads = f"{arch.num_attention_heads} attention and {arch.num_key_value_heads} key/value heads"
    if req.sequence_parallel_size:
        return (
            f"sequenceParallelSize {req.sequence_parallel_size} must divide the model's {heads} and the "
            f"{per_node} GPU(s) per node (a Ulysses group stays inside one node)"
        )
    return f"sequenceParallel: no Ulysses degree above 1 divides the model's {heads} and {per_node} GPU(s) per node"


def infeasible_reason(
    req: Request, arch: Architecture, pools: list[Pool], candidates: list[Candidate], rejections: list[str]
) -> str:
    what = f"{req.method} fine-tuning of a {params(arch.total_parameters)}-parameter model"
    if not candidates:
        why = "; ".join(dict.fromkeys(rejections)) or "no layout is possible"
        if req.global_batch and not rejections:
            why = f"globalBatchSize {req.global_batch} does not divide over the data-parallel sizes available"
        return f"{what} cannot be planned: {why}"
    closest = min(candidates, key=lambda c: c.pressure)
    layout, mem, pool = closest.layout, closest.memory, closest.pool
    gpus = f"{layout.world} x {pool.gpu.name}"
    gpu_pressure = mem.total / max(1.0, 0.9 * pool.memory_bytes)
    host_pressure = mem.host_per_node / max(1.0, 0.8 * pool.host_memory_bytes)
    if gpu_pressure > 1 and gpu_pressure >= host_pressure:  # name the limit that binds hardest
        binding = (
            f"even the leanest layout ({NAMES[layout.strategy]} over {gpus}, micro-batch {layout.micro_batch}, "
            f"gradient checkpointing {_checkpointing_word(layout)}) needs "
            f"{gib(mem.total)} per GPU (model states {gib(mem.model_states)}, activations {gib(mem.activations)}); "
            f"a {pool.gpu.name} offers {gib(0.9 * pool.memory_bytes)} of its {gib(pool.memory_bytes)}"
        )
    else:
        fits = "fits the GPUs but needs" if gpu_pressure <= 1 else f"needs {gib(mem.total)} per GPU and"
        binding = (
            f"{NAMES[layout.strategy]} over {gpus} {fits} {gib(mem.host_per_node)} of host "
            f"memory per node for offloading; the nodes offer {gib(0.8 * pool.host_memory_bytes)}"
        )
    limits = []
    if req.max_gpus is not None:
        limits.append(f"maxGPUs {req.max_gpus}")
    if req.strategy != "auto":
        limits.append(f"strategy {req.strategy} (as spec.parallelism.strategy asks)")
    extra = f" within {', '.join(limits)}" if limits else ""
    return f"{what} does not fit{extra}: {binding}"


def model_sentence(req: Request, arch: Architecture, trainable: int) -> str:
    return (
        f"Model: {params(arch.total_parameters)} parameters, {arch.num_layers} layers, hidden {arch.hidden_size} "
        f"({arch.source}); {req.method} trains {params(trainable)} of them."
        + (f" Its loss runs over the whole logits, not in chunks: {arch.own_loss}." if arch.own_loss else "")
    )


def infeasible_details(
    req: Request, arch: Architecture, candidates: list[Candidate], rejections: list[str]
) -> list[str]:
    """For each pool, the leanest layout tried and what it needed: where the search ran out."""
    out = []
    closest: dict[str, Candidate] = {}
    names: dict[int, str] = {}  # a pool's name, once per pool
    for c in candidates:
        pool = c.pool
        name = names.get(id(pool))
        if name is None:
            name = names[id(pool)] = pool.name
        if name not in closest or c.pressure < closest[name].pressure:
            closest[name] = c
    for name, c in closest.items():
        lay, mem = c.layout, c.memory
        host = f", host {gib(mem.host_per_node)} per node" if mem.host_per_node else ""
        out.append(
            f"Leanest layout on {name}: {NAMES[lay.strategy]} over {lay.world} GPU(s), micro-batch {lay.micro_batch}, "
            f"checkpointing {_checkpointing_word(lay)}: {gib(mem.total)} per GPU{host}."
        )
    out += [f"Ruled out: {r}." for r in dict.fromkeys(rejections)]
    return out


def summary(arch: Architecture, best: Candidate) -> str:
    lay = best.layout
    pure = "pure " if lay.master_weights == "bf16" else ""
    return (
        f"{NAMES[lay.strategy]}{f' with Ulysses x{lay.ulysses}' if lay.ulysses > 1 else ''} on {lay.world} x "
        f"{best.pool.gpu.name} ({lay.nodes} node(s)), {pure}{lay.precision}, "
        f"{gib(best.memory.total)} of {gib(best.pool.memory_bytes)} per GPU"
    )


def decisions(req: Request, arch: Architecture, best: Candidate, fitting: list[Candidate]) -> list[str]:
    lay, pool, mem = best.layout, best.pool, best.memory
    out = [model_sentence(req, arch, _trainable(arch, lay))]
    out.append(_pool_sentence(best, fitting))
    out.append(_gpus_sentence(best, fitting))
    out.append(_strategy_sentence(arch, best))
    out.append(_precision_sentence(req, pool, lay.precision))
    out.append(
        f"Global batch {req.global_batch} = micro-batch {lay.micro_batch} x gradient accumulation "
        f"{lay.gradient_accumulation} x data parallel {lay.data_parallel}."
    )
    out.append(_checkpointing_sentence(req, arch, best))
    if lay.ulysses > 1:
        out.append(_ulysses_sentence(arch, best, fitting))
    if lay.objective == "dpo":
        out.append(
            "DPO: each micro-batch element is a pair (chosen and rejected in one forward pass); the reference "
            "model is the starting model's log-probabilities, computed once before training (no second model)."
        )
    out.append(
        "Attention: flash_attention_2 (compute capability >= 8.0)."
        if pool.gpu.compute_capability >= (8, 0)
        else "Attention: sdpa (flash attention needs compute capability >= 8.0)."
    )
    out.append(
        f"Memory per GPU: weights {gib(mem.weights)}, gradients {gib(mem.gradients)}, optimizer "
        f"{gib(mem.optimizer)}, "
        + (f"gathered in flight {gib(mem.gathered)}, " if mem.gathered else "")
        + f"activations {gib(mem.activations)}, overhead {gib(mem.overhead)}; total "
        f"{gib(mem.total)} of {gib(0.9 * pool.memory_bytes)} usable (90% of {gib(pool.memory_bytes)})."
    )
    t = best.time
    out.append(
        f"Estimated {t.total:.2f} s per step: compute {t.compute:.2f} s, pipeline bubble {t.bubble:.2f} s, "
        f"data-parallel traffic {t.data_parallel:.2f} s, tensor-parallel traffic {t.tensor_parallel:.2f} s, "
        f"offload {t.offload:.2f} s, optimizer step {t.optimizer:.2f} s, latency {t.latency:.3f} s"
        + (f", Ulysses all-to-all {t.ulysses:.2f} s." if lay.ulysses > 1 else ".")
    )
    return out


def _ulysses_sentence(arch: Architecture, best: Candidate, fitting: list[Candidate]) -> str:
    """What Ulysses does here and why it was chosen (search.choose: no native layout without it fits this many
    GPUs, or it is faster than the fastest of them by ULYSSES_MARGIN)."""
    from kubeforge.planner.memory import activation_bytes

    lay = best.layout
    alone = activation_bytes(arch, replace(lay, ulysses=1, sequence_parallel=False))
    from kubeforge.planner.search import fastest_without_ulysses

    world = lay.world
    plain = fastest_without_ulysses(fitting).get(world)
    why = (
        f"the fastest layout without it on {world} GPUs takes {plain:.2f} s/step"
        if plain is not None
        else f"no layout without it runs on {world} GPUs"
    )
    return (
        f"Ulysses sequence parallelism of degree {lay.ulysses}: each GPU holds 1/{lay.ulysses} of every "
        f"{lay.seq_len}-token sequence and attends over all of it for {arch.num_attention_heads // lay.ulysses} "
        f"of the {arch.num_attention_heads} heads (without it the activations would need {gib(alone)} per GPU); "
        f"{why}."
    )


def _trainable(arch: Architecture, layout) -> int:
    from kubeforge.planner.memory import trainable_parameters

    return trainable_parameters(arch, layout)


def _pool_sentence(best: Candidate, fitting: Iterable[Candidate]) -> str:
    pool = best.pool
    link = (
        f"NVLink domain of {pool.nvlink_domain} GPUs"
        if pool.nvlink_domain > 1
        else "PCIe only (no NVLink between its GPUs)"
    )
    fastest: dict[int, float] = {}  # per other pool, in the order the pools first appear
    pools: list[Pool] = []
    for c in fitting:
        other = c.pool
        if other is not pool:
            seconds = fastest.get(id(other))
            if seconds is None:
                pools.append(other)
                fastest[id(other)] = c.seconds
            elif c.seconds < seconds:
                fastest[id(other)] = c.seconds
    others: dict[str, float] = {}  # by name: two pools may share one
    for other in pools:
        others[other.name] = min(others.get(other.name, float("inf")), fastest[id(other)])
    tail = ""
    if others:
        listed = ", ".join(f"{name} at {secs:.2f} s/step" for name, secs in sorted(others.items(), key=lambda x: x[1]))
        tail = f" Other pools that fit{_kept(best)}: {listed}."
    return f"Pool {pool.name}, {link}, chosen for the fastest estimated step.{tail}"


def _kept(best: Candidate) -> str:
    """What the compared layouts have in common: without offloading, the search compared only those
    (offloading is searched only when no layout without it fits)."""
    return " without offloading" if best.group.offload == "none" else ""


def _gpus_sentence(best: Candidate, fitting: list[Candidate]) -> str:
    from kubeforge.planner.search import MIN_SCALING, scaling

    lay = best.layout
    world = lay.world
    larger = [c for c in fitting if c.world > world]
    smaller = [c for c in fitting if c.world < world]
    parts = [f"{world} GPU(s)"]
    if smaller:
        slower = min(smaller, key=lambda c: c.seconds)
        parts.append(
            f"fewer ({slower.world}) would fit but take {slower.seconds:.2f} s/step instead of {best.seconds:.2f} s"
        )
    else:
        parts.append(f"the fewest that fit{_kept(best)}")
    if larger:
        faster = min(larger, key=lambda c: c.seconds)
        parts.append(
            f"{faster.world} would take {faster.seconds:.2f} s/step, {scaling(best, faster):.0%} scaling "
            f"efficiency (more GPUs need {MIN_SCALING:.0%} and a >5% gain)"
        )
    return ": ".join(parts[:2]) + ("; " + parts[2] if len(parts) > 2 else "") + "."


def _strategy_sentence(arch: Architecture, best: Candidate) -> str:
    lay, pool = best.layout, best.pool
    usable = 0.9 * pool.memory_bytes
    if lay.strategy == "ddp":
        if lay.world == 1:
            return "One GPU holds everything: no data parallelism or sharding needed."
        return (
            f"DDP: every GPU holds the full model states ({gib(best.memory.model_states)}), so nothing needs sharding."
        )
    ddp = estimate(arch, replace(lay, strategy="ddp", tensor_parallel=1, pipeline_parallel=1, sequence_parallel=False))
    simpler = (
        f"unsharded (DDP) the model states would need {gib(ddp.model_states)} per GPU and the total "
        f"{gib(ddp.total)}; a {pool.gpu.name} has {gib(usable)} usable"
    )
    if ddp.total <= usable:
        simpler = f"DDP would also fit ({gib(ddp.total)} per GPU) but is estimated slower here"
    if STRATEGIES[lay.strategy].engine == "megatron":
        return (
            f"Megatron TP {lay.tensor_parallel} x PP {lay.pipeline_parallel} x DP {lay.data_parallel}: {simpler}; "
            f"TP {lay.tensor_parallel} stays inside one NVLink domain of {pool.nvlink_domain} GPUs and PP "
            f"{lay.pipeline_parallel} divides the {arch.num_layers} layers."
        )
    extra = ""
    facts = STRATEGIES[lay.strategy]
    if facts.offload != "none":
        extra = f"; offloading needs {gib(best.memory.host_per_node)} of host memory per node"
    sharded = next((s for s, f in STRATEGIES.items() if f.offload == "none" and (f.engine, f.zero_stage) ==
                    (facts.engine, facts.zero_stage)), None)  # fmt: skip
    if facts.offload == "parameters" and sharded is not None:  # the binding constraint: sharding alone is too big
        kept = estimate(arch, replace(lay, strategy=sharded))
        extra += f"; without offloading, {NAMES[sharded]} would need {gib(kept.total)} per GPU"
    return f"{NAMES[lay.strategy]}: {simpler}{extra}."


def _precision_sentence(req: Request, pool: Pool, precision: str) -> str:
    cc = ".".join(map(str, pool.gpu.compute_capability))
    if req.master_weights == "bf16":
        return (
            f"Pure bf16, as spec.parallelism.masterWeights asks ({pool.gpu.name}: compute capability {cc}): the "
            "trained weights, their gradients and AdamW's moments in bf16, 8 bytes per trained parameter instead of "
            "16; an update smaller than 1/256 of a weight is lost."
        )
    if req.precision != "auto":
        return f"Precision {precision}, as spec.parallelism.precision asks ({pool.gpu.name}: compute capability {cc})."
    if precision == "fp8":
        return f"Precision fp8: {pool.gpu.name} (compute capability {cc}) has fp8 tensor cores; about 1.3x over bf16."
    if precision == "bf16":
        why = "fp8 is used for full fine-tuning only" if pool.gpu.supports_fp8 else "fp8 needs compute capability 8.9"
        return f"Precision bf16: {pool.gpu.name} has compute capability {cc}; {why}."
    return f"Precision fp16: {pool.gpu.name} (compute capability {cc}) has no bf16."


def _checkpointing_sentence(req: Request, arch: Architecture, best: Candidate) -> str:
    lay = best.layout
    if req.checkpointing != "auto":
        without = estimate(arch, replace(lay, gradient_checkpointing=False))
        what = (
            "each layer keeps its input, the attention kernel's output and every second matmul's, and recomputes "
            "the rest"
            if lay.checkpointing_policy == "selective"
            else "each layer keeps only its input and runs its forward pass again in the backward pass"
        )
        return (
            f"Gradient checkpointing {lay.checkpointing_policy}, as spec.parallelism.activationCheckpointing asks: "
            f"{what}; activations {gib(best.memory.activations)} (without checkpointing "
            f"{gib(without.activations)})."
        )
    if lay.gradient_checkpointing:
        without = estimate(arch, replace(lay, gradient_checkpointing=False))
        sentence = (
            f"Gradient checkpointing {_checkpointing_word(lay)}: without it activations would need "
            f"{gib(without.activations)} (total {gib(without.total)}), more than fits"
        )
        if lay.checkpointing_policy == "selective":
            share = selective_recompute(arch) / arch.active_parameters
            sentence += (
                f"; selective keeps each layer's input, the attention kernel's output and every second matmul's "
                f"({gib(best.memory.activations)}) and runs {share:.0%} of the forward matmul work again, where full "
                "checkpointing runs all of it"
            )
        return sentence + "."
    return f"Gradient checkpointing off: activations fit ({gib(best.memory.activations)})."


def _checkpointing_word(layout: Layout) -> str:
    if not layout.gradient_checkpointing:
        return "off"
    return "selective" if layout.checkpointing_policy == "selective" else "on"
