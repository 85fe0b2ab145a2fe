"""The Helm chart, rendered and linted with Helm's own SDK, its output checked like any manifest."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import pytest

from tests.chart.charting import CHART, render
from tests.harness.manifests import documents, validate_manifest

ROOT = Path(__file__).resolve().parents[1]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def test_lint_is_clean():
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watchNamespaces": ["team-a", "team-b"], "image": {"registry": "registry.local", "repository": "kf"}},
        {"image": {"registry": "", "repository": "registry.local/kf", "tag": "dev"}, "imageRegistry": "mirror.local"},
        {"serviceAccount": {"create": False, "name": "existing"}, "tolerations": [{"operator": "Exists"}]},
        {"replicas": 3, "podDisruptionBudget": {"minAvailable": "50%"}, "leaderElection": {"leaseName": "kf"}},
        {"replicas": 1, "leaderElection": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
    ],
)
def test_every_rendered_object_is_valid_kubernetes(values):
    docs = render(values)
    assert {d["kind"] for d in docs} >= {"Deployment", "ClusterRole", "ClusterRoleBinding", "Service"}
    for doc in docs:
        validate_manifest(doc)


def test_metrics_service_and_optional_service_monitor():
    docs = render({"metrics": {"port": 9200, "serviceMonitor": {"enabled": True, "interval": "15s"}}})
    kinds = by_kind(docs)
    assert kinds["Service"]["spec"]["ports"][0]["port"] == 9200
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "KUBEFORGE_METRICS_PORT", "value": "9200"} in container["env"]
    monitor = kinds["ServiceMonitor"]  # a Prometheus Operator CRD: not in the official schema
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "15s"}]
    assert "ServiceMonitor" not in by_kind(render())


def test_deployment_runs_the_operator_as_non_root_with_a_liveness_probe():
    dep = by_kind(render({"watchNamespaces": ["team-a"]}))["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    liveness = "--liveness=http://0.0.0.0:8080/healthz"
    assert container["args"][:3] == [liveness, "--log-format=text", "--namespace=team-a"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["image"] == "ghcr.io/kubeforge/operator:0.1.0"


def test_two_replicas_with_leader_election_and_a_disruption_budget():
    docs = render()
    dep = by_kind(docs)["Deployment"]
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][1:] == [
        "--log-format=text",
        "--leader-elect",
        "--lease-name=kubeforge",
        "--lease-namespace=kubeforge-system",
        "--lease-duration=15",
        "--renew-deadline=10",
        "--retry-period=2",
    ]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["POD_NAME"] == "metadata.name"  # the Lease holder's identity
    pdb = by_kind(docs)["PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    role = next(d for d in docs if d["kind"] == "Role")
    granted = {(r["apiGroups"][0], v, tuple(r.get("resourceNames", ()))) for r in role["rules"] for v in r["verbs"]}
    assert ("coordination.k8s.io", "create", ()) in granted
    assert ("coordination.k8s.io", "update", ("kubeforge",)) in granted
    assert {v for _, v, _ in granted} == {"create", "get", "update"}  # no patch: the Lease is replaced
    assert role["metadata"]["namespace"] == "kubeforge-system"
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_one_replica_without_leader_election_and_more_are_refused():
    docs = render({"replicas": 1, "leaderElection": {"enabled": False}, "podDisruptionBudget": {"enabled": False}})
    kinds = by_kind(docs)
    assert (
        kinds["Deployment"]["spec"]["replicas"] == 1 and kinds["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    )
    assert "--leader-elect" not in kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "PodDisruptionBudget" not in kinds and "Role" not in kinds
    with pytest.raises(Exception, match="leaderElection"):
        render({"replicas": 2, "leaderElection": {"enabled": False}})


def rules_of(doc: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_covers_our_kinds_and_their_status():
    """The rules themselves are checked against the operator's real calls in tests/operator/test_rbac.py."""
    granted = rules_of(by_kind(render())["ClusterRole"])
    for plural in ("finetunejobs", "quantizejobs", "modelservices"):
        assert ("kubeforge.io", plural, "watch") in granted
        assert ("kubeforge.io", f"{plural}/status", "patch") in granted
        assert ("kubeforge.io", f"{plural}/finalizers", "update") in granted  # blockOwnerDeletion
    assert ("", "nodes", "list") in granted
    assert ("batch", "jobs", "create") in granted and ("batch", "jobs", "patch") in granted
    assert ("", "events", "create") in granted
    # children go by garbage collection, except a ModelService's optional ones (its autoscaler and route),
    # deleted when its spec stops asking for them; update is the finalizers check only
    optional = {
        ("autoscaling", "horizontalpodautoscalers"),
        ("keda.sh", "scaledobjects"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("inference.networking.k8s.io", "inferencepools"),
    }
    assert {(g[0], g[1]) for g in granted if g[2] == "delete"} == optional
    assert not [g for g in granted if g[2] in ("deletecollection", "*")]
    assert all(resource.endswith("/finalizers") for _, resource, verb in granted if verb == "update")


CLUSTER_SCOPED = {("", "nodes"), ("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}


def test_watch_namespaces_get_roles_and_the_cluster_role_keeps_only_cluster_scoped_reads():
    docs = render({"watchNamespaces": ["team-a", "team-b"]})
    cluster_role = by_kind(docs)["ClusterRole"]
    assert {(group, resource) for group, resource, _ in rules_of(cluster_role)} == CLUSTER_SCOPED
    assert {verb for _, _, verb in rules_of(cluster_role)} == {"list", "watch"}
    roles = {
        d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "kubeforge"
    }
    bindings = {d["metadata"]["namespace"]: d for d in docs
                if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == "kubeforge"}  # fmt: skip
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    all_namespaces = rules_of(by_kind(render())["ClusterRole"])
    for ns, role in roles.items():
        # the same rules as the cluster-wide chart's, less the cluster-scoped ones
        assert rules_of(role) == {g for g in all_namespaces if (g[0], g[1]) not in CLUSTER_SCOPED}
        assert bindings[ns]["subjects"] == [
            {"kind": "ServiceAccount", "name": "kubeforge", "namespace": "kubeforge-system"}
        ]
    # watching all namespaces, kopf does not read Namespaces
    assert ("", "namespaces", "list") not in all_namespaces


def value_combinations() -> list[dict]:
    combos = []
    for namespaces in ([], ["team-a"], ["team-a", "kubeforge-system"]):
        for election in (True, False):
            for create_sa in (True, False):
                for monitor in (True, False):
                    combos.append({
                        "watchNamespaces": namespaces,
                        "replicas": 2 if election else 1,
                        "leaderElection": {"enabled": election},
                        "podDisruptionBudget": {"enabled": election},
                        "serviceAccount": {"create": create_sa, "name": "" if create_sa else "existing"},
                        "metrics": {"serviceMonitor": {"enabled": monitor}},
                    })  # fmt: skip
    return combos


def test_every_values_combination_passes_the_schema_and_renders_valid_objects():
    chart = helm.Chart.load(str(CHART))
    for values in value_combinations():
        chart.validate_schema(values)
        docs = render(values)
        keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
        assert len(keys) == len(set(keys)), f"duplicate objects for {values}"
        for doc in docs:
            if doc["kind"] != "ServiceMonitor":  # a Prometheus Operator CRD: not in the official schema
                validate_manifest(doc)
        roles = {
            d["metadata"]["namespace"] for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "kubeforge"
        }
        assert roles == set(values["watchNamespaces"]), values
        leader = [
            d for d in docs if d["kind"] in ("Role", "RoleBinding") and d["metadata"]["name"].endswith("-election")
        ]
        assert len(leader) == (2 if values["leaderElection"]["enabled"] else 0), values


def test_no_service_account_when_told_not_to_create_one():
    docs = by_kind(render({"serviceAccount": {"create": False, "name": "existing"}}))
    assert "ServiceAccount" not in docs
    assert docs["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


def test_values_schema_rejects_a_wrong_value():
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(Exception, match="watchNamespaces"):
        chart.validate_schema({"watchNamespaces": ["Not A Namespace"]})
    with pytest.raises(Exception, match="watchNamespaces"):  # one Role per namespace: no duplicates
        chart.validate_schema({"watchNamespaces": ["team-a", "team-a"]})
    with pytest.raises(Exception, match="leaderElection"):
        chart.validate_schema({"leaderElection": {"leaseDurationSeconds": -1}})


def test_chart_crds_are_the_generated_crds():
    chart_crds = sorted((CHART / "crds").glob("*.yaml"))
    assert [p.name for p in chart_crds] == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    for path in chart_crds:
        assert path.read_text() == (ROOT / "crds" / path.name).read_text(), f"run `kubeforge crds -o {CHART / 'crds'}`"


def test_crds_are_valid_apiextensions_objects():
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        for doc in documents([path.read_text()]):
            validate_manifest(doc)
