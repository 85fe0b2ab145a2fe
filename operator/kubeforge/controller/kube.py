"""The operator's few direct API calls: server-side apply of children and API discovery.

Reads go through kopf's watches and indexes; only writes of children and a discovery
probe use the Kubernetes client (synchronously: kopf runs sync handlers in threads).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from kubeforge.render.labels import FIELD_MANAGER

PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Job": "jobs",
    "JobSet": "jobsets",
    "Deployment": "deployments",
    "LeaderWorkerSet": "leaderworkersets",
}


class ApiError(RuntimeError):
    def __init__(self, status: int, reason: str, body: str):
        self.status = status
        super().__init__(f"{status} {reason}: {body[:500]}")


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None):
        if api_client is None:
            try:
                config.load_incluster_config()
            except ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = api_client
        self._discovery: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> Any:  # fmt: skip
        _method, url, headers, payload, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, header_params=headers, body=payload, _request_timeout=30)
        data = response.read()
        if response.status >= 400:
            raise ApiError(response.status, response.reason, data.decode(errors="replace"))
        return json.loads(data) if data else None

    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Server-side apply with kubeforge's field manager: a second apply of the same object changes nothing."""
        return self.request(
            "PATCH",
            object_path(obj),
            body=dict(obj),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    def serves(self, group_version: str, plural: str, ttl: float = 60.0) -> bool:
        """Whether the API serves group_version/plural (is the CRD installed?), cached for ``ttl`` seconds."""
        key = f"{group_version}/{plural}"
        with self._lock:
            cached = self._discovery.get(key)
            if cached and time.monotonic() - cached[0] < ttl:
                return cached[1]
        try:
            listing = self.request("GET", f"/apis/{group_version}")
            found = any(r.get("name") == plural for r in (listing or {}).get("resources", []))
        except ApiError:
            found = False
        with self._lock:
            self._discovery[key] = (time.monotonic(), found)
        return found


def object_path(obj: Mapping[str, Any]) -> str:
    api_version, kind = obj["apiVersion"], obj["kind"]
    meta = obj["metadata"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    ns = meta.get("namespace")
    scope = f"/namespaces/{ns}" if ns else ""
    return f"{prefix}{scope}/{PLURALS[kind]}/{meta['name']}"
