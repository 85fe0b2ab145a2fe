"""The chart's RBAC is what the operator really calls: every request allowed, nothing else granted.

The real operator process runs the whole chain (tests/operator/test_chain.py: FineTuneJob ->
QuantizeJob -> ModelService, with Events and status writes) against the emulator, with leader
election on the chart's Lease, once watching all namespaces and once watching one. Every
request it made (told from the test's own by its bearer token) becomes an RBAC request:
GET of an item = get, of a collection = list, ?watch = watch, POST = create, PATCH = patch
(a server-side apply also needs create: the API server authorizes an apply that creates as
create), PUT = update, DELETE = delete. The chart rendered with the matching values must allow
each one, and grant nothing that is not one of them or in UNSEEN below. Discovery (/api,
/apis/<group>/<version>) is a non-resource URL every authenticated user may read: not a rule.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from tests.conftest import free_port
from tests.harness.operator import OperatorProcess, write_kubeconfig
from tests.operator import test_chain as chain
from tests.test_chart import render

pytestmark = pytest.mark.operator

RELEASE_NAMESPACE = "kubeforge-system"  # tests/test_chart.py renders the release there
SERVICE_ACCOUNT = ("kubeforge", RELEASE_NAMESPACE)
LEASE = "kubeforge"  # the chart's default lease name: the release's full name
TOKEN = "Bearer emulator-token"  # the operator's kubeconfig (tests/harness/operator.py)
WORK_NAMESPACE = "team-a"  # where the scenario's objects live
OURS = ("finetunejobs", "quantizejobs", "modelservices")
CHILDREN = (("", "configmaps"), ("", "services"), ("batch", "jobs"), ("apps", "deployments"),
            ("jobset.x-k8s.io", "jobsets"), ("leaderworkerset.x-k8s.io", "leaderworkersets"))  # fmt: skip
OPTIONAL = (("keda.sh", "scaledobjects"), ("gateway.networking.k8s.io", "httproutes"),
            ("inference.networking.k8s.io", "inferencepools"))  # fmt: skip


class Call(NamedTuple):
    verb: str
    group: str
    resource: str  # plural, or plural/subresource
    namespace: str | None  # None: cluster-scoped, or across all namespaces
    name: str | None = None


# What the operator needs but the emulator cannot show, each with its reason. Namespaced ones
# are checked as calls in the scenario's namespace, so they land in a Role when the chart
# renders Roles.
UNSEEN: tuple[tuple[str, tuple[Call, ...]], ...] = (
    (
        "kopf watches CRDs to notice kinds installed after it started; the emulator serves no "
        "apiextensions.k8s.io, so kopf never gets that far there",
        tuple(Call(v, "apiextensions.k8s.io", "customresourcedefinitions", None) for v in ("list", "watch")),
    ),
    (
        "children's ownerReferences set blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement "
        "admission plugin allows only with update on the owner's finalizers subresource",
        tuple(Call("update", "kubeforge.io", f"{plural}/finalizers", WORK_NAMESPACE) for plural in OURS),
    ),
    (
        "Kube.apply re-reads a child after a 409 Conflict (controller/kube.py); the emulator has no apply conflicts",
        tuple(Call("get", group, plural, WORK_NAMESPACE) for group, plural in CHILDREN),
    ),
    (
        "JobSet and LeaderWorkerSet replace Job and Deployment where installed; the emulator does not serve "
        "them, so they get what the scenario shows for Job and Deployment",
        tuple(
            Call(verb, group, plural, WORK_NAMESPACE)
            for group, plural in (("jobset.x-k8s.io", "jobsets"), ("leaderworkerset.x-k8s.io", "leaderworkersets"))
            for verb in ("list", "watch", "create", "patch")
        ),
    ),
    (
        "a ModelService's autoscaler and route exist only when its spec asks (the scenario's does not): "
        "applied, followed, re-read after a 409 and deleted when no longer asked for; the emulator serves "
        "HorizontalPodAutoscalers (the scenario shows their list and watch) but not KEDA, the Gateway API "
        "or its Inference Extension (tests/operator/test_service_autoscaling.py runs them)",
        tuple(
            Call(verb, "autoscaling", "horizontalpodautoscalers", WORK_NAMESPACE)
            for verb in ("get", "create", "patch", "delete")
        )
        + tuple(
            Call(verb, group, plural, WORK_NAMESPACE)
            for group, plural in OPTIONAL
            for verb in ("get", "list", "watch", "create", "patch", "delete")
        ),
    ),
)


# ------------------------------------------------------------ requests -> RBAC requests


def rbac_calls(method: str, path: str, params: Any, content_type: str) -> list[Call]:
    """The RBAC requests one HTTP request needs; [] for discovery."""
    parts = [p for p in path.strip("/").split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return []  # /api, /apis, /version, /healthz
    if not rest:
        return []  # /api/v1, /apis/<group>/<version>: discovery
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    resource = f"{plural}/{sub}" if sub else plural
    if method == "GET":
        verbs = ["get"] if name else ["watch" if params.get("watch") in ("true", "1") else "list"]
    elif method == "PATCH":
        verbs = ["patch", "create"] if content_type.startswith("application/apply-patch") else ["patch"]
    else:
        verbs = [{"POST": "create", "PUT": "update", "DELETE": "delete" if name else "deletecollection"}[method]]
    return [Call(verb, group, resource, namespace, name) for verb in verbs]


def operator_calls(emulator: Any) -> set[Call]:
    calls: set[Call] = set()
    for request in emulator:
        if request.headers.get("Authorization") != TOKEN:
            continue  # the test's own requests (playing kubelets and controllers)
        calls.update(rbac_calls(str(request.method.value).upper(), request.url.path, request.params,
                                request.headers.get("Content-Type", "")))  # fmt: skip
    return calls


# ------------------------------------------------------------ the chart's grants


class Grant(NamedTuple):
    verb: str
    group: str
    resource: str
    namespace: str | None  # None: a ClusterRole bound cluster-wide
    names: frozenset[str]


def grants(docs: list[dict]) -> set[Grant]:
    """What the chart grants our ServiceAccount: each rule, expanded to one verb, group and resource."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}  # fmt: skip
    granted: set[Grant] = set()
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        subjects = {(s["name"], s.get("namespace")) for s in binding["subjects"] if s["kind"] == "ServiceAccount"}
        if SERVICE_ACCOUNT not in subjects:
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        role = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role["rules"]:
            for field in ("verbs", "apiGroups", "resources"):
                assert "*" not in rule[field], f"a wildcard in {role['metadata']['name']}: {rule}"
            granted.update(
                Grant(verb, group, resource, scope, frozenset(rule.get("resourceNames", ())))
                for verb in rule["verbs"]
                for group in rule["apiGroups"]
                for resource in rule["resources"]
            )
    return granted


