"""A small evaluator of Kubernetes NetworkPolicy semantics, enough to ask the chart's policies who may
talk to whom: pod and namespace selectors (matchLabels, matchExpressions), ipBlock, numbered and
named ports, policyTypes, and isolation (a pod selected by no policy of a type is open for it)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    ip: str = "10.244.0.10"
    ports: dict[str, int] = field(default_factory=dict)  # named container ports


@dataclass(frozen=True)
class Address:
    """Something outside the cluster's pods (the API server's endpoint, the Hub)."""

    ip: str


Endpoint = Pod | Address


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]  # fmt: skip
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(other.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or []
        )
    if not isinstance(other, Pod):
        return False
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other.namespace})
    else:
        ns_ok = other.namespace == policy_ns
    return ns_ok and selects(peer.get("podSelector"), other.labels)


def _port_matches(ports: list[dict[str, Any]] | None, dest: Endpoint, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        number = p.get("port")
        if isinstance(number, str):
            number = dest.ports.get(number) if isinstance(dest, Pod) else None
        if number is None or number <= port <= p.get("endPort", number):
            return True
    return False


def _allowed(policies: list[dict[str, Any]], pod: Pod, other: Endpoint, dest: Endpoint, port: int, protocol: str,
             kind: str) -> bool:  # fmt: skip
    direction, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    isolating = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                 and kind in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], pod.labels)]  # fmt: skip
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get(direction) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers)
            if peer_ok and _port_matches(rule.get("ports"), dest, port, protocol):
                return True
    return False


def may_connect(docs: Iterable[dict[str, Any]], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether ``src`` may open a connection to ``dst``:``port`` under the NetworkPolicies in ``docs``."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    egress = not isinstance(src, Pod) or _allowed(policies, src, dst, dst, port, protocol, "Egress")
    ingress = not isinstance(dst, Pod) or _allowed(policies, dst, src, dst, port, protocol, "Ingress")
    return egress and ingress
