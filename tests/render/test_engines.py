"""The engines' command lines: the flags each pinned engine accepts, LoRA adapters, prefix caching."""

from __future__ import annotations

from kubeforge.render.engines import launch
from kubeforge.render.images import SGLANG_IMAGE, SGLANG_VERSION, VLLM_IMAGE, VLLM_VERSION

COMMON = {"model_path": "/m", "served_name": "bot", "tensor_parallel": 2, "max_model_len": 8192,
          "gpu_memory_utilization": 0.85}  # fmt: skip


def pairs(args: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(args, [*args[1:], ""], strict=True) if a.startswith("--")}


def test_vllm():
    e = launch("vllm", **COMMON, prefix_caching=False, adapters=[("a", "/x"), ("b", "/y")])
    assert e.image == VLLM_IMAGE and e.image.endswith(VLLM_VERSION) and e.command == ["vllm", "serve"]
    assert e.args[0] == "/m"
    p = pairs(e.args)
    assert (p["--tensor-parallel-size"], p["--max-model-len"], p["--gpu-memory-utilization"]) == ("2", "8192", "0.85")
    assert "--no-enable-prefix-caching" in e.args and p["--max-loras"] == "2"
    assert e.args[e.args.index("--lora-modules") + 1 :][:2] == ["a=/x", "b=/y"]


def test_sglang():
    e = launch("sglang", **COMMON, prefix_caching=True, adapters=[("a", "/x")])
    assert e.image == SGLANG_IMAGE and e.image.endswith(SGLANG_VERSION)
    assert e.command == ["python3", "-m", "sglang.launch_server"]
    p = pairs(e.args)
    assert (p["--model-path"], p["--tp-size"], p["--context-length"], p["--mem-fraction-static"]) == (
        "/m", "2", "8192", "0.85")  # fmt: skip
    assert "--disable-radix-cache" not in e.args and "--enable-lora" in e.args and p["--lora-paths"] == "a=/x"


def test_transformers():
    e = launch("transformers", **COMMON, prefix_caching=True, adapters=[])
    assert e.command == ["python", "-m", "kubeforge.runtime.serve"]
    assert pairs(e.args)["--served-model-name"] == "bot"
