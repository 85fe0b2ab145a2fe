"""LoRA adapters on the transformers server, driven by the official `openai` client, and the adapter sidecar.

Two tiny peft LoRA adapters with different random weights (init_lora_weights=False: not a no-op) on
the tiny random Llama: each answers under its own model name, differently from the other and from the
base, which answers exactly as a server without adapters. Adapters come at start (--lora-modules) or
at run time through vLLM's runtime API, which kubeforge.runtime.adapters (the ModelService's sidecar)
drives from the adapter list: adding, replacing and removing an adapter changes what the running server
answers, with no restart.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubeforge.runtime import adapters, serve
from kubeforge.runtime.contract import AdapterSet, Location, ServedAdapter
from tests.harness.fakehub import serve_repo
from tests.runtime.test_serve_limits import running

openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra)")
peft = pytest.importorskip("peft", reason="peft is not installed (the train extra)")

QUESTION = [{"role": "user", "content": "what colour is a apple ?"}]


def make_adapter(base: Path, out: Path, *, seed: int, rank: int, targets: list[str] | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=rank, lora_alpha=8 * rank, init_lora_weights=False,
                             target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {"a": make_adapter(tiny_model, root / "a", seed=1, rank=4),
            "b": make_adapter(tiny_model, root / "b", seed=2, rank=8)}  # fmt: skip


@pytest.fixture(scope="module")
def plain(tiny_model) -> Iterator[str]:
    with running(serve.ModelServer(tiny_model, "tiny", max_model_len=64)) as url:
        yield url


@pytest.fixture(scope="module")
def both(tiny_model, loras) -> Iterator[str]:
    """A server given both adapters at start, as --lora-modules a=... b=... gives them."""
    with running(serve.ModelServer(tiny_model, "tiny", max_model_len=64, adapters=loras)) as url:
        yield url


@pytest.fixture()
def dynamic(tiny_model) -> Iterator[tuple[serve.ModelServer, str]]:
    """A server with no adapters yet that takes them at run time (--enable-lora)."""
    server = serve.ModelServer(tiny_model, "tiny", max_model_len=64, enable_lora=True)
    with running(server) as url:
        yield server, url


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def answer(url: str, model: str, **extra) -> str:
    reply = client(url).chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0, **extra)
    assert reply.model == model
    return reply.choices[0].message.content


def post(url: str, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_each_adapter_answers_under_its_own_name_and_the_base_as_the_base(plain, both):
    models = client(both).models.list().data
    assert [m.id for m in models] == ["tiny", "a", "b"]
    assert [m.model_extra["parent"] for m in models] == [None, "tiny", "tiny"]
    base, a, b = answer(both, "tiny"), answer(both, "a"), answer(both, "b")
    assert len({base, a, b}) == 3, (base, a, b)  # the same prompt, three different answers
    assert base == answer(plain, "tiny")  # the base with its adapters disabled is the base
    assert answer(both, "tiny:b") == b  # SGLang's <base>:<adapter> form names the same adapter
    chunks = client(both).chat.completions.create(model="a", messages=QUESTION, max_tokens=8, temperature=0,
                                                  stream=True)  # fmt: skip
    pieces = list(chunks)
    assert {p.model for p in pieces} == {"a"}
    assert "".join(p.choices[0].delta.content or "" for p in pieces).split() == a.split()
    text = client(both).completions.create(model="b", prompt="apple", max_tokens=4, temperature=0)
    assert text.model == "b"
    with pytest.raises(openai.NotFoundError, match="`tiny`, `a`, `b`"):
        answer(both, "c")


def test_adapters_load_and_unload_at_run_time(dynamic, both, loras, tiny_model, tmp_path):
    server, url = dynamic
    expected = {name: answer(both, name) for name in ("tiny", "a", "b")}
    assert post(url, serve.LOAD_LORA_PATH, {"lora_name": "a", "lora_path": str(loras["a"])})[0] == 200
    assert post(url, serve.LOAD_LORA_PATH, {"lora_name": "b", "lora_path": str(loras["b"])})[0] == 200
    assert [m.id for m in client(url).models.list().data] == ["tiny", "a", "b"]
    assert {name: answer(url, name) for name in expected} == expected  # as if given at start
    status, text = post(url, serve.LOAD_LORA_PATH, {"lora_name": "a", "lora_path": str(loras["b"])})
    assert status == 400 and "already been loaded" in text
    status, text = post(url, serve.LOAD_LORA_PATH, {"lora_name": "m", "lora_path": str(tiny_model)})
    assert status == 400 and "not a peft adapter" in text  # a model folder, not an adapter
    misfit = make_adapter(tiny_model, tmp_path / "misfit", seed=3, rank=4)  # targets a module the base lacks
    config = json.loads((misfit / "adapter_config.json").read_text())
    (misfit / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["nope_proj"]}))
    status, text = post(url, serve.LOAD_LORA_PATH, {"lora_name": "m", "lora_path": str(misfit)})
    assert status == 400 and "cannot load this adapter on tiny" in text
    assert {name: answer(url, name) for name in expected} == expected  # the failed load changed nothing
    assert post(url, serve.UNLOAD_LORA_PATH, {"lora_name": "a"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        answer(url, "a")
    assert answer(url, "b") == expected["b"]
    assert post(url, serve.UNLOAD_LORA_PATH, {"lora_name": "b"})[0] == 200  # the last one: the plain base again
    assert post(url, serve.UNLOAD_LORA_PATH, {"lora_name": "b"})[0] == 404
    assert type(server.model).__name__ == "LlamaForCausalLM" and answer(url, "tiny") == expected["tiny"]


def test_the_runtime_api_is_off_unless_enabled(both, loras):
    status, _ = post(both, serve.LOAD_LORA_PATH, {"lora_name": "x", "lora_path": str(loras["a"])})
    assert status == 404


def write_list(path: Path, *entries: ServedAdapter) -> None:
    path.write_text(AdapterSet(adapters=entries).model_dump_json())


def test_the_sidecar_keeps_the_running_engine_equal_to_the_list(dynamic, both, loras, tmp_path, monkeypatch):
    """What a ModelService's replicas do when spec.adapters changes: the list (a ConfigMap in the pod) is
    rewritten and the sidecar loads, replaces and unloads adapters in the running server."""
    server, url = dynamic
    expected = {name: answer(both, name) for name in ("a", "b")}
    listed, root = tmp_path / "adapters.json", tmp_path / "fetched"
    monkeypatch.setenv("KUBEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    a = ServedAdapter(name="a", location=Location(uri="pvc://adapters/a", local_path=str(loras["a"])))
    write_list(listed, a)
    sync = adapters.Sync(listed, root, adapters.Engine("transformers", url))
    assert [f.rank for f in sync.prepare()] == [4]  # before the engine starts: fetched, rank read
    sync.step()
    assert [m.id for m in client(url).models.list().data] == ["tiny", "a"] and answer(url, "a") == expected["a"]

    with serve_repo("acme/lora-b", loras["b"]) as (endpoint, seen):  # b from the Hub, added to a running server
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        b = ServedAdapter(name="b", location=Location(uri="hf://acme/lora-b"), digest="sha256:1")
        write_list(listed, a, b)
        sync.step()
    assert any("adapter_model.safetensors" in s for s in seen)
    fetched = sync.loaded["b"].path
    assert fetched.parent == root and (fetched / "adapter_config.json").exists()
    assert answer(url, "b") == expected["b"] and answer(url, "a") == expected["a"]

    write_list(listed, b)  # a removed from the list: unloaded
    sync.step()
    assert [m.id for m in client(url).models.list().data] == ["tiny", "b"]
    with serve_repo("acme/lora-b", loras["a"]) as (endpoint, _):  # a new artifact behind b: reloaded in place
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        write_list(listed, b.model_copy(update={"digest": "sha256:2"}))
        sync.step()
    assert answer(url, "b") == expected["a"] and not fetched.exists()  # the old version's files are gone
    assert sync.status()["adapters"]["b"]["state"] == "loaded"
    assert server.adapters.keys() == {"b"}  # one server all along: nothing restarted


def test_the_sidecar_reports_what_it_cannot_serve_and_serves_the_rest(dynamic, loras, tiny_model, tmp_path):
    _, url = dynamic
    listed = tmp_path / "adapters.json"
    entries = [ServedAdapter(name="big", location=Location(uri="pvc://x/b", local_path=str(loras["b"]))),
               ServedAdapter(name="model", location=Location(uri="pvc://x/m", local_path=str(tiny_model))),
               ServedAdapter(name="gone", location=Location(uri="pvc://x/g", local_path=str(tmp_path / "no"))),
               ServedAdapter(name="a", location=Location(uri="pvc://x/a", local_path=str(loras["a"])))]  # fmt: skip
    write_list(listed, *entries)
    sync = adapters.Sync(listed, tmp_path / "fetched", adapters.Engine("transformers", url), max_rank=4)
    sync.step()
    failed = sync.status()["adapters"]
    assert failed["a"]["state"] == "loaded"
    assert "rank 8 is above the engine's --max-lora-rank 4" in failed["big"]["message"]
    assert "not an adapter" in failed["model"]["message"] and "not a folder" in failed["gone"]["message"]
    assert [m.id for m in client(url).models.list().data] == ["tiny", "a"]


def test_the_sidecar_loads_again_what_a_restarted_engine_lost(dynamic, both, loras, tmp_path):
    _, url = dynamic
    listed = tmp_path / "adapters.json"
    write_list(listed, ServedAdapter(name="a", location=Location(uri="pvc://x/a", local_path=str(loras["a"]))))
    sync = adapters.Sync(listed, tmp_path / "fetched", adapters.Engine("transformers", url))
    sync.step()
    assert post(url, serve.UNLOAD_LORA_PATH, {"lora_name": "a"})[0] == 200  # what a restarted engine looks like
    sync.step()
    assert answer(url, "a") == answer(both, "a")
    sync.loaded.clear()  # the sidecar restarted, the engine did not: the load finds it there and loads it again
    sync.step()
    assert "a" in sync.loaded and answer(url, "a") == answer(both, "a")


def test_the_rank_the_engine_starts_with(loras):
    assert adapters.lora_rank(loras["b"]) == 8
    assert adapters.start_rank("vllm", [4, 8], 16) == 16  # the operator's floor
    assert adapters.start_rank("vllm", [4, 300], 1) == 320  # vLLM's allowed values only
    assert adapters.start_rank("vllm", [600], 64) == 64  # vLLM cannot take 600: that adapter is refused
    assert adapters.start_rank("sglang", [600], 64) == 1024
    assert adapters.start_rank("transformers", [600], 64) is None  # peft takes any rank


def test_lora_modules_are_name_equals_path():
    assert serve.lora_modules(["a=/x", "b=/y=z"]) == {"a": Path("/x"), "b": Path("/y=z")}
    with pytest.raises(ValueError, match="not NAME=PATH"):
        serve.lora_modules(["a"])
