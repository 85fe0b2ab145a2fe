"""One level-triggered reconcile of a FineTuneJob, as a pure function.

    decide(Observed) -> Decision(apply, status, events)

Observed is everything the handler read (the object, the GPU inventory from the Node
index, the children and pods from the child indexes, rank 0's progress, the model's
architecture); Decision is everything it must do: children to apply (only those that
differ from what exists), the status to write once, the events to post. The steps:

1. the spec is valid (else Accepted=False/InvalidSpec, nothing else happens);
2. immutable fields match what the running gang was rendered from (else refused);
3. a plan: made against the current inventory while nothing runs (searched once per
   distinct spec, inventory and architecture: controller/plancache.py) (Planned=False/
   Infeasible keeps the job Pending with no children, and is retried when nodes
   change); once the gang exists its plan is the one in status, never changed under it;
4. the children are rendered and applied where missing or drifted (a Job's pod
   template is immutable, so an existing gang is never re-applied);
5. the phase follows the gang: suspended (Kueue) -> Waiting, pods running -> Running,
   Complete -> Succeeded with the artifact from rank 0's termination message,
   Failed -> Failed with the Job's reason and rank 0's message. Terminal phases stay.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubeforge.api.finetune import FineTuneJob
from kubeforge.api.kinds import FINETUNEJOB
from kubeforge.api.validation import check, immutable_changes
from kubeforge.controller.conditions import find
from kubeforge.controller.plancache import cached_plan
from kubeforge.controller.state import (
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
from kubeforge.planner import Architecture
from kubeforge.render import labels as L
from kubeforge.render.finetune import Gang, plan_digest, render_finetune
from kubeforge.runtime.contract import CONFIG_FILE

ACCEPTED, PLANNED, ADMITTED, RUNNING, SUCCEEDED, FAILED = (
    "Accepted", "Planned", "Admitted", "Running", "Succeeded", "Failed",
)  # fmt: skip
TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Observed:
    body: Mapping[str, Any]
    inventory: Inventory
    now: str
    children: Sequence[Mapping[str, Any]] = ()  # ConfigMaps, Services, Jobs, JobSets owned by the job
    pods: Sequence[Mapping[str, Any]] = ()
    architecture: Architecture | None = None
    architecture_error: str | None = None
    jobset_available: bool = False
    progress: Mapping[str, Any] | None = None


def decide(obs: Observed) -> Decision:
    old = dict(obs.body.get("status") or {})
    meta = obs.body.get("metadata") or {}
    generation = meta.get("generation")
    state = State(old, generation, obs.now, FINETUNEJOB.kind)

    user_part = {k: obs.body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in obs.body}
    job, problems = check(user_part)
    if problems or not isinstance(job, FineTuneJob):
        state.set(ACCEPTED, "False", "InvalidSpec", "; ".join(str(p) for p in problems))
        if old.get("phase") not in TERMINAL and not _gang(obs.children):
            state.phase = "Failed"
        return state.decision(old)
    state.set(ACCEPTED, "True", "SpecValid", "the spec is valid")

    gang_obj = _gang(obs.children)
    configmap = of_kind(obs.children, "ConfigMap")
    refused = _immutable_changes(job, configmap) if gang_obj is not None else []
    if refused:
        state.set(ACCEPTED, "False", "ImmutableFieldChanged",
                  "; ".join(refused) + "; the running gang keeps its spec")  # fmt: skip

    if old.get("phase") in TERMINAL and find(old.get("conditions") or [], old["phase"]):
        state.phase = old["phase"]
        return state.decision(old)

    apply: list[dict[str, Any]] = []
    if gang_obj is None:
        if obs.architecture is None:
            state.set(PLANNED, "False", "ArchitectureUnknown", obs.architecture_error or "unknown architecture")
            state.phase = "Pending"
            return state.decision(old)
        result = cached_plan(job.spec, obs.inventory, obs.architecture)
        if not result.feasible:
            alternatives = "; ".join(
                f"{a.change} ({a.strategy} on {a.total_gpus} x {a.gpu_type})" for a in result.alternatives
            )
            message = result.reason + (f". Nearest feasible: {alternatives}" if alternatives else "")
            state.set(PLANNED, "False", "Infeasible", message)
            state.status["plan"] = result.to_json()
            state.phase = "Pending"
            return state.decision(old)
        state.set(PLANNED, "True", "Planned", result.reason)
        state.status["plan"] = result.to_json()
        desired = render_finetune(job, result, gang=_gangof_kind(job, obs), uid=meta.get("uid"))
        apply = [d for d in desired if not exists_equal(d, obs.children)]
        state.set(ADMITTED, "False", "Creating", "creating the pod gang")
        state.phase = "Waiting"
        return state.decision(old, apply)

    # The gang exists: keep its plan; re-apply what drifted only when the plan is unchanged.
    if not refused and obs.architecture is not None:
        result = cached_plan(job.spec, obs.inventory, obs.architecture)
        running_digest = ((gang_obj.get("metadata") or {}).get("annotations") or {}).get(L.PLAN_DIGEST)
        if result.feasible and plan_digest(result) == running_digest:
            gang = "jobset" if gang_obj.get("kind") == "JobSet" else "job"
            desired = render_finetune(job, result, gang=gang, uid=meta.get("uid"))
            apply = [d for d in desired if d["kind"] in ("ConfigMap", "Service") and not exists_equal(d, obs.children)]
    if find(old.get("conditions") or [], PLANNED) is None:
        state.set(PLANNED, "True", "Planned", "the gang exists")
    _follow_gang(state, gang_obj, obs)
    return state.decision(old, apply)


def _gang(children: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return of_kind(children, "Job") or of_kind(children, "JobSet")


def _gangof_kind(job: FineTuneJob, obs: Observed) -> Gang:
    wanted = job.spec.resources.gang
    if wanted == "jobset" or (wanted == "auto" and obs.jobset_available):
        return "jobset"
    return "job"


def _immutable_changes(job: FineTuneJob, configmap: Mapping[str, Any] | None) -> list[str]:
    """The Immutable fields (api: immutable_changes) whose value differs from the spec the running gang was
    rendered from, as far as its contract records that spec (every field of model, dataset and output it
    carries, and the method); a field the contract does not carry counts as unchanged."""
    if configmap is None:
        return []
    try:
        contract = json.loads((configmap.get("data") or {}).get(CONFIG_FILE, "{}"))
    except json.JSONDecodeError:
        return []
    if not isinstance(contract, dict):
        return []
    dataset, output = contract.get("dataset") or {}, contract.get("output") or {}
    data_at, output_at = dataset.get("location") or {}, output.get("location") or {}
    recorded = {  # spec field -> {its field: the value the contract holds}
        "model": _carried(contract.get("model") or {}, "uri", "revision"),
        "dataset": {**_carried(data_at, "uri"), **_carried(dataset, "format", "max_seq_length", "packing")},
        "output": {**_carried(output_at, "uri"), **_carried(output, "merge")},
    }
    spec = job.spec
    update: dict[str, Any] = {k: getattr(spec, k).model_copy(update=v) for k, v in recorded.items() if v}
    update.update(_carried(contract.get("training") or {}, "method"))
    rendered_from = spec.model_copy(update=update)
    return [f"{p.path} {p.message}" for p in immutable_changes(rendered_from, spec)]


def _carried(section: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: section[k] for k in keys if k in section}


def _follow_gang(state: State, gang: Mapping[str, Any], obs: Observed) -> None:
    gstatus = gang.get("status") or {}
    conditions = {c.get("type"): c for c in gstatus.get("conditions") or [] if c.get("status") == "True"}
    plan = state.status.get("plan") or {}
    nodes = int(plan.get("nodes") or 1)
    if gstatus.get("startTime") and not state.status.get("startTime"):
        state.status["startTime"] = gstatus["startTime"]
    rank0 = rank0_pod(obs.pods)

    done = conditions.get("Complete") or conditions.get("Completed")
    failed = conditions.get("Failed")
    if done:
        summary = termination(rank0)
        state.status["completionTime"] = gstatus.get("completionTime") or obs.now
        if summary and summary.get("uri"):
            state.status["artifact"] = artifact(summary, obs.now)
        state.set(RUNNING, "False", "Completed", "the gang finished")
        state.set(SUCCEEDED, "True", "Completed", artifact_message(summary))
        state.phase = "Succeeded"
        return
    if failed:
        job_failed(state, failed, termination(rank0), "rank 0", obs.now)
        return
    spec = gang.get("spec") or {}
    if spec.get("suspend"):
        state.set(ADMITTED, "False", "Queued", "the gang waits for Kueue to admit it (all pods at once)")
        state.phase = "Waiting"
        return
    state.set(ADMITTED, "True", "Admitted", "the gang may start")
    running = [p for p in obs.pods if (p.get("status") or {}).get("phase") == "Running"]
    if len(running) >= nodes:
        state.set(RUNNING, "True", "PodsRunning", f"{len(running)} of {nodes} pod(s) running")
        state.phase = "Running"
        if obs.progress:
            state.status["progress"] = _progress(obs.progress, obs.now)
    else:
        state.set(RUNNING, "False", "PodsPending", f"{len(running)} of {nodes} pod(s) running")
        state.phase = "Waiting"


def rank0_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        index = labels.get(L.JOB_COMPLETION_INDEX_LABEL) or annotations.get("batch.kubernetes.io/job-completion-index")
        if str(index) == "0":
            return pod
    return None


READ_AT = "readAt"  # set by the reader (controller/progress_reader.py): when rank 0 answered


def _progress(progress: Mapping[str, Any], now: str) -> dict[str, Any]:
    """status.progress from rank 0's answer; updatedAt is when it answered, so that a pass that finds the
    same answer writes the same status (a pass's time there made every pass a write, and every write a pass)."""
    read_at = progress.get(READ_AT)
    out: dict[str, Any] = {"updatedAt": read_at if isinstance(read_at, str) else now}
    step, total = progress.get("step"), progress.get("totalSteps") or progress.get("total")
    if isinstance(step, int):
        out["step"] = step
    if isinstance(total, int) and total > 0:
        out["totalSteps"] = total
        if isinstance(step, int):
            out["percent"] = max(0, min(100, int(100 * step / total)))
    for src, dst in (("loss", "loss"), ("tokensPerSecond", "tokensPerSecond"), ("epoch", "epoch")):
        if isinstance(progress.get(src), int | float):
            out[dst] = float(progress[src])
    if isinstance(progress.get("etaSeconds"), int | float):
        out["etaSeconds"] = int(progress["etaSeconds"])
    return out
