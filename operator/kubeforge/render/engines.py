"""How each serving engine is started: image, command line, port and health endpoint (pure).

vLLM (`vllm serve`) and SGLang (`python -m sglang.launch_server`) serve GPUs from their own
images; the transformers engine is kubeforge's small OpenAI-compatible server for CPU and
small models. All three answer the OpenAI API under /v1 on SERVING_PORT and GET /health.
An API key reaches each engine from a Secret through the environment (never the pod spec's
text): vLLM reads VLLM_API_KEY, kubeforge's server KUBEFORGE_API_KEY, and SGLang only takes
--api-key, so its argument is ``$(KUBEFORGE_API_KEY)``, expanded by Kubernetes from that
variable. All three leave /health open (the probes carry no key). The transformers server
binds 127.0.0.1 unless told, so the Deployment passes --host 0.0.0.0 for its Service.
compressed-tensors checkpoints (what QuantizeJob writes) are detected from config.json by
both vLLM and SGLang, so no --quantization flag is passed. The flags were checked against
vLLM's EngineArgs (arg_utils.py: --enable-prefix-caching is a BooleanOptionalAction, hence
--no-enable-prefix-caching) and SGLang's ServerArgs (--lora-paths NAME=PATH,
--max-loras-per-batch, --disable-radix-cache) as documented for the pinned versions.

LoRA adapters, two ways:

- given at start (``adapters``, local runs): vLLM --enable-lora --max-loras N --max-lora-rank R
  --lora-modules NAME=PATH...; SGLang --enable-lora --max-loras-per-batch N [--max-lora-rank R]
  --lora-paths NAME=PATH... (it infers the rank from them when none is given); the transformers
  server --lora-modules NAME=PATH...;
- loaded at run time (``runtime_lora``, a ModelService's pods): the engine starts with LoRA capacity
  only and the adapter sidecar (kubeforge.runtime.adapters) loads the adapters through its runtime
  API. vLLM: --enable-lora --max-loras N with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; SGLang:
  --enable-lora --max-loras-per-batch N --lora-target-modules all (its docs ask for the rank and the
  target modules up front when adapters come later); both get --max-lora-rank from the rank file the
  sidecar writes before the engine starts (a shell reads it: ``read`` then ``exec``, the arguments
  passed as "$@", never parsed by the shell); the transformers server --enable-lora.
  vLLM takes only the ranks in VLLM_LORA_RANKS (vllm/config/lora.py MaxLoRARanks): 512 at most.

A replica across nodes (a LeaderWorkerSet) follows each engine's documented recipe, without Ray:
vLLM's LWS page (its multiprocessing example): every pod runs ``vllm serve`` with
--pipeline-parallel-size <nodes> --distributed-executor-backend mp --nnodes <nodes> --node-rank <rank>
--master-addr $(LWS_LEADER_ADDRESS), the workers with --headless; SGLang's multi-node page: every pod
runs ``sglang.launch_server`` with --nnodes <nodes> --node-rank <rank> --dist-init-addr
$(LWS_LEADER_ADDRESS):20000, tensor parallel inside a node and --pp-size <nodes> across them. The
rank is 0 on the leader and $(LWS_WORKER_INDEX) on a worker; <nodes> is the plan's (LWS_GROUP_SIZE,
the group size, is the same number). LWS sets LWS_LEADER_ADDRESS and LWS_WORKER_INDEX in each pod and
Kubernetes expands the $(VAR) references: no shell runs.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from kubeforge.render.images import configured
from kubeforge.runtime.contract import ADAPTERS_DIR, ADAPTERS_RANK_FILE, engine_lora_rank

SERVING_PORT = 8000
SERVING_PORT_NAME = "openai"
HEALTH_PATH = "/health"
API_KEY_ENV = "KUBEFORGE_API_KEY"
UNKNOWN_LORA_RANK = 64  # adapters given at start whose rank the caller did not read (vLLM needs one)
SGLANG_DIST_INIT_PORT = 20000  # SGLang's multi-node docs' --dist-init-addr port
LWS_LEADER_ADDRESS, LWS_WORKER_INDEX = "$(LWS_LEADER_ADDRESS)", "$(LWS_WORKER_INDEX)"  # set by LeaderWorkerSet


@dataclass(frozen=True)
class EngineLaunch:
    image: str
    command: list[str]
    args: list[str]
    api_key_env: str = API_KEY_ENV  # the variable the engine reads an API key from
    # kubeforge's own arguments that pass the key (they name $(API_KEY_ENV); never literal()-escaped)
    api_key_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # kubeforge's own environment for the engine


def rank_from_file(command: Sequence[str]) -> list[str]:
    """``command`` run with "$@" plus --max-lora-rank read from the adapter sidecar's rank file."""
    script = (f"read -r rank < {ADAPTERS_DIR}/{ADAPTERS_RANK_FILE}; "
              f'exec {" ".join(shlex.quote(c) for c in command)} "$@" --max-lora-rank "$rank"')  # fmt: skip
    return ["/bin/sh", "-c", script, command[0]]


