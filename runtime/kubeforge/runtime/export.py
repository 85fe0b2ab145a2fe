"""The artifact: weights (merged, or the adapter alone), the tokenizer, and kubeforge-artifact.json.

The manifest lists every file with its size and sha256; the artifact's digest is the sha256
of the manifest itself. ``verify`` re-reads the files and checks them against it.

Staging (the quantizer's evaluation gate): an artifact that must pass a check before it
replaces what is at its destination is written to a staging place first, and promoted only
after the check passed; a failed check discards it and leaves the destination as it was.

    folder <final>             staged in <final>.staging-<tag> beside it (the same volume), promoted
                               by rename: <final> -> <final>.replaced-<tag>, staging -> <final>,
                               then the replaced folder is removed; the earlier artifact is replaced
                               as a whole (no stale shard of it survives next to the new manifest)
    folder that is a mount     (a claim's root: no writable sibling) staged in
    point                      <final>/.kubeforge-staging-<tag>, which artifact_files skips; promoted
                               file by file: the old manifest first, then the files it listed, then
                               the new files moved up, the new manifest last
    s3://bucket/prefix         written locally, uploaded to s3://bucket/prefix.staging-<tag>
                               (weights first, manifest last, as publish), copied server-side into
                               the prefix in the same order, then the staging objects are deleted:
                               the final prefix changes only during the copy, never during the upload

A failed gate removes the staging folder (nothing is kept); the tag is the job's (its uid), so
a retried attempt of the same job clears what an earlier one left.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "kubeforge-artifact.json"
ARTIFACT_VERSION = "kubeforge.io/artifact/v1"
STAGING = ".staging-"  # <final>.staging-<tag>: beside the destination, until the gate passes
STAGING_INSIDE = ".kubeforge-staging-"  # <final>/.kubeforge-staging-<tag>: where <final> is a mount point
REPLACED = ".replaced-"  # <final>.replaced-<tag>: the earlier artifact, during the swap
log = logging.getLogger("kubeforge.export")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(model: Any, tokenizer: Any, out: Path, *, method: str, merge: bool) -> bool:
    """Write the model (merged when asked and possible) and tokenizer; True when merged."""
    out.mkdir(parents=True, exist_ok=True)
    merged = False
    if method in ("lora", "qlora") and merge:
        model = model.merge_and_unload()
        merged = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return merged or method == "full"


CHECKPOINTS = "checkpoints"  # resumable training state under the output; not part of the artifact


def artifact_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST and _in_artifact(p.relative_to(out)))


def _in_artifact(relative: Path) -> bool:
    top = relative.parts[0]
    return top != CHECKPOINTS and not top.startswith(STAGING_INSIDE)


def write_manifest(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    files = []
    for path in artifact_files(out):
        files.append({"path": str(path.relative_to(out)), "size": path.stat().st_size, "sha256": sha256_file(path)})
    manifest = {
        "apiVersion": ARTIFACT_VERSION,
        "createdAt": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **info,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def digest(out: Path) -> str:
    return "sha256:" + sha256_file(out / MANIFEST)


def verify(out: Path) -> list[str]:
    """Problems found re-reading the artifact against its manifest ([] when intact)."""
    manifest = json.loads((out / MANIFEST).read_text())
    problems = []
    listed = set()
    for entry in manifest["files"]:
        path = out / entry["path"]
        listed.add(entry["path"])
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: content differs from the manifest")
    extra = {str(p.relative_to(out)) for p in artifact_files(out)} - listed
    problems += [f"{name}: not in the manifest" for name in sorted(extra)]
    return problems


def size(out: Path) -> int:
    return sum(p.stat().st_size for p in artifact_files(out)) + (out / MANIFEST).stat().st_size


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def publish(out: Path, uri: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Upload a finished artifact where its URI says (s3://) and return the pod's summary of it.

    Weights and tokenizer first, the manifest last: a reader (fetch.download_s3) trusts the objects
    only through the manifest and checks each against it, so an upload that dies midway leaves no new
    manifest (a first publish) or an old one the new files fail against (a republish), never a
    manifest that vouches for files not yet there."""
    if uri.startswith("s3://"):
        from kubeforge.runtime import fetch

        fetch.upload_s3(out, uri, [*artifact_files(out), out / MANIFEST])  # upload_s3 keeps this order
    return summary(out, uri, metrics)


