"""`python -m kubeforge.runtime.adapters`: keep a serving engine's LoRA adapters equal to its ModelService's list.

It runs beside the engine in each replica (a native sidecar: an init container with restartPolicy
Always, so it starts first and stops last). The list is a ConfigMap mounted at ADAPTERS_CONFIG_DIR as
a whole volume, which the kubelet updates in place (about a minute after the operator changes it):
nothing in the pod template names an adapter, so adding, removing or updating one restarts nothing.

    start  fetch every listed adapter (hf:// and s3:// into ADAPTERS_DIR/<name>-<version>; pvc:// and
           local paths are mounted), read each adapter_config.json's r, and write ADAPTERS_RANK_FILE: the
           --max-lora-rank the engine starts with (the largest of those ranks and --min-rank, the
           operator's floor from the ranks it knows, as the engine accepts it). Then /started answers 200
           (the startup probe), and the kubelet starts the engine.
    then   wait for the engine's /health, load every adapter through the engine's runtime LoRA API;
           /ready answers 200 once each adapter of the list was tried (the pod takes traffic with its
           adapters loaded).
    loop   every --interval seconds, read the list again: load the new adapters, unload the removed ones,
           reload the changed ones (a new URI or digest: a FineTuneJob's new artifact), without a restart.

The engines' runtime LoRA APIs (each POST {"lora_name", "lora_path"} to load, {"lora_name"} to unload):
vLLM /v1/load_lora_adapter and /v1/unload_lora_adapter (the engine runs with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), SGLang /load_lora_adapter and /unload_lora_adapter, kubeforge's
transformers server the same paths as vLLM (with --enable-lora; loopback callers only).

A loaded adapter is unloaded and loaded again when a load says it is there already (this sidecar
restarted while the engine kept running); the adapters are loaded again when the engine restarted (it
was unhealthy, or, for vLLM and the transformers server, /v1/models no longer lists them). An adapter
that cannot be served (not found, not a LoRA adapter, a rank above what the engine started with,
refused by the engine) is reported on /status and in the log, and tried again after --retry seconds or
when its entry changes; the others are served.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubeforge.runtime.contract import (
    ADAPTERS_CONFIG_DIR,
    ADAPTERS_CONFIG_FILE,
    ADAPTERS_DIR,
    ADAPTERS_PORT,
    ADAPTERS_RANK_FILE,
    ADAPTERS_READY_PATH,
    ADAPTERS_STARTED_PATH,
    AdapterSet,
    ServedAdapter,
    engine_lora_rank,
)

log = logging.getLogger("kubeforge.adapters")
ADAPTER_CONFIG = "adapter_config.json"
COMPLETE = ".kubeforge-complete"  # written into a fetched folder once all of it is there
ENGINE_API = {  # engine -> (load path, unload path)
    "vllm": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
    "sglang": ("/load_lora_adapter", "/unload_lora_adapter"),
    "transformers": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
}
ENV_API_KEY = "KUBEFORGE_API_KEY"


class AdapterError(Exception):
    """This adapter cannot be served (the message says why); the others can."""


def lora_rank(folder: Path) -> int:
    """The rank an engine must hold for the peft LoRA adapter in ``folder``: its r, or the largest of its
    per-module ranks (rank_pattern)."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{folder}: no readable {ADAPTER_CONFIG} (a merged model, not an adapter?): {err}") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{folder}: a {kind} adapter; only LoRA adapters are served")
    ranks = [config.get("r"), *((config.get("rank_pattern") or {}).values())]
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool) and r > 0]
    if not ranks:
        raise AdapterError(f"{folder}: {ADAPTER_CONFIG} has no rank r")
    return max(ranks)


