"""One level-triggered reconcile of a ModelService, as a pure function.

1. the spec is valid (else Accepted=False/InvalidSpec);
2. the source (a QuantizeJob, a FineTuneJob or a URI) decides which artifact to serve;
   while a referenced job runs the service waits (SourceReady=False/WaitingForSource);
   if it failed, a service that already serves keeps serving, one that does not fails;
3. a serving plan (engine, GPUs per replica) for the artifact's base model;
4. Deployment and Service are applied where missing or different: a new artifact
   digest changes the pod template and the Deployment rolls over to it; with them the
   optional autoscaler (ScaledObject where KEDA is installed, else HorizontalPodAutoscaler)
   and route (HTTPRoute, to an InferencePool where that CRD is installed and an Endpoint
   Picker is named); one the spec no longer asks for is deleted (before anything is applied:
   KEDA refuses a ScaledObject for a workload an HPA already scales);
5. status from the Deployment: readyReplicas, and servedArtifact once every replica
   runs the new template (until then the old artifact is still the one served);
   RolledOut=False from the pass that applies a new template until it runs everywhere;
   Autoscaling and Routed conditions say what was made of spec.autoscaling and spec.route.

LoRA adapters (spec.adapters) resolve one by one (sources.resolve_adapter): a URI at once, a
FineTuneJob's artifact once it succeeded (it must export an adapter). The ones ready go into the
adapter list (a ConfigMap the replicas' sidecars follow: render/adapters.py), so an adapter that
arrives, changes or goes restarts no pod; the engine's LoRA capacity (adapters per batch, the
largest rank the operator knows, counted in the plan's memory) is in the pod template. An adapter
that cannot be served (not an adapter, a rank above vLLM's 512, the served model's name) is left
out with its reason; the others are served. status.adapters says, for each, the model name clients
ask for and its phase; AdaptersReady sums them up.

Replicas, and who owns them. kubeforge applies its children by server-side apply with force,
as field manager ``kubeforge``: every field it applies it owns, and each apply (a new pod
template, a drift correction) sets it again. Without autoscaling the workload's ``replicas`` is
spec.replicas (which `kubectl scale msvc` changes through the scale subresource). With an
autoscaler, the HPA (KEDA's or ours) sets ``replicas`` through the workload's scale subresource;
if kubeforge kept applying it they would fight, each pass undoing the autoscaler's choice. So
the rendered workload has no ``replicas`` (render_service), and ``exists_equal`` ignores it: a
replica count changed by the autoscaler (or by anyone) is neither drift nor reset.

Dropping a field from an apply removes it when no other manager owns it, and a Deployment's
``replicas`` then defaults to 1: a service at 6 replicas would drop to 1 the moment autoscaling
is switched on, until the HPA scaled it back up. Kubernetes' documented handover avoids that
(server-side apply, "Transferring ownership"): while the live workload still lists ``replicas``
among kubeforge's applied fields, the pass first applies just ``replicas``, at its live value,
as a second manager (``kubeforge-handover``, without force: if an autoscaler already changed it,
the conflict says it owns the field and nothing is needed), then applies the workload without
``replicas``, so that kubeforge lets go while the handover manager still holds the value. The
autoscaler's first change takes the field over from the handover manager.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kubeforge.api.kinds import MODELSERVICE
from kubeforge.api.service import ModelService
from kubeforge.api.validation import check
from kubeforge.controller.diff import is_subset
from kubeforge.controller.sources import SOURCE_READY, AdapterSource, Lookup, resolve, resolve_adapter
from kubeforge.controller.state import ACCEPTED, FAILED, PLANNED, Decision, State, exists_equal, of_kind
from kubeforge.inventory.pools import Inventory
from kubeforge.planner.architecture import Architecture
from kubeforge.planner.serving import WEIGHT_BITS, plan_serving
from kubeforge.render import labels as L
from kubeforge.render.adapters import LoraRollout, ServedLora, model_name
from kubeforge.render.engines import lora_slots
from kubeforge.render.service import (
    ServingApis,
    autoscaled,
    endpoint,
    optional_children,
    render_service,
    selector_string,
)
from kubeforge.runtime.contract import engine_lora_rank

AVAILABLE, ROLLED_OUT = "Available", "RolledOut"
AUTOSCALING, ROUTED = "Autoscaling", "Routed"
ADAPTERS_READY = "AdaptersReady"


@dataclass(frozen=True)
class Lineage:
    """Where what a ModelService serves comes from, following its refs: the base model (as a FineTuneJob's
    spec.model; a URI source is its own) and the quantization method (None: not quantized)."""

    base: Mapping[str, Any] | None = None
    method: str | None = None


@dataclass(frozen=True)
class ServiceObserved:
    body: Mapping[str, Any]
    now: str
    lookup: Lookup
    inventory: Inventory
    architecture: Architecture | None = None  # of the base model the artifact came from, when known
    children: Sequence[Mapping[str, Any]] = ()
    leaderworkerset_available: bool = False
    keda_available: bool = False  # scaledobjects.keda.sh
    gateway_available: bool = False  # httproutes.gateway.networking.k8s.io
    inference_pool_available: bool = False  # inferencepools.inference.networking.k8s.io
    # lineage(spec, lookup), resolved once by whoever observes (the architecture is read from its base)
    lineage: Lineage = field(kw_only=True)

    @property
    def apis(self) -> ServingApis:
        return ServingApis(keda=self.keda_available, gateway=self.gateway_available,
                           inference_pool=self.inference_pool_available)  # fmt: skip


def lineage(spec: Mapping[str, Any], lookup: Lookup) -> Lineage:
    """The Lineage of what a ModelService (or QuantizeJob) spec serves, following refs."""
    source = spec.get("source") or {}
    method = None
    if (source.get("quantizeJobRef") or {}).get("name"):
        qj = lookup("QuantizeJob", source["quantizeJobRef"]["name"]) or {}
        method = (qj.get("spec") or {}).get("method")
        source = (qj.get("spec") or {}).get("source") or {}
    if (source.get("fineTuneJobRef") or {}).get("name"):
        ftj = lookup("FineTuneJob", source["fineTuneJobRef"]["name"]) or {}
        return Lineage((ftj.get("spec") or {}).get("model"), method)
    return Lineage({"uri": source["uri"]} if source.get("uri") else None, method)


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

    method = obs.lineage.method
    adapters = [resolve_adapter(a, obs.lookup) for a in svc.spec.adapters]
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
        lora_slots=lora_slots(len(adapters)) if adapters else 0,
        lora_rank=max((a.rank for a in adapters if a.rank and not a.failed), default=1),
    )
    if not plan.feasible:
        state.set(PLANNED, "False", "Infeasible", plan.reason)
        if deployment is None:
            state.phase = "Pending"
            return state.decision(old)
        _follow(state, deployment, svc)
        return state.decision(old)
    state.set(PLANNED, "True", "Planned", plan.reason)
    rollout = _adapters(state, adapters, plan.engine, svc.spec.served_model_name or name)
    desired = render_service(svc, plan, artifact_uri=source.uri or "", artifact_digest=source.digest,
                             uid=meta.get("uid"), apis=obs.apis, adapters=rollout)  # fmt: skip
    apply = [d for d in desired if not exists_equal(d, obs.children)]
    handover = replicas_handover(deployment, desired[0]) if autoscaled(svc, plan.engine) else []
    if handover and desired[0] not in apply:
        apply.insert(0, desired[0])  # the apply without replicas is what lets go of them
    delete = stale_children(name, namespace, desired, obs.children)
    serving = desired[1]["spec"]["selector"]  # the Service's: the pods that serve
    state.status.update(engine=plan.engine, gpus=plan.gpus_per_replica, endpoint=endpoint(name, namespace),
                        selector=selector_string(serving))  # fmt: skip
    _autoscaling(state, svc, plan.engine, obs.apis)
    _routing(state, svc, obs.apis)
    if deployment is None:
        state.set(AVAILABLE, "False", "Deploying", "creating the Deployment")
        state.phase = "Deploying"
        return replace(state.decision(old, apply), delete=delete, handover=handover)
    _follow(state, deployment, svc)
    if any(d["kind"] == deployment.get("kind") and not is_subset(_template(d), _template(deployment)) for d in apply):
        state.set(ROLLED_OUT, "False", "RollingOut", "applying the new pod template")  # what runs is about to change
    return replace(state.decision(old, apply), delete=delete, handover=handover)


def _template(workload: Mapping[str, Any]) -> Any:
    spec = workload.get("spec") or {}
    return spec.get("template") or spec.get("leaderWorkerTemplate")


def stale_children(name: str, namespace: str, desired: Sequence[Mapping[str, Any]],
                   children: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
    """The optional children (autoscaler, route, pool) that exist but are no longer wanted: autoscaling
    or the route removed from the spec, or KEDA installed since an HPA was made. Only the names kubeforge
    gives them: KEDA's own HPA (keda-hpa-<name>) carries the ScaledObject's labels, ours, and must stay."""
    wanted = {(d["kind"], d["metadata"]["name"]) for d in desired}
    out = []
    for kind, child in optional_children(name).items():
        if (kind, child) in wanted:
            continue
        found = next((c for c in children if c.get("kind") == kind
                      and (c.get("metadata") or {}).get("name") == child), None)  # fmt: skip
        if found is not None:
            out.append({"apiVersion": found.get("apiVersion"), "kind": kind,
                        "metadata": {"name": child, "namespace": namespace}})  # fmt: skip
    return out


def replicas_handover(live: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[the live workload's replicas, to apply as HANDOVER_FIELD_MANAGER] while kubeforge's applied
    fields still include spec.replicas (see the module docstring); [] once they do not."""
    if live is None or "replicas" not in (live.get("spec") or {}):
        return []
    owned = any(
        entry.get("manager") == L.FIELD_MANAGER
        and entry.get("operation") == "Apply"
        and not entry.get("subresource")
        and "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
        for entry in (live.get("metadata") or {}).get("managedFields") or []
    )
    if not owned:
        return []
    return [{"apiVersion": desired["apiVersion"], "kind": desired["kind"],
             "metadata": {"name": desired["metadata"]["name"], "namespace": desired["metadata"]["namespace"]},
             "spec": {"replicas": live["spec"]["replicas"]}}]  # fmt: skip