def summary(out: Path, uri: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The pod's summary of the finished artifact in ``out``, published at ``uri``."""
    return {
        "status": "succeeded",
        "uri": uri,
        "digest": digest(out),
        "sizeBytes": size(out),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        "createdAt": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def staging_folder(final: Path, tag: str) -> Path:
    """Where an artifact bound for the folder ``final`` is written until it may replace what is there:
    beside it, or inside it where ``final`` is a mount point (see the module doc)."""
    if os.path.ismount(final):
        return final / f"{STAGING_INSIDE}{tag}"
    return final.with_name(f"{final.name}{STAGING}{tag}")


def discard(staging: Path) -> None:
    """Remove a staging folder (a failed gate, or what an earlier attempt left); nothing if absent."""
    shutil.rmtree(staging, ignore_errors=True)


def promote(staging: Path, final: Path) -> None:
    """Make the artifact in ``staging`` (from staging_folder) the one at ``final``, replacing what was there."""
    if staging.parent == final:
        _promote_inside(staging, final)
        return
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
        return
    replaced = final.with_name(f"{final.name}{REPLACED}{staging.name.rpartition(STAGING)[2]}")
    discard(replaced)
    final.rename(replaced)
    try:
        staging.rename(final)
    except OSError:
        replaced.rename(final)  # the earlier artifact goes back
        raise
    discard(replaced)


def _promote_inside(staging: Path, final: Path) -> None:
    """A staging folder inside a mount point: the old manifest goes first, so that nothing vouches for the
    folder while its files change; the new manifest last."""
    previous = read_manifest(final) or {}
    (final / MANIFEST).unlink(missing_ok=True)
    root = final.resolve()
    for entry in previous.get("files", []):
        path = (final / str(entry.get("path", ""))).resolve()
        if path.is_relative_to(root) and path.is_file() and _in_artifact(path.relative_to(root)):
            path.unlink()
    for path in artifact_files(staging):
        target = final / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    os.replace(staging / MANIFEST, final / MANIFEST)
    discard(staging)


def s3_staging_uri(uri: str, tag: str) -> str:
    """s3://bucket/prefix -> s3://bucket/prefix.staging-<tag> (the bucket's root: .kubeforge-staging-<tag>)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    return f"s3://{bucket}/{prefix}{STAGING}{tag}" if prefix else f"s3://{bucket}/{STAGING_INSIDE}{tag}"


def promote_s3(folder: Path, uri: str, tag: str) -> None:
    """Publish the artifact in ``folder`` at ``uri`` through a staging prefix (see the module doc): upload there,
    copy server-side into ``uri`` weights first and the manifest last, then delete the staging objects."""
    from minio.commonconfig import ComposeSource
    from minio.deleteobjects import DeleteObject

    from kubeforge.runtime import fetch

    staging = s3_staging_uri(uri, tag)
    files = [*artifact_files(folder), folder / MANIFEST]
    fetch.upload_s3(folder, staging, files)
    client, bucket, prefix = fetch.s3_client(uri)
    staged = staging.removeprefix(f"s3://{bucket}/")
    copied = []
    for path in files:  # the manifest last: until it lands, the final prefix's old manifest stays
        relative = path.relative_to(folder).as_posix()
        source = f"{staged}/{relative}"
        # compose_object copies server-side; objects over 5 GiB in parts (one CopyObject takes at most 5 GiB)
        client.compose_object(bucket, "/".join(x for x in (prefix.strip("/"), relative) if x),
                              [ComposeSource(bucket, source)])  # fmt: skip
        copied.append(source)
    for error in client.remove_objects(bucket, [DeleteObject(key) for key in copied]):
        log.warning("could not delete the staging object %s: %s", error.name, error.message)
