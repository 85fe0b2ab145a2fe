"""Where the planner learns a model's architecture, and the parameter counts it computes."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from kubeforge.api.finetune import ModelArchitecture, ModelSource
from kubeforge.planner.architecture import ArchitectureUnknown, fetch_hub_config, from_hf_config, resolve
from kubeforge.planner.catalog import NOMINAL_BILLIONS, lookup, names

LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize("repo", sorted(NOMINAL_BILLIONS))
def test_computed_parameter_counts_match_the_published_ones(repo):
    arch = lookup(repo)
    assert arch is not None
    assert arch.total_parameters / 1e9 == pytest.approx(NOMINAL_BILLIONS[repo], rel=0.02)


def test_catalog_covers_the_required_families():
    catalog = " ".join(names())
    for needed in ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B", "Llama-3.1-70B", "Llama-3.1-405B",
                   "Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B",
                   "Qwen2.5-7B", "Qwen2.5-72B", "Mistral-7B", "Mixtral-8x7B", "gemma-2-9b", "gemma-3-12b"):  # fmt: skip
        assert needed in catalog


def test_instruct_variants_share_the_base_architecture():
    assert lookup("meta-llama/Llama-3.1-8B-Instruct") == lookup("meta-llama/Llama-3.1-8B")
    assert lookup("google/gemma-3-27b-it") is not None
    assert lookup("qwen/qwen3-8b") is not None


def test_mixtral_active_parameters():
    arch = lookup("mistralai/Mixtral-8x7B-v0.1")
    assert arch.active_parameters / 1e9 == pytest.approx(12.9, rel=0.02)


def test_lora_parameters_for_all_linear_and_named_targets():
    arch = lookup("meta-llama/Llama-3.1-8B")
    all_linear, unknown = arch.lora_parameters(16, ("all-linear",))
    assert all_linear == 41_943_040 and unknown == ()  # peft's count for r=16 on all seven projections
    qv, _ = arch.lora_parameters(8, ("q_proj", "v_proj"))
    assert qv == 3_407_872
    _, unknown = arch.lora_parameters(8, ("q_proj", "wqkv"))
    assert unknown == ("wqkv",)


def test_config_json_in_a_local_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    arch = resolve(ModelSource(uri="model"), local_root=tmp_path)
    assert arch.total_parameters == 8_030_261_248
    assert "config.json" in arch.source


def test_a_head_that_scales_its_logits_keeps_the_models_own_loss_in_the_plan(tmp_path):
    """Cohere's logit_scale (Granite's logits_scaling): the runtime keeps the model's own loss for such a head
    (contract.own_loss_reason, chunked_loss.unsupported), so the plan counts the whole logits and renders no
    chunk, and says why."""
    from kubeforge.api import parse
    from kubeforge.planner import plan
    from kubeforge.planner.memory import Layout, loss_chunk
    from tests.builders import finetune
    from tests.planner.nodes import example_cluster

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({**LLAMA_8B_CONFIG, "logit_scale": 0.0625}))
    scaled = resolve(ModelSource(uri="model"), local_root=tmp_path)
    plain = from_hf_config(LLAMA_8B_CONFIG, "x/config.json")
    assert scaled.own_loss == "it scales its logits (logit_scale)" and plain.own_loss == ""
    layout = Layout(method="lora", strategy="ddp", nodes=1, gpus_per_node=1)
    assert loss_chunk(scaled, layout) == 0 and loss_chunk(plain, layout) == 256
    routed = from_hf_config({**LLAMA_8B_CONFIG, "output_router_logits": True}, "x/config.json")
    assert "router" in routed.own_loss and loss_chunk(routed, layout) == 0

    spec = parse(finetune()).spec
    inventory = example_cluster("h100-4x8.yaml")
    own, chunked = (plan(spec, inventory, arch) for arch in (scaled, plain))
    assert own.feasible and own.loss_chunk_tokens == 0 and chunked.loss_chunk_tokens == 256
    assert own.memory.activations > chunked.memory.activations
    assert any("whole logits, not in chunks: it scales its logits (logit_scale)" in r for r in own.reasons)


def test_spec_architecture_overrides_the_catalog():
    spec = ModelSource(uri="hf://meta-llama/Llama-3.1-8B", architecture=ModelArchitecture(num_layers=16))
    arch = resolve(spec)
    assert arch.num_layers == 16 and arch.hidden_size == 4096
    assert "spec.model.architecture" in arch.source


def test_spec_architecture_alone():
    spec = ModelSource(
        uri="pvc://models/custom",
        architecture=ModelArchitecture(
            num_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=512
        ),
    )
    arch = resolve(spec)
    assert (
        arch.num_key_value_heads == 4
        and arch.total_parameters == 2 * 512 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 128) + 64
    )


def test_unknown_model_names_the_fields_to_set():
    with pytest.raises(ArchitectureUnknown, match=r"set spec.model.architecture \(numLayers, hiddenSize"):
        resolve(ModelSource(uri="pvc://models/mystery"))


def test_config_without_required_keys():
    with pytest.raises(ValueError, match="lacks 'num_hidden_layers'"):
        from_hf_config({"num_attention_heads": 4}, "x/config.json")


@pytest.fixture()
def fake_hub(monkeypatch) -> Iterator[list[str]]:
    """A local stand-in for the Hub's /{repo}/resolve/{revision}/config.json."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path + " auth=" + str(self.headers.get("Authorization")))
            if self.path == "/acme/llm-8b/resolve/v2/config.json":
                body = json.dumps(LLAMA_8B_CONFIG).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    yield seen
    server.shutdown()


def test_hub_config_is_fetched_where_there_is_network(fake_hub):
    arch = resolve(ModelSource(uri="hf://acme/llm-8b", revision="v2"), allow_network=True)
    assert arch.total_parameters == 8_030_261_248
    assert fake_hub == ["/acme/llm-8b/resolve/v2/config.json auth=Bearer hf_test"]


def test_hub_lookup_is_skipped_offline_and_absent_configs_are_none(fake_hub):
    with pytest.raises(ArchitectureUnknown):
        resolve(ModelSource(uri="hf://acme/llm-8b", revision="v2"), allow_network=False)
    assert fake_hub == []
    assert fetch_hub_config("acme/missing", "main") is None


def test_unreachable_hub_is_none(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    assert fetch_hub_config("acme/llm-8b", "main", timeout=2) is None
