"""Every phase of every kind, as the operator's own decide functions write it (no hand-written statuses).

SCENARIOS maps a name to the object (metadata, spec, and the status the pass decided) so that
tests can check what is derived from a status (Ready/Reconciling/Stalled, kstatus, the Argo CD
health checks) against what the operator really writes. Each object's metadata.generation is
its status.observedGeneration: it is reconciled.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache
from typing import Any

from kubeforge.controller.finetune import Observed, decide
from kubeforge.controller.quantize import QuantizeObserved, decide_quantize
from kubeforge.controller.service import ServiceObserved, decide_service, lineage
from kubeforge.controller.state import Decision
from kubeforge.planner.catalog import lookup as catalog
from kubeforge.runtime.contract import termination_message
from tests.builders import DELETE, finetune, quantize, service
from tests.planner.nodes import example_cluster

NOW = "2026-11-22T10:00:00Z"
H100 = example_cluster("h100-4x8.yaml")
A10 = example_cluster("a10-4x1.yaml")
QWEN = catalog("Qwen/Qwen3-8B")
LLAMA_70B = catalog("meta-llama/Llama-3.1-70B")
FTJ_ARTIFACT = {"uri": "pvc://models/support-bot", "digest": "sha256:aaa"}
QJ_ARTIFACT = {"uri": "pvc://models/support-bot-fp8", "digest": "sha256:q1"}


def live(doc: dict[str, Any], status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["metadata"].update(uid=f"uid-{doc['metadata']['name']}", generation=generation, resourceVersion="5")
    if status is not None:
        doc["status"] = copy.deepcopy(status)
    return doc


def written(doc: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """The object once the pass's status is stored."""
    out = copy.deepcopy(doc)
    out["status"] = copy.deepcopy(decision.status)
    return out


def child_status(decision: Decision, kind: str, **status: Any) -> list[dict[str, Any]]:
    """The children a pass applied, as they exist afterwards (``status`` on the one of ``kind``)."""
    children = copy.deepcopy(decision.apply)
    for child in children:
        if child["kind"] == kind:
            child["status"] = status
    return children


def pod(index: int | None = None, phase: str = "Running", summary: dict[str, Any] | str | None = None) -> dict:
    out: dict[str, Any] = {"metadata": {"name": f"p{index}", "labels": {}}, "status": {"phase": phase}}
    if index is not None:
        out["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] = str(index)
    if summary is not None:
        message = summary if isinstance(summary, str) else termination_message(summary)
        out["status"]["containerStatuses"] = [{"state": {"terminated": {"exitCode": 0, "message": message}}}]
    return out


COMPLETE = [{"type": "Complete", "status": "True"}]
FAILED = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "backoff limit reached"}]
OOM = json.dumps({"status": "failed", "error": "CUDA out of memory"})


# ---------------------------------------------------------------- FineTuneJob


def _ftj(**changes: Any) -> dict[str, Any]:
    changes.setdefault("resources.queue", DELETE)
    return live(finetune(**changes))


def _decide_ftj(doc: dict[str, Any], **kw: Any) -> Decision:
    kw.setdefault("inventory", H100)
    kw.setdefault("architecture", QWEN)
    return decide(Observed(body=doc, now=NOW, **kw))


def _ftj_gang(doc: dict[str, Any], job_status: dict[str, Any], pods=(), **kw: Any) -> dict[str, Any]:
    first = _decide_ftj(doc)
    again = written(doc, first)
    return written(again, _decide_ftj(again, children=child_status(first, "Job", **job_status), pods=list(pods), **kw))


def finetunejobs() -> dict[str, dict[str, Any]]:
    big = _ftj(model={"uri": "hf://meta-llama/Llama-3.1-70B"}, method="full", lora=DELETE)
    mystery = _ftj(model={"uri": "pvc://models/mystery"})
    invalid = _ftj(**{"lora.rank": 0})
    queued = live(finetune(**{"resources.queue": "q"}))
    first = _decide_ftj(_ftj())
    running = [pod(0), pod(1)]
    refused = _ftj_gang(_ftj(), {"active": 2}, running)
    refused["metadata"]["generation"] = 2
    refused["spec"]["model"]["uri"] = "hf://Qwen/Qwen3-4B"
    refused_children = child_status(first, "Job", active=2)
    done = {"status": "succeeded", **FTJ_ARTIFACT}
    return {
        "infeasible": written(big, _decide_ftj(big, inventory=A10, architecture=LLAMA_70B)),
        "architecture-unknown": written(
            mystery, _decide_ftj(mystery, architecture=None, architecture_error="set spec.model.architecture")
        ),
        "invalid-spec": written(invalid, _decide_ftj(invalid)),
        "creating": written(_ftj(), first),
        "queued": _ftj_gang(queued, {}),
        "pods-pending": _ftj_gang(_ftj(), {"active": 2}, [pod(0)]),
        "running": _ftj_gang(_ftj(), {"active": 2}, running),
        "immutable-field-changed": written(refused, _decide_ftj(refused, children=refused_children, pods=running)),
        "succeeded": _ftj_gang(_ftj(), {"conditions": COMPLETE}, [pod(0, "Succeeded", done)]),
        "succeeded-without-artifact": _ftj_gang(_ftj(), {"conditions": COMPLETE}, [pod(0, "Succeeded")]),
        "failed": _ftj_gang(_ftj(), {"conditions": FAILED}, [pod(0, "Failed", OOM)]),
    }


# ---------------------------------------------------------------- QuantizeJob


