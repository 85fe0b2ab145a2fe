"""Rank 0's progress: a JSON endpoint (the contract's port and path), Prometheus metrics at METRICS_PATH
on the same port, and readable log lines.

The metrics are read from the same snapshot as the JSON at scrape time, each labelled with the job's
``namespace`` and ``job_name`` (kube-state-metrics' names for a Job's). The objective's own metrics
(DPO: TRL's ``rewards/margins``...) are exported under ``objective_metric(name)`` when a step reported
them. MFU is not exported: the runtime does not know the model's FLOPs per token.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kubeforge.runtime.contract import JobIdentity

METRICS_PATH = "/metrics"
PREFIX = "kubeforge_train_"
LABELS = ("namespace", "job_name")
# name (as exposed; a counter's samples end in _total) -> (type, help, snapshot key)
METRICS: dict[str, tuple[str, str, str]] = {
    f"{PREFIX}step": ("gauge", "Optimizer steps done", "step"),
    f"{PREFIX}total_steps": ("gauge", "Optimizer steps the run makes", "totalSteps"),
    f"{PREFIX}loss": ("gauge", "Loss of the last step", "loss"),
    f"{PREFIX}epoch": ("gauge", "Epochs done (fractional)", "epoch"),
    f"{PREFIX}tokens": ("counter", "Tokens trained on since the process started", "tokens"),
    f"{PREFIX}tokens_per_second": ("gauge", "Tokens per second since the process started", "tokensPerSecond"),
    f"{PREFIX}eta_seconds": ("gauge", "Estimated seconds to the last step", "etaSeconds"),
}


def objective_metric(name: str) -> str:
    """The exported name of an objective's metric: ``rewards/margins`` -> ``kubeforge_train_rewards_margins``."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", name)


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.step = start_step
        self.start_step = start_step
        self.loss: float | None = None
        self.epoch = 0.0
        self.tokens = 0
        self.metrics: dict[str, float] = {}  # the objective's, of the last step (dpo: TRL's names)
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def update(
        self, step: int, loss: float, tokens: int, epoch: float, metrics: dict[str, float] | None = None
    ) -> None:
        with self.lock:
            self.step, self.loss, self.epoch = step, loss, epoch
            self.tokens += tokens
            if metrics:
                self.metrics = {k: round(float(v), 6) for k, v in metrics.items()}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            elapsed = max(1e-9, time.monotonic() - self.started)
            done = self.step - self.start_step
            rate = done / elapsed
            eta = int((self.total - self.step) / rate) if rate > 0 else None
            out = {
                "step": self.step,
                "totalSteps": self.total,
                "loss": self.loss,
                "epoch": round(self.epoch, 3),
                "tokensPerSecond": round(self.tokens / elapsed, 1),
                "etaSeconds": eta,
            }
            if self.metrics:  # only objectives that report any (dpo): an sft snapshot keeps its keys
                out["metrics"] = dict(self.metrics)
            return out

    def tokens_seen(self) -> int:
        with self.lock:
            return self.tokens

    def line(self) -> str:
        s = self.snapshot()
        loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
        eta = f"{s['etaSeconds']}s" if s["etaSeconds"] is not None else "-"
        metrics = s.get("metrics", {})
        dpo = (
            f" margin {metrics['rewards/margins']:.4f} accuracy {metrics['rewards/accuracies']:.2f}"
            if "rewards/margins" in metrics and "rewards/accuracies" in metrics
            else ""
        )
        return (
            f"step {s['step']}/{s['totalSteps']} loss {loss}{dpo} epoch {s['epoch']:.2f} "
            f"tokens/s {s['tokensPerSecond']:.0f} eta {eta}"
        )


class _Collector:
    """The snapshot as Prometheus metric families, read at each scrape."""

    def __init__(self, progress: Progress, job: JobIdentity | None):
        self.progress = progress
        self.labels = [job.namespace, job.name] if job else ["", ""]

    def collect(self) -> Iterator[Metric]:
        snap = self.progress.snapshot()
        values: dict[str, Any] = {**snap, "tokens": self.progress.tokens_seen()}
        for name, (kind, doc, key) in METRICS.items():
            if values.get(key) is None:  # no loss before the first step, no ETA before a rate
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            metric = family(name, doc, labels=LABELS)
            metric.add_metric(self.labels, float(values[key]))
            yield metric
        for key, value in sorted(snap.get("metrics", {}).items()):
            metric = GaugeMetricFamily(objective_metric(key), f"The objective's {key} of the last step", labels=LABELS)
            metric.add_metric(self.labels, float(value))
            yield metric


def serve(progress: Progress, port: int, path: str, job: JobIdentity | None = None) -> ThreadingHTTPServer | None:
    """Serve the snapshot at http://0.0.0.0:port/path and its metrics at METRICS_PATH, labelled with
    ``job``'s namespace and name; None when the port is taken (progress is best effort)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(progress, job))  # type: ignore[arg-type]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == path:
                body, content_type = json.dumps(progress.snapshot()).encode(), "application/json"
            elif self.path == METRICS_PATH:
                body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
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
