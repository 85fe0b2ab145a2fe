"""helm lint (strict, Kubernetes 1.33) and the Kubernetes 1.33 schema (kubernetes-validate, strict) on
the combinations of values this chart is meant for."""

from __future__ import annotations

import helm_python as helm
import pytest

from kubeforge.render import images
from tests.chart.charting import CHART, of_kind, operator_container, operator_pod, render
from tests.harness.manifests import KUBERNETES_VERSION, validate_manifest

DIGEST = "sha256:" + "ab" * 32
ALL_DIGESTS = {
    "imageRegistry": "mirror.example.com:5000",
    "image": {"digest": DIGEST},
    "images": {name: {"digest": DIGEST} for name in images.NAMES},
}
OPENSHIFT = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None}}
WATCHED = {"watchNamespaces": ["team-a", "team-b"]}
NO_POLICY = {"networkPolicy": {"enabled": False}}
COMBINATIONS = {
    "defaults": {},
    "digests-and-mirror": ALL_DIGESTS,
    "network-policy-off": NO_POLICY,
    "openshift-no-run-as-user": OPENSHIFT,
    "watch-namespaces": WATCHED,
    "everything": {
        **ALL_DIGESTS,
        **OPENSHIFT,
        **WATCHED,
        "networkPolicy": {
            "apiServerCIDRs": ["10.0.0.0/24"],
            "dnsPorts": [53, 5353],
            "metricsFrom": [{"podSelector": {}}],
            "extraEgress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443}]}],
        },
        "env": [{"name": "HF_ENDPOINT", "value": "https://hub.internal"}],
        "envFrom": [{"secretRef": {"name": "hf"}}],
        "readinessProbe": {"periodSeconds": 5},
        "replicas": 1,
        "leaderElection": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
    },
    "tag-overrides-no-probes": {
        "image": {"registry": "", "repository": "kf/operator", "tag": "dev"},
        "images": {"trainer": {"registry": "registry.local", "repository": "ml/trainer", "tag": "2.0"}},
        "livenessProbe": None,
        "readinessProbe": None,
    },
}


@pytest.mark.parametrize("values", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_lint_is_clean_and_every_object_is_valid_kubernetes(values):
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES_VERSION}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    docs = render(values)
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for doc in docs:
        validate_manifest(doc, KUBERNETES_VERSION)
    assert bool(of_kind(docs, "NetworkPolicy")) is (values is not NO_POLICY)
    pod = operator_pod(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert ("runAsUser" in pod["securityContext"]) is ("podSecurityContext" not in values)
    container = operator_container(docs)
    assert ("@" in container["image"]) is ("digest" in values.get("image", {}))
    assert all(v["value"] for v in container["env"] if "value" in v)  # no empty settings are passed
