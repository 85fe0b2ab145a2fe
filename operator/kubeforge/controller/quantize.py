"""One level-triggered reconcile of a QuantizeJob, as a pure function.

1. the spec is valid (else Accepted=False/InvalidSpec);
2. the source: a FineTuneJob that has not succeeded yet keeps the job Waiting with
   SourceReady=False/WaitingForSource; one that failed fails it (SourceFailed); a URI is
   ready at once;
3. the pod is sized from the source model's architecture and the GPU pools
   (planner/quantize_size.py): Planned=True/Sized with the estimate, Planned=True/
   DefaultResources where the architecture is unknown (the fixed defaults), Planned=False/
   Infeasible where no pool holds it (nothing is created; it waits for the inventory or a
   new spec); status.resources says what the pod requests and why;
4. the children (contract ConfigMap, Job) are rendered once the source is ready and
   applied where missing; the calibration data defaults to the FineTuneJob's dataset;
5. the phase follows the Job: Complete -> Succeeded with the artifact and metrics from
   the pod's termination message, Failed -> Failed with its reason and message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubeforge.api.kinds import QUANTIZEJOB
from kubeforge.api.quantize import Calibration, QuantizeJob
from kubeforge.api.validation import check
from kubeforge.controller.conditions import find
from kubeforge.controller.sources import SOURCE_READY, Lookup, resolve
from kubeforge.controller.state import (
    ACCEPTED,
    FAILED,
    PLANNED,
    TERMINAL,
    Decision,
    State,
    artifact,
    artifact_message,
    exists_equal,
    job_failed,
    of_kind,
    termination,
)
from kubeforge.inventory.pools import Inventory
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.quantize_size import QuantizeSizing, size_quantize
from kubeforge.render.quantize import render_quantize, resources_status

RUNNING, SUCCEEDED = "Running", "Succeeded"


@dataclass(frozen=True)
class QuantizeObserved:
    body: Mapping[str, Any]
    now: str
    lookup: Lookup
    children: Sequence[Mapping[str, Any]] = ()
    pods: Sequence[Mapping[str, Any]] = ()
    architecture: Architecture | None = None  # of the source's base model, when known
    architecture_error: str | None = None  # why it is not known
    inventory: Inventory | None = None  # the GPU pools (None: not observed; one GPU of any type)


def decide_quantize(obs: QuantizeObserved) -> Decision:
    old = dict(obs.body.get("status") or {})
    meta = obs.body.get("metadata") or {}
    state = State(old, meta.get("generation"), obs.now, QUANTIZEJOB.kind)
    job, problems = check({k: obs.body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in obs.body})
    batch = of_kind(obs.children, "Job")
    if problems or not isinstance(job, QuantizeJob):
        state.set(ACCEPTED, "False", "InvalidSpec", "; ".join(str(p) for p in problems))
        if old.get("phase") not in TERMINAL and batch is None:
            state.phase = "Failed"
        return state.decision(old)
    state.set(ACCEPTED, "True", "SpecValid", "the spec is valid")
    if old.get("phase") in TERMINAL and find(old.get("conditions") or [], old["phase"]):
        return state.decision(old)

    if batch is None:
        ref = job.spec.source.fine_tune_job_ref
        source = resolve({"FineTuneJob": ref.name if ref else None}, job.spec.source.uri, obs.lookup)
        if not source.ready:
            state.set(SOURCE_READY, "False", source.reason, source.message)
            if source.failed:
                state.set(FAILED, "True", source.reason, source.message)
                state.phase = "Failed"
            else:
                state.phase = "Waiting"
            return state.decision(old)
        state.set(SOURCE_READY, "True", "SourceReady", source.message)
        state.status["source"] = source.status()
        upstream = obs.lookup("FineTuneJob", ref.name) if ref else None
        training_data = ((upstream or {}).get("spec") or {}).get("dataset", {}).get("uri")
        sizing = size(job, obs)
        state.status["resources"] = resources_status(sizing)
        state.status["gpus"] = sizing.gpus
        if not sizing.feasible:
            state.set(PLANNED, "False", "Infeasible", sizing.reason)
            state.phase = "Pending"
            return state.decision(old)
        state.set(PLANNED, "True", "Sized" if sizing.sized_from == "model" else "DefaultResources", sizing.reason)
        desired = render_quantize(job, source_uri=source.uri or "", default_data_uri=training_data,
                                  uid=meta.get("uid"), sizing=sizing)  # fmt: skip
        state.set(RUNNING, "False", "Creating", "creating the quantization Job")
        state.phase = "Pending"
        return state.decision(old, [d for d in desired if not exists_equal(d, obs.children)])

    _follow(state, batch, obs)
    return state.decision(old)


def size(job: QuantizeJob, obs: QuantizeObserved) -> QuantizeSizing:
    """The quantizer pod's resources: from the source model where its architecture is known."""
    cal = job.spec.calibration or Calibration()  # its defaults, as the contract's
    why = obs.architecture_error or "the source model's architecture is unknown (no catalog entry, no config.json)"
    return size_quantize(
        job.spec.method,
        obs.architecture,
        samples=cal.samples,
        max_seq_length=cal.max_seq_length,
        inventory=obs.inventory,
        gpu_type=job.spec.resources.gpu_type,
        node_selector=job.spec.resources.node_selector,
        unknown=why,
    )


def latest_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return max(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", default=None)


def _follow(state: State, batch: Mapping[str, Any], obs: QuantizeObserved) -> None:
    status = batch.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if status.get("startTime") and not state.status.get("startTime"):
        state.status["startTime"] = status["startTime"]
    pod = latest_pod(obs.pods)
    if true.get("Complete"):
        summary = termination(pod)
        state.status["completionTime"] = status.get("completionTime") or obs.now
        if summary and summary.get("uri"):
            state.status["artifact"] = {k: v for k, v in artifact(summary, obs.now).items() if k != "metrics"}
            state.status["metrics"] = {k: float(v) for k, v in (summary.get("metrics") or {}).items()
                                       if isinstance(v, int | float)}  # fmt: skip
        state.set(RUNNING, "False", "Completed", "the quantizer finished")
        state.set(SUCCEEDED, "True", "Completed", artifact_message(summary))
        state.phase = "Succeeded"
        return
    failed = true.get("Failed")
    if failed:
        job_failed(state, failed, termination(pod), "quantizer", obs.now)
        return
    running = any((p.get("status") or {}).get("phase") == "Running" for p in obs.pods)
    state.set(RUNNING, "True" if running else "False", "PodRunning" if running else "PodPending",
              "the quantizer is running" if running else "waiting for the quantizer pod")  # fmt: skip
    state.phase = "Running" if running else "Pending"
