"""Planning time against cluster size: it must scale with pools, not nodes.

Generates inventories of 10, 100, 1,000 and 10,000 GPU nodes spread over a fixed set of
pool types (H100 x8, A100-80GB x8, L40S x4, A10G x1, plus CPU nodes), then times, in one
run: reading the nodes into pools (linear in nodes, once per inventory change) and
planning one job against the pools (what every reconcile pays). Prints per-size times
and the ratio to the 10-node case.

Then the figure issue 11 asks for (one plan in at most 5 ms p50 on a 4-pool inventory): the
example Qwen3-8B LoRA job planned --plans times against the 100-node inventory (4 pools) in
this process after --warmup plans, with p50/p90 of the wall time per plan, the same of the
process's CPU time (less moved by other processes on a shared machine), and the load average.

    python bench/plan_scale.py [--repeat 5] [--plans 1000] [--warmup 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT)]

import yaml  # noqa: E402

from kubeforge.api import parse  # noqa: E402
from kubeforge.inventory.pools import pools_from_nodes  # noqa: E402
from kubeforge.planner import plan, resolve  # noqa: E402
from tests.planner.nodes import gfd_node  # noqa: E402

TYPES = [("NVIDIA-H100-80GB-HBM3", 8), ("NVIDIA-A100-SXM4-80GB", 8), ("NVIDIA-L40S", 4), ("NVIDIA-A10G", 1)]


def nodes(n: int) -> list[dict]:
    out = []
    for i in range(n):
        product, gpus = TYPES[i % len(TYPES)]
        node = gfd_node(f"node-{i}", product, gpus, cordoned=(i % 97 == 0))
        out.append(node)
    return out


def timed(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def per_plan(fn, plans: int, warmup: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of each of ``plans`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(plans):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return wall, cpu


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--plans", type=int, default=1000, help="timed plans on the 4-pool inventory")
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    job = parse(yaml.safe_load((ROOT / "examples" / "finetunejob-qwen3-8b-lora.yaml").read_text())).spec
    arch = resolve(job.model)
    rows = []
    for n in (10, 100, 1000, 10000):
        cluster = nodes(n)
        inventory = pools_from_nodes(cluster)
        t_pools = timed(lambda c=cluster: pools_from_nodes(c), args.repeat)
        t_plan = timed(lambda inv=inventory: plan(job, inv, arch), args.repeat)
        rows.append((n, len(inventory.pools), t_pools, t_plan))
    base_pools, base_plan = rows[0][2], rows[0][3]
    print(f"{'nodes':>7} {'pools':>6} {'nodes->pools ms':>16} {'x10-node':>9} {'plan ms':>9} {'x10-node':>9}")
    for n, pools, t_pools, t_plan in rows:
        print(
            f"{n:>7} {pools:>6} {t_pools * 1e3:>16.2f} {t_pools / base_pools:>9.1f} "
            f"{t_plan * 1e3:>9.2f} {t_plan / base_plan:>9.2f}"
        )

    inventory = pools_from_nodes(nodes(100))
    load_before = os.getloadavg()
    wall, cpu = per_plan(lambda: plan(job, inventory, arch), args.plans, args.warmup)
    load_after = os.getloadavg()
    print(
        f"\none plan, {len(inventory.pools)} pools (100 nodes), {args.plans} plans after {args.warmup} warm-up, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} -> "
        f"{load_after[0]:.1f}"
    )
    for name, samples in (("wall", wall), ("cpu", cpu)):
        print(
            f"  {name:>4} ms per plan: p50 {statistics.median(samples) * 1e3:.2f}  p90 "
            f"{percentile(samples, 0.9) * 1e3:.2f}  min {min(samples) * 1e3:.2f}"
        )


if __name__ == "__main__":
    main()
