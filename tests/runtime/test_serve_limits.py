"""The transformers server's guards: where it binds, the API key, body and prompt limits, seeds, and
/health staying responsive while a long prompt is tokenized; and the API key a ModelService renders."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kubeforge.runtime import serve

openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra)")

KEY = "sk-test-0123456789"
LIMIT = 64 * 1024
QUESTION = [{"role": "user", "content": "what colour is a apple ?"}]


@contextmanager
def running(server: serve.ModelServer) -> Iterator[str]:
    """``server`` on a free loopback port in a background event loop; its base URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(server.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        state["runner"], state["port"] = runner, runner.addresses[0][1]
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(60)
    try:
        yield f"http://127.0.0.1:{state['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="module")
def keyed(tiny_model) -> Iterator[str]:
    """A server with an API key and a 64 KiB body limit."""
    with running(serve.ModelServer(tiny_model, "tiny", max_model_len=64, api_key=KEY, max_request_bytes=LIMIT)) as url:
        yield url


@pytest.fixture(scope="module")
def open_server(tiny_model) -> Iterator[str]:
    """No key, and a 16 MiB body limit: room for a prompt that takes seconds to tokenize."""
    with running(serve.ModelServer(tiny_model, "tiny", max_model_len=64, max_request_bytes=16 << 20)) as url:
        yield url


def call(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         chunked: bool = False) -> tuple[int, dict]:  # fmt: skip
    """One raw HTTP request; the status and the JSON body."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            conn.request(method, path, body=iter([body[i : i + 8192] for i in range(0, len(body), 8192)]),
                         headers=hdrs, encode_chunked=True)  # fmt: skip
        else:
            conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(body: dict, *, code: str | None = None, param: str | None = None) -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["code"] == code and err["param"] == param
    return err


# ---------------------------------------------------------------------------------------------- API key
def test_the_api_key_is_required_on_v1_but_not_on_health(keyed):
    chat = json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 2}).encode()
    assert call(keyed, "GET", "/health") == (200, {"status": "ok"})
    for headers in ({}, bearer("wrong"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        status, body = call(keyed, "POST", "/v1/chat/completions", chat, headers)
        assert status == 401, headers
        assert "API key" in assert_openai_error(body, code="invalid_api_key")["message"]
    assert call(keyed, "GET", "/v1/models")[0] == 401
    assert call(keyed, "POST", "/v1/embeddings", b"{}")[0] == 401  # no key: not even whether a route exists
    assert call(keyed, "POST", "/v1/embeddings", b"{}", bearer())[0] == 404
    status, body = call(keyed, "POST", "/v1/chat/completions", chat, bearer())
    assert status == 200 and body["object"] == "chat.completion"


def test_the_api_key_with_the_openai_client(keyed):
    good = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == ["tiny"]
    reply = good.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    bad = openai.OpenAI(base_url=f"{keyed}/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"


def test_api_key_sources(tmp_path: Path):
    (tmp_path / "key").write_text("  from-file\n")
    assert serve.api_key(str(tmp_path / "key"), {serve.ENV_API_KEY: "from-env"}) == "from-file"
    assert serve.api_key(None, {serve.ENV_API_KEY: "from-env\n"}) == "from-env"
    assert serve.api_key(None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        serve.api_key(str(tmp_path / "empty"), {})
    with pytest.raises(ValueError, match="empty"):
        serve.api_key(None, {serve.ENV_API_KEY: ""})


def test_main_binds_loopback_unless_told(tiny_model, tmp_path, monkeypatch):
    seen: list[dict[str, Any]] = []

    class Fake:
        def __init__(self, model_dir, name, max_len, *, api_key, max_request_bytes):
            self.name = name
            seen.append({"api_key": api_key, "max_request_bytes": max_request_bytes})

        def app(self) -> None:
            return None

    monkeypatch.setattr(serve, "ModelServer", Fake)
    monkeypatch.setattr(serve.web, "run_app", lambda app, host, port, print: seen[-1].update(host=host, port=port))
    monkeypatch.delenv(serve.ENV_API_KEY, raising=False)
    assert serve.main(["--model", str(tiny_model)]) == 0
    assert seen[-1] == {"api_key": None, "max_request_bytes": 1 << 20, "host": "127.0.0.1", "port": 8000}
    monkeypatch.setenv(serve.ENV_API_KEY, "k1")
    assert serve.main(["--model", str(tiny_model), "--host", "0.0.0.0", "--max-request-bytes", "100"]) == 0
    assert seen[-1] == {"api_key": "k1", "max_request_bytes": 100, "host": "0.0.0.0", "port": 8000}
    (tmp_path / "key").write_text("k2\n")
    assert serve.main(["--model", str(tiny_model), "--api-key-file", str(tmp_path / "key")]) == 0
    assert seen[-1]["api_key"] == "k2"
    monkeypatch.setenv(serve.ENV_API_KEY, "")
    assert serve.main(["--model", str(tiny_model)]) == 2  # set but empty: refuse to serve without a key
    assert serve.main(["--model", str(tiny_model), "--api-key-file", str(tmp_path / "missing")]) == 2
    assert len(seen) == 3


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_gets_413(keyed, chunked):
    big = json.dumps({"model": "tiny", "prompt": "apple " * (LIMIT // 6 + 10), "max_tokens": 1}).encode()
    assert len(big) > LIMIT
    status, body = call(keyed, "POST", "/v1/completions", big, bearer(), chunked=chunked)
    assert status == 413
    assert str(LIMIT) in assert_openai_error(body, code="request_too_large")["message"]
    assert call(keyed, "GET", "/health")[0] == 200  # and the server goes on


def test_a_body_over_the_limit_with_the_openai_client(keyed):
    client = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * (LIMIT + 1)}])
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"


@pytest.mark.parametrize(("path", "field", "param"), [("/v1/completions", "prompt", "prompt"),
                                                      ("/v1/chat/completions", "messages", "messages")])  # fmt: skip
def test_a_prompt_longer_than_the_context_gets_400(keyed, path, field, param):
    text = "apple " * 200  # ~200 tokens; the context is 64
    value = text if field == "prompt" else [{"role": "user", "content": text}]
    for stream in (False, True):
        status, body = call(keyed, "POST", path, json.dumps({"model": "tiny", field: value, "stream": stream}).encode(),
                            bearer())  # fmt: skip
        assert status == 400
        err = assert_openai_error(body, code="context_length_exceeded", param=param)
        assert "this model's context is 64" in err["message"]


def test_health_answers_while_a_long_prompt_is_tokenized(open_server):
    """A 2.5 MB prompt takes seconds to tokenize (then gets 400: far over the context); meanwhile
    /health answers at once, since the tokenizer runs in a worker thread, not on the event loop.
    (Before, with the tokenizer on the event loop, a 7.5 MB prompt held /health for its 20 s here.)"""
    prompt = "what colour is a apple ? " * 100_000
    payload = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1}).encode()
    assert len(payload) > 2_000_000
    result: dict[str, Any] = {}

    def big() -> None:
        started = time.monotonic()
        result["answer"] = call(open_server, "POST", "/v1/completions", payload)
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=big)
    worker.start()
    time.sleep(0.3)  # the body is sent and being tokenized
    latencies = []  # of the /health calls answered while the prompt was still being handled
    while worker.is_alive() and len(latencies) < 20:
        started = time.monotonic()
        assert call(open_server, "GET", "/health") == (200, {"status": "ok"})
        if worker.is_alive():
            latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    worker.join(120)
    status, body = result["answer"]
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    # a blocked event loop answers /health only after the prompt: none of them would count
    assert len(latencies) >= 2, f"the prompt took {result['seconds']:.2f} s: /health did not answer meanwhile"
    # relative, not a wall-clock limit: tokenizing on the event loop would hold a /health call for about the
    # whole prompt's time; in a worker thread each answers in a small part of it, however loaded the machine
    assert max(latencies) < result["seconds"] / 4, (latencies, result["seconds"])


def test_health_answers_during_a_generation(open_server):
    client = openai.OpenAI(base_url=f"{open_server}/v1", api_key="unused", max_retries=0, timeout=60)
    done = threading.Event()

    def generate() -> None:
        for _ in range(3):
            client.completions.create(model="tiny", prompt="apple", max_tokens=40, temperature=1.0, seed=1)
            list(client.completions.create(model="tiny", prompt="apple", max_tokens=40, stream=True, stop=["e"]))
        done.set()

    begun = time.monotonic()
    threading.Thread(target=generate, daemon=True).start()
    latencies = []
    while not done.is_set():
        started = time.monotonic()
        assert call(open_server, "GET", "/health")[0] == 200
        latencies.append(time.monotonic() - started)
    total = time.monotonic() - begun
    # relative, not a wall-clock limit: generating on the event loop would hold /health for a whole request (one
    # sixth of the total); in a worker thread each call answers in a small part of that
    assert max(latencies) < total / 12, (latencies, total)


# ---------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize(
    "seed", [str(2**80), str(2**63), "-1", "1" + "0" * 5000], ids=["2**80", "2**63", "-1", "10**5000"]
)
def test_a_seed_out_of_range_gets_400_over_raw_http(open_server, seed):
    for path, field in (("/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}]'),
                        ("/v1/completions", '"prompt": "apple"')):  # fmt: skip
        for stream in ("false", "true"):
            raw = f'{{"model": "tiny", {field}, "max_tokens": 2, "stream": {stream}, "seed": {seed}}}'.encode()
            status, body = call(open_server, "POST", path, raw)
            if len(seed) > 4300:  # over Python's 4300-digit int parsing limit: not even read as a number
                assert status == 400 and "not JSON" in body["error"]["message"]
                continue
            assert status == 400, body
            assert "between 0 and 9223372036854775807" in assert_openai_error(body, param="seed")["message"]


@pytest.mark.parametrize("seed", [2**80, -5])
def test_a_seed_out_of_range_with_the_openai_client(open_server, seed):
    client = openai.OpenAI(base_url=f"{open_server}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, seed=seed)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "seed"


def test_the_extreme_seeds_in_range_work(open_server):
    client = openai.OpenAI(base_url=f"{open_server}/v1", api_key="unused", max_retries=0, timeout=60)
    for seed in (0, 2**63 - 1):
        ask = {"model": "tiny", "messages": QUESTION, "max_tokens": 3, "temperature": 1.0, "seed": seed}
        first = client.chat.completions.create(**ask).choices[0].message.content
        assert client.chat.completions.create(**ask).choices[0].message.content == first


# ---------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize(("engine", "cluster", "env"), [("transformers", None, "KUBEFORGE_API_KEY"),
                                                        ("vllm", "h100-4x8.yaml", "VLLM_API_KEY"),
                                                        ("sglang", "h100-4x8.yaml", "KUBEFORGE_API_KEY")])  # fmt: skip
def test_a_model_service_passes_its_api_key_from_the_secret(engine, cluster, env):
    from tests.builders import service
    from tests.render.rendering import render_ms

    ref = {"name": "bot-api-key", "key": "token"}
    docs = render_ms(service(engine=engine, auth={"apiKeySecretRef": ref}), "pvc://models/bot", cluster)
    assert docs is not None
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": env, "valueFrom": {"secretKeyRef": ref}} in container["env"]
    args = container["args"]
    if engine == "sglang":  # only a flag: Kubernetes expands the variable into it
        assert args[args.index("--api-key") + 1] == "$(KUBEFORGE_API_KEY)"
    else:
        assert "--api-key" not in args
    if engine == "transformers":
        assert args[args.index("--host") + 1] == "0.0.0.0"  # the Service must reach it (the default is loopback)
    assert "token" not in json.dumps(container["args"])

    plain = render_ms(service(engine=engine), "pvc://models/bot", cluster)
    assert plain is not None
    container = next(d for d in plain if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert not any(e["name"] in ("KUBEFORGE_API_KEY", "VLLM_API_KEY") for e in container["env"])
    assert "--api-key" not in container["args"]
