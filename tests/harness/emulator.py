"""kmock's KubernetesEmulator, made faithful enough for kubeforge's operator tests.

kmock 0.8's emulator stores objects and serves list/watch/patch, but lacks much of
what a real API server does. This subclass adds:

- metadata the server owns: uid, resourceVersion (one counter for the whole store),
  generation (bumped when anything but metadata/status changes), creationTimestamp,
  generateName; these cannot be overwritten by clients;
- 201 Created on create and 409 AlreadyExists / Conflict (stale resourceVersion); 422 for
  a JSON patch whose "test" fails (kopf removes its finalizer that way and retries on 422);
- the status subresource: writes to /status change only status, writes to the main
  resource never change status, create drops status;
- PUT (replace) and server-side apply (PATCH application/apply-patch+yaml creates or
  merges; see the limits below);
- label and field selectors on list and watch;
- garbage collection: deleting an owner deletes its dependents (ownerReferences.uid),
  unless propagationPolicy is Orphan, and an object created for an owner that no longer
  exists is collected at once; finalizers hold a deletion until removed;
- discovery of the built-in kinds kubeforge creates (and coordination.k8s.io Leases, for
  leader election) and of our CRDs, read from crds/;
- an optional cap on the request log (``log_limit``) for long or busy runs;
- the scale subresource (GET, merge PATCH, PUT of an autoscaling/v1 Scale) of Deployments and of
  CRDs that declare one (their specReplicasPath, statusReplicasPath, labelSelectorPath), as
  `kubectl scale` and the HPA controller use it; HorizontalPodAutoscalers are served (no controller).

What it still lacks (tests must not rely on these):
- server-side apply has no field ownership: an apply merges like a merge patch, fields
  dropped from the applied config are not removed, and there are no apply conflicts;
- strategic merge patch is treated as a JSON merge patch (lists are replaced);
- no schema validation, defaulting, CEL or admission webhooks (tests validate
  manifests with kubernetes-validate and the CRD schema separately);
- a watch starts with the current objects as ADDED instead of resuming from the
  requested resourceVersion (unless ``resume_watches``: then only the objects changed since
  it, as ADDED; deletions in between are not replayed); no bookmarks, no 410 Gone;
- no controllers: nothing runs Jobs or Pods; tests play the job controller and kubelet
  by patching status.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import random
import string
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import apps, enums, parsing, rendering

from tests.harness.selectors import parse_field_selector, parse_label_selector

VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
CRD_DIR = Path(__file__).resolve().parents[2] / "crds"

# (group/version, plural, kind, namespaced, subresources, short names)
BUILTINS: tuple[tuple[str, str, str, bool, tuple[str, ...], tuple[str, ...]], ...] = (
    ("v1", "namespaces", "Namespace", False, ("status",), ("ns",)),
    ("v1", "nodes", "Node", False, ("status",), ("no",)),
    ("v1", "pods", "Pod", True, ("status", "log"), ("po",)),
    ("v1", "services", "Service", True, ("status",), ("svc",)),
    ("v1", "configmaps", "ConfigMap", True, (), ("cm",)),
    ("v1", "secrets", "Secret", True, (), ()),
    ("v1", "events", "Event", True, (), ("ev",)),
    ("v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("status",), ("pvc",)),
    ("batch/v1", "jobs", "Job", True, ("status",), ()),
    ("apps/v1", "deployments", "Deployment", True, ("status", "scale"), ("deploy",)),
    ("autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True, ("status",), ("hpa",)),
    ("events.k8s.io/v1", "events", "Event", True, (), ("ev",)),
    ("coordination.k8s.io/v1", "leases", "Lease", True, (), ()),  # the operator's leader election
)

# (specReplicasPath, statusReplicasPath, labelSelectorPath) of the built-in kinds with a scale subresource;
# a Deployment's selector is its spec.selector, in string form
BUILTIN_SCALE = {"apps/v1/deployments": (".spec.replicas", ".status.replicas", None)}

APPLY = "application/apply-patch+yaml"
JSON_PATCH = "application/json-patch+json"


_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads /api/v1/namespaces[/NAME] as a namespace prefix and fails; these are Namespaces."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        return parsing.ParsedPath(
            group="",
            version="v1",
            plural="namespaces",
            name=parts[3] if len(parts) > 3 else None,
            subresource=parts[4] if len(parts) > 4 else None,
        )
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path  # kmock's rendering calls parsing.parse_path at request time


def _version(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch_from(old: Any, new: Any) -> Any:
    """The JSON merge patch that turns ``old`` into ``new`` (None deletes a key)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = merge_patch_from(old[key], value)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def _essence(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


@attrs.define(kw_only=True)
class FaithfulEmulator(kmock.KubernetesEmulator):
    """See the module docstring for what this adds to kmock's emulator."""

    _rv: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_rv: int = attrs.field(default=0, init=False)
    url: str = attrs.field(default="", init=False)  # set by the fixture once the server listens
    _created: dict[int, tuple] = attrs.field(factory=dict, init=False)  # id(request) -> stored key
    # Keep only this many recent requests (and every watch) in the log: kmock matches each new
    # request against the whole log, so a long run otherwise measures the emulator, not the operator.
    # None keeps everything, for tests that count requests.
    log_limit: int | None = attrs.field(default=None, init=False)
    # Resume a watch that names a resourceVersion (as the API server does) instead of replaying every object:
    # for long runs (bench/operator_scale.py), where each reconnect would otherwise re-send the whole store.
    resume_watches: bool = attrs.field(default=False, init=False)
    # "group/version/plural" -> (specReplicasPath, statusReplicasPath, labelSelectorPath or None)
    _scale_paths: dict[str, tuple[str, str, str | None]] = attrs.field(factory=lambda: dict(BUILTIN_SCALE), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_replace
        for gv, plural, kind, namespaced, subresources, short in BUILTINS:
            self.declare(gv, plural, kind, namespaced, subresources, short)
        for crd in load_crds(CRD_DIR):
            self.declare_crd(crd)

    # ------------------------------------------------------------ discovery

    def declare(
        self,
        group_version: str,
        plural: str,
        kind: str,
        namespaced: bool = True,
        subresources: Iterable[str] = ("status",),
        short_names: Iterable[str] = (),
        categories: Iterable[str] = (),
    ) -> None:
        self.resources[f"{group_version}/{plural}"] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=namespaced,
            verbs=VERBS,
            subresources=set(subresources),
            shortnames=set(short_names),
            categories=set(categories),
        )

    def declare_crd(self, crd: Mapping[str, Any]) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            scale = (version.get("subresources") or {}).get("scale")
            if scale:
                self._scale_paths[f"{spec['group']}/{version['name']}/{names['plural']}"] = (
                    scale["specReplicasPath"],
                    scale["statusReplicasPath"],
                    scale.get("labelSelectorPath"),
                )
            self.declare(
                f"{spec['group']}/{version['name']}",
                names["plural"],
                names["kind"],
                spec.get("scope", "Namespaced") == "Namespaced",
                tuple(version.get("subresources", {})),
                names.get("shortNames", ()),
                names.get("categories", ()),
            )

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        for known in self.resources:
            if known == resource:
                return self.resources[known]
        return None

    def _has_status(self, resource: kmock.resource) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    # ------------------------------------------------------------ state changes

    def _next_rv(self) -> str:
        self._last_rv = next(self._rv)
        return str(self._last_rv)

    def _trim_log(self) -> None:
        if self.log_limit is None or len(self._requests) <= 2 * self.log_limit:
            return
        older, recent = self._requests[: -self.log_limit], self._requests[-self.log_limit :]
        self._requests[:] = [r for r in older if r.params.get("watch") == "true"] + recent

    async def _handle(self, request: rendering.Request):  # type: ignore[override]
        self._trim_log()
        if request.resource is not None and request.subresource == "scale":
            try:
                return aiohttp.web.json_response(await self._scale(request))
            except kmock.KubernetesError as err:
                return await self._render_error(err)
        if request.resource is not None and request.subresource in (None, "status"):
            try:
                async with self._lock:
                    await self._change(request)
            except kmock.KubernetesError as err:  # an API answer (404, 409, 422), not a server fault
                return await self._render_error(err)
        return await apps.RawHandler._handle(self, request)

    async def _change(self, request: rendering.Request) -> None:
        if request.action == enums.action.CREATE:
            self._created[id(request)] = await self._create(request.resource, request.namespace, request.data)
        elif request.action == enums.action.UPDATE and request.name is not None:
            await self._patch(request)
        elif request.method == kmock.method.PUT and request.name is not None:
            await self._replace(request)
        elif request.action == enums.action.DELETE and request.name is not None:
            await self._delete(request.resource, request.namespace, request.name, request.data)

    async def _create(self, resource: kmock.resource, namespace: str | None, data: Any) -> tuple:
        if not isinstance(data, Mapping):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(dict(data))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        info = self._info(resource)
        namespaced = info is None or info.namespaced is not False
        ns = (namespace or meta.get("namespace")) if namespaced else None
        if namespaced:
            meta["namespace"] = ns
        key = (resource, ns, meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise _error(409, "AlreadyExists", f"{resource.plural} {meta['name']!r} already exists")
        if info is not None and info.kind:
            obj.setdefault("kind", info.kind)
            obj.setdefault("apiVersion", f"{resource.group}/{resource.version}".lstrip("/"))
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=self._next_rv(),
            generation=1,
            creationTimestamp=now_rfc3339(),
        )
        meta.pop("deletionTimestamp", None)
        if self._has_status(resource):
            obj.pop("status", None)
        if key not in self._objects:
            self._objects[key] = obj
        else:
            self._objects[key].create(obj)
        await self._buses[resource].put({"type": "ADDED", "object": self._objects[key].raw})
        refs = meta.get("ownerReferences") or []
        if refs and not any(self._uid_exists(ref.get("uid")) for ref in refs):
            await self._remove(key)  # the garbage collector deletes dependents of owners that are gone
        return key

    def _uid_exists(self, uid: str | None) -> bool:
        return any(not o.deleted and (o.raw.get("metadata") or {}).get("uid") == uid for _, o in self._objects.items())

    async def _patch(self, request: rendering.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        data = request.data
        if content_type == APPLY and data is None:
            data = yaml.safe_load(request.text)
        if key not in self._objects or self._objects[key].deleted:
            if content_type == APPLY and request.subresource is None:
                await self._create(
                    request.resource,
                    request.namespace,
                    dict(data, metadata=dict(data.get("metadata", {}), name=request.name)),
                )
                return
            raise _error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        old = copy.deepcopy(self._objects[key].raw)
        if isinstance(data, list) or content_type == JSON_PATCH:
            import jsonpatch
            from kmock._internal.dicts import json_patch_dict

            try:
                new = dict(json_patch_dict(old, data))
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                # as the API server: a failed "test" op (e.g. a stale resourceVersion) is 422, not 500
                raise _error(422, "Invalid", f"the JSON patch could not be applied: {err}") from err
        elif isinstance(data, Mapping):
            self._check_rv(old, data)
            new = apply_merge_patch(old, data)
        else:
            raise _error(400, "BadRequest", "the patch must be a JSON object or a JSON patch")
        await self._store(key, old, new, status_only=request.subresource == "status")

    async def _replace(self, request: rendering.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise _error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        if not isinstance(request.data, Mapping):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        old = copy.deepcopy(self._objects[key].raw)
        self._check_rv(old, request.data)
        await self._store(key, old, copy.deepcopy(dict(request.data)), status_only=request.subresource == "status")

    def _check_rv(self, old: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        wanted = (data.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != old["metadata"].get("resourceVersion"):
            raise _error(
                409, "Conflict", "the object has been modified; please apply your changes to the latest version"
            )

    async def _store(self, key: tuple, old: dict[str, Any], new: dict[str, Any], *, status_only: bool) -> None:
        resource = key[0]
        if status_only:
            new = (
                dict(old, status=new.get("status"))
                if "status" in new
                else {k: v for k, v in old.items() if k != "status"}
            )
        elif self._has_status(resource):
            new = {k: v for k, v in new.items() if k != "status"}
            if "status" in old:
                new["status"] = old["status"]
        meta = dict(new.get("metadata") or {})
        for owned in ("uid", "creationTimestamp", "name", "namespace", "generation", "deletionTimestamp"):
            if owned in old["metadata"]:
                meta[owned] = old["metadata"][owned]
            else:
                meta.pop(owned, None)
        if _essence(new) != _essence(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"] = meta
        if new == old:
            return  # a no-op write changes nothing, not even resourceVersion (as the API server)
        meta["resourceVersion"] = self._next_rv()
        self._objects[key].patch(merge_patch_from(old, new))
        raw = self._objects[key].raw
        await self._buses[resource].put({"type": "MODIFIED", "object": raw})
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await self._remove(key)

    async def _delete(self, resource: kmock.resource, namespace: str | None, name: str, options: Any) -> None:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise _error(404, "NotFound", f"{resource.plural} {name!r} not found")
        obj = self._objects[key]
        orphan = isinstance(options, Mapping) and options.get("propagationPolicy") == "Orphan"
        if obj.get("metadata", {}).get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj.patch({"metadata": {"deletionTimestamp": now_rfc3339(), "resourceVersion": self._next_rv()}})
                await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
            return
        await self._remove(key, orphan=orphan)

    async def _remove(self, key: tuple, *, orphan: bool = False) -> None:
        obj = self._objects[key]
        raw = copy.deepcopy(obj.raw)
        uid = raw.get("metadata", {}).get("uid")
        obj.delete()
        await self._buses[key[0]].put({"type": "DELETED", "object": raw})
        if orphan or not uid:
            return
        for dep_key, dep in list(self._objects.items()):
            if dep.deleted:
                continue
            refs = dep.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                await self._delete(dep_key[0], dep_key[1], dep_key[2], None)

    # ------------------------------------------------------------ the scale subresource

    async def _scale(self, request: rendering.Request) -> dict[str, Any]:
        """GET, merge PATCH or PUT of an object's autoscaling/v1 Scale: spec.replicas is written to the
        object's specReplicasPath (a change of spec: generation moves, watchers see MODIFIED)."""
        paths = next((p for known, p in self._scale_paths.items() if known == request.resource), None)
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if paths is None or request.name is None:
                raise _error(404, "NotFound", f"{request.resource.plural} have no scale subresource")
            if key not in self._objects or self._objects[key].deleted:
                raise _error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
            old = copy.deepcopy(self._objects[key].raw)
            if request.method in (kmock.method.PATCH, kmock.method.PUT):
                scale = _scale_of(old, paths)
                data = request.data
                if not isinstance(data, Mapping):
                    raise _error(400, "BadRequest", "a Scale patch must be a JSON object")
                changed = apply_merge_patch(scale, data) if request.method == kmock.method.PATCH else dict(data)
                replicas = (changed.get("spec") or {}).get("replicas")
                if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
                    raise _error(422, "Invalid", f"spec.replicas: Invalid value: {replicas!r}")
                new = copy.deepcopy(old)
                _set_path(new, paths[0], replicas)
                await self._store(key, old, new, status_only=False)
            return _scale_of(self._objects[key].raw, paths)

    # ------------------------------------------------------------ responses

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        # kmock finds the new object by the name in the body; with generateName there is none
        key = self._created.pop(id(request))
        return rendering.Response(status=201, payload=self._objects[key].last.raw)

    async def _serve_replace(self, request: rendering.Request) -> rendering.Payload:
        return await self._serve_fetch(request)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        return self._objects[(request.resource, request.namespace, request.name)].last.raw

    def _matching(self, request: rendering.Request) -> list[dict[str, Any]]:
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        out = []
        for (resource, namespace, _), obj in self._objects.items():
            if resource != request.resource or obj.deleted:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            raw = obj.raw
            if labels(raw.get("metadata", {}).get("labels") or {}) and fields(raw):
                out.append(raw)
        return out

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request.resource)
        if info is None:
            raise kmock.KubernetesResourceNotFoundError()
        try:
            async with self._lock:
                items = self._matching(request)
        except ValueError as err:
            raise _error(400, "BadRequest", str(err)) from err
        return {
            "apiVersion": f"{request.resource.group}/{request.resource.version}".lstrip("/"),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._last_rv)},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        yield b""
        since = _version(request.params.get("resourceVersion")) if self.resume_watches else None
        async with self._lock:
            current = self._matching(request)
            if since is not None:
                current = [o for o in current if _version((o.get("metadata") or {}).get("resourceVersion")) > since]
            events = [{"type": "ADDED", "object": raw} for raw in current]
        for event in events:
            yield event
        async for event in self._buses[request.resource]:
            raw = event.get("object", {})
            meta = raw.get("metadata", {})
            if request.namespace is not None and meta.get("namespace") != request.namespace:
                continue
            if request.name is not None and meta.get("name") != request.name:
                continue
            if labels(meta.get("labels") or {}) and fields(raw):
                yield event

    # ------------------------------------------------------------ helpers for tests

    def stored(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def stored_all(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        res = kmock.resource(resource)
        return [
            copy.deepcopy(obj.raw)
            for (r, ns, _), obj in self._objects.items()
            if r == res and not obj.deleted and (namespace is None or ns == namespace)
        ]


def _get_path(obj: Mapping[str, Any], path: str) -> Any:
    for part in path.strip(".").split("."):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj


def _set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.strip(".").split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[last] = value


def _scale_of(obj: Mapping[str, Any], paths: tuple[str, str, str | None]) -> dict[str, Any]:
    spec_path, status_path, selector_path = paths
    if selector_path is None:  # a Deployment: its spec.selector, as a string
        labels = (_get_path(obj, ".spec.selector") or {}).get("matchLabels") or {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    else:
        selector = _get_path(obj, selector_path) or ""
    meta = obj.get("metadata") or {}
    kept = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {k: meta[k] for k in kept if k in meta},
        "spec": {"replicas": int(_get_path(obj, spec_path) or 0)},
        "status": {"replicas": int(_get_path(obj, status_path) or 0), "selector": selector},
    }


def load_crds(folder: Path) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(folder.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]
