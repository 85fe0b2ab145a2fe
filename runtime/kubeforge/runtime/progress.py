"""Rank 0's progress: a JSON endpoint (the contract's port and path), Prometheus metrics at METRICS_PATH
on the same port, and readable log lines.

The metrics are read from the same snapshot as the JSON at scrape time, each labelled with the job's
``namespace`` and ``job_name`` (kube-state-metrics' names for a Job's). The objective's own metrics
(DPO: TRL's ``rewards/margins``...) are exported under ``objective_metric(name)`` when a step reported
them. MFU (``kubeforge_train_mfu``) is exported where the device's peak is known (the contract's
``compute.peak_tflops``, from the planner's GPU catalog): never on a CPU or an unknown GPU.

Each update also goes to the experiment trackers (tracking.py) when a sink is given: the one place where
a step is reported.

MFU, model FLOPs utilization (Chowdhery et al. 2022, "PaLM", appendix B): the FLOPs the model needs per
token times the tokens per second, over the devices' peak. Per token, with N the parameters that multiply
(the input embedding is a lookup, so it is left out; a tied output head multiplies, so it counts once):

    6 N + 12 L H Q T         (PaLM; L layers, H query heads of dimension Q, sequence length T)

6 N: 2 FLOPs per parameter forward, 4 backward: the gradients of the activations and of the weights
(Kaplan et al. 2020, section 2.1; Narayanan et al. 2021, "Efficient Large-Scale Language Model Training
on GPU Clusters using Megatron-LM", section 5.1). A frozen weight (a LoRA base) needs no weight gradient:
4 N_frozen + 6 N_trainable. 12 L H Q T: the attention scores and their weighted sum, 2 matmuls of 2 L H Q T
forward, twice that backward; they have no weights, so they count in full for LoRA too. Recomputation for
gradient checkpointing is not model FLOPs (that would be hardware FLOPs utilization), nor is padding.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kubeforge.runtime.contract import Contract, JobIdentity

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


MFU_METRIC = f"{PREFIX}mfu"


def flops_per_token(*, trainable: int, frozen: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """Model FLOPs of one trained token (the module's docstring): 6 per trainable and 4 per frozen parameter that
    multiplies, plus PaLM's attention term."""
    return 6.0 * trainable + 4.0 * frozen + 12.0 * layers * heads * head_dim * seq_len


def mfu(tokens_per_second: float, flops_token: float, devices: int, peak_tflops: float) -> float:
    """The fraction of ``devices`` x ``peak_tflops`` the model's FLOPs reach at ``tokens_per_second`` (all devices')."""
    return tokens_per_second * flops_token / (devices * peak_tflops * 1e12)


def model_flops_per_token(config: Any, model: Any, method: str, seq_len: int) -> float | None:
    """``flops_per_token`` of a Hugging Face causal LM: the parameters counted on a meta-device copy of ``config``
    (exact and free, however the trained model is sharded), the trainable ones (LoRA: the adapters) on ``model``;
    None for an architecture without the usual fields."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(config)
        embedding = empty.get_input_embeddings().weight
        output = empty.get_output_embeddings()
        tied = output is not None and output.weight is embedding
        total = sum(p.numel() for p in empty.parameters())  # a tied weight once
        multiplying = total - (0 if tied else embedding.numel())
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
    except (AttributeError, ValueError, TypeError):
        return None
    if method == "full":
        trainable, frozen = multiplying, 0
    else:  # the adapters (ds_numel: a ZeRO-3 shard's whole size)
        trainable = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters() if p.requires_grad)
        frozen = multiplying
    return flops_per_token(trainable=trainable, frozen=frozen, layers=layers, heads=heads, head_dim=head_dim,
                           seq_len=seq_len)  # fmt: skip


def mfu_inputs(contract: Contract, config: Any, model: Any) -> dict[str, Any]:
    """Progress's MFU arguments for this run: none without the device's peak (a CPU, an unknown GPU)."""
    peak = contract.compute.peak_tflops
    if peak is None:
        return {}
    flops = model_flops_per_token(config, model, contract.training.method, contract.dataset.max_seq_length)
    return {"flops_token": flops, "devices": contract.parallel.world_size, "peak_tflops": peak}


def learning_rate(optimizer: Any) -> float | None:
    """The learning rate of the optimizer's first parameter group (torch, DeepSpeed and Megatron optimizers)."""
    try:
        return float(optimizer.param_groups[0]["lr"])
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def objective_metric(name: str) -> str:
    """The exported name of an objective's metric: ``rewards/margins`` -> ``kubeforge_train_rewards_margins``."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", name)


class Sink(Protocol):  # tracking.Tracker
    def log(self, step: int, scalars: dict[str, float]) -> None: ...


class Progress:
    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        flops_token: float | None = None,
        devices: int = 1,
        peak_tflops: float | None = None,
        sink: Sink | None = None,
    ):
        """``flops_token``, ``devices`` and ``peak_tflops`` give MFU (all known, or no MFU); ``sink`` receives
        every update's scalars (rank 0's experiment trackers)."""
        self.total = total_steps
        self.step = start_step
        self.start_step = start_step
        self.loss: float | None = None
        self.epoch = 0.0
        self.tokens = 0
        self.metrics: dict[str, float] = {}  # the objective's, of the last step (dpo: TRL's names)
        self.learning_rate: float | None = None
        self.flops = (flops_token, devices, peak_tflops) if flops_token and peak_tflops else None
        self.sink = sink
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def update(
        self,
        step: int,
        loss: float,
        tokens: int,
        epoch: float,
        metrics: dict[str, float] | None = None,
        learning_rate: float | None = None,
    ) -> None:
        with self.lock:
            self.step, self.loss, self.epoch = step, loss, epoch
            self.tokens += tokens
            self.learning_rate = learning_rate
            if metrics:
                self.metrics = {k: round(float(v), 6) for k, v in metrics.items()}
        if self.sink is not None:
            self.sink.log(step, self.scalars())

    def mfu(self) -> float | None:
        """Model FLOPs utilization since the process started; None where the FLOPs or the peak are unknown."""
        if self.flops is None:
            return None
        with self.lock:
            rate = self.tokens / max(1e-9, time.monotonic() - self.started)
        return mfu(rate, *self.flops)  # type: ignore[arg-type]

    def scalars(self) -> dict[str, float]:
        """What the trackers log at each step: loss, learning rate, epoch, tokens/s, MFU, the objective's metrics."""
        s = self.snapshot()
        out = {"loss": s["loss"], "learning_rate": self.learning_rate, "epoch": s["epoch"],
               "tokens_per_second": s["tokensPerSecond"], "mfu": self.mfu(), **s.get("metrics", {})}  # fmt: skip
        return {k: float(v) for k, v in out.items() if v is not None}

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
        utilization = self.progress.mfu()
        if utilization is not None:  # only where the device's peak is known (never on a CPU)
            metric = GaugeMetricFamily(MFU_METRIC, "Model FLOPs utilization since the process started", labels=LABELS)
            metric.add_metric(self.labels, utilization)
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
