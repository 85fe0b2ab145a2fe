"""The OpenAI-compatible transformers server, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request

import pytest
from aiohttp import web

from kubeforge.runtime import serve

openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra)")


@pytest.fixture(scope="module")
def server(tiny_model):
    """The server on a free loopback port in a background event loop; yields its base URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def start() -> None:
        app = serve.ModelServer(tiny_model, "tiny", max_model_len=64).app()
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["runner"] = runner
        state["port"] = runner.addresses[0][1]
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield f"http://127.0.0.1:{state['port']}"
    asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


QUESTION = [{"role": "user", "content": "what colour is a apple ?"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(f"{server}/health") as response:
        assert response.status == 200


def test_chat_completion(client):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_chat_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=0,
                                                  stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.split() == whole.choices[0].message.content.split()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1


def test_completions_with_and_without_streaming(client):
    whole = client.completions.create(model="tiny", prompt="apple", max_tokens=4, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 4
    pieces = list(client.completions.create(model="tiny", prompt="apple", max_tokens=4, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces).split() == whole.choices[0].text.split()


def test_sampling_with_a_seed_is_repeatable(client):
    ask = {"model": "tiny", "messages": QUESTION, "max_tokens": 6, "temperature": 1.0, "seed": 3}
    assert client.chat.completions.create(**ask).choices[0].message.content == \
        client.chat.completions.create(**ask).choices[0].message.content  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "text"),
    [
        ({"model": "nope", "messages": QUESTION}, 404, "model", "The model `nope` does not exist"),
        ({"model": "tiny", "messages": []}, 400, "messages", "'messages' must be a non-empty list"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "role"),
        ({"model": "tiny", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", "positive integer"),
        ({"model": "tiny", "messages": QUESTION, "max_tokens": 10_000}, 400, "max_tokens", "context leaves"),
        ({"model": "tiny", "messages": QUESTION, "temperature": 5}, 400, "temperature", "between 0.0 and 2.0"),
        ({"model": "tiny", "messages": QUESTION, "n": 2}, 400, "n", "only 'n': 1"),
    ],
)
def test_bad_requests_get_openai_errors(client, kwargs, status, param, text):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**kwargs)
    err = caught.value
    assert err.status_code == status
    assert err.body["type"] == "invalid_request_error" and err.body["param"] == param
    assert text in err.body["message"]


def test_malformed_json_and_unknown_routes(server):
    def post(path: str, payload: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"{server}{path}", data=payload, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, body = post("/v1/chat/completions", b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    status, body = post("/v1/embeddings", b"{}")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
