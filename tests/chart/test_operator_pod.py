"""The operator Deployment's pod from values: security contexts, probes, env, resources, NOTES."""

from __future__ import annotations

from tests.chart.charting import notes, operator_container, operator_pod, render
from tests.render.test_pod_security import check_restricted

OPENSHIFT = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None}}


def test_defaults_keep_the_restricted_pod_security_standard():
    docs = render()
    pod = operator_pod(docs)
    assert check_restricted(pod) == []
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    assert operator_container(docs)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_openshift_style_leaves_the_uid_to_the_platform_and_stays_restricted():
    docs = render(OPENSHIFT)
    pod = operator_pod(docs)
    assert "runAsUser" not in pod["securityContext"] and "runAsGroup" not in pod["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert check_restricted(pod) == []
    assert "assigns the UID" in notes(OPENSHIFT) and "assigns the UID" not in notes()


def test_security_contexts_are_values():
    values = {"podSecurityContext": {"fsGroup": 2000}, "securityContext": {"runAsUser": 1234}}
    docs = render(values)
    assert operator_pod(docs)["securityContext"]["fsGroup"] == 2000
    assert operator_pod(docs)["securityContext"]["runAsUser"] == 65532  # the defaults stay, merged
    assert operator_container(docs)["securityContext"]["runAsUser"] == 1234
    assert operator_container(docs)["securityContext"]["readOnlyRootFilesystem"] is True


def test_both_probes_ask_the_health_endpoint_the_operator_serves():
    container = operator_container(render({"livenessPort": 8181}))
    assert "--liveness=http://0.0.0.0:8181/healthz" in container["args"]
    health = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
    assert health == 8181
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    tuned = operator_container(render({"readinessProbe": {"periodSeconds": 3}, "livenessProbe": None}))
    assert tuned["readinessProbe"]["periodSeconds"] == 3 and tuned["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "livenessProbe" not in tuned


def test_env_env_from_and_resources_are_values():
    env = [{"name": "HF_ENDPOINT", "value": "https://hub.internal"},
           {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]  # fmt: skip
    values = {"env": env, "envFrom": [{"configMapRef": {"name": "proxy"}}],
              "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}}  # fmt: skip
    container = operator_container(render(values))
    assert container["env"][-2:] == env  # after the operator's own
    assert {"name": "KUBEFORGE_RESYNC_SECONDS", "value": "60"} in container["env"]
    assert {"name": "KUBEFORGE_PROGRESS_SECONDS", "value": "30"} in container["env"]
    assert {"name": "KUBEFORGE_PROGRESS_READS_PER_SECOND", "value": "2"} in container["env"]
    assert container["envFrom"] == [{"configMapRef": {"name": "proxy"}}]
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    assert "envFrom" not in operator_container(render())


def test_notes_say_where_the_operator_runs_and_what_it_watches():
    text = notes({"watchNamespaces": ["team-a"], "imageRegistry": "mirror.local", "images": {"vllm": {"tag": "v9"}}})
    assert "kubectl -n kubeforge-system rollout status deployment/kubeforge" in text
    assert "the namespaces team-a" in text and "images.vllm.tag=v9" in text and "imageRegistry=mirror.local" in text
    assert "image: mirror.local/kubeforge/operator:0.1.0" in text
    assert "every namespace" in notes() and "Workload images" not in notes()
    assert "NetworkPolicies are on" in notes() and "NetworkPolicies" not in notes({"networkPolicy": {"enabled": False}})