def version(adapter: ServedAdapter) -> str:
    """What identifies this version of an adapter: a change of URI, revision or digest is a new one."""
    text = json.dumps([adapter.location.model_dump(), adapter.digest], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_set(path: Path) -> AdapterSet:
    """The adapter list in ``path``; an empty one when there is no file (no adapters configured)."""
    try:
        return AdapterSet.model_validate_json(path.read_text())
    except FileNotFoundError:
        return AdapterSet()


class Engine:
    """An engine's runtime LoRA API on this pod (loopback)."""

    def __init__(self, kind: str, url: str, api_key: str | None = None, timeout: float = 600):
        if kind not in ENGINE_API:
            raise ValueError(f"unknown engine {kind!r}")
        self.kind, self.url, self.api_key, self.timeout = kind, url.rstrip("/"), api_key, timeout

    def _request(self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST" if data else "GET")
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def healthy(self) -> bool:
        try:
            return self._request("/health", timeout=5)[0] == 200
        except OSError:
            return False

    def models(self) -> set[str] | None:
        """The model names the engine answers to (vLLM and the transformers server list their adapters in
        /v1/models); None where that is not known (SGLang)."""
        if self.kind == "sglang":
            return None
        status, text = self._request("/v1/models", timeout=30)
        if status != 200:
            return None
        return {m.get("id") for m in json.loads(text).get("data") or [] if isinstance(m, dict)}

    def load(self, name: str, path: Path) -> None:
        status, text = self._request(ENGINE_API[self.kind][0], {"lora_name": name, "lora_path": str(path)})
        if status != 200 and "already" in text.lower():  # loaded before this sidecar (re)started
            self.unload(name)
            status, text = self._request(ENGINE_API[self.kind][0], {"lora_name": name, "lora_path": str(path)})
        if status != 200:
            raise AdapterError(f"the {self.kind} engine refused it ({status}): {text.strip()[:500]}")

    def unload(self, name: str) -> None:
        status, text = self._request(ENGINE_API[self.kind][1], {"lora_name": name})
        if status != 200:  # not loaded (any more): nothing to do; anything else is only logged
            log.info("unloading %s: the engine answered %s: %s", name, status, text.strip()[:200])


@dataclass
class Fetched:
    name: str
    version: str
    path: Path
    rank: int
    owned: bool  # fetched into ADAPTERS_DIR by us (removed when no longer served); else mounted


@dataclass
class Sync:
    """The engine's adapters made equal to the list in ``config``; one ``step`` at a time."""

    config: Path
    root: Path
    engine: Engine
    max_rank: int | None = None  # what the engine started with (None: any)
    retry: float = 60.0
    fetched: dict[str, Fetched] = field(default_factory=dict)
    loaded: dict[str, Fetched] = field(default_factory=dict)
    failed: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # name -> (version, why, when)

    def fetch(self, adapter: ServedAdapter) -> Fetched:
        """The adapter on this pod's disk (fetched once per version), with its rank."""
        from kubeforge.runtime import fetch

        key = version(adapter)
        known = self.fetched.get(adapter.name)
        if known is not None and known.version == key:
            return known
        if adapter.location.local_path:
            path, owned = Path(adapter.location.local_path), False
            if not path.is_dir():
                raise AdapterError(f"{adapter.location.uri}: {path} is not a folder on this pod")
        else:
            path, owned = self.root / f"{adapter.name}-{key}", True
            if not (path / COMPLETE).exists():
                try:
                    fetch.local_path(adapter.location, dest=path)
                except (fetch.SourceMissing, ValueError, OSError) as err:
                    raise AdapterError(f"{adapter.location.uri}: {err}") from err
                (path / COMPLETE).write_text(adapter.location.uri)
        found = Fetched(adapter.name, key, path, lora_rank(path), owned)
        self.fetched[adapter.name] = found
        return found

    def prepare(self) -> list[Fetched]:
        """Before the engine starts: every listed adapter fetched (failures recorded), for the start rank."""
        out = []
        for adapter in read_set(self.config).adapters:
            try:
                out.append(self.fetch(adapter))
            except AdapterError as err:
                self._failed(adapter, str(err))
        return out

    def step(self) -> None:
        """One pass: unload what is gone or changed, then load what is listed and not loaded."""
        wanted = {a.name: a for a in read_set(self.config).adapters}
        present = self.engine.models() if self.loaded else None
        for name in [n for n in self.loaded if present is not None and n not in present]:
            log.warning("%s is no longer loaded in the engine (it restarted?): loading it again", name)
            del self.loaded[name]
        for name, have in list(self.loaded.items()):
            if name not in wanted or version(wanted[name]) != have.version:
                self.engine.unload(name)
                del self.loaded[name]
                log.info("unloaded %s (%s)", name, "changed" if name in wanted else "removed from the list")
        for name, have in list(self.fetched.items()):
            if name not in self.loaded and (name not in wanted or version(wanted[name]) != have.version):
                self._forget(have)
        for name in [n for n in self.failed if n not in wanted]:
            del self.failed[name]
        for name, adapter in wanted.items():
            if name in self.loaded:
                continue
            key, _, when = self.failed.get(name, ("", "", 0.0))
            if key == version(adapter) and time.monotonic() - when < self.retry:
                continue
            try:
                found = self.fetch(adapter)
                if self.max_rank is not None and found.rank > self.max_rank:
                    raise AdapterError(
                        f"rank {found.rank} is above the engine's --max-lora-rank {self.max_rank} (it started "
                        "before this adapter was listed): the replicas serve it once they restart"
                    )
                self.engine.load(name, found.path)
            except AdapterError as err:
                self._failed(adapter, str(err))
                continue
            self.loaded[name] = found
            self.failed.pop(name, None)
            log.info("loaded %s from %s (rank %d)", name, adapter.location.uri, found.rank)

    def _failed(self, adapter: ServedAdapter, why: str) -> None:
        log.error("adapter %s cannot be served: %s", adapter.name, why)
        self.failed[adapter.name] = (version(adapter), why, time.monotonic())

    def _forget(self, found: Fetched) -> None:
        self.fetched.pop(found.name, None)
        if found.owned and found.path.is_relative_to(self.root):
            shutil.rmtree(found.path, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        adapters: dict[str, Any] = {n: {"state": "loaded", "path": str(f.path), "rank": f.rank}
                                    for n, f in self.loaded.items()}  # fmt: skip
        adapters.update({n: {"state": "failed", "message": why} for n, (_, why, _) in self.failed.items()})
        return {"engine": self.engine.kind, "maxLoraRank": self.max_rank, "adapters": adapters}


def start_rank(engine: str, ranks: list[int], floor: int) -> int | None:
    """The --max-lora-rank the engine starts with: the largest rank it can take of ``ranks`` and ``floor``."""
    fitting = [r for r in [floor, *ranks] if engine_lora_rank(engine, r) is not None]
    return engine_lora_rank(engine, max(fitting, default=1))


class _Probes:
    """/started, /ready and /status on ADAPTERS_PORT."""

    def __init__(self, sync: Sync, port: int):
        self.started = threading.Event()
        self.ready = threading.Event()
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == ADAPTERS_STARTED_PATH:
                    self._send(200 if probes.started.is_set() else 503, {"started": probes.started.is_set()})
                elif path == ADAPTERS_READY_PATH:
                    self._send(200 if probes.ready.is_set() else 503, {"ready": probes.ready.is_set()})
                elif path == "/status":
                    self._send(200, sync.status())
                else:
                    self._send(404, {"error": "not found"})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:  # probes every few seconds: not logged
                return

        self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # every address: the kubelet probes the pod IP
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge.runtime.adapters")
    parser.add_argument("--engine", required=True, choices=sorted(ENGINE_API))
    parser.add_argument("--engine-url", default="http://127.0.0.1:8000")
    parser.add_argument("--config", default=f"{ADAPTERS_CONFIG_DIR}/{ADAPTERS_CONFIG_FILE}")
    parser.add_argument("--dir", default=ADAPTERS_DIR, help="where adapters are fetched, and the rank file")
    parser.add_argument("--min-rank", type=int, default=1, help="the operator's floor for the engine's rank")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between two reads of the list")
    parser.add_argument("--retry", type=float, default=60.0, help="seconds before a failed adapter is tried again")
    parser.add_argument("--port", type=int, default=ADAPTERS_PORT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    engine = Engine(args.engine, args.engine_url, api_key=os.environ.get(ENV_API_KEY) or None)
    sync = Sync(Path(args.config), root, engine, retry=args.retry)
    probes = _Probes(sync, args.port)
    ranks = [f.rank for f in sync.prepare()]
    sync.max_rank = start_rank(args.engine, ranks, args.min_rank)
    if sync.max_rank is not None:
        (root / ADAPTERS_RANK_FILE).write_text(f"{sync.max_rank}\n")
    log.info("%d adapter(s) fetched; the %s engine starts with --max-lora-rank %s", len(ranks), args.engine,
             sync.max_rank)  # fmt: skip
    probes.started.set()
    while True:
        if not engine.healthy():  # starting, or restarting: a restarted engine has lost what was loaded
            sync.loaded.clear()
            while not engine.healthy():
                time.sleep(2)
        try:
            sync.step()
            probes.ready.set()
        except (OSError, ValueError) as err:  # the engine went away, a list being rewritten: the next pass
            log.warning("adapter pass failed: %s", err)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