def upstream(kind: str, phase: str | None, artifact: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = live(finetune() if kind == "FineTuneJob" else quantize())
    doc["status"] = {"phase": phase, "conditions": []} if phase else {}
    if phase == "Failed":
        doc["status"]["conditions"] = [{"type": "Failed", "status": "True", "message": "OOM on rank 3"}]
    if artifact:
        doc["status"]["artifact"] = artifact
    return doc


def lookup_of(*objects: dict[str, Any]) -> Callable[[str, str], dict[str, Any] | None]:
    table = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    return lambda kind, name: table.get((kind, name))


FTJ_DONE = upstream("FineTuneJob", "Succeeded", FTJ_ARTIFACT)


def _qj_job(job_status: dict[str, Any], pods=()) -> dict[str, Any]:
    doc = live(quantize())
    first = decide_quantize(QuantizeObserved(doc, NOW, lookup_of(FTJ_DONE)))
    again = written(doc, first)
    children = child_status(first, "Job", **job_status)
    return written(again, decide_quantize(QuantizeObserved(again, NOW, lookup_of(FTJ_DONE), children, list(pods))))


def quantizejobs() -> dict[str, dict[str, Any]]:
    doc, invalid = live(quantize()), live(quantize(output={"uri": "ftp://nowhere"}))

    def once(obj: dict[str, Any], *objects: dict[str, Any]) -> dict[str, Any]:
        return written(obj, decide_quantize(QuantizeObserved(obj, NOW, lookup_of(*objects))))

    summary = {"status": "succeeded", **QJ_ARTIFACT, "metrics": {"perplexity_after": 5.2}}
    return {
        "waiting-for-source": once(doc, upstream("FineTuneJob", "Running")),
        "source-failed": once(doc, upstream("FineTuneJob", "Failed")),
        "invalid-spec": once(invalid, FTJ_DONE),
        "creating": once(doc, FTJ_DONE),
        "pod-pending": _qj_job({"active": 1}, [pod(phase="Pending")]),
        "running": _qj_job({"active": 1}, [pod()]),
        "succeeded": _qj_job({"conditions": COMPLETE}, [pod(phase="Succeeded", summary=summary)]),
        "succeeded-without-artifact": _qj_job({"conditions": COMPLETE}, [pod(phase="Succeeded")]),
        "failed": _qj_job({"conditions": FAILED}, [pod(phase="Failed", summary=OOM)]),
    }


# ---------------------------------------------------------------- ModelService

QJ_DONE = upstream("QuantizeJob", "Succeeded", QJ_ARTIFACT)


def _observe_svc(doc: dict[str, Any], *objects: dict[str, Any], children=(), inventory=H100, arch=QWEN):
    lookup = lookup_of(FTJ_DONE, *objects)
    source = lineage(doc["spec"], lookup)  # resolved once, as reconcile_modelservice does
    return ServiceObserved(doc, NOW, lookup, inventory, arch, lineage=source, children=list(children))


def rolled(deployment: dict[str, Any], generation: int, ready: int, updated: int | None = None) -> dict[str, Any]:
    deployment = copy.deepcopy(deployment)
    deployment["metadata"]["generation"] = generation
    n = deployment["spec"]["replicas"]
    deployment["status"] = {"observedGeneration": generation, "replicas": n, "availableReplicas": ready,
                            "updatedReplicas": n if updated is None else updated, "readyReplicas": ready}  # fmt: skip
    return deployment


def modelservices() -> dict[str, dict[str, Any]]:
    doc = live(service())
    first = decide_service(_observe_svc(doc, QJ_DONE))
    deployment, svc = first.apply
    deploying = written(doc, first)

    serving_kids = [rolled(deployment, 1, 2), svc]  # the Deployment rolled out, 2 of 2 ready

    def serving(*objects: dict[str, Any], children=serving_kids, **kw: Any) -> dict[str, Any]:
        return written(deploying, decide_service(_observe_svc(deploying, *objects, children=children, **kw)))

    ready = serving(QJ_DONE)
    newer = copy.deepcopy(QJ_DONE)
    newer["status"]["artifact"]["digest"] = "sha256:q2"
    applying = decide_service(_observe_svc(ready, newer, children=serving_kids))
    midway = [rolled(applying.apply[0], 2, 2, updated=1), svc]
    invalid = live(service(replicas=-1))
    huge = live(service(**{"engineOptions.maxModelLen": 131072}))

    def once(obj: dict[str, Any], *objects: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return written(obj, decide_service(_observe_svc(obj, *objects, **kw)))

    return {
        "waiting-for-source": once(doc, upstream("QuantizeJob", "Running")),
        "source-failed": once(doc, upstream("QuantizeJob", "Failed")),
        "invalid-spec": once(invalid, QJ_DONE),
        "infeasible": once(huge, QJ_DONE, inventory=A10, arch=LLAMA_70B),
        "deploying": deploying,
        "no-replica-ready": serving(QJ_DONE, children=[rolled(deployment, 1, 0), svc]),
        "ready": ready,
        "applying-new-artifact": written(ready, applying),
        "rolling-out": written(ready, decide_service(_observe_svc(written(ready, applying), newer, children=midway))),
        "waiting-for-new-source": serving(upstream("QuantizeJob", "Running")),
        "serving-but-source-failed": serving(upstream("QuantizeJob", "Failed")),
        "serving-but-infeasible": once(
            live(huge, ready["status"]), QJ_DONE, children=serving_kids, inventory=A10, arch=LLAMA_70B
        ),
    }


@cache
def _all() -> dict[str, dict[str, dict[str, Any]]]:
    return {"FineTuneJob": finetunejobs(), "QuantizeJob": quantizejobs(), "ModelService": modelservices()}


def scenarios() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> the object with the status the operator wrote; a fresh copy each call."""
    return {(kind, name): copy.deepcopy(obj) for kind, objs in _all().items() for name, obj in objs.items()}
