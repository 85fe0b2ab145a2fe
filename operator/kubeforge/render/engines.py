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
"""

from __future__ import annotations

from dataclasses import dataclass

from kubeforge.render.images import configured

SERVING_PORT = 8000
SERVING_PORT_NAME = "openai"
HEALTH_PATH = "/health"
API_KEY_ENV = "KUBEFORGE_API_KEY"


@dataclass(frozen=True)
class EngineLaunch:
    image: str
    command: list[str]
    args: list[str]
    api_key_env: str = API_KEY_ENV  # the variable the engine reads an API key from
    # kubeforge's own arguments that pass the key (they name $(API_KEY_ENV); never literal()-escaped)
    api_key_args: tuple[str, ...] = ()


def launch(
    engine: str,
    *,
    model_path: str,
    served_name: str,
    tensor_parallel: int,
    max_model_len: int | None,
    gpu_memory_utilization: float,
    prefix_caching: bool,
    adapters: list[tuple[str, str]],  # (name, path)
    max_lora_rank: int = 64,
    image: str | None = None,
) -> EngineLaunch:
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
        if adapters:
            args += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(max_lora_rank),
                     "--lora-modules", *(f"{name}={path}" for name, path in adapters)]  # fmt: skip
        return EngineLaunch(image or configured().vllm, ["vllm", "serve"], args, api_key_env="VLLM_API_KEY")
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
        if adapters:
            args += ["--enable-lora", "--max-loras-per-batch", str(len(adapters)),
                     "--max-lora-rank", str(max_lora_rank),
                     "--lora-paths", *(f"{name}={path}" for name, path in adapters)]  # fmt: skip
        return EngineLaunch(image or configured().sglang, ["python3", "-m", "sglang.launch_server"], args,
                            api_key_args=("--api-key", f"$({API_KEY_ENV})"))  # fmt: skip
    if engine == "transformers":
        args = ["--model", model_path, "--served-model-name", served_name,
                "--host", "0.0.0.0",  # the server's default is loopback; the Service must reach it
                "--port", str(SERVING_PORT)]  # fmt: skip
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        return EngineLaunch(image or configured().server, ["python", "-m", "kubeforge.runtime.serve"], args)
    raise ValueError(f"unknown engine {engine!r}")
