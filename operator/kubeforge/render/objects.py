"""Object metadata every renderer shares: names, labels, owner references, GPU tolerations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kubeforge.api.kinds import API_VERSION
from kubeforge.api.uris import parse_uri
from kubeforge.render import labels as L
from kubeforge.runtime.contract import CACHE_DIR, CONFIG_PATH, ENV_CONFIG, ENV_HF_HOME, ENV_HF_TOKEN, EXIT_USER_ERROR


def owner_refs(kind: str, name: str, uid: str | None) -> list[dict[str, Any]]:
    """The controller reference that makes the children go with their owner (none without a uid)."""
    if not uid:
        return []
    return [{"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid, "controller": True,
             "blockOwnerDeletion": True}]  # fmt: skip


def meta(api: str, kind: str, name: str, ns: str, labels: dict, component: str, owner: list) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": ns, "labels": {**labels, L.COMPONENT: component}}
    if owner:
        metadata["ownerReferences"] = owner
    return {"apiVersion": api, "kind": kind, "metadata": metadata}


def tolerations(extra: Iterable[Any]) -> list[dict[str, Any]]:
    """The GPU taint the NVIDIA device plugin's nodes usually carry, then the spec's, without duplicates."""
    out: list[dict[str, Any]] = [{"key": L.GPU_TAINT, "operator": "Exists", "effect": "NoSchedule"}]
    for t in extra:
        item = t.dump()
        if item not in out:
            out.append(item)
    return out


def node_affinity(selector: Iterable[tuple[str, str]]) -> dict[str, Any] | None:
    terms = [{"key": k, "operator": "In", "values": [v]} for k, v in selector]
    if not terms:
        return None
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": terms}]}}}  # fmt: skip


def hf_token_env(credentials: Any) -> list[dict[str, Any]]:
    """HF_TOKEN from the Secret the spec names (never the token itself)."""
    if not (credentials and credentials.hugging_face):
        return []
    ref = credentials.hugging_face
    return [{"name": ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def runtime_env(credentials: Any, model_uri: str) -> list[dict[str, Any]]:
    """What every runtime pod (train, quantize) needs: the contract, the Hub cache and token, and no Hub
    lookups unless the model comes from the Hub."""
    env: list[dict[str, Any]] = [
        {"name": ENV_CONFIG, "value": CONFIG_PATH},
        {"name": ENV_HF_HOME, "value": f"{CACHE_DIR}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += hf_token_env(credentials)
    if parse_uri(model_uri).scheme != "hf":
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    return env


def non_root(uid: int) -> dict[str, Any]:
    """The pod security context of every pod kubeforge renders, whatever its image: the restricted Pod
    Security Standard (non-root, RuntimeDefault seccomp) with a fixed uid/gid, and fsGroup so that the
    pod can write its volumes. Our images run as ``uid`` already; vLLM's and SGLang's run as root by
    default and a custom image may too, so the uid is set, not merely asked for (runAsNonRoot alone
    would stop a root image from starting). That assumes such an image works as a user without a home
    or /etc/passwd entry: its programs readable by all, and what it writes under $HOME or /tmp
    (foreign_image_env() points HOME at the cache emptyDir). OnRootMismatch: a volume already owned by
    the group is not chowned file by file at every start (an output PVC can hold many checkpoints)."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def container_security() -> dict[str, Any]:
    """The restricted Pod Security Standard's container rules, for every container and init container."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def foreign_image_env() -> list[dict[str, Any]]:
    """For an image kubeforge did not build, run under non_root()'s uid: that uid has no home in it
    (HOME would be / and not writable), so HOME is the cache emptyDir (vLLM's, Triton's, FlashInfer's
    and Hugging Face's caches live under it), and USER names the user (torch's compile cache calls
    getpass.getuser(), which fails for a uid without a passwd entry)."""
    return [{"name": "HOME", "value": CACHE_DIR}, {"name": "USER", "value": "kubeforge"}]


def literal(text: str) -> str:
    """``text`` as it must be written in a container's command, args or env value to reach the
    process unchanged. Kubernetes expands ``$(VAR)`` there from the container's environment (a URI
    holding ``$(AWS_SECRET_ACCESS_KEY)`` would carry the Secret's value to wherever the URI goes),
    and reads ``$$`` as a literal ``$``; so every ``$`` is doubled. (Doubling only ``$(`` is not
    enough: ``$$(X)`` would become ``$$$(X)``, read as ``$`` then ``$(X)``, expanded.) Apply it to
    every string that comes from a user or another object, never to kubeforge's own ``$(VAR)``."""
    return text.replace("$", "$$")


def pod_failure_policy(container: str) -> dict[str, Any]:
    """EXIT_USER_ERROR fails the Job at once; a disruption (preemption, drain) does not count."""
    return {
        "rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": container, "operator": "In", "values": [EXIT_USER_ERROR]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }  # fmt: skip
