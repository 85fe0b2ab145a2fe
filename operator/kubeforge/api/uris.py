"""Model and data locations: hf://, pvc://, s3:// and local paths.

One parser serves validation, the planner (where to read config.json) and the
renderer (which volume or credentials a pod needs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

Scheme = Literal["hf", "pvc", "s3", "local"]

HF_REPO = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,95}(/[A-Za-z0-9][-A-Za-z0-9_.]{0,95})?$")
PVC_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# The pattern the CRD enforces; the parser below gives the precise message.
URI_PATTERN = r"^((hf|pvc|s3)://\S+|[^:\s]+)$"


@dataclass(frozen=True)
class Location:
    """A parsed location. ``path`` is inside the repo, claim or bucket ('' for the root)."""

    scheme: Scheme
    authority: str  # hf repo id, PVC claim name, S3 bucket; '' for local paths
    path: str

    @property
    def is_remote(self) -> bool:
        return self.scheme in ("hf", "s3")


def parse_uri(uri: str) -> Location:
    """Parse a location or raise ValueError with a message a user can act on."""
    if not uri or uri != uri.strip():
        raise ValueError("must be a non-empty URI without surrounding spaces")
    match = SCHEME.match(uri)
    if match is None:
        if ":" in uri.split("/", 1)[0]:
            raise ValueError(f"{uri!r} is neither a URI (hf://, pvc://, s3://) nor a local path")
        return Location("local", "", uri)
    scheme, rest = match.group(1), uri[match.end() :]
    if scheme == "hf":
        repo = rest.rstrip("/")
        if not HF_REPO.match(repo):
            raise ValueError(f"{uri!r}: hf:// takes a Hub repository id, e.g. hf://Qwen/Qwen3-8B")
        return Location("hf", repo, "")
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not PVC_CLAIM.match(claim):
            raise ValueError(
                f"{uri!r}: pvc:// takes a PersistentVolumeClaim name (a DNS-1123 label) and a path, "
                "e.g. pvc://models/qwen3-8b"
            )
        return Location("pvc", claim, _clean_path(uri, path))
    if scheme == "s3":
        bucket, _, path = rest.partition("/")
        if not S3_BUCKET.match(bucket):
            raise ValueError(f"{uri!r}: s3:// takes a bucket name and a prefix, e.g. s3://models/qwen3-8b")
        return Location("s3", bucket, _clean_path(uri, path))
    raise ValueError(f"{uri!r}: unsupported scheme {scheme!r}; use hf://, pvc://, s3:// or a local path")


def _clean_path(uri: str, path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"{uri!r}: the path may not contain '.' or '..' segments")
    return "/".join(parts)


def check_uri(uri: str) -> str:
    parse_uri(uri)
    return uri


def check_writable_uri(uri: str) -> str:
    """An output location: hf:// is read-only for us."""
    if parse_uri(uri).scheme == "hf":
        raise ValueError(f"{uri!r}: hf:// is read-only here; write to pvc://, s3:// or a local path")
    return uri


_CRD = Field(max_length=2048, json_schema_extra={"pattern": URI_PATTERN})
Uri = Annotated[str, _CRD, AfterValidator(check_uri)]
OutputUri = Annotated[str, _CRD, AfterValidator(check_writable_uri)]