def _adapters(state: State, adapters: list[AdapterSource], engine: str, served_name: str) -> LoraRollout:
    """status.adapters and AdaptersReady; what the replicas serve, and the capacity every entry needs."""
    if not adapters:
        state.conditions = [c for c in state.conditions if c.get("type") != ADAPTERS_READY]
        if state.status.get("adapters"):
            state.status["adapters"] = []
        return LoraRollout()
    entries, served, usable = [], [], []
    for a in adapters:
        entry: dict[str, Any] = {"name": a.name, "model": model_name(engine, served_name, a.name)}
        entry.update({k: v for k, v in (("uri", a.uri), ("digest", a.digest), ("rank", a.rank)) if v})
        problem = None
        if a.name == served_name:
            problem = f"adapter {a.name} has the served model's name: rename it"
        elif a.rank and engine == "vllm" and engine_lora_rank("vllm", a.rank) is None:
            problem = (f"adapter {a.name} has rank {a.rank}; vLLM serves LoRA ranks up to 512: use engine "
                       "sglang or transformers")  # fmt: skip
        if a.failed or problem:
            entry.update(phase="Failed", message=problem or a.message)
        else:
            usable.append(a)
            if a.ready and a.uri:
                served.append(ServedLora(a.name, a.uri, a.digest))
                entry["phase"] = "Configured"
            else:
                entry.update(phase="Pending", message=a.message)
        entries.append(entry)
    state.status["adapters"] = entries
    waiting = [e for e in entries if e["phase"] != "Configured"]
    if not waiting:
        state.set(ADAPTERS_READY, "True", "AdaptersConfigured",
                  f"{len(entries)} adapter(s) handed to the replicas, which load them without restarting")  # fmt: skip
    else:
        failed = any(e["phase"] == "Failed" for e in waiting)
        state.set(ADAPTERS_READY, "False", "AdapterFailed" if failed else "WaitingForAdapter",
                  "; ".join(e["message"] for e in waiting)[:1024])  # fmt: skip
    return LoraRollout(served=tuple(served), count=len(adapters), ranks=tuple(a.rank for a in usable if a.rank),
                       uris=tuple(a.uri for a in usable if a.uri))  # fmt: skip


