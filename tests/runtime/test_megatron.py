"""The Megatron backend: config translation and HF <-> megatron-core weights on CPU; training on GPUs.

megatron-core's forward pass calls CUDA, so on CPU these tests build the real GPTModel
(use_cpu_initialization), load the mapped weights strictly, and compare the parts of the
computation that do run on CPU (attention's q/k/v split, the SwiGLU MLP) with transformers'.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubeforge.runtime.contract import EXIT_USER_ERROR
from kubeforge.runtime.mcore import config as mconfig
from kubeforge.runtime.mcore import weights
from tests.runtime.conftest import make_contract
from tests.runtime.test_train import run_inline

ROOT = Path(__file__).resolve().parents[2]


def hf_model(arch: str = "llama", **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "vocab_size": 300,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    kwargs.update(overrides)
    torch.manual_seed(0)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def test_config_translation():
    model = hf_model()
    hf = model.config.to_dict()
    kwargs = mconfig.transformer_config(hf, tensor_parallel=2, pipeline_parallel=2, precision="bf16")
    assert kwargs["num_query_groups"] == 2 and kwargs["kv_channels"] == 16 and kwargs["ffn_hidden_size"] == 96
    assert kwargs["normalization"] == "RMSNorm" and kwargs["gated_linear_unit"] and not kwargs["add_qkv_bias"]
    assert kwargs["bf16"] and kwargs["params_dtype"] == "bfloat16"
    gpt = mconfig.gpt_model(hf, tensor_parallel=2)
    assert gpt["vocab_size"] == 512  # 300 padded to a multiple of 128 x TP 2
    assert gpt["rotary_base"] == 10000 and gpt["position_embedding_type"] == "rope"
    assert mconfig.transformer_config(hf_model("qwen2").config.to_dict())["add_qkv_bias"]
    assert mconfig.transformer_config(hf, precision="fp8")["fp8"] == "hybrid"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "this model is GPT2LMHeadModel"),
        ({"num_key_value_heads": 1}, "num_key_value_heads=1 does not divide by tensor parallel 2"),
        ({"num_hidden_layers": 3}, "num_hidden_layers=3 does not divide into 2 pipeline stages"),
        ({"hidden_act": "gelu"}, "hidden_act gelu"),
    ],
)
def test_unsupported_models_are_named(change, message):
    hf = {**hf_model().config.to_dict(), **change}
    with pytest.raises(mconfig.Unsupported, match=message):
        mconfig.transformer_config(hf, tensor_parallel=2, pipeline_parallel=2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weights_round_trip_exactly(arch):
    model = hf_model(arch)
    s = mconfig.shape(model.config.to_dict(), tensor_parallel=2)
    hf = model.state_dict()
    back = weights.mcore_to_hf(weights.hf_to_mcore(hf, s), s)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_tensor_and_pipeline_slices_reassemble():
    model = hf_model()
    s = mconfig.shape(model.config.to_dict(), tensor_parallel=2)
    full = weights.hf_to_mcore(model.state_dict(), s)
    stages = [
        weights.unshard([weights.shard(weights.for_stage(full, s, 2, p), 2, t) for t in range(2)]) for p in range(2)
    ]
    assert [sorted({k.split(".")[2] for k in st if k.startswith("decoder.layers.")}) for st in stages] == [
        ["0", "1"]
    ] * 2
    joined = weights.join_stages(stages, s)
    assert set(joined) == set(full) and all(torch.equal(joined[k], full[k]) for k in full)
    fc1 = weights.shard(full, 2, 1)["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = full["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
    assert torch.equal(fc1, torch.cat([gate[48:], up[48:]]))  # rank 1: its half of gate, then of up


@pytest.fixture()
def megatron_tp1():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the megatron extra)")
    import torch.distributed as td
    from megatron.core import parallel_state as ps

    if not td.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        td.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    yield
    ps.destroy_model_parallel()
    if td.is_initialized():
        td.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_megatron_model_takes_the_mapped_weights_and_computes_the_same(megatron_tp1, arch):
    from kubeforge.runtime.mcore import engine

    hf_llm = hf_model(arch)
    hf = hf_llm.config.to_dict()
    s = mconfig.shape(hf)
    config = engine.build_config(hf, {"use_cpu_initialization": True}, precision="fp32")
    model = engine.build_model(hf, config).eval()
    engine.load_slice(model, weights.hf_to_mcore(hf_llm.state_dict(), s), 1, 0, 1, 0, s)  # strict: every parameter

    x = torch.randn(5, 2, 64)  # megatron is [sequence, batch, hidden]
    layer, hf_layer = model.decoder.layers[1], hf_llm.model.layers[1]
    with torch.no_grad():
        q, k, v = layer.self_attention.get_query_key_value_tensors(x)[:3]
        attn = hf_layer.self_attn
        hf_q = attn.q_proj(x).view(5, 2, 4, 16)
        hf_k, hf_v = attn.k_proj(x).view(5, 2, 2, 16), attn.v_proj(x).view(5, 2, 2, 16)
        assert torch.allclose(q, hf_q, atol=1e-6) and torch.allclose(k, hf_k, atol=1e-6)
        assert torch.allclose(v, hf_v, atol=1e-6)
        mlp_out = layer.mlp(x)[0]
        assert torch.allclose(mlp_out, hf_layer.mlp(x), atol=1e-5)
        assert torch.allclose(layer.input_layernorm(x), hf_layer.input_layernorm(x), atol=1e-6)


def test_tensor_parallel_slices_fit_a_megatron_model_built_with_tp2(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the megatron extra)")
    script = tmp_path / "tp2.py"
    script.write_text(TP2_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "runtime"), str(ROOT)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("slice ok") == 2


TP2_SCRIPT = """
import torch, torch.distributed as td
from megatron.core import parallel_state as ps
from kubeforge.runtime.mcore import config as mconfig, engine, weights
from tests.runtime.test_megatron import hf_model
td.init_process_group("gloo")
ps.initialize_model_parallel(2, 1)
hf_llm = hf_model()
hf = hf_llm.config.to_dict()
s = mconfig.shape(hf, 2)
config = engine.build_config(hf, {"use_cpu_initialization": True}, tensor_parallel=2, precision="fp32")
model = engine.build_model(hf, config)
rank = ps.get_tensor_model_parallel_rank()
engine.load_slice(model, weights.hf_to_mcore(hf_llm.state_dict(), s), 2, rank, 1, 0, s)
assert model.embedding.word_embeddings.weight.shape == (256, 64)
print("slice ok", rank, flush=True)
td.destroy_process_group()
"""


def test_megatron_plans_are_refused_on_cpu_with_the_reason(tiny_model, task_data, tmp_path):
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method="full", strategy="megatron")
    code, summary = run_inline(contract, tmp_path)
    assert code == EXIT_USER_ERROR
    assert "strategy megatron needs CUDA GPUs" in summary["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="megatron-core's forward pass needs a CUDA GPU")
def test_megatron_trains_on_a_gpu_and_exports_hf_weights(tiny_model, task_data, tmp_path):
    pytest.importorskip("megatron.core")
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method="full", strategy="megatron",
                             steps=30, lr=1e-3)  # fmt: skip
    contract = contract.model_copy(
        update={"compute": contract.compute.model_copy(update={"device": "cuda", "precision": "bf16"})}
    )
    code, summary = run_inline(contract, tmp_path)
    assert code == 0, summary
    curve = json.loads((tmp_path / "out" / "kubeforge-artifact.json").read_text())["losses"]
    assert curve[-1] < curve[0] * 0.8
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the exported weights load as Hugging Face
