"""Malformed input against every command that reads a user's file: no traceback, no hang, named problems.

Builds N cases (default 10,000) by mutating the example jobs and cluster snapshots: values
swapped for wrong types, huge / negative / non-finite numbers, broken quantities, deep
nesting, deleted or unknown fields; and, on the YAML text, alias bombs, duplicate keys,
truncation, stray characters. Each case runs in-process through `kubeforge validate`
(the API check), `kubeforge plan` (cluster reading + planning) or `kubeforge render`,
in worker processes, each case under a wall-clock limit. Counts:

- cases, accepted (exit 0, or plan exit 1 = infeasible), rejected (exit 1/2 with a message)
- tracebacks (an exception escaped `main`, or "Traceback" printed): must be 0
- hangs (past --timeout) and dead workers: must be 0
- unnamed: a rejection line that names neither a field path nor a file line: must be 0
- p50 / p99 / max seconds per case

    python bench/fuzz_inputs.py [--cases 10000] [--workers 2] [--seed 1] [--timeout 10]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import multiprocessing
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT)]

import yaml  # noqa: E402

EXAMPLES = ROOT / "examples"
JOBS = sorted(EXAMPLES.glob("*.yaml"))
FINETUNES = sorted(EXAMPLES.glob("finetunejob-*.yaml"))
CLUSTERS = sorted((EXAMPLES / "clusters").glob("*.yaml"))


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


NASTY: list[Any] = [
    7, -1, 0, -8, 1, None, "", "abc", "8Gi ", " 8", "8 ", "1e400", "nan", "NaN", "inf", "-inf", "1e-400", ".",
    "..", "1..2", "0x10", "1_000", "\uff18", "8Gi\n", "-0", "+8", "99999999999999999999Ei", "1e18Ei", "1e308", "1Ki2",
    10**30, -(10**30), 10**400, 1e308, float("inf"), float("-inf"), float("nan"), True, False, 2.5, -0.5,
    [], {}, ["FineTuneJob"], {"a": 1}, [1, 2], "x" * 5000, _nested(120), "\x00", "💥", "a\nb", "-8", "0.5",
    "NVIDIA-H100-80GB-HBM3", "MIG", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "True", "p4d.24xlarge", "Node",
]  # fmt: skip

NODE_PATHS: list[tuple[Any, ...]] = [
    ("metadata",), ("metadata", "name"), ("metadata", "labels"), ("spec",), ("status",), ("kind",),
    ("metadata", "labels", "nvidia.com/gpu.product"), ("metadata", "labels", "nvidia.com/gpu.count"),
    ("metadata", "labels", "nvidia.com/gpu.memory"), ("metadata", "labels", "nvidia.com/gpu.compute.major"),
    ("metadata", "labels", "nvidia.com/gpu.clique"), ("metadata", "labels", "node.kubernetes.io/instance-type"),
    ("metadata", "labels", "cloud.google.com/gke-accelerator"),
    ("metadata", "labels", "cloud.google.com/gke-accelerator-count"),
    ("metadata", "labels", "karpenter.k8s.aws/instance-gpu-count"),
    ("status", "allocatable"), ("status", "allocatable", "nvidia.com/gpu"), ("status", "allocatable", "memory"),
    ("status", "allocatable", "cpu"), ("status", "capacity"), ("status", "capacity", "nvidia.com/gpu"),
    ("status", "capacity", "memory"), ("status", "conditions"), ("status", "conditions", 0),
    ("status", "conditions", -1, "status"), ("status", "conditions", -1, "type"), ("spec", "taints"),
    ("spec", "taints", 0), ("spec", "taints", 0, "key"), ("spec", "unschedulable"),
]  # fmt: skip

BOMB = "".join(
    f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
    for p, c in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)


# ---------------------------------------------------------------- mutations


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return doc
    try:
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass
    return doc


def mutate(doc: Any, rng: random.Random, targeted: list[tuple] | None = None) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.random()
        path = rng.choice(targeted) if targeted and op < 0.5 else rng.choice(_paths(doc))
        if op < 0.75:
            doc = _set(doc, path, copy.deepcopy(rng.choice(NASTY)))
        elif op < 0.85 and path:
            doc = _set(doc, path, None, delete=True)
        elif op < 0.95:
            doc = _set(doc, (*path, rng.choice(["extra", "Spec", "labels", "items"])), rng.choice(NASTY[:12]))
        else:
            doc = _set(doc, path, rng.choice(NASTY[40:50]))
    return doc


def mutate_text(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    op = rng.randrange(9)
    if op == 0:  # billion laughs at the top, referenced from a real field
        return BOMB + text.replace("name: ", "name: *i\n  old: ", 1) if rng.random() < 0.5 else BOMB + text
    if op == 1 and lines:  # a duplicate key
        i = rng.randrange(len(lines))
        return "".join([*lines[: i + 1], lines[i], *lines[i + 1 :]])
    if op == 2:
        return text[: rng.randrange(len(text) + 1)]
    if op == 3:
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice("[]{}:&*!|>-'\"\t\n#%@`,?") + text[i:]
    if op == 4:
        depth = rng.choice((50, 500, 5000, 50000))
        return "spec: " + "[" * depth + "]" * depth + "\n" + text
    if op == 5:
        depth = rng.choice((100, 2000))
        return "".join(" " * i + "a:\n" for i in range(depth)) + " " * depth + "b\n"
    if op == 6:  # merge-key bomb
        return BOMB + "m: &m {<<: [" + ", ".join(["{x: *i}"] * 3) + "]}\n" + text
    if op == 7:  # a tag the safe loader knows, with a value it cannot build
        bad = rng.choice(
            ["!!int 0xZZ", "!!float abc", "2024-13-45", "!!binary '%%%'", "!!python/name:os.system", "1" * 5000]
        )
        return text.replace("name: ", f"name: {bad}\n  other: ", 1)
    i = rng.randrange(len(text) + 1)
    return text[:i] + text[i + 1 :]


# ---------------------------------------------------------------- cases


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def make_case(seed: int, i: int) -> tuple[str, str, str | None]:
    """(command, job file text, cluster file text or None) for case i."""
    rng = random.Random(seed * 1_000_003 + i)
    kind = i % 10
    good_job = _load(rng.choice(FINETUNES))
    cluster = _load(rng.choice(CLUSTERS))
    if kind <= 2:  # API check of every kind
        doc = mutate(_load(rng.choice(JOBS)), rng)
        return "validate", yaml.safe_dump(doc, sort_keys=False), None
    if kind == 3:  # API check, text-level
        return "validate", mutate_text((rng.choice(JOBS)).read_text(), rng), None
    if kind <= 6:  # cluster reading + plan
        items = cluster["items"]
        j = rng.randrange(len(items))
        items[j] = mutate(items[j], rng, NODE_PATHS)
        if rng.random() < 0.15:
            cluster = mutate(cluster, rng)
        return "plan", yaml.safe_dump(good_job, sort_keys=False), yaml.safe_dump(cluster, sort_keys=False)
    if kind == 7:  # cluster text-level
        text = mutate_text(yaml.safe_dump(cluster, sort_keys=False), rng)
        return "plan", yaml.safe_dump(good_job, sort_keys=False), text
    command = "plan" if kind == 8 else "render"
    return command, yaml.safe_dump(mutate(good_job, rng), sort_keys=False), yaml.safe_dump(cluster, sort_keys=False)


# ---------------------------------------------------------------- running

FILE_LEVEL = (
    "no such file",
    "holds no YAML document",
    "expected exactly one FineTuneJob",
    "nothing to render, the plan is infeasible",
    "is larger than",
)
NAMED = re.compile(r"^(?:\S+|[^:\n]+): ")  # spec.lora.rank: ..., or a path holding a space
LINE = re.compile(r"\bline \d+")


class Hang(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise Hang


def unnamed(lines: list[str], files: list[str]) -> list[str]:
    """The stderr lines that name neither a field path nor a file line."""
    bad = []
    for line in lines:
        rest = next((line[len(f) :] for f in files if line.startswith(f)), None)
        if rest is None:
            bad.append(line)
            continue
        rest = re.sub(r"^(#\d+)?( \([^)]*\))?: ", "", rest)
        if NAMED.match(rest) or LINE.search(rest) or any(rest.startswith(m) for m in FILE_LEVEL):
            continue
        if rest.startswith(("must be a mapping (a Kubernetes object)", "expected a List of Nodes")):  # the document
            continue
        bad.append(line)
    return bad


def run_case(seed: int, i: int, workdir: Path, timeout: float) -> tuple[int, str, float, str]:
    """(i, outcome, seconds, detail); outcome: accepted | rejected | traceback | hang | unnamed."""
    from kubeforge.cli import main

    command, job_text, cluster_text = make_case(seed, i)
    job = workdir / "job.yaml"
    job.write_text(job_text, encoding="utf-8", errors="surrogatepass")
    argv = [command, str(job)]
    files = [str(job)]
    if cluster_text is not None:
        cluster = workdir / "cluster.yaml"
        cluster.write_text(cluster_text, encoding="utf-8", errors="surrogatepass")
        argv += ["--cluster", str(cluster), "--offline"]
        files.append(str(cluster))
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Hang:
        return i, "hang", time.perf_counter() - start, f"{command}: past {timeout} s"
    except BaseException as exc:  # counting them is the point
        tb = traceback.format_exc(limit=-3)
        return i, "traceback", time.perf_counter() - start, f"{command}: {type(exc).__name__}: {exc!s:.200}\n{tb}"
    seconds = time.perf_counter() - start
    stderr = err.getvalue()
    if "Traceback" in stderr:
        return i, "traceback", seconds, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code == 0 or (command == "plan" and code == 1 and not lines):
        return i, "accepted", seconds, command
    missing = unnamed(lines, files)
    if missing or not lines:
        return i, "unnamed", seconds, f"{command} exit {code}: {(missing or ['(no message)'])[0][:300]}"
    return i, "rejected", seconds, f"{command} exit {code}: {lines[0][:300]}"


def run_range(seed: int, start: int, stop: int, timeout: float) -> list[tuple[int, str, float, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        return [run_case(seed, i, Path(tmp), timeout) for i in range(start, stop)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--show", type=int, default=20, help="print this many distinct failures")
    parser.add_argument("--samples", type=int, default=0, help="print this many rejection messages, at random")
    args = parser.parse_args()

    results: list[tuple[int, str, float, str]] = []
    dead = 0
    chunks = [(s, min(s + args.chunk, args.cases)) for s in range(0, args.cases, args.chunk)]
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with this one
    pending = chunks
    while pending:
        retry = []
        with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_range, args.seed, a, b, args.timeout): (a, b) for a, b in pending}
            for future, (a, b) in futures.items():
                try:
                    results += future.result()
                except BrokenProcessPool:
                    retry.append((a, b))
        if retry and all(b - a == 1 for a, b in retry):
            dead += len(retry)
            results += [(a, "dead worker", 0.0, "the worker process died (a crash in C code?)") for a, _ in retry]
            retry = []
        pending = [(i, i + 1) for a, b in retry for i in range(a, b)]  # find the case that kills a worker
    wall = time.perf_counter() - started

    counts = Counter(outcome for _, outcome, _, _ in results)
    times = sorted(seconds for _, _, seconds, _ in results)
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    by_command = Counter(detail.split()[0].rstrip(":") for _, outcome, _, detail in results if outcome != "accepted")
    by_command.update(detail for _, outcome, _, detail in results if outcome == "accepted")
    print(f"cases {len(results)} ({', '.join(f'{k} {v}' for k, v in sorted(by_command.items()))}) in {wall:.0f} s")
    print(
        f"accepted {counts['accepted']}  rejected {counts['rejected']}  tracebacks {counts['traceback']}  "
        f"hangs {counts['hang']}  dead workers {dead}  unnamed {counts['unnamed']}"
    )
    print(f"seconds per case: p50 {p50:.4f}  p99 {p99:.4f}  max {times[-1]:.3f}")
    rejected = [detail for _, outcome, _, detail in results if outcome == "rejected"]
    for detail in random.Random(0).sample(rejected, min(args.samples, len(rejected))):
        print("  " + re.sub(r"/tmp/[^/]+/", "", detail))
    seen: set[str] = set()
    for i, outcome, _, detail in sorted(results):
        if outcome in ("accepted", "rejected"):
            continue
        key = outcome + detail.splitlines()[0][:80] if detail else outcome
        if key in seen or len(seen) >= args.show:
            continue
        seen.add(key)
        print(f"--- case {i}: {outcome}\n{detail}")


if __name__ == "__main__":
    main()