def allows(grant: Grant, call: Call) -> bool:
    return (
        (grant.verb, grant.group, grant.resource) == (call.verb, call.group, call.resource)
        and (grant.namespace is None or grant.namespace == call.namespace)
        and (not grant.names or call.name in grant.names)
    )


def needed_by(grant: Grant, call: Call, clusterwide: bool) -> bool:
    """Whether this grant is what ``call`` needs (not merely something that allows it).

    A cluster-wide grant is needed for a cluster-scoped call, or for any call when the operator
    watches every namespace (it then works in namespaces no Role could name in advance).
    """
    if not allows(grant, call):
        return False
    return grant.namespace is not None or call.namespace is None or clusterwide


# ------------------------------------------------------------ the scenario


async def run_chain(emulator: Any, tmp_path: Any, namespace_args: tuple[str, ...]) -> set[Call]:
    resp = await emulator.post("/api/v1/namespaces", json={"metadata": {"name": RELEASE_NAMESPACE}})
    assert resp.status == 201, await resp.text()
    env = {
        "KUBEFORGE_RESYNC_SECONDS": "0.5",
        "KUBEFORGE_FULL_PASS_SECONDS": "0",
        "KUBEFORGE_OFFLINE": "1",
        "KUBEFORGE_METRICS_PORT": str(free_port()),
        "POD_NAME": "kubeforge-0",
    }
    # the chart's Deployment arguments (tests/test_chart.py checks them), at a test's pace
    args = (*namespace_args, "--leader-elect", f"--lease-name={LEASE}", f"--lease-namespace={RELEASE_NAMESPACE}",
            "--lease-duration=4", "--renew-deadline=2", "--retry-period=0.5")  # fmt: skip
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    proc = OperatorProcess(kubeconfig, tmp_path / "operator.log", emulator, args=args, env=env)
    await proc.start()
    try:
        await chain.test_the_whole_chain_applied_at_once(emulator, proc)
    except BaseException:
        print(f"----- operator log -----\n{proc.logs()[-20000:]}")
        raise
    finally:
        await proc.stop()  # a graceful stop releases the Lease: a PUT too
    return operator_calls(emulator)