def _autoscaling(state: State, svc: ModelService, engine: str, apis: ServingApis) -> None:
    spec = svc.spec.autoscaling
    if spec is None:
        state.conditions = [c for c in state.conditions if c.get("type") != AUTOSCALING]
        return
    bounds = f"{spec.min_replicas} to {spec.max_replicas} replicas"
    if not autoscaled(svc, engine):
        message = f"the {engine} engine exports no serving metrics: spec.replicas ({svc.spec.replicas}) applies"
        state.set(AUTOSCALING, "False", "EngineHasNoMetrics", message)
    elif apis.keda:
        state.set(AUTOSCALING, "True", "ScaledObject", f"KEDA scales the {engine} replicas, {bounds}")
    else:
        state.set(AUTOSCALING, "True", "HorizontalPodAutoscaler",
                  f"a HorizontalPodAutoscaler scales the {engine} replicas, {bounds}, on the Prometheus "
                  "adapter's metrics (KEDA is not installed)")  # fmt: skip


def _routing(state: State, svc: ModelService, apis: ServingApis) -> None:
    route = svc.spec.route
    if route is None:
        state.conditions = [c for c in state.conditions if c.get("type") != ROUTED]
        return
    gateway = f"{route.gateway.namespace + '/' if route.gateway.namespace else ''}{route.gateway.name}"
    if not apis.gateway:
        state.set(ROUTED, "False", "GatewayAPINotInstalled",
                  "the Gateway API's HTTPRoute CRD (gateway.networking.k8s.io/v1) is not installed")  # fmt: skip
    elif route.endpoint_picker is not None and apis.inference_pool:
        state.set(ROUTED, "True", "InferencePool",
                  f"an HTTPRoute on Gateway {gateway} sends requests to an InferencePool; Endpoint Picker "
                  f"{route.endpoint_picker.name} chooses the replica")  # fmt: skip
    elif route.endpoint_picker is not None:
        state.set(ROUTED, "True", "InferencePoolNotInstalled",
                  f"an HTTPRoute on Gateway {gateway} sends requests to the Service: the InferencePool CRD "
                  "(inference.networking.k8s.io/v1) is not installed, so no Endpoint Picker is used")  # fmt: skip
    else:
        state.set(ROUTED, "True", "HTTPRoute", f"an HTTPRoute on Gateway {gateway} sends requests to the Service")


def _follow(state: State, deployment: Mapping[str, Any], svc: ModelService) -> None:
    status = deployment.get("status") or {}
    spec = deployment.get("spec") or {}
    # applied without replicas (an autoscaler's), a workload defaults to 1 until the autoscaler sets it
    want = int(spec.get("replicas", 1 if svc.spec.autoscaling else svc.spec.replicas) or 0)
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
