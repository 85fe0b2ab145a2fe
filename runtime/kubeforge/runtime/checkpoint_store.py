"""Resumable checkpoints of s3:// outputs, kept in the output store so that a replaced pod resumes.

An s3:// output's checkpoints are written to the pod's scratch volume (an emptyDir, lost with the
pod), so each finished checkpoint is also copied to the store, next to the artifact it will become:

    s3://bucket/prefix/checkpoints/step-NNNNNNNN/<the files of the local step directory>
    s3://bucket/prefix/checkpoints/step-NNNNNNNN/kubeforge-checkpoint.json   (the completion marker)

The layout mirrors the local one (``<output>/checkpoints/step-N/``), and the artifact's manifest never
lists it, so downloading the artifact leaves it alone.

S3 has no rename, so the marker takes the place of ``step-N.tmp`` -> ``step-N``: it is written last,
by rank 0, after every node has uploaded its own ranks' files (the trainer's barrier between the two),
and lists every object of the checkpoint with its size. A checkpoint without it, or one whose objects
no longer match it, does not count. Removal takes the marker first for the same reason.

    push(step_dir, uri)              every node (its local rank 0): the files this node wrote
    mark_complete(uri, step)         rank 0, after a barrier that follows every node's push
    restore(local_root, uri)         every node (its local rank 0), before the trainer looks for a checkpoint
    prune_remote(uri, keep=2)        rank 0, after mark_complete
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeforge.runtime import checkpoint, export, fetch

log = logging.getLogger("kubeforge.checkpoints")

MARKER = "kubeforge-checkpoint.json"
CHECKPOINT_VERSION = "kubeforge.io/checkpoint/v1"
REMOTE_DIR = export.CHECKPOINTS  # the same name as the local folder under the output
_PARALLEL = 4  # concurrent object transfers per process


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    name: str  # step-NNNNNNNN
    files: dict[str, int]  # path inside the step directory -> size, as the marker lists them


def remote_uri(output_uri: str) -> str | None:
    """Where the checkpoints of an output live in its store: ``<output>/checkpoints`` for s3:// outputs,
    None for outputs on a mounted volume (pvc://, a local path), whose checkpoints already survive a pod."""
    if not output_uri.startswith("s3://"):
        return None
    return f"{output_uri.rstrip('/')}/{REMOTE_DIR}"


def push(step_dir: Path, uri: str, *, files: list[Path] | None = None, complete_marker: bool = False) -> list[str]:
    """Upload the files of a finished local checkpoint (``root/step-N``) under ``uri/step-N/``.

    ``files`` (default: every file under the directory) are the ones this process has: on a node other
    than rank 0's, a sharded engine leaves its ranks' files in ``step-N.tmp`` (only rank 0 renames), and
    that directory is used when ``step-N`` is absent; a node with no files of the checkpoint uploads
    nothing. Any marker of the same step is removed first, so a re-written step does not count until it
    is marked again. ``complete_marker=True`` marks the checkpoint complete afterwards: right only where
    this process's files are the whole checkpoint (every rank on one node); otherwise call
    mark_complete from rank 0 after a barrier. Returns the keys written."""
    name = step_dir.name.removesuffix(".tmp")
    step = _step(name)
    if not step_dir.is_dir() and step_dir.with_name(f"{name}.tmp").is_dir():
        step_dir = step_dir.with_name(f"{name}.tmp")
    client, bucket, base = _client(uri)
    client.remove_object(bucket, f"{base}{name}/{MARKER}")
    chosen = files if files is not None else sorted(p for p in step_dir.rglob("*") if p.is_file())
    jobs = [(str(p), f"{base}{name}/{p.relative_to(step_dir).as_posix()}") for p in chosen]
    with ThreadPoolExecutor(_PARALLEL) as pool:
        list(pool.map(lambda job: client.fput_object(bucket, job[1], job[0]), jobs))
    log.info("checkpoint %s: %d files uploaded to %s", name, len(jobs), uri)
    if complete_marker:
        mark_complete(uri, step)
    return [key for _, key in jobs]


def mark_complete(uri: str, step: int) -> dict[str, Any]:
    """Write the completion marker of ``uri/step-N/``: the list of its objects as the store has them now.
    Call it once every node's push of the step has returned (rank 0, after a barrier)."""
    client, bucket, base = _client(uri)
    name = f"{checkpoint.PREFIX}{step:08d}"
    folder = f"{base}{name}/"
    objects = {
        o.object_name[len(folder) :]: int(o.size)
        for o in client.list_objects(bucket, prefix=folder, recursive=True)
        if not o.is_dir and o.object_name != folder + MARKER
    }
    if "state.json" not in objects:  # rank 0's last file: without it the checkpoint cannot be resumed
        raise RuntimeError(f"{uri}/{name}: state.json was not uploaded; the checkpoint cannot be marked complete")
    marker = {
        "apiVersion": CHECKPOINT_VERSION,
        "step": step,
        "createdAt": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": [{"path": path, "size": size} for path, size in sorted(objects.items())],
    }
    _put_json(client, bucket, folder + MARKER, marker)
    log.info("checkpoint %s: complete in %s (%d files)", name, uri, len(objects))
    return marker


def complete_checkpoints(uri: str) -> list[RemoteCheckpoint]:
    """The complete checkpoints in the store, oldest first."""
    client, bucket, base = _client(uri)
    return [c for c in (_complete(client, bucket, base, uri, n, o) for n, o in _listing(client, bucket, base)) if c]


def latest_remote(uri: str) -> RemoteCheckpoint | None:
    """The newest complete checkpoint in the store (an incomplete or damaged newer one is passed over)."""
    client, bucket, base = _client(uri)
    for name, objects in reversed(_listing(client, bucket, base)):
        found = _complete(client, bucket, base, uri, name, objects)
        if found is not None:
            return found
    return None


def restore(local_root: Path, uri: str, *, trust_local: bool = True) -> Path | None:
    """Make the checkpoint to resume from available in ``local_root`` and return its directory (None: none).

    The newest complete checkpoint in the store is downloaded into ``local_root/step-N`` (through
    ``step-N.tmp`` and a rename, so an interrupted download never counts); files already there at the
    size the marker lists are kept. A newer complete local checkpoint (a restarted container that kept
    its volume, whose upload had not finished) wins when ``trust_local``; pass ``trust_local=False``
    when the gang spans several nodes: each node then resumes from the store's checkpoint, and local
    ones newer than it are removed, so that every node's checkpoint.latest() names the same step.
    An output bucket that does not exist is a SourceMissing, raised before any training."""
    client, bucket, base = _client(uri)
    if not client.bucket_exists(bucket):
        raise fetch.SourceMissing(f"{uri}: no bucket {bucket!r} at this endpoint (AWS_ENDPOINT_URL)")
    remote = latest_remote(uri)
    local = checkpoint.latest(local_root)
    local_step = _step(local.name) if local is not None else -1
    if remote is None or local_step > remote.step:
        if trust_local or local is None:
            return local
        for path in local_root.iterdir():
            name = path.name
            if (
                path.is_dir()
                and name.startswith(checkpoint.PREFIX)
                and not name.endswith(".tmp")
                and (remote is None or _step(name) > remote.step)
            ):
                shutil.rmtree(path)
        if remote is None:
            return None
    final = local_root / remote.name
    if final.is_dir():  # already here, perhaps in part (on a node that wrote only its own ranks' files)
        _download(client, bucket, f"{base}{remote.name}/", _missing(final, remote.files), final)
        return final
    tmp = local_root / f"{remote.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _download(client, bucket, f"{base}{remote.name}/", sorted(remote.files), tmp)
    os.replace(tmp, final)
    log.info("checkpoint %s: restored from %s (%d files)", remote.name, uri, len(remote.files))
    return final


def prune_remote(uri: str, keep: int = 2) -> list[str]:
    """Keep the newest ``keep`` complete checkpoints in the store; remove older ones and abandoned
    (unmarked) ones older than the newest complete. Markers go first. Returns the names removed."""
    from minio.deleteobjects import DeleteObject

    client, bucket, base = _client(uri)
    listing = _listing(client, bucket, base)
    complete = {n for n, o in listing if _complete(client, bucket, base, uri, n, o) is not None}
    if not complete:
        return []
    kept = sorted(complete, key=_step)[-keep:] if keep else []
    newest = max(_step(n) for n in complete)
    doomed = [(n, o) for n, o in listing if n not in kept and (n in complete or _step(n) < newest)]
    for name, objects in doomed:
        if MARKER in objects:
            client.remove_object(bucket, f"{base}{name}/{MARKER}")
        rest = [DeleteObject(f"{base}{name}/{path}") for path in objects if path != MARKER]
        errors = list(client.remove_objects(bucket, rest))
        if errors:
            raise RuntimeError(f"{uri}/{name}: could not remove {len(errors)} objects ({errors[0]})")
    return [n for n, _ in doomed]


def _client(uri: str) -> tuple[Any, str, str]:
    """(client, bucket, key prefix ending in '/' unless empty) for the checkpoints' URI."""
    client, bucket, prefix = fetch.s3_client(uri)
    prefix = prefix.strip("/")
    return client, bucket, f"{prefix}/" if prefix else ""


def _step(name: str) -> int:
    if not name.startswith(checkpoint.PREFIX):
        raise ValueError(f"{name}: not a checkpoint directory ({checkpoint.PREFIX}NNNNNNNN)")
    return int(name.removeprefix(checkpoint.PREFIX).removesuffix(".tmp"))


def _listing(client: Any, bucket: str, base: str) -> list[tuple[str, dict[str, int]]]:
    """Every step-N folder in the store with its objects (path -> size), by step: one listing."""
    found: dict[str, dict[str, int]] = {}
    for obj in client.list_objects(bucket, prefix=base, recursive=True):
        name, _, path = obj.object_name[len(base) :].partition("/")
        if obj.is_dir or not path or not name.startswith(checkpoint.PREFIX):
            continue
        try:
            _step(name)
        except ValueError:
            continue
        found.setdefault(name, {})[path] = int(obj.size)
    return sorted(found.items(), key=lambda item: _step(item[0]))


def _complete(client: Any, bucket: str, base: str, uri: str, name: str, objects: dict[str, int]):
    """The checkpoint when its marker is there and every object it lists is, at its size; else None."""
    if MARKER not in objects:
        return None
    try:
        response = client.get_object(bucket, f"{base}{name}/{MARKER}")
        try:
            marker = json.loads(response.read())
        finally:
            response.close()
            response.release_conn()
        files = {str(f["path"]): int(f["size"]) for f in marker["files"]}
    except Exception as err:  # unreadable marker (or removed meanwhile): the checkpoint does not count
        log.warning("checkpoint %s in %s: unreadable marker (%s); passed over", name, uri, err)
        return None
    wrong = sorted(p for p, size in files.items() if objects.get(p) != size)
    if wrong or any(".." in Path(p).parts or p.startswith("/") for p in files):
        log.warning("checkpoint %s in %s: objects differ from the marker (%s); passed over", name, uri, wrong[:3])
        return None
    return RemoteCheckpoint(step=_step(name), name=name, files=files)


def _missing(folder: Path, files: dict[str, int]) -> list[str]:
    return sorted(p for p, size in files.items() if not (folder / p).is_file() or (folder / p).stat().st_size != size)


def _download(client: Any, bucket: str, folder: str, paths: list[str], target: Path) -> None:
    def one(path: str) -> None:
        dest = target / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.fget_object(bucket, folder + path, str(dest))  # minio writes a temporary file, then renames

    with ThreadPoolExecutor(_PARALLEL) as pool:
        list(pool.map(one, paths))


def _put_json(client: Any, bucket: str, key: str, value: dict[str, Any]) -> None:
    import io

    body = json.dumps(value, indent=2, sort_keys=True).encode()
    client.put_object(bucket, key, io.BytesIO(body), len(body), content_type="application/json")
