"""Every pod kubeforge renders passes the restricted Pod Security Standard.

check_restricted() implements the standard's rules (Kubernetes' "Pod Security Standards" page,
baseline + restricted, as the PodSecurity admission controller enforces them at "latest") for
the pod and container fields; it is run over every pod template of every kind, example, example
cluster and variant in tests/render/rendering.py: custom images, vLLM, SGLang, the transformers
engine, the init container that fetches an artifact, JobSet and LeaderWorkerSet templates.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubeforge.render.images import SGLANG_IMAGE, VLLM_IMAGE
from tests.render.rendering import all_cases, containers, pod_templates

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret"}  # fmt: skip
ALLOWED_ADDED_CAPABILITIES = {"NET_BIND_SERVICE"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}  # fmt: skip


def check_restricted(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """The restricted profile's violations in a pod spec (empty: it would be admitted)."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    # baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"{field} must not be true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("hostProcess must not be true")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            out.append(f"volume {volume['name']}: hostPath is not allowed")
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volume {volume['name']}: type {sorted(kinds - ALLOWED_VOLUMES)} is not allowed")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl.get('name')} is not allowed")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            out.append(f"AppArmor annotation {key}={value}")
    # restricted, pod level
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser must not be 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_OK:
        out.append(f"pod seccompProfile {pod_seccomp} is not allowed")
    out += _profiles(psc, "pod")

    for c in containers(pod):
        name, sc = c["name"], c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: hostProcess")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{name}: procMount {sc['procMount']}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        out += _profiles(sc, name)
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_OK:
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost (pod or container), not {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        added = set(caps.get("add") or []) - ALLOWED_ADDED_CAPABILITIES
        if added:
            out.append(f"{name}: capabilities {sorted(added)} must not be added")
    return out


def _profiles(sc: dict[str, Any], who: str) -> list[str]:
    out = []
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"{who}: appArmorProfile {apparmor}")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        out.append(f"{who}: seLinuxOptions {selinux}")
    return out


CASES = list(all_cases())


def test_the_cases_cover_every_kind_and_variant():
    ids = [case_id for case_id, _ in CASES]
    assert len(ids) == len(set(ids)) and len(ids) > 30
    kinds = {d["kind"] for _, docs in CASES for d in docs}
    assert {"Job", "JobSet", "Deployment", "LeaderWorkerSet"} <= kinds
    pods = [pod for _, docs in CASES for _, pod in pod_templates(docs)]
    assert any(pod.get("initContainers") for pod in pods)
    images = {c["image"] for pod in pods for c in containers(pod)}
    assert {VLLM_IMAGE, SGLANG_IMAGE, "registry.local/my-trainer:1", "registry.local/vllm:1"} <= images


@pytest.mark.parametrize(("case", "docs"), CASES, ids=[c for c, _ in CASES])
def test_every_pod_passes_the_restricted_pod_security_standard(case, docs):
    templates = list(pod_templates(docs))
    assert templates
    for where, pod in templates:
        assert check_restricted(pod) == [], f"{case}: {where}"


def test_engines_not_built_by_kubeforge_run_as_a_non_root_uid_with_a_writable_home():
    for case in ("ms@h100-4x8.yaml", "ms-sglang", "ms-custom-image", "ms-lws"):
        for _, pod in pod_templates(dict(CASES)[case]):
            assert pod["securityContext"]["runAsUser"] != 0 and pod["securityContext"]["runAsGroup"] != 0
            engine = pod["containers"][0]
            home = next(e["value"] for e in engine["env"] if e["name"] == "HOME")
            mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts[home]], f"{case}: HOME must be a writable emptyDir"


def test_the_checker_catches_what_the_standard_forbids():
    _, pod = next(pod_templates(dict(CASES)["ms-vllm-s3-fetch"]))
    assert check_restricted(pod) == []
    bad = copy.deepcopy(pod)
    del bad["securityContext"]
    bad["hostNetwork"] = True
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    bad["initContainers"][0]["securityContext"] = {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}
    bad["containers"][0]["securityContext"]["runAsUser"] = 0
    bad["containers"][0]["ports"][0]["hostPort"] = 8000
    found = "\n".join(check_restricted(bad))
    for expected in ("hostNetwork", "hostPath is not allowed", "fetch-model: privileged",
                     "fetch-model: allowPrivilegeEscalation", "fetch-model: capabilities must drop ALL",
                     "fetch-model: capabilities ['SYS_ADMIN']", "engine: runAsUser must not be 0",
                     "engine: hostPort", "fetch-model: seccompProfile"):  # fmt: skip
        assert expected in found, expected
    # the pod level alone satisfies runAsNonRoot and seccomp; a container may not override them badly
    ok = copy.deepcopy(pod)
    for c in containers(ok):
        c["securityContext"].pop("runAsNonRoot")
        c["securityContext"].pop("seccompProfile")
    assert check_restricted(ok) == []
    ok["containers"][0]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    ok["containers"][0]["securityContext"]["runAsNonRoot"] = False
    assert len(check_restricted(ok)) == 2
