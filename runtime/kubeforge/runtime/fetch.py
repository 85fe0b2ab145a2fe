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
    """Every object under s3://bucket/prefix, into ``target`` (credentials from the environment)."""
    client, bucket, prefix = s3_client(uri)
    if not client.bucket_exists(bucket):
        raise SourceMissing(f"{uri}: no bucket {bucket!r} at this endpoint (AWS_ENDPOINT_URL)")
    found = False
    for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
        if obj.is_dir:
            continue
        found = True
        relative = obj.object_name[len(prefix) :].lstrip("/") if prefix else obj.object_name
        dest = target / relative if relative else target
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.fget_object(bucket, obj.object_name, str(dest))
    if not found:
        raise SourceMissing(f"{uri}: no objects under this prefix")
    return target


def upload_s3(folder: Path, uri: str, files: list[Path] | None = None) -> None:
    """``files`` (default: every file under ``folder``) to s3://bucket/prefix/<path relative to folder>."""
    client, bucket, prefix = s3_client(uri)
    for path in sorted(files if files is not None else (p for p in folder.rglob("*") if p.is_file())):
        key = "/".join(x for x in (prefix.strip("/"), str(path.relative_to(folder))) if x)
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
