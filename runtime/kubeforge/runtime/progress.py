"""Rank 0's progress: a JSON endpoint (the contract's port and path) and readable log lines."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.step = start_step
        self.start_step = start_step
        self.loss: float | None = None
        self.epoch = 0.0
        self.tokens = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def update(self, step: int, loss: float, tokens: int, epoch: float) -> None:
        with self.lock:
            self.step, self.loss, self.epoch = step, loss, epoch
            self.tokens += tokens

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            elapsed = max(1e-9, time.monotonic() - self.started)
            done = self.step - self.start_step
            rate = done / elapsed
            eta = int((self.total - self.step) / rate) if rate > 0 else None
            return {
                "step": self.step,
                "totalSteps": self.total,
                "loss": self.loss,
                "epoch": round(self.epoch, 3),
                "tokensPerSecond": round(self.tokens / elapsed, 1),
                "etaSeconds": eta,
            }

    def line(self) -> str:
        s = self.snapshot()
        loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
        eta = f"{s['etaSeconds']}s" if s["etaSeconds"] is not None else "-"
        return (
            f"step {s['step']}/{s['totalSteps']} loss {loss} epoch {s['epoch']:.2f} "
            f"tokens/s {s['tokensPerSecond']:.0f} eta {eta}"
        )


def serve(progress: Progress, port: int, path: str) -> ThreadingHTTPServer | None:
    """Serve the snapshot at http://0.0.0.0:port/path; None when the port is taken (progress is best effort)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != path:
                self.send_response(404)
                self.end_headers()
                return
            body = json.dumps(progress.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    except OSError:
        return None
    threading.Thread(target=server.serve_forever, daemon=True, name="progress").start()
    return server