def describe(items: Any) -> str:
    return "\n".join(f"  {item}" for item in sorted(items, key=str))


@pytest.mark.parametrize(
    ("values", "namespace_args"),
    [({}, ()), ({"watchNamespaces": [WORK_NAMESPACE]}, (f"--namespace={WORK_NAMESPACE}",))],
    ids=["all-namespaces", "watch-namespaces"],
)
async def test_chart_rbac_is_exactly_what_the_operator_calls(emulator, tmp_path, values, namespace_args):
    seen = await run_chain(emulator, tmp_path, namespace_args)
    # the scenario exercised every kind of call: a smaller one could not show a rule unused
    summary = {(c.verb, c.group, c.resource) for c in seen}
    assert {("create", "", "events"), ("update", "coordination.k8s.io", "leases"),
            ("patch", "kubeforge.io", "finetunejobs/status"), ("create", "apps", "deployments"),
            ("watch", "", "nodes"), ("get", "kubeforge.io", "quantizejobs")} <= summary  # fmt: skip
    unseen = {call for _, calls in UNSEEN for call in calls}
    assert not unseen & seen, f"allow-listed but seen (drop it from UNSEEN):\n{describe(unseen & seen)}"
    needed = seen | unseen

    granted = grants(render(values))
    missing = {call for call in needed if not any(allows(g, call) for g in granted)}
    assert not missing, f"the operator calls these but the chart does not grant them:\n{describe(missing)}"
    clusterwide = not values.get("watchNamespaces")
    unused = {g for g in granted if not any(needed_by(g, call, clusterwide) for call in needed)}
    assert not unused, f"the chart grants these but the operator never needs them:\n{describe(unused)}"


def test_request_to_rbac_mapping():
    ns = "/apis/kubeforge.io/v1alpha1/namespaces/team-a/finetunejobs"
    assert rbac_calls("GET", f"{ns}/a", {}, "") == [Call("get", "kubeforge.io", "finetunejobs", "team-a", "a")]
    assert rbac_calls("GET", ns, {}, "") == [Call("list", "kubeforge.io", "finetunejobs", "team-a")]
    assert rbac_calls("GET", "/api/v1/nodes", {"watch": "true"}, "") == [Call("watch", "", "nodes", None)]
    assert rbac_calls("PATCH", f"{ns}/a/status", {}, "application/merge-patch+json") == [
        Call("patch", "kubeforge.io", "finetunejobs/status", "team-a", "a")
    ]
    assert [c.verb for c in rbac_calls("PATCH", "/api/v1/namespaces/x/configmaps/c", {},
                                       "application/apply-patch+yaml")] == ["patch", "create"]  # fmt: skip
    assert rbac_calls("PUT", "/apis/coordination.k8s.io/v1/namespaces/s/leases/l", {}, "")[0].verb == "update"
    assert rbac_calls("DELETE", "/api/v1/namespaces/x/services/s", {}, "")[0].verb == "delete"
    assert rbac_calls("POST", "/api/v1/namespaces/x/events", {}, "") == [Call("create", "", "events", "x")]
    assert rbac_calls("GET", "/api/v1/namespaces", {}, "") == [Call("list", "", "namespaces", None)]
    assert rbac_calls("GET", "/apis/jobset.x-k8s.io/v1alpha2", {}, "") == []  # discovery
    assert rbac_calls("GET", "/apis", {}, "") == []
