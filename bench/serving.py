"""Serving throughput on CPU: kubeforge's transformers server against `transformers serve`.

Writes a Llama-architecture model with random weights (~29M parameters: hidden 512, 8 layers,
8 heads, a word-level vocabulary of 8,000 words) into a temp folder, then, in one run, starts
each engine on it as its own process on a free loopback port and drives it with the official
`openai` client (AsyncOpenAI, non-streaming chat completions) at 1, 8 and 32 concurrent
clients. Each level sends the same fixed set of requests (same prompts, prompt length,
``max_tokens``, temperature 0 and a seed); every client sends its next request as soon as its
last one is answered (closed loop). Per engine and level: output tokens/s, requests/s and the
p50/p99 latency of a request, each engine's tokens/s as a ratio to kubeforge's at the same level,
and the server process's own CPU time per output token (steadier than wall time on a shared
machine). All servers are started first and stay up (an idle one uses no CPU; the report
checks); then each level is run engine after engine, the order rotated from level to level,
so that background load drifting over the run falls on every engine alike. Medians over
``--repeats``.

Engines:
- ``kubeforge``: ``python -m kubeforge.runtime.serve`` (runtime/kubeforge/runtime/serve.py).
- ``transformers``: ``transformers serve <folder>`` (transformers 5.x, FastAPI + uvicorn,
  sequential ``generate()`` on one inference thread).
- ``transformers-cb``: the same with ``--continuous-batching`` (paged attention, requests
  batched as they arrive).

Like for like: the model has no EOS in its generation config, so every request produces
exactly ``max_tokens`` tokens (the OpenAI API has no portable ``ignore_eos``; each reply's
``usage.completion_tokens`` is checked), and its tokenizer has no BOS, so both servers feed
the model the very same prompt tokens (kubeforge prepends BOS, `transformers serve` does not;
``usage.prompt_tokens`` is checked). Greedy answers are compared with kubeforge's, request by
request (``same_text``). Both servers run in float32 on the CPU with the same thread count.

`transformers serve` needs FastAPI and uvicorn, which kubeforge's .venv does not carry. They
go into a side venv that sees .venv's packages (torch, transformers) through a .pth file, so
.venv is untouched (made once, needs the package index; afterwards everything is offline):

    python3.11 -m venv ~/.cache/kubeforge/bench-hf-serve
    echo "$PWD/.venv/lib/python3.11/site-packages" \\
        > ~/.cache/kubeforge/bench-hf-serve/lib/python3.11/site-packages/kubeforge-venv.pth
    ~/.cache/kubeforge/bench-hf-serve/bin/pip install fastapi uvicorn

(``--make-hf-venv`` runs exactly that.) Servers run with HF_HUB_OFFLINE=1 and
HF_HUB_DISABLE_UPDATE_CHECK=1: no network.

    .venv/bin/python bench/serving.py [--requests 32] [--max-tokens 32] [--prompt-words 32]
        [--levels 1,8,32] [--repeats 1] [--threads 1] [--engines kubeforge,transformers,transformers-cb]
        [--out serving.json]

``--threads`` sets OMP_NUM_THREADS for every server (torch's intra-op threads), the same for all.
The default, 1, leaves the second of two cores to the load generator and the machine's other work;
on the 2 shared cores this was written on, 2 threads were not faster (kubeforge, 1 client, runs
alternated: 26 and 35 tokens/s with 2 threads, 25 and 42 with 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT)]

HF_VENV = Path.home() / ".cache" / "kubeforge" / "bench-hf-serve"
ENGINES = ("kubeforge", "transformers", "transformers-cb")
VOCAB = 8000
SEED = 1234


# ---------------------------------------------------------------------------- the model


def make_model(folder: Path, hidden: int, layers: int, heads: int) -> tuple[Path, int]:
    """A random Llama with the demo's word-level tokenizer; no EOS to stop on, no BOS. Returns (folder, params)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    from kubeforge.runtime.demo import tiny

    words = [f"w{i}" for i in range(VOCAB)]
    out = tiny.make_model(folder, words, hidden=hidden, layers=layers, heads=heads, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.bos_token = None  # both servers then tokenize the chat identically (kubeforge adds BOS when there is one)
    tokenizer.save_pretrained(out)
    config = LlamaConfig.from_pretrained(out)
    config.eos_token_id = None  # every request runs to max_tokens
    config.save_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)
    generation.eos_token_id = None
    generation.save_pretrained(out)
    with safe_open(out / "model.safetensors", framework="pt") as weights:
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    return out, params


def prompts(n: int, words: int) -> list[str]:
    rng = random.Random(SEED)
    return [" ".join(f"w{rng.randrange(VOCAB)}" for _ in range(words)) for _ in range(n)]


# ---------------------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(engine: str, model: Path, port: int, hf_python: Path) -> tuple[list[str], str]:
    """The server's command line and the model name its clients must send."""
    if engine == "kubeforge":
        return [
            sys.executable,
            "-m",
            "kubeforge.runtime.serve",
            "--model",
            str(model),
            "--served-model-name",
            "bench",
            "--port",
            str(port),
        ], "bench"
    cmd = [
        str(hf_python),
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--log-level",
        "error",
    ]
    if engine == "transformers-cb":
        cmd.append("--continuous-batching")
    return cmd, str(model)


