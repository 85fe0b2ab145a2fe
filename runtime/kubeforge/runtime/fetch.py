"""Locations to local paths: mounted or local paths as they are; hf:// and s3:// downloaded first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kubeforge.runtime.contract import CACHE_DIR, Location


class SourceMissing(ValueError):
    """The URI names nothing (no such repository, revision or prefix): a user error, not a retry."""


def local_path(location: Location, cache_dir: str | None = None, dest: Path | None = None) -> Path:
    """A folder (or file) with the location's content: mounted paths as they are, hf:// and s3:// downloaded
    into the cache, or straight into ``dest`` when given (an init container's target: no second copy)."""
    if location.local_path:
        return Path(location.local_path)
    cache = Path(cache_dir or os.environ.get("KUBEFORGE_CACHE_DIR", CACHE_DIR))
    uri = location.uri
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        repo = uri.removeprefix("hf://").rstrip("/")
        try:  # HF_ENDPOINT (a mirror, or a local stand-in) and HF_TOKEN are read now, not at import time
            folder = snapshot_download(
                repo,
                revision=location.revision,
                cache_dir=str(cache / "hf"),
                local_dir=str(dest) if dest is not None else None,
                endpoint=os.environ.get("HF_ENDPOINT"),
                token=os.environ.get("HF_TOKEN"),
            )
        except GatedRepoError as err:
            raise SourceMissing(f"{uri}: gated repository; set HF_TOKEN from a Secret with access to it") from err
        except RevisionNotFoundError as err:
            raise SourceMissing(f"{uri}: no revision {location.revision!r} on the Hub") from err
        except RepositoryNotFoundError as err:
            raise SourceMissing(
                f"{uri}: no such repository on the Hub (or it is private and HF_TOKEN is unset)"
            ) from err
        return Path(folder)
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return download_s3(uri, dest if dest is not None else cache / "s3" / bucket / prefix)
    raise ValueError(f"{uri}: no local path and no way to fetch it")


def staging_dir(uri: str, cache_dir: str | None = None) -> Path:
    """Where an artifact bound for a remote URI (s3://) is written before the upload."""
    cache = Path(cache_dir or os.environ.get("KUBEFORGE_CACHE_DIR", CACHE_DIR))
    return cache / "output" / uri.split("://", 1)[-1].strip("/")


def s3_client(uri: str) -> tuple[Any, str, str]:
    """(client, bucket, prefix) for s3://bucket/prefix; endpoint and credentials from the AWS_* variables."""
    from urllib.parse import urlparse

    from minio import Minio

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    endpoint = urlparse(os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com"))
    client = Minio(
        endpoint.netloc,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=os.environ.get("AWS_REGION"),
        secure=endpoint.scheme == "https",
    )
    return client, bucket, prefix


def download_s3(uri: str, target: Path) -> Path:
    """The object s3://bucket/key, or every object under the folder s3://bucket/prefix/, into ``target``
    (credentials from the environment).

    A folder holding a kubeforge artifact manifest (export.MANIFEST) is downloaded as the manifest
    says: exactly the files it lists, each checked against its size and sha256 before the download
    counts; the manifest itself is written last, so a folder with it is a verified artifact. Other
    objects under the prefix (resumable checkpoints, leftovers of an earlier publish) are not fetched.
    """
    from kubeforge.runtime import export

    client, bucket, prefix = s3_client(uri)
    if not client.bucket_exists(bucket):
        raise SourceMissing(f"{uri}: no bucket {bucket!r} at this endpoint (AWS_ENDPOINT_URL)")
    prefix = prefix.rstrip("/")
    if prefix and _object_size(client, bucket, prefix) is not None:  # one object, not a folder
        target.parent.mkdir(parents=True, exist_ok=True)
        client.fget_object(bucket, prefix, str(target))
        return target
    folder = f"{prefix}/" if prefix else ""
    objects = {
        obj.object_name[len(folder) :]: obj.size
        for obj in client.list_objects(bucket, prefix=folder, recursive=True)
        if not obj.is_dir
    }
    if not objects:
        raise SourceMissing(f"{uri}: no objects under this prefix")
    if export.MANIFEST in objects:
        return _download_artifact(client, bucket, folder, uri, objects, target)
    for relative in sorted(objects):
        dest = target / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.fget_object(bucket, folder + relative, str(dest))
    return target


class ArtifactIntegrityError(SourceMissing):
    """The objects at an artifact's URI do not match its manifest (missing, truncated or altered, or a
    publish still under way): nothing downloaded from it may be used."""


def _download_artifact(client: Any, bucket: str, folder: str, uri: str, objects: dict[str, int], target: Path) -> Path:
    import json

    from kubeforge.runtime import export

    raw = client.get_object(bucket, folder + export.MANIFEST)
    try:
        manifest = json.loads(raw.read())
    finally:
        raw.close()
        raw.release_conn()
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise ArtifactIntegrityError(f"{uri}: {export.MANIFEST} is not a kubeforge artifact manifest")
    for entry in entries:  # everything the manifest promises is there, at its size, before any download
        path = str(entry.get("path", "")) if isinstance(entry, dict) else ""
        if not path or path.startswith("/") or ".." in Path(path).parts or path == export.MANIFEST:
            raise ArtifactIntegrityError(f"{uri}: {export.MANIFEST} lists an invalid path {path!r}")
        if path not in objects:
            raise ArtifactIntegrityError(f"{uri}: {path} is listed in {export.MANIFEST} but missing from the store")
        if objects[path] != entry.get("size"):
            raise ArtifactIntegrityError(
                f"{uri}: {path} has {objects[path]} bytes in the store; {export.MANIFEST} says {entry.get('size')}"
            )
    stale = target / export.MANIFEST
    if stale.exists():  # an earlier download's: the folder is not verified until this one finishes
        stale.unlink()
    for entry in entries:
        dest = target / entry["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.fget_object(bucket, folder + entry["path"], str(dest))
        if export.sha256_file(dest) != entry.get("sha256"):
            dest.unlink()
            raise ArtifactIntegrityError(
                f"{uri}: {entry['path']} does not match the sha256 in {export.MANIFEST} (altered, or replaced by "
                "a publish still under way)"
            )
    client.fget_object(bucket, folder + export.MANIFEST, str(stale))
    if export.read_manifest(target) != manifest:  # replaced between the first read and now: a new publish
        stale.unlink()
        raise ArtifactIntegrityError(f"{uri}: {export.MANIFEST} changed during the download (a publish under way)")
    return target


def _object_size(client: Any, bucket: str, key: str) -> int | None:
    """The size of the object named exactly ``key``, None when there is none."""
    for obj in client.list_objects(bucket, prefix=key):
        if obj.object_name == key and not obj.is_dir:
            return int(obj.size)
    return None


def upload_s3(folder: Path, uri: str, files: list[Path] | None = None) -> None:
    """``files`` (default: every file under ``folder``) to s3://bucket/prefix/<path relative to folder>, in
    their order, except that a kubeforge artifact manifest at the top of ``folder`` always goes last:
    readers (download_s3) trust a folder only through its manifest, so it must name weights already there."""
    from kubeforge.runtime import export

    client, bucket, prefix = s3_client(uri)
    chosen = list(files) if files is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = folder / export.MANIFEST
    ordered = [p for p in chosen if p != manifest] + [p for p in chosen if p == manifest][:1]
    for path in ordered:
        key = "/".join(x for x in (prefix.strip("/"), path.relative_to(folder).as_posix()) if x)
        client.fput_object(bucket, key, str(path))


def main(argv: list[str] | None = None) -> int:
    """`python -m kubeforge.runtime.fetch URI DEST`: an init container's download of an artifact."""
    import argparse
    import shutil
    import sys

    parser = argparse.ArgumentParser(prog="python -m kubeforge.runtime.fetch")
    parser.add_argument("uri")
    parser.add_argument("dest")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    try:
        found = local_path(Location(uri=args.uri, revision=args.revision), dest=dest)
    except (SourceMissing, ValueError) as err:
        print(f"kubeforge fetch: {err}", file=sys.stderr)
        return 3
    if found != dest:  # a mounted or local path: copied
        shutil.copytree(found, dest, dirs_exist_ok=True, symlinks=False)
    print(f"kubeforge fetch: {args.uri} -> {dest}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