def lora_slots(count: int) -> int:
    """Adapters per batch an engine is started for: 4, 8 or 16 (adding adapters within a step restarts nothing)."""
    return next(s for s in (4, 8, 16) if count <= s) if count <= 16 else count


def launch(
    engine: str,
    *,
    model_path: str,
    served_name: str,
    tensor_parallel: int,
    max_model_len: int | None,
    gpu_memory_utilization: float,
    prefix_caching: bool,
    adapters: Sequence[tuple[str, str]] = (),  # (name, path), loaded at start
    max_lora_rank: int | None = None,  # their largest rank, when known
    runtime_lora: int | None = None,  # adapters per batch, when the sidecar loads them at run time
    image: str | None = None,
) -> EngineLaunch:
    if adapters and runtime_lora:
        raise ValueError("adapters are given at start or loaded at run time, not both")
    if engine == "vllm":
        args = [
            model_path,
            "--served-model-name", served_name,
            "--host", "0.0.0.0",
            "--port", str(SERVING_PORT),
            "--tensor-parallel-size", str(tensor_parallel),
            "--gpu-memory-utilization", str(gpu_memory_utilization),
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
        ]  # fmt: skip
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        command, env = ["vllm", "serve"], ()
        if adapters:
            rank = engine_lora_rank("vllm", max_lora_rank or UNKNOWN_LORA_RANK)
            args += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(rank),
                     "--lora-modules", *(f"{name}={path}" for name, path in adapters)]  # fmt: skip
        elif runtime_lora:
            args += ["--enable-lora", "--max-loras", str(runtime_lora)]
            command, env = rank_from_file(command), (("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),)
        return EngineLaunch(image or configured().vllm, command, args, api_key_env="VLLM_API_KEY", env=env)
    if engine == "sglang":
        args = [
            "--model-path", model_path,
            "--served-model-name", served_name,
            "--host", "0.0.0.0",
            "--port", str(SERVING_PORT),
            "--tp-size", str(tensor_parallel),
            "--mem-fraction-static", str(gpu_memory_utilization),
        ]  # fmt: skip
        if max_model_len:
            args += ["--context-length", str(max_model_len)]
        if not prefix_caching:
            args.append("--disable-radix-cache")
        command = ["python3", "-m", "sglang.launch_server"]
        if adapters:
            args += ["--enable-lora", "--max-loras-per-batch", str(len(adapters)),
                     *(["--max-lora-rank", str(engine_lora_rank("sglang", max_lora_rank))] if max_lora_rank else []),
                     "--lora-paths", *(f"{name}={path}" for name, path in adapters)]  # fmt: skip
        elif runtime_lora:
            args += ["--enable-lora", "--max-loras-per-batch", str(runtime_lora), "--lora-target-modules", "all"]
            command = rank_from_file(command)
        return EngineLaunch(image or configured().sglang, command, args,
                            api_key_args=("--api-key", f"$({API_KEY_ENV})"))  # fmt: skip
    if engine == "transformers":
        args = ["--model", model_path, "--served-model-name", served_name,
                "--host", "0.0.0.0",  # the server's default is loopback; the Service must reach it
                "--port", str(SERVING_PORT)]  # fmt: skip
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        if adapters:
            args += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
        elif runtime_lora:
            args.append("--enable-lora")  # the runtime LoRA API, for the sidecar (loopback only)
        return EngineLaunch(image or configured().server, ["python", "-m", "kubeforge.runtime.serve"], args)
    raise ValueError(f"unknown engine {engine!r}")


def multi_node(engine: str, nodes: int) -> tuple[list[str], list[str]]:
    """(the leader's, the workers') arguments added for one replica across ``nodes`` LeaderWorkerSet pods:
    pipeline parallel across the nodes (tensor parallel stays in each), rank and rendezvous from LWS."""
    if engine == "vllm":
        common = ["--pipeline-parallel-size", str(nodes), "--distributed-executor-backend", "mp",
                  "--nnodes", str(nodes), "--master-addr", LWS_LEADER_ADDRESS]  # fmt: skip
        return [*common, "--node-rank", "0"], [*common, "--node-rank", LWS_WORKER_INDEX, "--headless"]
    if engine == "sglang":
        common = ["--pp-size", str(nodes), "--nnodes", str(nodes),
                  "--dist-init-addr", f"{LWS_LEADER_ADDRESS}:{SGLANG_DIST_INIT_PORT}"]  # fmt: skip
        return [*common, "--node-rank", "0"], [*common, "--node-rank", LWS_WORKER_INDEX]
    raise ValueError(f"engine {engine!r} does not run across nodes")
