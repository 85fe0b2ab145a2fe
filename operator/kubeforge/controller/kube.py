"""The operator's direct API calls: applies of children, status writes, Events, reads, the Lease.

Reads of the world go through kopf's watches and indexes; what is here uses the Kubernetes
client (synchronously: kopf runs sync handlers in threads), every call through the one
retry policy of controller/retry.py. urllib3's own retries are off, so nothing retries twice.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from kubeforge.controller import retry
from kubeforge.controller.diff import is_subset
from kubeforge.controller.retry import UNREACHABLE, ApiError, Policy
from kubeforge.render.labels import FIELD_MANAGER, HANDOVER_FIELD_MANAGER

__all__ = ["ApiError", "Kube", "LeaseLock", "Policy", "object_path"]

log = logging.getLogger("kubeforge.kube")

PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Job": "jobs",
    "JobSet": "jobsets",
    "Deployment": "deployments",
    "LeaderWorkerSet": "leaderworkersets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "ScaledObject": "scaledobjects",
    "HTTPRoute": "httproutes",
    "InferencePool": "inferencepools",
    "FineTuneJob": "finetunejobs",
    "QuantizeJob": "quantizejobs",
    "ModelService": "modelservices",
}
COMPONENT = "kubeforge-operator"  # source.component / reportingComponent of our Events
MERGE = "application/merge-patch+json"


def policy_from_env() -> Policy:
    """The retry policy, tunable for tests (KUBEFORGE_API_DEADLINE_SECONDS)."""
    return Policy(deadline=float(os.environ.get("KUBEFORGE_API_DEADLINE_SECONDS", "30")))


def request_timeout_from_env() -> float:
    """Seconds one request may take before it counts as a fault (KUBEFORGE_API_TIMEOUT_SECONDS)."""
    return float(os.environ.get("KUBEFORGE_API_TIMEOUT_SECONDS", "10"))


class Kube:
    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        policy: Policy | None = None,
        timeout: float | None = None,
    ):
        if api_client is None:
            try:
                config.load_incluster_config()
            except ConfigException:
                config.load_kube_config()
            configuration = client.Configuration.get_default_copy()
            configuration.retries = False  # one retry policy: ours
            api_client = client.ApiClient(configuration)
        self.api = api_client
        self.policy = policy or policy_from_env()
        self.timeout = timeout if timeout is not None else request_timeout_from_env()
        self.identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        self._discovery: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ one attempt

    def request(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> Any:  # fmt: skip
        """One attempt; ApiError for an answer >= 400, or with status 0 for no answer."""
        _method, url, headers, payload, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(
                method, url, header_params=headers, body=payload, _request_timeout=(self.timeout, self.timeout)
            )
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as err:  # refused, reset, timed out
            raise ApiError(UNREACHABLE, type(err).__name__, f"{method} {path}: {err}") from err
        if response.status >= 400:
            raise ApiError(response.status, response.reason, data.decode(errors="replace"), dict(response.headers))
        return json.loads(data) if data else None

    # ------------------------------------------------------------ retried calls

    def _retried(self, what: str, fn: Any, on_conflict: Any = None) -> Any:
        return retry.call(fn, policy=self.policy, what=what, on_conflict=on_conflict)

    def get(self, path: str) -> Any:
        return self._retried(f"GET {path}", lambda: self.request("GET", path))

    def read(self, path: str) -> dict[str, Any] | None:
        """The stored object, or None when there is none."""
        return self._retried(f"GET {path}", lambda: self._reread(path))

    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Server-side apply with kubeforge's field manager: a second apply of the same object changes nothing.

        A 409 re-reads the object (to learn whether it is gone) and applies again.
        """
        path = object_path(obj)

        def once() -> Any:
            return self.request(
                "PATCH",
                path,
                body=dict(obj),
                query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                content_type="application/apply-patch+yaml",
            )

        def reread() -> bool:  # gone or changed, the same apply is what it needs
            self._reread(path)
            return False

        return self._retried(f"apply {path}", once, on_conflict=reread)

    def hand_over(self, obj: Mapping[str, Any]) -> bool:
        """Apply ``obj`` (a few fields of a child) as HANDOVER_FIELD_MANAGER, without force: the handover
        manager then holds those fields, at these values, when kubeforge stops applying them (see
        controller/service.py). A conflict means another manager (an autoscaler) owns them with another
        value already, which is all the handover is for: False, and nothing written."""
        path = object_path(obj)

        def once() -> bool:
            self.request("PATCH", path, body=dict(obj), query=[("fieldManager", HANDOVER_FIELD_MANAGER)],
                         content_type="application/apply-patch+yaml")  # fmt: skip
            return True

        return bool(self._retried(f"hand over {path}", once, on_conflict=lambda: True))

    def delete(self, obj: Mapping[str, Any]) -> bool:
        """Delete a child (its dependents in the background); False when it was gone already."""
        path = object_path(obj)

        def once() -> bool:
            try:
                self.request("DELETE", path, body={"propagationPolicy": "Background"})
            except ApiError as err:
                if err.status == 404:
                    return False
                raise
            return True

        return bool(self._retried(f"delete {path}", once))

    def patch_status(
        self,
        path: str,
        status: Mapping[str, Any],
        resource_version: str | None = None,
        based_on: Mapping[str, Any] | None = None,
    ) -> bool:
        """Merge-patch the status subresource, on ``resource_version`` when given (a precondition).

        A 409 re-reads the object: if our status is there already, or the object is gone, done;
        if only its metadata moved (kopf's annotations), the same status is written again on the
        new version; if its status moved away from ``based_on`` (what this status was decided
        from), the write is dropped (False): a later pass decides again from what is stored. A
        write that reaches the server late (a dead process's, a timed-out one's) cannot undo a
        newer status this way.
        """
        version = {"rv": resource_version}
        dropped = []

        def once() -> Any:
            patch: dict[str, Any] = {"status": dict(status)}
            if version["rv"]:
                patch["metadata"] = {"resourceVersion": version["rv"]}
            try:
                return self.request("PATCH", f"{path}/status", body=patch, content_type=MERGE)
            except ApiError as err:
                if err.status == 404:
                    return None
                raise

        def reread() -> bool:
            current = self._reread(path)
            if current is None or is_subset(dict(status), current.get("status") or {}):
                return True
            have = current.get("status") or {}
            if based_on is not None and not (is_subset(have, based_on) and is_subset(based_on, have)):
                dropped.append(True)
                return True
            version["rv"] = (current.get("metadata") or {}).get("resourceVersion")
            return False

        self._retried(f"status of {path}", once, on_conflict=reread)
        if dropped:
            log.info("status of %s not written: it changed since this pass read it", path)
        return not dropped

    def post_event(self, event: Mapping[str, Any]) -> bool:
        """Create an Event under its deterministic name; False when it exists already (posted before)."""
        ns = event["metadata"]["namespace"]

        def once() -> bool:
            try:
                self.request("POST", f"/api/v1/namespaces/{ns}/events", body=dict(event))
            except ApiError as err:
                if err.already_exists:
                    return False
                raise
            return True

        return bool(self._retried(f"event {event['metadata']['name']}", once))

    def _reread(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def serves(self, group_version: str, plural: str, ttl: float = 60.0) -> bool:
        """Whether the API serves group_version/plural (is the CRD installed?), cached for ``ttl`` seconds.

        404 means no; other failures (after retries) raise rather than guess, and are not cached.
        """
        key = f"{group_version}/{plural}"
        with self._lock:
            cached = self._discovery.get(key)
            if cached and time.monotonic() - cached[0] < ttl:
                return cached[1]
        try:
            listing = self.get(f"/apis/{group_version}")
            found = any(r.get("name") == plural for r in (listing or {}).get("resources", []))
        except ApiError as err:
            if err.status != 404:
                raise
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


def micro_now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_object(owner: Mapping[str, Any], type_: str, reason: str, message: str, key: str, instance: str) -> dict:
    """A core/v1 Event about ``owner`` whose name is fixed by (owner uid, ``key``).

    Posting the same transition twice (a retried pass, a restart before the status write
    landed) is then a 409 AlreadyExists, not a second Event.
    """
    meta = owner.get("metadata") or {}
    digest = hashlib.sha256(f"{meta.get('uid')}|{key}".encode()).hexdigest()[:16]
    now = micro_now()[:19] + "Z"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta.get('name', '')[:200]}.{digest}", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": owner.get("apiVersion"),
            "kind": owner.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance[:128],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class LeaseLock:
    """Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

    Expiry is judged on the local clock: a holder's lease is expired when its record has not
    changed for leaseDurationSeconds since this process first saw it (no trust in other
    clocks). Writes are optimistic (PUT with the resourceVersion read): of two candidates
    racing for an expired lease, one gets a 409 and stays standby. One attempt per call; the
    caller's loop is the retry.
    """

    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, duration: float):
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self._observed: tuple[Any, float] | None = None  # (record, local time it was first seen)

    def holder(self) -> str | None:
        record = self._observed[0] if self._observed else None
        return record[0] if record else None

    def _observe(self, spec: Mapping[str, Any]) -> float:
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, time.monotonic())
        return time.monotonic() - self._observed[1]

    def try_acquire_or_renew(self) -> bool:
        now = micro_now()
        try:
            lease = self.kube.request("GET", self.path)
        except ApiError as err:
            if err.status != 404:
                log.info("lease %s/%s: %s", self.namespace, self.name, err)
                return False
            return self._create(now)
        spec = dict(lease.get("spec") or {})
        age = self._observe(spec)
        holder = spec.get("holderIdentity")
        if holder and holder != self.identity and age < float(spec.get("leaseDurationSeconds") or self.duration):
            return False
        mine = holder == self.identity
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=max(1, round(self.duration)),
            renewTime=now,
            acquireTime=spec.get("acquireTime") if mine and spec.get("acquireTime") else now,
            leaseTransitions=int(spec.get("leaseTransitions") or 0) + (0 if mine else 1),
        )
        lease["spec"] = spec
        try:
            self.kube.request("PUT", self.path, body=lease)
        except ApiError as err:
            log.info("lease %s/%s not taken: %s", self.namespace, self.name, err)
            return False
        self._observe(spec)
        return True

    def _create(self, now: str) -> bool:
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        }
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        }
        try:
            self.kube.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", body=body)
        except ApiError as err:
            log.info("lease %s/%s not created: %s", self.namespace, self.name, err)
            return False
        self._observe(spec)
        return True

    def release(self) -> None:
        """Hand the lease over at once (a graceful stop), if it is still ours."""
        try:
            lease = self.kube.request("GET", self.path)
            spec = dict(lease.get("spec") or {})
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity=None, leaseDurationSeconds=1, renewTime=micro_now())
            lease["spec"] = spec
            self.kube.request("PUT", self.path, body=lease)
        except ApiError as err:
            log.warning("lease %s/%s not released (it will expire): %s", self.namespace, self.name, err)
