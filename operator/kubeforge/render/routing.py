"""A ModelService's route: a Gateway API HTTPRoute in front of its Service, or in front of an InferencePool
(pure).

    spec.route set, HTTPRoute CRD installed          HTTPRoute -> Service (port 8000)
      + route.endpointPicker, InferencePool CRD      InferencePool (the engine pods, the Endpoint Picker
                                                     named) and HTTPRoute -> InferencePool

The InferencePool is the Gateway API Inference Extension's (inference.networking.k8s.io/v1, GA since its
v1.0; the x-k8s.io v1alpha2 group is the older one): selector = the engine pods' labels, targetPorts =
the engine's port, endpointPickerRef = the Endpoint Picker's Service, which the platform deploys (its
image and configuration are the extension's, not ours). The gateway then asks that picker, per request,
which replica to send it to. Without a picker named no InferencePool is made: a pool without one would
send every request nowhere (FailClose) or anywhere (FailOpen), so installing the CRD alone changes nothing.

With a path prefix other than /, a URLRewrite filter removes it (unless stripPathPrefix is false): the
engines serve the OpenAI API under /v1, so /support-bot/v1/chat/completions reaches them as
/v1/chat/completions.
"""

from __future__ import annotations

from typing import Any

from kubeforge.api.service import Route
from kubeforge.render.engines import SERVING_PORT

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_API = f"{GATEWAY_GROUP}/v1"
INFERENCE_GROUP = "inference.networking.k8s.io"
INFERENCE_API = f"{INFERENCE_GROUP}/v1"


def http_route(route: Route, metadata: dict[str, Any], backend: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` from render/objects.meta; ``backend``: a backendRef (service_backend or pool_backend)."""
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": route.gateway.name}
    if route.gateway.namespace:
        parent["namespace"] = route.gateway.namespace
    if route.gateway.section_name:
        parent["sectionName"] = route.gateway.section_name
    rule: dict[str, Any] = {"matches": [{"path": {"type": "PathPrefix", "value": route.path_prefix}}]}
    if route.path_prefix != "/" and route.strip_path_prefix:
        strip = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}
        rule["filters"] = [{"type": "URLRewrite", "urlRewrite": strip}]
    rule["backendRefs"] = [backend]
    obj: dict[str, Any] = {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": metadata}
    obj["spec"] = {"parentRefs": [parent], "rules": [rule]}
    if route.hostnames:
        obj["spec"]["hostnames"] = list(route.hostnames)
    return obj


def service_backend(service: str) -> dict[str, Any]:
    return {"group": "", "kind": "Service", "name": service, "port": SERVING_PORT, "weight": 1}


def pool_backend(pool: str) -> dict[str, Any]:
    return {"group": INFERENCE_GROUP, "kind": "InferencePool", "name": pool, "weight": 1}


def inference_pool(route: Route, metadata: dict[str, Any], pod_labels: dict[str, str]) -> dict[str, Any]:
    picker = route.endpoint_picker
    if picker is None:
        raise ValueError("an InferencePool needs route.endpointPicker")
    obj: dict[str, Any] = {"apiVersion": INFERENCE_API, "kind": "InferencePool", "metadata": metadata}
    obj["spec"] = {
        "selector": {"matchLabels": dict(pod_labels)},
        "targetPorts": [{"number": SERVING_PORT}],
        "endpointPickerRef": {"group": "", "kind": "Service", "name": picker.name, "port": {"number": picker.port},
                              "failureMode": picker.failure_mode},
    }  # fmt: skip
    return obj
