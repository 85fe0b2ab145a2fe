"""One level-triggered reconcile of a ModelService, as a pure function.

1. the spec is valid (else Accepted=False/InvalidSpec);
2. the source (a QuantizeJob, a FineTuneJob or a URI) decides which artifact to serve;
   while a referenced job runs the service waits (SourceReady=False/WaitingForSource);
   if it failed, a service that already serves keeps serving, one that does not fails;
3. a serving plan (engine, GPUs per replica) for the artifact's base model;
4. Deployment and Service are applied where missing or different: a new artifact
   digest changes the pod template and the Deployment rolls over to it;
5. status from the Deployment: readyReplicas, and servedArtifact once every replica
   runs the new template (until then the old artifact is still the one served);
   RolledOut=False from the pass that applies a new template until it runs everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubeforge.api.kinds import MODELSERVICE
from kubeforge.api.service import ModelService
from kubeforge.api.validation import check
from kubeforge.controller.sources import SOURCE_READY, Lookup, resolve
from kubeforge.controller.state import ACCEPTED, FAILED, PLANNED, Decision, State, exists_equal, of_kind
from kubeforge.inventory.pools import Inventory
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.serving import WEIGHT_BITS, plan_serving
from kubeforge.render import labels as L
from kubeforge.render.service import endpoint, render_service

AVAILABLE, ROLLED_OUT = "Available", "RolledOut"


@dataclass(frozen=True)
class ServiceObserved:
    body: Mapping[str, Any]
    now: str
    lookup: Lookup
    inventory: Inventory
    architecture: Architecture | None = None  # of the base model the artifact came from, when known
    children: Sequence[Mapping[str, Any]] = ()
    leaderworkerset_available: bool = False


def lineage(spec: Mapping[str, Any], lookup: Lookup) -> tuple[Mapping[str, Any] | None, str | None]:
    """(base model as a FineTuneJob's spec.model, quantization method) of what a ModelService spec serves,
    following refs; a URI source is its own base model."""
    source = spec.get("source") or {}
    method = None
    if (source.get("quantizeJobRef") or {}).get("name"):
        qj = lookup("QuantizeJob", source["quantizeJobRef"]["name"]) or {}
        method = (qj.get("spec") or {}).get("method")
        source = (qj.get("spec") or {}).get("source") or {}
    if (source.get("fineTuneJobRef") or {}).get("name"):
        ftj = lookup("FineTuneJob", source["fineTuneJobRef"]["name"]) or {}
        return (ftj.get("spec") or {}).get("model"), method
    return ({"uri": source["uri"]} if source.get("uri") else None), method


def decide_service(obs: ServiceObserved) -> Decision:
    old = dict(obs.body.get("status") or {})
    meta = obs.body.get("metadata") or {}
    state = State(old, meta.get("generation"), obs.now, MODELSERVICE.kind)
    svc, problems = check({k: obs.body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in obs.body})
    deployment = of_kind(obs.children, "Deployment") or of_kind(obs.children, "LeaderWorkerSet")
    if problems or not isinstance(svc, ModelService):
        state.set(ACCEPTED, "False", "InvalidSpec", "; ".join(str(p) for p in problems))
        if deployment is None:
            state.phase = "Failed"
        return state.decision(old)
    state.set(ACCEPTED, "True", "SpecValid", "the spec is valid")
    name, namespace = meta.get("name") or "", meta.get("namespace") or "default"

    src = svc.spec.source
    refs = {"QuantizeJob": src.quantize_job_ref.name if src.quantize_job_ref else None,
            "FineTuneJob": src.fine_tune_job_ref.name if src.fine_tune_job_ref else None}  # fmt: skip
    source = resolve(refs, src.uri, obs.lookup)
    if not source.ready:
        state.set(SOURCE_READY, "False", source.reason, source.message)
        if deployment is None:
            state.phase = "Failed" if source.failed else "Waiting"
            if source.failed:
                state.set(FAILED, "True", source.reason, source.message)
            return state.decision(old)
        _follow(state, deployment, svc)  # keep serving what is deployed
        return state.decision(old)
    state.set(SOURCE_READY, "True", "SourceReady", source.message)

    _, method = lineage(obs.body.get("spec") or {}, obs.lookup)
    plan = plan_serving(
        engine=svc.spec.engine,
        inventory=obs.inventory,
        arch=obs.architecture,
        weight_bits=WEIGHT_BITS.get(method or "", 16),
        max_model_len=svc.spec.engine_options.max_model_len,
        utilization=svc.spec.engine_options.gpu_memory_utilization,
        tensor_parallel=svc.spec.tensor_parallel,
        gpu_type=svc.spec.resources.gpu_type,
        method=method,
        multi_node=obs.leaderworkerset_available,
    )
    if not plan.feasible:
        state.set(PLANNED, "False", "Infeasible", plan.reason)
        if deployment is None:
            state.phase = "Pending"
            return state.decision(old)
        _follow(state, deployment, svc)
        return state.decision(old)
    state.set(PLANNED, "True", "Planned", plan.reason)
    desired = render_service(svc, plan, artifact_uri=source.uri or "", artifact_digest=source.digest,
                             uid=meta.get("uid"))  # fmt: skip
    apply = [d for d in desired if not exists_equal(d, obs.children)]
    state.status.update(engine=plan.engine, gpus=plan.gpus_per_replica, endpoint=endpoint(name, namespace))
    if deployment is None:
        state.set(AVAILABLE, "False", "Deploying", "creating the Deployment")
        state.phase = "Deploying"
        return state.decision(old, apply)
    _follow(state, deployment, svc)
    if any(d["kind"] == deployment.get("kind") for d in apply):  # what runs is about to change
        state.set(ROLLED_OUT, "False", "RollingOut", "applying the new pod template")
    return state.decision(old, apply)


def _follow(state: State, deployment: Mapping[str, Any], svc: ModelService) -> None:
    status = deployment.get("status") or {}
    spec = deployment.get("spec") or {}
    want = int(spec.get("replicas", svc.spec.replicas) or 0)
    ready = int(status.get("readyReplicas") or 0)
    state.status["replicas"] = want
    state.status["readyReplicas"] = ready
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration", generation)  # a LeaderWorkerSet reports none
    rolled = (
        generation is not None
        and int(observed or 0) >= int(generation)
        and int(status.get("updatedReplicas") or 0) >= want
        and int(status.get("availableReplicas") or 0) >= want
        and int(status.get("replicas") or 0) <= want  # no old replica left
    )
    template = spec.get("template") or (spec.get("leaderWorkerTemplate") or {}).get("leaderTemplate") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    if rolled:
        served = {"uri": annotations.get(L.ARTIFACT_URI)}
        if annotations.get(L.ARTIFACT_DIGEST):
            served["digest"] = annotations[L.ARTIFACT_DIGEST]
        if served["uri"]:
            state.status["servedArtifact"] = served
        state.set(ROLLED_OUT, "True", "RolledOut", f"{want} replica(s) serve {served.get('digest') or served['uri']}")
    else:
        state.set(ROLLED_OUT, "False", "RollingOut",
                  f"{status.get('updatedReplicas') or 0} of {want} replica(s) updated")  # fmt: skip
    if ready > 0:
        state.set(AVAILABLE, "True", "ReplicasReady", f"{ready} of {want} replica(s) ready")
    else:
        state.set(AVAILABLE, "False", "NoReplicaReady", f"0 of {want} replica(s) ready")
    state.phase = "Ready" if ready > 0 else "Deploying"  # during a rollout the old replicas still serve
