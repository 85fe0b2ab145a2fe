"""A ModelService's replicas, autoscaler and route, as the real operator process runs them against the emulator.

The tests play the HPA controller (a PATCH to the Deployment's scale subresource) and `kubectl scale`
(a PATCH to the ModelService's); the emulator serves both subresources (tests/harness/emulator.py).

What the emulator cannot show: its server-side apply merges and never removes a field an apply leaves
out, so it cannot show the reset to 1 that the handover prevents on a real API server (that decision is
tested in tests/controller/test_quantize_service_decide.py), nor field ownership; here the point is
that the operator itself never writes replicas back while an autoscaler owns them, on resync passes
and on the apply of a new pod template alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.builders import service
from tests.conftest import running_operator
from tests.harness.cluster import STATUS, add_nodes, owned, roll_out, wait_children
from tests.harness.crdschema import apply_defaults, cel_violations, schema_errors
from tests.harness.emulator import FaithfulEmulator
from tests.harness.manifests import validate_manifest
from tests.harness.waiters import wait_for, wait_status
from tests.operator.test_finetunejob import condition
from tests.operator.test_finetunejob import server_fields_removed as clean

pytestmark = pytest.mark.operator

NS = "team-a"
MSVC = "kubeforge.io/v1alpha1/modelservices"
BASE = f"/apis/kubeforge.io/v1alpha1/namespaces/{NS}/modelservices"
DEPLOYMENTS, HPAS = "apps/v1/deployments", "autoscaling/v2/horizontalpodautoscalers"
SCALED_OBJECTS, ROUTES = "keda.sh/v1alpha1/scaledobjects", "gateway.networking.k8s.io/v1/httproutes"
POOLS = "inference.networking.k8s.io/v1/inferencepools"
VENDORED = Path(__file__).resolve().parents[1] / "assets" / "crds"
SCALING = {"minReplicas": 2, "maxReplicas": 8, "target": {"waitingRequestsPerReplica": 4}}


def doc(**spec: Any) -> dict[str, Any]:
    return service(source={"uri": "pvc://models/support-bot"}, **spec)  # replicas: 2, as in the example


async def create(api: FaithfulEmulator, body: dict[str, Any]) -> None:
    resp = await api.post(BASE, json=body)
    assert resp.status == 201, await resp.text()


async def patch_spec(api: FaithfulEmulator, spec: dict[str, Any]) -> None:
    resp = await api.patch(f"{BASE}/support-bot", json={"spec": spec}, headers=STATUS)
    assert resp.status == 200, await resp.text()


def the(api: FaithfulEmulator, resource: str) -> dict[str, Any] | None:
    items = owned(api, resource, NS, "support-bot")
    return items[0] if items else None


def replicas(api: FaithfulEmulator) -> int | None:
    return ((the(api, DEPLOYMENTS) or {}).get("spec") or {}).get("replicas")


def engine_args(api: FaithfulEmulator) -> list[str]:
    deployment = the(api, DEPLOYMENTS)
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"] if deployment else []


async def scale(api: FaithfulEmulator, path: str, n: int) -> dict[str, Any]:
    """What `kubectl scale` and the HPA controller do: a merge patch of the Scale subresource."""
    resp = await api.patch(f"{path}/scale", json={"spec": {"replicas": n}}, headers=STATUS)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_an_autoscalers_replica_count_survives_and_kubectl_scale_works_without_one(emulator, operator):
    await add_nodes(emulator, "h100-4x8.yaml")
    await create(emulator, doc(autoscaling=SCALING))
    deployment = (await wait_children(emulator, NS, "support-bot", ("Deployment",)))["Deployment"]
    assert "replicas" not in deployment["spec"]  # the operator never applies it while autoscaling is set
    hpa = await wait_for(lambda: the(emulator, HPAS), what="the HorizontalPodAutoscaler")
    validate_manifest(clean(hpa))
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    await roll_out(emulator, deployment)
    svc = await wait_status(emulator, MSVC, NS, "support-bot", lambda s: s.get("phase") == "Ready", what="Ready")
    assert condition(svc, "Autoscaling")["reason"] == "HorizontalPodAutoscaler"

    # the HPA controller scales the Deployment to 5 through its scale subresource
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{deployment['metadata']['name']}"
    assert (await scale(emulator, path, 5))["spec"]["replicas"] == 5
    await roll_out(emulator, deployment)
    await wait_status(emulator, MSVC, NS, "support-bot", lambda s: s.get("readyReplicas") == 5,
                      what="the status following the HPA's 5 replicas")  # fmt: skip

    # a pass that applies a new pod template and new autoscaler bounds leaves the count alone too
    await patch_spec(emulator, {"engineOptions": {"gpuMemoryUtilization": 0.85}, "autoscaling": {"maxReplicas": 6}})
    await wait_for(lambda: (the(emulator, HPAS) or {}).get("spec", {}).get("maxReplicas") == 6,
                   what="the HPA's new maxReplicas")  # fmt: skip
    await wait_for(lambda: "0.85" in engine_args(emulator), what="the new pod template")
    assert replicas(emulator) == 5
    await roll_out(emulator, deployment)
    await wait_status(emulator, MSVC, NS, "support-bot",
                      lambda s: (condition({"status": s}, "RolledOut") or {}).get("status") == "True",
                      what="the rollout of the new template seen by a later pass")  # fmt: skip
    assert replicas(emulator) == 5

    # autoscaling off: the HPA goes, spec.replicas (2) is the count again...
    await patch_spec(emulator, {"autoscaling": None})
    await wait_for(lambda: the(emulator, HPAS) is None, what="the HPA deleted")
    await wait_for(lambda: replicas(emulator) == 2, what="the Deployment back at spec.replicas")
    # ... and `kubectl scale msvc support-bot --replicas=3` goes through the ModelService's scale subresource
    answer = await scale(emulator, f"{BASE}/support-bot", 3)
    assert answer["kind"] == "Scale" and answer["spec"]["replicas"] == 3
    await wait_for(lambda: replicas(emulator) == 3, what="the Deployment scaled by kubectl scale msvc")
    await roll_out(emulator, deployment)
    svc = await wait_status(emulator, MSVC, NS, "support-bot", lambda s: s.get("readyReplicas") == 3, what="3 ready")
    assert condition(svc, "Autoscaling") is None
    read = await (await emulator.get(f"{BASE}/support-bot/scale")).json()
    assert read["spec"] == {"replicas": 3} and read["status"]["replicas"] == 3
    pods = read["status"]["selector"]  # what an HPA aimed at the ModelService counts
    labels = the(emulator, DEPLOYMENTS)["spec"]["template"]["metadata"]["labels"]
    assert pods and all(labels.get(k) == v for k, v in (kv.split("=") for kv in pods.split(",")))


@pytest.fixture()
async def operator_with_crds(emulator: FaithfulEmulator, tmp_path: Path, request: pytest.FixtureRequest):
    """The operator, started once KEDA's, the Gateway API's and the Inference Extension's CRDs are installed
    (the emulator serves no CRD watch: kopf sees kinds present when it starts)."""
    for path in sorted(VENDORED.glob("*.yaml")):
        emulator.declare_crd(yaml.safe_load(path.read_text()))
    async with running_operator(emulator, tmp_path, request) as proc:
        yield proc


def crd_problems(obj: dict[str, Any]) -> list[Any]:
    crd = next(d for p in VENDORED.glob("*.yaml") if (d := yaml.safe_load(p.read_text()))["spec"]["names"]["kind"]
               == obj["kind"])  # fmt: skip
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    defaulted = apply_defaults(schema, clean(obj))
    return schema_errors(schema, defaulted) + cel_violations(schema, defaulted)


async def test_keda_gateway_and_inference_pool_where_installed(emulator, operator_with_crds):
    await add_nodes(emulator, "h100-4x8.yaml")
    route = {"gateway": {"name": "gw", "namespace": "infra"}, "pathPrefix": "/bot", "endpointPicker": {"name": "epp"}}
    await create(emulator, doc(engine="sglang", autoscaling=SCALING, route=route))
    found = await wait_for(lambda: all(the(emulator, r) for r in (SCALED_OBJECTS, POOLS, ROUTES))
                           and [the(emulator, r) for r in (SCALED_OBJECTS, POOLS, ROUTES)],
                           what="the ScaledObject, InferencePool and HTTPRoute")  # fmt: skip
    for obj in found:
        assert crd_problems(obj) == [], obj["kind"]
    so, pool, http = found
    assert so["spec"]["triggers"][0]["metadata"]["query"].startswith("sum(sglang:num_queue_reqs{")
    assert http["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]
    assert the(emulator, HPAS) is None  # KEDA makes its own
    deployment = the(emulator, DEPLOYMENTS)
    assert "--enable-metrics" in engine_args(emulator)
    await roll_out(emulator, deployment)
    svc = await wait_status(emulator, MSVC, NS, "support-bot", lambda s: s.get("phase") == "Ready", what="Ready")
    assert condition(svc, "Autoscaling")["reason"] == "ScaledObject" and condition(svc, "Routed")["reason"] == (
        "InferencePool"
    )

    # the route without a picker: the pool goes, the HTTPRoute points at the Service; then no route at all
    await patch_spec(emulator, {"route": {"endpointPicker": None}})
    await wait_for(lambda: the(emulator, POOLS) is None, what="the InferencePool deleted")
    await wait_for(lambda: the(emulator, ROUTES)["spec"]["rules"][0]["backendRefs"][0]["kind"] == "Service",
                   what="the HTTPRoute on the Service")  # fmt: skip
    await patch_spec(emulator, {"route": None, "autoscaling": None})
    await wait_for(lambda: the(emulator, ROUTES) is None and the(emulator, SCALED_OBJECTS) is None,
                   what="the HTTPRoute and ScaledObject deleted")  # fmt: skip
    await wait_for(lambda: replicas(emulator) == 2, what="the Deployment at spec.replicas")
