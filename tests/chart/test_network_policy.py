"""The chart's NetworkPolicies, asked who may talk to whom (tests/chart/netpol.py), with the trainer and
other pods the operator really renders: the chart's trainer selector and progress port must match
operator/kubeforge/render (labels.py, finetune.py) and the runtime's contract."""

from __future__ import annotations

from typing import Any

import pytest

from kubeforge.runtime.contract import PROGRESS_PORT, PROGRESS_PORT_NAME, RENDEZVOUS_PORT
from tests.builders import DELETE, finetune, quantize, service
from tests.chart.charting import NAMESPACE, by_kind, of_kind, operator_container, render
from tests.chart.netpol import Address, Pod, may_connect, selects
from tests.harness.manifests import validate_manifest
from tests.render.rendering import render_ftj, render_ms, render_qj

API_SERVER = Address("10.96.0.1")
HUB = Address("18.160.1.2")
WATCHED = {"watchNamespaces": ["team-a", "team-b"]}


def pods_of(docs: list[dict[str, Any]] | None, ip: str) -> list[Pod]:
    """The pods of each pod template in ``docs``, as the network sees them."""
    assert docs is not None
    out = []
    for doc in docs:
        if doc["kind"] not in ("Job", "Deployment", "JobSet", "LeaderWorkerSet"):
            continue
        template = _template(doc)
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        out.append(Pod(doc["metadata"]["namespace"], template["metadata"]["labels"], ip, ports))
    return out


def _template(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "JobSet":
        return spec["replicatedJobs"][0]["template"]["spec"]["template"]
    if doc["kind"] == "LeaderWorkerSet":
        return spec["leaderWorkerTemplate"]["leaderTemplate"]
    return spec["template"]


def trainers(gang: str = "job") -> list[Pod]:
    docs = render_ftj(finetune(**{"resources.queue": DELETE}), gang=gang)
    (pod,) = pods_of(docs, "10.244.1.5")
    rank1 = Pod(pod.namespace, pod.labels, "10.244.2.5", pod.ports)
    return [pod, rank1]


def operator_of(docs: list[dict[str, Any]]) -> Pod:
    template = by_kind(docs)["Deployment"]["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]}
    return Pod(NAMESPACE, template["metadata"]["labels"], "10.244.9.9", ports)


def test_the_chart_selects_the_trainer_pods_the_operator_renders_and_no_others():
    docs = render(WATCHED)
    (policy,) = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["namespace"] == "team-a"]
    selector = policy["spec"]["podSelector"]
    for gang in ("job", "jobset"):
        rank0, _ = trainers(gang)
        assert selects(selector, rank0.labels), gang
        assert rank0.ports[PROGRESS_PORT_NAME] == PROGRESS_PORT
    lws = render_ms(service(), "s3://bucket/x", "a10-4x1.yaml", lws=True, max_model_len=32768)
    others = [
        *pods_of(render_qj(quantize()), "10.244.3.1"),
        *pods_of(render_ms(service(), "pvc://models/x"), "10.244.3.2"),
        *pods_of(lws, "10.244.3.3"),
    ]
    assert len(others) == 3
    assert not [p.labels for p in others if selects(selector, p.labels)]
    # the operator's egress rule names the same pods and port
    (egress,) = [r for r in by_kind(render())["NetworkPolicy"]["spec"]["egress"] if r.get("to")]
    assert egress["to"][0]["podSelector"] == selector and egress["ports"] == [
        {"port": PROGRESS_PORT, "protocol": "TCP"}
    ]


@pytest.mark.parametrize("values", [{}, WATCHED], ids=["all-namespaces", "watched"])
def test_the_operator_reaches_the_api_server_dns_and_rank0_progress_only(values):
    docs = render(values)
    for doc in of_kind(docs, "NetworkPolicy"):
        validate_manifest(doc)
    operator = operator_of(docs)
    rank0, rank1 = trainers()
    assert may_connect(docs, operator, API_SERVER, 6443) and may_connect(docs, operator, API_SERVER, 443)
    assert may_connect(docs, operator, Address("10.96.0.10"), 53, "UDP")
    assert may_connect(docs, operator, rank0, PROGRESS_PORT)
    assert not may_connect(docs, operator, rank0, RENDEZVOUS_PORT)
    assert not may_connect(docs, operator, API_SERVER, 2379)  # etcd, say
    stranger = Pod("team-a", {"app": "db"}, "10.244.5.5", {"pg": 5432})
    assert not may_connect(docs, operator, stranger, 5432)
    assert not may_connect(docs, operator, Pod("team-a", rank0.labels | {"app.kubernetes.io/component": "engine"},
                                               "10.244.5.6"), PROGRESS_PORT)  # fmt: skip
    # scraped on the metrics port only
    prometheus = Pod("monitoring", {"app": "prometheus"})
    assert may_connect(docs, prometheus, operator, operator.ports["metrics"])
    assert not may_connect(docs, prometheus, operator, 9999)
    # the gang talks within itself on any port (rendezvous, NCCL)
    assert may_connect(docs, rank1, rank0, RENDEZVOUS_PORT) and may_connect(docs, rank0, rank1, 45123)


def test_watched_namespaces_get_a_trainer_ingress_policy_and_nothing_else_reaches_trainers():
    docs = render(WATCHED)
    policies = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in of_kind(docs, "NetworkPolicy")}
    assert policies == {(NAMESPACE, "kubeforge"), ("team-a", "kubeforge-trainers"), ("team-b", "kubeforge-trainers")}
    rank0, _ = trainers()
    operator = operator_of(docs)
    stranger = Pod("team-a", {"app": "notebook"}, "10.244.5.7")
    assert may_connect(docs, operator, rank0, PROGRESS_PORT)
    assert not may_connect(docs, stranger, rank0, PROGRESS_PORT)
    assert not may_connect(docs, Pod(NAMESPACE, {"app": "other"}), rank0, PROGRESS_PORT)
    # not watched: the operator does not reach trainers there, and the chart leaves the namespace alone
    elsewhere = Pod("team-c", rank0.labels, "10.244.6.1", rank0.ports)
    assert not may_connect(docs, operator, elsewhere, PROGRESS_PORT)
    assert may_connect(docs, Pod("team-c", {"app": "x"}), elsewhere, PROGRESS_PORT)  # team-c is not isolated
    # watching all namespaces, no trainer policy (the README shows one to add)
    assert [p["metadata"]["namespace"] for p in of_kind(render(), "NetworkPolicy")] == [NAMESPACE]
    trainer_off = render({**WATCHED, "networkPolicy": {"trainerIngress": False}})
    assert [p["metadata"]["namespace"] for p in of_kind(trainer_off, "NetworkPolicy")] == [NAMESPACE]


