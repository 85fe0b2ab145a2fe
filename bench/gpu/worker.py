"""One benchmark case in its own process (so that its CUDA peaks are its own), or the GPU probe.

    python bench/gpu/worker.py SPEC.json RESULT.json     (run.py writes SPEC and reads RESULT)
    python bench/gpu/worker.py --probe RESULT.json        (the GPU's name, memory, capability)

As train.run does: engines.check, return_freed_memory, the device, the seeds, a process group
for DeepSpeed, then engines.build(Setup(...)). Then WARMUP steps and STEPS timed steps of one
synthetic micro-batch each (random ids, labels = ids, full attention mask; CPU tensors, as the
training loop hands them over). The peak counters are reset after the warm-up, so the timed
peaks are the steady state; the peak of building + warm-up is kept too. RESULT.json is
rewritten at every stage, so a process that dies still says how far it got.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def probe(result_path: Path) -> int:
    import torch

    info: dict = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        info.update(
            name=torch.cuda.get_device_name(0),
            count=torch.cuda.device_count(),
            total_memory=total,
            free_memory=free,
            capability=list(torch.cuda.get_device_capability(0)),
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    _write(result_path, info)
    return 0


def run_case(spec_path: Path, result_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    result: dict = {"stage": "import", "pid": os.getpid()}
    _write(result_path, result)
    import torch

    sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT)]
    cuda = torch.cuda.is_available()
    mem = _Memory(cuda)
    try:
        from kubeforge.runtime import engines
        from kubeforge.runtime.contract import STRATEGIES, parse
        from kubeforge.runtime.engines import Dist, Setup
        from kubeforge.runtime.train import _init_process_group

        contract = parse(spec["contract"], "bench spec")
        result["stage"] = "check"
        engines.check(contract, cuda=cuda)
        engines.common.return_freed_memory()
        dist = Dist(rank=0, world=1, local_rank=0)
        on_gpu = contract.compute.device == "cuda"  # cpu: only for smoke-testing this script
        if on_gpu:
            torch.cuda.set_device(0)
        device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        mem = _Memory(on_gpu)
        seed = contract.training.seed
        random.seed(seed)
        torch.manual_seed(seed)
        if STRATEGIES[contract.parallel.strategy].engine in ("deepspeed", "megatron"):
            _init_process_group(dist, device)  # as train.run: DeepSpeed wants a process group even alone
        mem.synchronize()
        mem.reset_peak_memory_stats()
        result["allocated_before_build"] = mem.memory_allocated()

        result["stage"] = "build"
        _write(result_path, result)
        started = time.perf_counter()
        engine = engines.build(Setup(contract, dist, device, Path(spec["model_dir"]), spec["warmup"] + spec["steps"]))
        mem.synchronize()
        result["build_seconds"] = round(time.perf_counter() - started, 2)
        result["engine"] = engine.describe()
        result["allocated_after_build"] = mem.memory_allocated()
        result["peak_allocated_build"] = mem.max_memory_allocated()
        result["trainable_parameters"] = sum(
            getattr(p, "ds_numel", None) or p.numel() for p in engine.model.parameters() if p.requires_grad
        )

        t = contract.training
        seq = contract.dataset.max_seq_length
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, spec["vocab_size"], (t.micro_batch_size, seq), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        micro_batches = [batch] * t.gradient_accumulation_steps
        tokens_per_step = t.micro_batch_size * seq * t.gradient_accumulation_steps
        engine.model.train()

        result["stage"] = "warmup"
        _write(result_path, result)
        losses = []
        started = time.perf_counter()
        for _ in range(spec["warmup"]):
            losses.append(engine.train_step(micro_batches))
        mem.synchronize()
        result["warmup_seconds"] = round(time.perf_counter() - started, 2)
        result["peak_allocated_build_and_warmup"] = mem.max_memory_allocated()
        result["peak_reserved_build_and_warmup"] = mem.max_memory_reserved()

        result["stage"] = "timed"
        _write(result_path, result)
        gc.collect()
        mem.reset_peak_memory_stats()
        times = []
        for _ in range(spec["steps"]):
            started = time.perf_counter()
            losses.append(engine.train_step(micro_batches))
            mem.synchronize()
            times.append(time.perf_counter() - started)
        peak_allocated = mem.max_memory_allocated()
        peak_reserved = mem.max_memory_reserved()
        gc.collect()
        free, total = mem.mem_get_info()
        reserved_now = mem.memory_reserved()
        stats = mem.memory_stats()
        result.update(
            stage="done",
            ok=True,
            tokens_per_step=tokens_per_step,
            step_seconds=times,
            step_seconds_median=statistics.median(times),
            tokens_per_second=tokens_per_step * len(times) / sum(times),
            peak_allocated=peak_allocated,
            peak_reserved=peak_reserved,
            # what the weights, gradients and optimizer states hold between steps (no batch, no graph)
            allocated_between_steps=mem.memory_allocated(),
            # CUDA context, cuBLAS/cuDNN workspaces, NCCL: device memory the caching allocator does not count
            outside_allocator=(total - free) - reserved_now,
            device_total=total,
            alloc_retries=stats.get("num_alloc_retries", 0),
            losses=[round(x, 4) for x in losses],
        )
        result["device_peak"] = peak_reserved + result["outside_allocator"]
    except BaseException as err:  # record every failure (OOM, import, check) and exit non-zero
        oom = isinstance(err, torch.OutOfMemoryError)
        result.update(
            ok=False,
            error_type="oom" if oom else type(err).__name__,
            error=(str(err).strip().splitlines() or [repr(err)])[0][:2000],
            traceback=traceback.format_exc()[-6000:],
        )
        if mem.cuda:
            result["peak_allocated_at_failure"] = mem.max_memory_allocated()
            result["peak_reserved_at_failure"] = mem.max_memory_reserved()
        _write(result_path, result)
        return 2
    finally:
        try:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
        except Exception:
            pass
    _write(result_path, result)
    return 0


class _Memory:
    """torch.cuda's counters, or zeros on CPU (a smoke test of the flow measures nothing)."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda = cuda
        self.torch = torch

    def __getattr__(self, name: str):
        if self.cuda:
            return getattr(self.torch.cuda, name)
        if name == "mem_get_info":
            return lambda: (0, 0)
        if name == "memory_stats":
            return dict
        return lambda: 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--probe":
        return probe(Path(argv[1]))
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 64
    return run_case(Path(argv[0]), Path(argv[1]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
