"""The artifact: weights (merged, or the adapter alone), the tokenizer, and kubeforge-artifact.json.

The manifest lists every file with its size and sha256; the artifact's digest is the sha256
of the manifest itself. ``verify`` re-reads the files and checks them against it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "kubeforge-artifact.json"
ARTIFACT_VERSION = "kubeforge.io/artifact/v1"


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
    return sorted(
        p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST and p.relative_to(out).parts[0] != CHECKPOINTS
    )


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
    return {
        "status": "succeeded",
        "uri": uri,
        "digest": digest(out),
        "sizeBytes": size(out),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        "createdAt": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
