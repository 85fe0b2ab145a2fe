"""A ModelService's autoscaler and route, rendered (pure): what appears when, against which schema.

    spec.autoscaling, engine vllm/sglang    KEDA installed: ScaledObject    else: HorizontalPodAutoscaler
                                            and the workload has no replicas (the autoscaler's)
    spec.route, HTTPRoute CRD installed     HTTPRoute -> Service; with route.endpointPicker and the
                                            InferencePool CRD: InferencePool, HTTPRoute -> InferencePool

Kubernetes' own kinds are checked against the Kubernetes 1.33 schema (kubernetes-validate); KEDA's,
the Gateway API's and the Inference Extension's against their CRDs as released, vendored in
tests/assets/crds/ (each file names its source and version): the openAPIV3Schema with jsonschema, and
every CEL rule with cel-python.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.api import check, parse
from kubeforge.api.crd import crd
from kubeforge.api.kinds import MODELSERVICE
from kubeforge.api.validation import rule_problems
from kubeforge.inventory.pools import Inventory
from kubeforge.planner.serving import plan_serving
from kubeforge.render import autoscaling, routing
from kubeforge.render.service import ServingApis, optional_children, render_service
from tests.builders import service
from tests.harness.crdschema import apply_defaults, cel_violations, schema_errors
from tests.harness.manifests import validate_manifest
from tests.planner.nodes import example_cluster
from tests.render.rendering import QWEN, with_name

ROOT = Path(__file__).resolve().parents[2]
VENDORED = ROOT / "tests" / "assets" / "crds"
DOC = ROOT / "docs" / "modelservice-autoscaling-and-routing.md"
NOTHING, KEDA = ServingApis(), ServingApis(keda=True)
GATEWAY, EVERYTHING = ServingApis(gateway=True), ServingApis(keda=True, gateway=True, inference_pool=True)
SCALING = {"minReplicas": 2, "maxReplicas": 8, "target": {"waitingRequestsPerReplica": 4}}
ROUTE = {"gateway": {"name": "inference-gateway", "namespace": "infra"}, "hostnames": ["llm.example.com"],
         "pathPrefix": "/support-bot", "endpointPicker": {"name": "support-bot-epp"}}  # fmt: skip
NO_PICKER = {k: v for k, v in ROUTE.items() if k != "endpointPicker"}


@cache
def vendored() -> dict[str, dict[str, Any]]:
    """kind -> the openAPIV3Schema of the version kubeforge renders (each vendored CRD keeps that one only)."""
    out = {}
    for path in sorted(VENDORED.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        (version,) = doc["spec"]["versions"]
        out[doc["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"] | {"x-version": version["name"]}
    return out


def crd_problems(obj: dict[str, Any]) -> list[Any]:
    """What the API server would refuse in ``obj``, a KEDA, Gateway API or Inference Extension object."""
    schema = vendored()[obj["kind"]]
    assert obj["apiVersion"].endswith("/" + schema["x-version"]), obj["apiVersion"]
    defaulted = apply_defaults(schema, obj)
    return schema_errors(schema, defaulted) + cel_violations(schema, defaulted)


def assert_valid(obj: dict[str, Any]) -> None:
    if obj["kind"] in vendored():
        assert crd_problems(obj) == [], obj["kind"]
    else:
        validate_manifest(obj)


def render(doc: dict[str, Any], apis: ServingApis = NOTHING, *, cluster: str | None = "h100-4x8.yaml",
           lws: bool = False, max_model_len: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    svc = parse(with_name(doc, None))
    plan = plan_serving(engine=svc.spec.engine, inventory=example_cluster(cluster) if cluster else Inventory((), ()),
                        arch=QWEN, max_model_len=max_model_len or svc.spec.engine_options.max_model_len,
                        utilization=svc.spec.engine_options.gpu_memory_utilization,
                        tensor_parallel=svc.spec.tensor_parallel, multi_node=lws)  # fmt: skip
    assert plan.feasible, plan.reason
    return render_service(svc, plan, artifact_uri="pvc://models/support-bot-fp8", artifact_digest="sha256:q1",
                          apis=apis)  # fmt: skip


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


# ---------------------------------------------------------------- what renders when


@pytest.mark.parametrize(
    ("spec", "apis", "kinds"),
    [
        ({}, EVERYTHING, ["Deployment", "Service"]),
        ({"autoscaling": SCALING}, NOTHING, ["Deployment", "Service", "HorizontalPodAutoscaler"]),
        ({"autoscaling": SCALING}, KEDA, ["Deployment", "Service", "ScaledObject"]),
        ({"route": ROUTE}, NOTHING, ["Deployment", "Service"]),  # no Gateway API: nothing to route with
        ({"route": ROUTE}, GATEWAY, ["Deployment", "Service", "HTTPRoute"]),  # no InferencePool CRD
        ({"route": ROUTE}, EVERYTHING, ["Deployment", "Service", "InferencePool", "HTTPRoute"]),
        ({"route": NO_PICKER}, EVERYTHING, ["Deployment", "Service", "HTTPRoute"]),
        ({"autoscaling": SCALING, "route": ROUTE}, EVERYTHING,
         ["Deployment", "Service", "ScaledObject", "InferencePool", "HTTPRoute"]),
    ],
    ids=["plain", "hpa", "keda", "route-no-gateway-api", "route", "route-pool", "route-no-picker", "all"],
)  # fmt: skip
def test_what_renders_where_and_every_object_is_valid(spec, apis, kinds):
    docs = render(service(**spec), apis)
    assert [d["kind"] for d in docs] == kinds
    for doc in docs:
        assert_valid(doc)
    names = optional_children("support-bot")
    for doc in docs[2:]:  # the controller finds (and deletes) the optional children by these names
        assert doc["metadata"]["name"] == names[doc["kind"]]
        assert doc["metadata"]["ownerReferences"][0]["kind"] == "ModelService"
        assert doc["metadata"]["labels"]["kubeforge.io/owner-name"] == "support-bot"


@pytest.mark.parametrize("apis", [NOTHING, KEDA], ids=["hpa", "keda"])
def test_with_an_autoscaler_the_workload_carries_no_replicas(apis):
    deployment = render(service(autoscaling=SCALING), apis)[0]
    assert "replicas" not in deployment["spec"]  # server-side apply: then kubeforge owns no opinion on it
    assert render(service(replicas=3), apis)[0]["spec"]["replicas"] == 3
    lws = render(service(autoscaling=SCALING), apis, cluster="a10-4x1.yaml", lws=True, max_model_len=32768)
    assert lws[0]["kind"] == "LeaderWorkerSet" and "replicas" not in lws[0]["spec"]


def test_without_engine_metrics_there_is_no_autoscaler_and_replicas_stay():
    docs = render(service(engine="auto", autoscaling=SCALING, replicas=2), KEDA, cluster=None)  # CPU: transformers
    assert [d["kind"] for d in docs] == ["Deployment", "Service"] and docs[0]["spec"]["replicas"] == 2


# ---------------------------------------------------------------- the metrics, as each autoscaler reads them

POD = 'namespace="team-a",pod=~"support-bot-engine-[a-z0-9]+-[a-z0-9]+"'


@pytest.mark.parametrize(
    ("engine", "target", "query", "metric_type", "threshold", "adapter_name", "average_value"),
    [
        ("vllm", {"waitingRequestsPerReplica": 4}, f"sum(vllm:num_requests_waiting{{{POD}}}) or vector(0)",
         "AverageValue", "4", "vllm_num_requests_waiting", "4"),
        ("vllm", {"kvCacheUsage": 0.8}, f"sum(vllm:kv_cache_usage_perc{{{POD}}}) or vector(0)",
         "AverageValue", "0.8", "vllm_kv_cache_usage_perc", "800m"),
        ("vllm", {"timeToFirstTokenSeconds": 1.5},
         f"histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{POD}}}[2m])))"
         " > 0 or vector(0)", "Value", "1.5", "vllm_time_to_first_token_seconds_p90", "1500m"),
        ("sglang", {"waitingRequestsPerReplica": 2.5}, f"sum(sglang:num_queue_reqs{{{POD}}}) or vector(0)",
         "AverageValue", "2.5", "sglang_num_queue_reqs", "2500m"),
        ("sglang", {"kvCacheUsage": 0.75}, f"sum(sglang:token_usage{{{POD}}}) or vector(0)",
         "AverageValue", "0.75", "sglang_token_usage", "750m"),
        ("sglang", {"timeToFirstTokenSeconds": 3},
         f"histogram_quantile(0.9, sum by (le) (rate(sglang:time_to_first_token_seconds_bucket{{{POD}}}[2m])))"
         " > 0 or vector(0)", "Value", "3", "sglang_time_to_first_token_seconds_p90", "3"),
    ],
    ids=["vllm-waiting", "vllm-kv", "vllm-ttft", "sglang-waiting", "sglang-kv", "sglang-ttft"],
)  # fmt: skip
def test_each_target_is_the_engines_own_metric(engine, target, query, metric_type, threshold, adapter_name,
                                               average_value):  # fmt: skip
    scaling = {**SCALING, "target": target}
    so = by_kind(render(service(engine=engine, autoscaling=scaling), KEDA))["ScaledObject"]
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "support-bot-engine"}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (2, 8)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == metric_type
    assert trigger["metadata"] == {"serverAddress": autoscaling.DEFAULT_PROMETHEUS, "query": query,
                                   "threshold": threshold}  # fmt: skip
    assert balanced(query)
    hpa = by_kind(render(service(engine=engine, autoscaling=scaling)))["HorizontalPodAutoscaler"]
    pods = {"metric": {"name": adapter_name}, "target": {"type": "AverageValue", "averageValue": average_value}}
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": pods}]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)


def balanced(query: str) -> bool:
    depth = 0
    for char in query:
        depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def test_a_leaderworkerset_is_scaled_on_its_leaders():
    docs = render(service(autoscaling=SCALING), KEDA, cluster="a10-4x1.yaml", lws=True, max_model_len=32768)
    lws, _, so = docs
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                                            "name": lws["metadata"]["name"]}  # fmt: skip
    assert f'pod=~"{lws["metadata"]["name"]}-[0-9]+"' in so["spec"]["triggers"][0]["metadata"]["query"]
    assert_valid(so)
    hpa = render(service(autoscaling=SCALING), NOTHING, cluster="a10-4x1.yaml", lws=True, max_model_len=32768)[2]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    assert_valid(hpa)


def test_the_pod_patterns_match_the_workloads_pods_and_no_others():
    deployment = re.compile(autoscaling.pod_pattern("Deployment", "bot-engine"))
    assert deployment.fullmatch("bot-engine-7d9f8b6c4d-x2k9q")
    for other in ("bot-engine-canary-7d9f8b6c4d-x2k9q", "bot-engine-7d9f8b6c4d", "xbot-engine-7d9f8b6c4d-x2k9q"):
        assert not deployment.fullmatch(other), other
    leaders = re.compile(autoscaling.pod_pattern("LeaderWorkerSet", "bot-engine"))
    assert leaders.fullmatch("bot-engine-0") and leaders.fullmatch("bot-engine-12")
    assert not leaders.fullmatch("bot-engine-0-1")  # a worker: it serves no HTTP and exports nothing


def test_prometheus_address_and_sglang_metrics_flag():
    so = by_kind(render(service(engine="sglang", autoscaling={**SCALING, "prometheusAddress": "http://prom:9090"}),
                        KEDA))["ScaledObject"]  # fmt: skip
    assert so["spec"]["triggers"][0]["metadata"]["serverAddress"] == "http://prom:9090"

    def args(spec: dict, apis: ServingApis) -> list[str]:
        return render(service(**spec), apis)[0]["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--enable-metrics" in args({"engine": "sglang", "autoscaling": SCALING}, NOTHING)
    assert "--enable-metrics" in args({"engine": "sglang", "route": ROUTE}, EVERYTHING)  # the picker reads them
    assert "--enable-metrics" not in args({"engine": "sglang"}, EVERYTHING)  # unchanged pod template otherwise
    assert "--enable-metrics" not in args({"engine": "sglang", "route": ROUTE}, GATEWAY)
    assert "--enable-metrics" not in args({"autoscaling": SCALING}, NOTHING)  # vLLM exports them always


@pytest.mark.parametrize(
    ("value", "canonical"),
    [(4, "4"), (0.8, "800m"), (1.5, "1500m"), (0.001, "1m"), (1000, "1k"), (10000, "10k"), (2500, "2500"),
     (0.25, "250m"), (1e-3 * 7, "7m")],
)  # fmt: skip
def test_targets_are_quantities_in_the_form_the_api_server_stores(value, canonical):
    assert autoscaling.quantity(value) == canonical


# ---------------------------------------------------------------- the route


def test_the_route_attaches_to_the_gateway_and_strips_its_prefix():
    docs = by_kind(render(service(route=ROUTE), GATEWAY))
    route = docs["HTTPRoute"]
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "inference-gateway", "namespace": "infra"}]  # fmt: skip
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/support-bot"}}]
    assert rule["filters"] == [{"type": "URLRewrite", "urlRewrite": {
        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}]  # fmt: skip
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": docs["Service"]["metadata"]["name"],
                                    "port": 8000, "weight": 1}]  # fmt: skip
    plain = by_kind(render(service(route={"gateway": {"name": "gw"}}), GATEWAY))["HTTPRoute"]
    assert "filters" not in plain["spec"]["rules"][0] and "hostnames" not in plain["spec"]
    kept = by_kind(render(service(route={**ROUTE, "stripPathPrefix": False}), GATEWAY))["HTTPRoute"]
    assert "filters" not in kept["spec"]["rules"][0]
    for doc in (route, plain, kept):
        assert_valid(doc)


def test_the_inference_pool_selects_the_serving_pods_and_names_the_picker():
    picker = {"name": "epp", "port": 9003, "failureMode": "FailOpen"}
    docs = by_kind(render(service(route={**ROUTE, "endpointPicker": picker}), EVERYTHING))
    pool, route, deployment = docs["InferencePool"], docs["HTTPRoute"], docs["Deployment"]
    assert pool["spec"]["selector"]["matchLabels"] == docs["Service"]["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "epp",
                                                 "port": {"number": 9003}, "failureMode": "FailOpen"}  # fmt: skip
    assert route["spec"]["rules"][0]["backendRefs"] == [{"group": "inference.networking.k8s.io",
                                                         "kind": "InferencePool", "name": pool["metadata"]["name"],
                                                         "weight": 1}]  # fmt: skip
    lws = by_kind(render(service(route=ROUTE), EVERYTHING, cluster="a10-4x1.yaml", lws=True, max_model_len=32768))
    assert lws["InferencePool"]["spec"]["selector"]["matchLabels"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert_valid(lws["InferencePool"])


def test_the_vendored_schemas_refuse_what_they_should():
    """A control: the vendored CRDs and their CEL rules do reject broken objects (so passing means something)."""
    docs = by_kind(render(service(autoscaling=SCALING, route=ROUTE), EVERYTHING))
    route = docs["HTTPRoute"]
    route["spec"]["rules"][0]["backendRefs"] = [{"group": "", "kind": "Service", "name": "x"}]  # a Service needs a port
    assert any("port" in str(p).lower() for p in crd_problems(route)), crd_problems(route)
    pool = docs["InferencePool"]
    del pool["spec"]["endpointPickerRef"]["port"]  # a Service picker needs a port
    assert any("port is required" in str(p) for p in crd_problems(pool))
    so = docs["ScaledObject"]
    del so["spec"]["scaleTargetRef"]["name"]
    assert any("name" in str(p) for p in crd_problems(so))
    hpa = by_kind(render(service(autoscaling=SCALING)))["HorizontalPodAutoscaler"]
    hpa["spec"]["metrics"][0]["pods"]["metric"]["selectr"] = {}  # strict: an unknown field
    with pytest.raises(AssertionError):
        validate_manifest(hpa)


# ---------------------------------------------------------------- the API: Python and CEL agree


SCHEMA = crd(MODELSERVICE)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def problems(doc: dict[str, Any], old: dict[str, Any] | None = None) -> tuple[set, set, list[str]]:
    """(CEL violations, Python rule problems, schema errors) of a ModelService document."""
    defaulted = apply_defaults(SCHEMA, doc)
    errors = schema_errors(SCHEMA, defaulted)
    if errors:  # only structurally valid objects reach CEL
        return set(), set(), errors
    cel = set(cel_violations(SCHEMA, defaulted, apply_defaults(SCHEMA, old) if old else None))
    python = {(p.path, p.message) for p in rule_problems(MODELSERVICE.model, doc, "")}
    return cel, python, errors


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"autoscaling": SCALING, "route": ROUTE}, set()),
        ({"autoscaling": {**SCALING, "minReplicas": 9}},
         {("spec.autoscaling.minReplicas", "minReplicas must not exceed maxReplicas")}),
        ({"autoscaling": {**SCALING, "target": {"kvCacheUsage": 0.8, "waitingRequestsPerReplica": 2}}},
         {("spec.autoscaling.target", "set exactly one of waitingRequestsPerReplica, kvCacheUsage and "
                                      "timeToFirstTokenSeconds")}),
        ({"autoscaling": {**SCALING, "target": {}}},
         {("spec.autoscaling.target", "set exactly one of waitingRequestsPerReplica, kvCacheUsage and "
                                      "timeToFirstTokenSeconds")}),
        ({"engine": "transformers", "autoscaling": SCALING},
         {("spec.autoscaling", "autoscaling needs engine vllm or sglang (the transformers server exports no "
                               "engine metrics)")}),
    ],
    ids=["valid", "min-over-max", "two-targets", "no-target", "transformers"],
)  # fmt: skip
def test_rules_say_the_same_in_cel_and_python(spec, expected):
    cel, python, errors = problems(service(**spec))
    assert errors == []
    assert cel == python == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"autoscaling": {**SCALING, "target": {"kvCacheUsage": 1.5}}}, "kvCacheUsage: 1.5 is greater than"),
        ({"autoscaling": {**SCALING, "minReplicas": 0}}, "minReplicas: 0 is less than the minimum of 1"),
        ({"autoscaling": {"target": {"kvCacheUsage": 0.5}}}, "'maxReplicas' is a required property"),
        ({"autoscaling": {**SCALING, "prometheusAddress": "prom:9090"}}, "prometheusAddress: 'prom:9090' does not"),
        ({"route": {**ROUTE, "hostnames": ["LLM.example.com"]}}, "hostnames.0: 'LLM.example.com' does not match"),
        ({"route": {**ROUTE, "pathPrefix": "/a/../b"}}, "pathPrefix: '/a/../b' does not match"),
        ({"route": {**ROUTE, "pathPrefix": "bot"}}, "pathPrefix: 'bot' does not match"),
        ({"route": {**ROUTE, "gateway": {}}}, "'name' is a required property"),
        ({"route": {**ROUTE, "endpointPicker": {"name": "epp", "failureMode": "Retry"}}}, "'Retry' is not one of"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_by_the_schema_and_the_models(spec, fragment):
    doc = service(**spec)
    _, _, errors = problems(doc)
    assert any(fragment in e for e in errors), errors
    _, found = check(doc)
    assert found, "the operator's own validation refuses it too"


def test_replicas_cannot_change_while_autoscaling_is_set():
    """A transition rule (the API server's only): `kubectl scale msvc` fails rather than being ignored."""
    message = ("spec.replicas", "replicas cannot change while autoscaling is set: change "
               "autoscaling.minReplicas/maxReplicas")  # fmt: skip
    scaled = service(autoscaling=SCALING, replicas=2)
    assert message in problems(service(autoscaling=SCALING, replicas=3), old=scaled)[0]
    assert problems(service(autoscaling=SCALING, replicas=2), old=scaled)[0] == set()
    assert problems(service(replicas=3), old=scaled)[0] == set()  # autoscaling removed in the same change
    assert problems(service(autoscaling=SCALING, replicas=3), old=service(replicas=2))[0] == set()  # switched on
    assert problems(service(replicas=5), old=service(replicas=2))[0] == set()


# ---------------------------------------------------------------- the documented adapter rules


def test_the_documented_prometheus_adapter_rules_are_the_ones_the_hpa_needs():
    blocks = re.findall(r"```yaml\n(rules:\n.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/modelservice-autoscaling-and-routing.md shows the adapter rules once"
    assert yaml.safe_load(blocks[0]) == {"rules": autoscaling.prometheus_adapter_rules()}
    served = set()
    for rule in autoscaling.prometheus_adapter_rules()["custom"]:
        pattern = re.compile(rule["name"]["matches"])
        series = re.search(r'__name__=~"\^\((.*?)\)(_bucket)?\$"', rule["seriesQuery"])
        assert series is not None
        for name in series.group(1).split("|"):
            as_ = rule["name"]["as"].replace("${1}", "{0}").replace("${2}", "{1}")
            served.add(as_.format(*pattern.fullmatch(name + (series.group(2) or "")).groups()))
    wanted = {m.adapter_name for by_target in autoscaling.METRICS.values() for m in by_target.values()}
    assert served == wanted  # every metric an HPA is rendered with is one the adapter serves, by that name


def test_the_api_versions_rendered_are_the_vendored_crds_versions():
    ours = ("HTTPRoute", "InferencePool", "ScaledObject")  # other vendored CRDs (PodMonitor) belong to other tests
    versions = {kind: schema["x-version"] for kind, schema in vendored().items() if kind in ours}
    assert versions == {"HTTPRoute": routing.GATEWAY_API.split("/")[1],
                        "InferencePool": routing.INFERENCE_API.split("/")[1],
                        "ScaledObject": autoscaling.KEDA_API.split("/")[1]}  # fmt: skip