@contextlib.contextmanager
def running(engine: str, model: Path, threads: int, hf_python: Path, logs: Path):
    port = free_port()
    cmd, name = command(engine, model, port, hf_python)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]),
    }
    log = logs / f"{engine}-{port}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=str(logs))
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{engine} exited with {proc.returncode}; its log, {log}:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > 300:
                raise RuntimeError(f"{engine} not healthy after 300 s; its log: {log}")
            time.sleep(0.5)
        yield f"{base}/v1", name, round(time.perf_counter() - started, 1), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- the load


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process and its threads so far (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def drive(base_url: str, name: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Send every prompt once, ``concurrency`` at a time (closed loop); latency, tokens and answers per request."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="unused",
        max_retries=0,
        timeout=900,
        http_client=httpx.AsyncClient(limits=limits, timeout=900),
    )
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(texts)):
        queue.put_nowait(i)
    results: list[dict | None] = [None] * len(texts)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            start = time.perf_counter()
            reply = await client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": texts[i]}],
                max_tokens=max_tokens,
                temperature=0,
                seed=SEED,
            )
            results[i] = {
                "latency": time.perf_counter() - start,
                "completion_tokens": reply.usage.completion_tokens,
                "prompt_tokens": reply.usage.prompt_tokens,
                "text": reply.choices[0].message.content,
            }

    start = time.perf_counter()
    async with client:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    latencies = [r["latency"] for r in done]
    tokens = sum(r["completion_tokens"] for r in done)
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(done) / wall, 3),
        "latency_p50_s": round(percentile(latencies, 0.50), 3),
        "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3),
        "short_replies": sum(r["completion_tokens"] != max_tokens for r in done),
        "prompt_tokens": sorted({r["prompt_tokens"] for r in done}),
        "texts": [r["text"] for r in results],
    }


def measure(engines: list[str], model: Path, args: argparse.Namespace, texts: list[str], logs: Path):
    """All servers up at once (an idle one costs memory, not CPU: checked, see idle_servers_cpu_s), then each
    level run engine after engine, the order rotated level by level, so that drifting background load on a
    shared machine falls on every engine alike. Returns (one dict per engine x level x repeat, startup times)."""
    with contextlib.ExitStack() as stack:
        servers, startup = {}, {}
        for engine in engines:
            base_url, name, startup[engine], pid = stack.enter_context(
                running(engine, model, args.threads, args.hf_python, logs)
            )
            servers[engine] = (base_url, name, pid)
            # warm up: one request alone, then one concurrent burst (CB sizes its cache, torch picks kernels)
            asyncio.run(drive(base_url, name, texts[:1], 1, args.max_tokens))
            asyncio.run(drive(base_url, name, texts[: max(args.levels)], max(args.levels), 4))
            print(f"  {engine}: healthy after {startup[engine]:.1f} s, warmed up", flush=True)
        results, turn = [], 0
        for r in range(args.repeats):
            for c in args.levels:
                order = engines[turn % len(engines) :] + engines[: turn % len(engines)]
                turn += 1
                for engine in order:
                    base_url, name, pid = servers[engine]
                    before = {e: cpu_seconds(p) for e, (_, _, p) in servers.items()}
                    level = asyncio.run(drive(base_url, name, texts, c, args.max_tokens))
                    after = {e: cpu_seconds(p) for e, (_, _, p) in servers.items()}
                    if None not in before.values():  # the servers' own CPU time: steadier than wall time here
                        level["server_cpu_s"] = round(after[engine] - before[engine], 2)
                        level["server_cpu_ms_per_token"] = round(
                            1000 * level["server_cpu_s"] / level["output_tokens"], 2
                        )
                        level["idle_servers_cpu_s"] = round(
                            sum(after[e] - before[e] for e in servers if e != engine), 2
                        )
                    print(
                        f"    {engine:16s} {c:3d} clients: {level['tokens_per_s']:8.1f} tokens/s  "
                        f"p50 {level['latency_p50_s']:7.2f} s  p99 {level['latency_p99_s']:7.2f} s  "
                        f"server CPU {level.get('server_cpu_ms_per_token', 0):5.1f} ms/token",
                        flush=True,
                    )
                    results.append({"engine": engine, "repeat": r + 1, **level})
    return results, startup


# ---------------------------------------------------------------------------- report


