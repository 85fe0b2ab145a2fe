"""Plans for one machine (`kubeforge run`): its GPUs through the cluster planner, or its CPUs.

GPUs are read with nvidia-smi and described as one Node, so the very same search runs.
Without GPUs the plan is DDP over ``nproc`` CPU processes (gloo) in fp32, checked against
the machine's memory with the same memory model; an explicit spec.parallelism.strategy of
fsdp or a ZeRO stage is honoured, since FSDP2 and DeepSpeed run on CPUs too (offload and
Megatron need GPUs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from kubeforge.api.finetune import FineTuneJobSpec
from kubeforge.inventory.pools import pools_from_nodes
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.explain import NAMES
from kubeforge.planner.memory import Layout, estimate, loss_chunk, trainable_parameters
from kubeforge.planner.plan import MemoryPerGPU, Plan
from kubeforge.planner.search import MASTER_WEIGHTS_FIELD, Request
from kubeforge.planner.search import plan as cluster_plan
from kubeforge.runtime.contract import unsupported_master_weights

HOST_SHARE = 0.8  # of the machine's memory a local run may use
CPU_STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")  # engines that run on CPUs with gloo


def local_gpus() -> list[dict[str, str]]:
    """nvidia-smi's view of the local GPUs ([] without a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, memory, cc = (x.strip() for x in line.split(","))
        gpus.append({"name": name, "memory": memory, "cc": cc})
    return gpus


def local_node(gpus: list[dict[str, str]], host_memory: int, cpus: int) -> dict[str, Any]:
    major, _, minor = gpus[0]["cc"].partition(".")
    return {
        "metadata": {
            "name": "localhost",
            "labels": {
                "nvidia.com/gpu.product": gpus[0]["name"].replace(" ", "-"),
                "nvidia.com/gpu.memory": "".join(ch for ch in gpus[0]["memory"] if ch.isdigit()) or "0",
                "nvidia.com/gpu.count": str(len(gpus)),
                "nvidia.com/gpu.compute.major": major,
                "nvidia.com/gpu.compute.minor": minor or "0",
            },
        },
        "status": {"allocatable": {"nvidia.com/gpu": str(len(gpus)), "memory": str(host_memory), "cpu": str(cpus)}},
    }


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_local(spec: FineTuneJobSpec, arch: Architecture, *, nproc: int | None = None) -> tuple[Plan, str]:
    """(plan, device): cuda when nvidia-smi shows GPUs, else cpu."""
    memory, cpus = host_memory(), os.cpu_count() or 1
    gpus = local_gpus()
    if gpus:
        inventory = pools_from_nodes([local_node(gpus[: nproc or len(gpus)], memory, cpus)])
        return cluster_plan(spec, inventory, arch), "cuda"
    return plan_cpu(spec, arch, nproc=nproc or 1, host_memory_bytes=memory), "cpu"


def plan_cpu(spec: FineTuneJobSpec, arch: Architecture, *, nproc: int, host_memory_bytes: int) -> Plan:
    gbs = spec.training.global_batch_size
    asked = spec.parallelism.strategy
    if asked not in ("auto", *CPU_STRATEGIES):
        return Plan(False, f"strategy {asked} needs GPUs; on CPU kubeforge runs {', '.join(CPU_STRATEGIES)}")
    strategy = "ddp" if asked == "auto" else asked  # fsdp on one process shards over one: the same as ddp
    why = unsupported_master_weights(strategy, "fp32", spec.parallelism.master_weights, MASTER_WEIGHTS_FIELD)
    if why:
        return Plan(False, f"{why} (on CPU kubeforge trains in fp32)")
    if gbs % nproc:
        return Plan(False, f"globalBatchSize {gbs} does not divide over {nproc} processes")
    per_process = gbs // nproc
    available = int(host_memory_bytes * HOST_SHARE / nproc)
    req = Request.from_spec(spec)  # the LoRA defaults, resolved once, as the cluster search sees them
    best = None
    for mb in (8, 4, 2, 1):
        if per_process % mb:
            continue
        for checkpointing in (False, True) if req.checkpointing == "auto" else (True,):
            layout = Layout(
                method=spec.method,
                strategy=strategy,
                nodes=1,
                gpus_per_node=nproc,
                precision="fp32",
                micro_batch=mb,
                seq_len=spec.dataset.max_seq_length,
                gradient_checkpointing=checkpointing,
                checkpointing_policy="selective" if req.checkpointing == "selective" else "full",
                gradient_accumulation=per_process // mb,
                lora_rank=req.lora_rank,
                lora_targets=req.lora_targets,
                lora_dropout=req.lora_dropout,
                objective=req.objective,
            )
            mem = estimate(arch, layout)
            if mem.total - mem.overhead <= available:
                best = (layout, mem)
                break
        if best:
            break
    if best is None:
        return Plan(False, f"the model does not fit this machine's memory ({available / 1024**3:.1f} GiB per process)")
    layout, mem = best
    return Plan(
        feasible=True,
        reason=f"{NAMES[strategy]} over {nproc} CPU process(es), fp32",
        reasons=(
            f"No GPU found (nvidia-smi): {nproc} CPU process(es) with gloo, fp32, {NAMES[strategy]}"
            + (" (as spec.parallelism.strategy asks)." if asked != "auto" else "."),
            *(
                [
                    "QLoRA on CPU runs NF4 kernels on the CPU (bitsandbytes'; torchao's NF4Tensor under fsdp with "
                    "several processes): for experiments, far slower than a GPU."
                ]
                if spec.method == "qlora"
                else []
            ),
            f"Global batch {gbs} = micro-batch {layout.micro_batch} x gradient accumulation "
            f"{layout.gradient_accumulation} x data parallel {nproc}.",
        ),
        method=spec.method,
        model_parameters=arch.total_parameters,
        trainable_parameters=trainable_parameters(arch, layout),
        num_layers=arch.num_layers,
        gpu_type="cpu",
        pool="localhost (CPU)",
        nvlink_domain=1,
        nodes=1,
        gpus_per_node=nproc,
        strategy=strategy,
        precision="fp32",
        global_batch_size=gbs,
        micro_batch_size=layout.micro_batch,
        gradient_accumulation_steps=layout.gradient_accumulation,
        gradient_checkpointing=layout.gradient_checkpointing,
        checkpointing_policy=layout.checkpointing_policy if layout.gradient_checkpointing else "",
        attention="sdpa",
        sequence_length=spec.dataset.max_seq_length,
        objective=layout.objective,
        loss_chunk_tokens=loss_chunk(arch, layout),
        memory=MemoryPerGPU(mem.weights, mem.gradients, mem.optimizer, mem.activations, 0, available),
        estimated_step_seconds=0.0,
    )