def test_api_server_cidrs_dns_ports_extra_egress_and_metrics_peers_are_values():
    hub = {"to": [{"ipBlock": {"cidr": "18.160.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    scraper = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    values = {"networkPolicy": {"apiServerCIDRs": ["10.96.0.1/32"], "apiServerPorts": [6443], "dnsPorts": [5353],
                                "extraEgress": [hub], "metricsFrom": scraper}}  # fmt: skip
    docs = render(values)
    operator = operator_of(docs)
    assert may_connect(docs, operator, API_SERVER, 6443)
    assert not may_connect(docs, operator, API_SERVER, 443)
    assert not may_connect(docs, operator, Address("10.96.0.2"), 6443)
    assert may_connect(docs, operator, HUB, 443) and not may_connect(docs, operator, Address("1.1.1.1"), 443)
    assert may_connect(docs, operator, Address("10.96.0.10"), 5353, "UDP")
    assert not may_connect(docs, operator, Address("10.96.0.10"), 53, "UDP")
    assert may_connect(docs, Pod("monitoring", {}), operator, operator.ports["metrics"])
    assert not may_connect(docs, Pod("team-a", {}), operator, operator.ports["metrics"])
    # by default HTTPS anywhere is open through the API server rule: the planner's Hub lookups work
    assert may_connect(render(), operator_of(render()), HUB, 443)
    assert not may_connect(render({"networkPolicy": {"dnsPorts": []}}), operator, Address("10.96.0.10"), 53, "UDP")


def test_no_policies_when_disabled():
    docs = render({**WATCHED, "networkPolicy": {"enabled": False}})
    assert not of_kind(docs, "NetworkPolicy")
    rank0, _ = trainers()
    assert may_connect(docs, operator_of(docs), rank0, PROGRESS_PORT)


def test_prometheus_reaches_the_trainers_metrics_only_when_their_podmonitor_is_on():
    scraper = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    rank0, _ = trainers()
    prometheus, stranger = Pod("monitoring", {"app": "prometheus"}), Pod("team-a", {"app": "notebook"})
    on = {"metrics": {"podMonitors": {"trainer": {"enabled": True}}}}
    docs = render({**WATCHED, **on, "networkPolicy": {"metricsFrom": scraper}})
    assert may_connect(docs, prometheus, rank0, PROGRESS_PORT)
    assert not may_connect(docs, stranger, rank0, PROGRESS_PORT)
    assert may_connect(render({**WATCHED, **on}), stranger, rank0, PROGRESS_PORT)  # metricsFrom empty: any peer
    assert not may_connect(render({**WATCHED, "networkPolicy": {"metricsFrom": scraper}}), prometheus, rank0,
                           PROGRESS_PORT)  # fmt: skip
    for doc in of_kind(docs, "NetworkPolicy"):
        validate_manifest(doc)