def summarise(runs: list[dict], engines: list[str], levels: list[int], reference: str) -> list[dict]:
    """Medians over repeats per engine and level, with ratios and answers compared to ``reference``'s."""
    rows = []
    base: dict[int, tuple[float, list]] = {}
    for engine in [reference, *(e for e in engines if e != reference)]:
        for c in levels:
            samples = [lv for lv in runs if lv["engine"] == engine and lv["concurrency"] == c]
            if not samples:
                continue
            row = {"engine": engine, "concurrency": c, "runs": len(samples)}
            for key in ("tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p99_s", "server_cpu_ms_per_token"):
                if all(key in s for s in samples):
                    row[key] = round(statistics.median(s[key] for s in samples), 3)
            row["tokens_per_s_runs"] = [s["tokens_per_s"] for s in samples]
            row["short_replies"] = sum(s["short_replies"] for s in samples)
            row["prompt_tokens"] = sorted({p for s in samples for p in s["prompt_tokens"]})
            if engine == reference:
                base[c] = (row["tokens_per_s"], samples[0]["texts"])
            if c in base:
                row["tokens_per_s_vs_" + reference] = round(row["tokens_per_s"] / base[c][0], 2)
                texts = samples[0]["texts"]
                row["same_text"] = f"{sum(a == b for a, b in zip(texts, base[c][1], strict=True))}/{len(texts)}"
            rows.append(row)
    return rows


def table(rows: list[dict], first: str) -> str:
    head = (
        f"| engine | clients | output tokens/s | requests/s | p50 latency (s) | p99 latency (s) | "
        f"tokens/s vs {first} | server CPU ms/token | same text as {first} |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cpu = f"{r['server_cpu_ms_per_token']:.1f}" if "server_cpu_ms_per_token" in r else "-"
        lines.append(
            f"| {r['engine']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
            f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r.get('tokens_per_s_vs_' + first, 0):.2f} | "
            f"{cpu} | {r.get('same_text', '-')} |"
        )
    return "\n".join(lines)


def make_hf_venv(venv: Path) -> None:
    site = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    here = next(p for p in sys.path if p.endswith("site-packages"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / site / "kubeforge-venv.pth").write_text(here + "\n")
    subprocess.run([str(venv / "bin" / "pip"), "install", "fastapi", "uvicorn"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=32, help="words (= tokens) of user text per prompt")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every server")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--hf-venv", type=Path, default=HF_VENV, help="venv with fastapi + uvicorn for transformers")
    parser.add_argument("--make-hf-venv", action="store_true", help="make --hf-venv (needs the package index)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    if args.requests < max(args.levels):
        print(
            f"note: {args.requests} requests per level: the {max(args.levels)}-client level has at most "
            f"{args.requests} in flight"
        )
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    args.hf_python = args.hf_venv / "bin" / "python"
    if args.make_hf_venv:
        make_hf_venv(args.hf_venv)
    if any(e != "kubeforge" for e in engines):
        check = (
            subprocess.run(
                [str(args.hf_python), "-c", "import fastapi, uvicorn, transformers"], capture_output=True, text=True
            )
            if args.hf_python.exists()
            else None
        )
        if check is None or check.returncode != 0:
            sys.exit(
                f"{args.hf_venv}: no venv with fastapi and uvicorn for `transformers serve`; "
                "make it with --make-hf-venv (see this script's docstring), or pass --engines kubeforge"
            )

    import torch
    import transformers

    work = Path(tempfile.mkdtemp(prefix="kf-serving-"))
    model, params = make_model(work / "bench-llama", args.hidden, args.layers, args.heads)
    texts = prompts(args.requests, args.prompt_words)
    print(
        f"model: random Llama, {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
        f"vocab {VOCAB + 8}), float32, {model}"
    )
    print(
        f"load: {args.requests} chat completions per level, {args.prompt_words}-word prompts, max_tokens "
        f"{args.max_tokens}, temperature 0, levels {args.levels}, {args.repeats} repeat(s), "
        f"OMP_NUM_THREADS={args.threads}, {os.cpu_count()} CPUs"
    )
    started = time.perf_counter()
    runs, startup = measure(engines, model, args, texts, work)
    reference = "kubeforge" if "kubeforge" in engines else engines[0]
    rows = summarise(runs, engines, args.levels, reference)
    print()
    print(table(rows, reference))
    print("start to healthy (model loaded): " + ", ".join(f"{e} {t:.1f} s" for e, t in startup.items()))
    shutil.rmtree(model)  # ~120 MB of weights; the server logs stay
    print(f"\n{time.perf_counter() - started:.0f} s of measuring; server logs under {work}")
    short = sum(r["short_replies"] for r in rows)
    if short:
        print(f"WARNING: {short} replies had fewer than max_tokens tokens: tokens/s are not like for like")
    if args.out:
        report = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "model": {
                "parameters": params,
                "hidden": args.hidden,
                "layers": args.layers,
                "heads": args.heads,
                "vocab": VOCAB + 8,
                "dtype": "float32",
            },
            "load": {
                "requests_per_level": args.requests,
                "prompt_words": args.prompt_words,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "seed": SEED,
                "levels": args.levels,
                "repeats": args.repeats,
                "omp_num_threads": args.threads,
                "api": "chat.completions",
                "stream": False,
            },
            "startup_s": startup,
            "summary": rows,
            "runs": [{k: v for k, v in lv.items() if k != "texts"} for lv in runs],
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
