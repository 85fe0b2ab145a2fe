"""`python -m kubeforge.runtime.serve`: a small OpenAI-compatible server on transformers' generate.

For CPU, small models and local runs (vLLM and SGLang serve GPUs from their own images).
Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions and /v1/completions,
both with ``stream: true`` (server-sent events ending in ``data: [DONE]``). Requests are
validated; a bad one gets an OpenAI-style error body with status 400 (404 for an unknown
model, 413 for a body over --max-request-bytes, 401 without the API key), never a 500. One
generation runs at a time; prompts are tokenized the way the training runtime tokenized them
(the chat template, then the BOS token).

LoRA adapters (peft) are served on the base model, each under its own model name: listed in
/v1/models with the base as parent, chosen by the request's ``model`` (``<adapter>``, or SGLang's
``<base>:<adapter>``); the base name answers with the adapters disabled. They are given at start
(--lora-modules NAME=PATH ...) or, with --enable-lora, loaded and unloaded while the server runs
through vLLM's runtime API (POST /v1/load_lora_adapter {"lora_name", "lora_path"} and
/v1/unload_lora_adapter {"lora_name"}), which only callers on this machine (loopback) may use: the
ModelService's adapter sidecar, in the same pod. Loading waits for the generation under way.

It binds 127.0.0.1 unless told otherwise (--host; the ModelService Deployment passes 0.0.0.0,
for its Service). With an API key (env KUBEFORGE_API_KEY, or --api-key-file) every /v1/*
request must carry ``Authorization: Bearer <key>``; /health never needs it (probes). The
chat template, tokenization and generation run in worker threads, so /health answers while
a long prompt is tokenized or a generation runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from kubeforge.runtime import data

log = logging.getLogger("kubeforge.serve")
DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
HEALTH_PATH = "/health"
API_PREFIX = "/v1/"
ENV_API_KEY = "KUBEFORGE_API_KEY"
SEED_MAX = 2**63 - 1  # what torch.manual_seed and OpenAI's API take (int64, not negative)
LOAD_LORA_PATH = "/v1/load_lora_adapter"  # vLLM's runtime LoRA API, same paths and bodies
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"
ADAPTER_CONFIG = "adapter_config.json"
LORA_NAME = r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,127}$"
LOOPBACK = ("127.0.0.1", "::1")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def response(self) -> web.Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number between {low} and {high} (got {value!r})", key)
    return float(value)


def sampling(body: dict, room: int) -> Sampling:
    """The generation settings of a request, validated; ``room`` is how many tokens the context leaves."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(256, room)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be a positive integer (got {max_tokens!r})", "max_tokens")
    if max_tokens > room:
        raise BadRequest(
            f"this model's context leaves {room} tokens after the prompt; 'max_tokens' asked for {max_tokens}",
            "max_tokens",
            code="context_length_exceeded",
        )
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    n = body.get("n", 1)
    if n not in (1, None):
        raise BadRequest("only 'n': 1 is supported by this server", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise BadRequest(f"'seed' must be an integer between 0 and {SEED_MAX} (got {seed!r})", "seed")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=tuple(stop),
        seed=seed,
    )


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"messages[{i}].role must be system, developer, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class ModelServer:
    def __init__(
        self,
        model_dir: Path,
        served_name: str,
        max_model_len: int | None = None,
        *,
        api_key: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        adapters: Mapping[str, Path] | None = None,
        enable_lora: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32 if not torch.cuda.is_available() else "auto"
        )
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.model.eval()
        self.name = served_name
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_len = min(max_model_len or limit, limit)
        self.created = int(time.time())
        self.lock = asyncio.Lock()
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.enable_lora = enable_lora  # the runtime LoRA API (loopback callers only)
        self.adapters: dict[str, Path] = {}  # name -> folder; once there is one, self.model is a PeftModel
        for name, folder in (adapters or {}).items():
            self.load_adapter(name, Path(folder))

    # ------------------------------------------------------------------ HTTP
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.max_request_bytes)
        app.router.add_get(HEALTH_PATH, self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        if self.enable_lora:
            app.router.add_post(LOAD_LORA_PATH, self._load_lora)
            app.router.add_post(UNLOAD_LORA_PATH, self._unload_lora)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            self._authorize(request)
            self._check_size(request)
            return await handler(request)
        except BadRequest as err:
            return err.response()
        except web.HTTPRequestEntityTooLarge as err:  # a chunked body over the limit, found while reading it
            return self._too_large(err.status).response()
        except web.HTTPException as err:
            return BadRequest(f"{request.method} {request.path}: {err.reason}", status=err.status).response()
        except Exception as err:  # a bug of ours, still answered in the API's shape
            log.exception("request failed")
            return BadRequest(f"internal error: {type(err).__name__}", status=500).response()

    def _authorize(self, request: web.Request) -> None:
        """With an API key, every /v1/* request carries it as a bearer token (compared in constant time)."""
        if self.api_key is None or not request.path.startswith(API_PREFIX):
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise BadRequest("Incorrect or missing API key: send 'Authorization: Bearer <key>'", status=401,
                             code="invalid_api_key")  # fmt: skip

    def _check_size(self, request: web.Request) -> None:
        """A declared body over the limit is refused before a byte of it is read."""
        if request.content_length is not None and request.content_length > self.max_request_bytes:
            raise self._too_large(413)

    def _too_large(self, status: int) -> BadRequest:
        return BadRequest(f"the request body is larger than this server's limit of {self.max_request_bytes} bytes",
                          status=status, code="request_too_large")  # fmt: skip

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, _: web.Request) -> web.Response:
        model = {"id": self.name, "object": "model", "created": self.created, "owned_by": "kubeforge",
                 "max_model_len": self.max_len, "root": self.name, "parent": None}  # fmt: skip
        adapters = [{**model, "id": name, "root": str(folder), "parent": self.name}
                    for name, folder in sorted(self.adapters.items())]  # fmt: skip
        return web.json_response({"object": "list", "data": [model, *adapters]})

    def _adapter_of(self, model: object) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for any other name."""
        if model == self.name:
            return None
        if isinstance(model, str):
            name = model.removeprefix(f"{self.name}:")  # SGLang's <base>:<adapter> form
            if name in self.adapters:
                return name
        known = ", ".join(f"`{n}`" for n in [self.name, *sorted(self.adapters)])
        raise BadRequest(f"The model `{model}` does not exist; this server has {known}", "model", 404,
                         "model_not_found")  # fmt: skip

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as err:  # ValueError: JSONDecodeError, or an int over 4300 digits
            raise BadRequest(f"the request body is not JSON: {err}") from err
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        self._adapter_of(body.get("model"))
        return body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._complete(request, body, _messages(body), chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", "prompt")
        return await self._complete(request, body, prompt, chat=False)

    # ------------------------------------------------------------------ generation
    def _prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """The prompt's token ids (a chat is rendered with its template first); runs in a worker thread."""
        if isinstance(prompt, list):
            prompt = data.render_chat(prompt, self.tokenizer, add_generation_prompt=True)
        return data.prompt_ids(self.tokenizer, prompt)

    async def _complete(self, request: web.Request, body: dict, prompt: str | list[dict[str, str]], *,
                        chat: bool) -> web.StreamResponse:  # fmt: skip
        ids = await asyncio.get_running_loop().run_in_executor(None, self._prompt_ids, prompt)
        if len(ids) >= self.max_len:
            raise BadRequest(f"the prompt has {len(ids)} tokens; this model's context is {self.max_len}", "messages"
                             if chat else "prompt", code="context_length_exceeded")  # fmt: skip
        settings = sampling(body, self.max_len - len(ids))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false", "stream")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        model = body["model"]
        async with self.lock:  # the adapter set changes only under it, so the one looked up stays loaded
            adapter = self._adapter_of(model)
            if not stream:
                text, tokens, stopped = await asyncio.get_running_loop().run_in_executor(
                    None, self._generate, ids, settings, adapter
                )
                finish = "stop" if stopped or tokens < settings.max_tokens else "length"
                choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                usage = {"prompt_tokens": len(ids), "completion_tokens": tokens, "total_tokens": len(ids) + tokens}
                return web.json_response({"id": rid, "object": kind, "created": int(time.time()),
                                          "model": model, "choices": [choice], "usage": usage})  # fmt: skip
            return await self._stream(request, ids, settings, rid, chat, model, adapter)

    def _generate_kwargs(self, ids: list[int], settings: Sampling) -> dict[str, Any]:
        import torch

        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        tensor = torch.tensor([ids], device=self.model.device)
        kwargs: dict[str, Any] = {
            "input_ids": tensor,
            "attention_mask": torch.ones_like(tensor),
            "max_new_tokens": settings.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _selected(self, adapter: str | None) -> contextlib.AbstractContextManager[Any]:
        """Where ``self.model`` generates with ``adapter`` (None: the base, its adapters disabled). Called
        under self.lock, in the thread that generates."""
        if not self.adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _generate(self, ids: list[int], settings: Sampling, adapter: str | None = None) -> tuple[str, int, bool]:
        import torch

        with torch.no_grad(), self._selected(adapter):
            out = self.model.generate(**self._generate_kwargs(ids, settings))
        new = out[0, len(ids) :]
        text, stopped = _cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), settings.stop)
        return text, len(new), stopped

    def _finish(self, streamer: Any, worker: threading.Thread, text: str) -> int:
        """Drain ``streamer`` (when given), wait for ``worker``'s generate; the tokens ``text`` holds."""
        if streamer is not None:
            for _ in streamer:
                pass
        worker.join()
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _stream(self, request: web.Request, ids: list[int], settings: Sampling, rid: str,
                      chat: bool, model: str, adapter: str | None) -> web.StreamResponse:  # fmt: skip
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs = {**self._generate_kwargs(ids, settings), "streamer": streamer}

        def generate() -> None:
            with self._selected(adapter):
                self.model.generate(**kwargs)

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        async def send(delta: str | None, finish: str | None, first: bool = False) -> None:
            if chat:
                content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            chunk = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        if chat:
            await send(None, None, first=True)
        loop = asyncio.get_running_loop()
        text, sent, stopped = "", 0, False
        while True:
            piece = await loop.run_in_executor(None, next, streamer, None)
            if piece is None:
                break
            text += piece
            visible, stopped = _cut_at_stop(text, settings.stop)
            if len(visible) > sent:
                await send(visible[sent:], None)
                sent = len(visible)
            if stopped:
                break
        # let generate finish before the next request (after a stop, the rest of it and the streamer's
        # end marker are still to come); in a worker thread, as all waiting on generate is
        produced = await loop.run_in_executor(None, self._finish, streamer if stopped else None, worker, text)
        await send(None, "stop" if stopped or produced < settings.max_tokens else "length")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ LoRA adapters
    def load_adapter(self, name: str, folder: Path) -> None:
        """Load the peft LoRA adapter in ``folder`` as ``name``; BadRequest when it is not one or does not fit
        the base model (the server is left as it was)."""
        from peft import PeftConfig, PeftModel

        if not re.fullmatch(LORA_NAME, name) or name == self.name:
            raise BadRequest(f"'lora_name' must match {LORA_NAME} and differ from the base model's name "
                             f"(got {name!r})", "lora_name")  # fmt: skip
        if name in self.adapters:
            raise BadRequest(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        config_file = folder / ADAPTER_CONFIG
        try:
            peft_type = json.loads(config_file.read_text()).get("peft_type")
        except (OSError, ValueError, AttributeError) as err:
            raise BadRequest(f"{folder}: not a peft adapter ({ADAPTER_CONFIG} unreadable: {err})", "lora_path") from err
        if peft_type != "LORA":
            raise BadRequest(f"{folder}: a {peft_type} adapter; only LoRA adapters are served", "lora_path")
        try:
            if isinstance(self.model, PeftModel):
                try:
                    self.model.load_adapter(str(folder), adapter_name=name)
                except Exception:
                    if name in self.model.peft_config:
                        self.model.delete_adapter(name)
                    raise
            else:
                wrapped = PeftModel(self.model, PeftConfig.from_pretrained(str(folder)), adapter_name=name)
                try:
                    wrapped.load_adapter(str(folder), adapter_name=name)
                except Exception:
                    wrapped.unload()  # the LoRA layers out again: the base model as it was
                    raise
                self.model = wrapped
        except BadRequest:
            raise
        except Exception as err:  # a shape that does not fit this base model, unreadable weights
            raise BadRequest(f"{folder}: cannot load this adapter on {self.name}: {type(err).__name__}: {err}",
                             "lora_path") from err  # fmt: skip
        self.model.eval()
        self.adapters[name] = folder

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise BadRequest(f"The lora adapter '{name}' cannot be found.", "lora_name", 404, "model_not_found")
        if len(self.adapters) == 1:
            self.model = self.model.unload()  # the last one: back to the plain base model
            self.model.eval()
        else:
            if self.model.active_adapter == name:  # make another one active first (peft would, with a warning)
                self.model.set_adapter(next(n for n in self.adapters if n != name))
            self.model.delete_adapter(name)
        del self.adapters[name]

    def _local_caller(self, request: web.Request) -> None:
        if request.remote not in LOOPBACK:
            raise BadRequest("the LoRA adapter API answers callers on this machine only", status=403,
                             code="forbidden")  # fmt: skip

    async def _lora_request(self, request: web.Request, *keys: str) -> list[str]:
        self._local_caller(request)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as err:
            raise BadRequest(f"the request body is not JSON: {err}") from err
        values = [body.get(k) if isinstance(body, dict) else None for k in keys]
        for key, value in zip(keys, values, strict=True):
            if not isinstance(value, str) or not value:
                raise BadRequest(f"'{key}' must be a non-empty string", key)
        return values

    async def _load_lora(self, request: web.Request) -> web.Response:
        name, path = await self._lora_request(request, "lora_name", "lora_path")
        async with self.lock:  # after the generation under way; none starts until it is loaded
            await asyncio.get_running_loop().run_in_executor(None, self.load_adapter, name, Path(path))
        log.info("loaded LoRA adapter %r from %s", name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        (name,) = await self._lora_request(request, "lora_name")
        async with self.lock:
            await asyncio.get_running_loop().run_in_executor(None, self.unload_adapter, name)
        log.info("unloaded LoRA adapter %r", name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def lora_modules(values: list[str]) -> dict[str, Path]:
    """--lora-modules NAME=PATH ... as a mapping (vLLM's form)."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules: {value!r} is not NAME=PATH")
        out[name] = Path(path)
    return out


def api_key(path: str | None, environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The API key from --api-key-file, else from KUBEFORGE_API_KEY; None when neither is given.
    One that is given but empty is an error: serving without a key by accident is worse than not starting."""
    if path is not None:
        key, source = Path(path).read_text().strip(), path
    elif ENV_API_KEY in environ:
        key, source = environ[ENV_API_KEY].strip(), ENV_API_KEY
    else:
        return None
    if not key:
        raise ValueError(f"{source}: the API key is empty")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge.runtime.serve")
    parser.add_argument("--model", required=True, help="the model folder")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--api-key-file", default=None,
                        help=f"a file holding the API key /v1/* requests must send as a bearer token "
                             f"(default: env {ENV_API_KEY}; neither: no key)")  # fmt: skip
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body accepted; larger ones get 413 (default %(default)s)")  # fmt: skip
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="LoRA adapters (peft folders) to serve, each under its own model name")  # fmt: skip
    parser.add_argument("--enable-lora", action="store_true",
                        help=f"accept {LOAD_LORA_PATH} and {UNLOAD_LORA_PATH} from loopback callers")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        print(f"kubeforge serve: {model_dir}: no config.json (is this a model folder?)", file=sys.stderr)
        return 2
    if args.max_request_bytes < 1:
        print("kubeforge serve: --max-request-bytes must be at least 1", file=sys.stderr)
        return 2
    try:
        key = api_key(args.api_key_file)
        modules = lora_modules(args.lora_modules)
    except (OSError, ValueError) as err:
        print(f"kubeforge serve: {err}", file=sys.stderr)
        return 2
    lora: dict[str, Any] = {"adapters": modules} if modules else {}
    if args.enable_lora:
        lora["enable_lora"] = True
    try:
        server = ModelServer(model_dir, args.served_model_name or model_dir.name, args.max_model_len, api_key=key,
                             max_request_bytes=args.max_request_bytes, **lora)  # fmt: skip
    except BadRequest as err:  # an adapter given at start that cannot be served
        print(f"kubeforge serve: {err.message}", file=sys.stderr)
        return 2
    if key is None and args.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("no API key (%s or --api-key-file): anyone who reaches %s:%d can use the model",
                    ENV_API_KEY, args.host, args.port)  # fmt: skip
    log.info("serving %s as %r on %s:%d (OpenAI API under /v1%s)", model_dir, server.name, args.host, args.port,
             ", API key required" if key else "")  # fmt: skip
    web.run_app(server.app(), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
