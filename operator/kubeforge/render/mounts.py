"""Where a job's locations live inside its pods: PVCs mounted once each, the rest downloaded."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kubeforge.api.uris import parse_uri
from kubeforge.render.names import child_name
from kubeforge.runtime.contract import PVC_ROOT, Location


@dataclass(frozen=True)
class ClaimMount:
    claim: str
    read_only: bool

    @property
    def volume_name(self) -> str:
        return child_name(f"pvc-{self.claim}")  # a claim's name may hold dots; a volume's may not

    @property
    def mount_path(self) -> str:
        return f"{PVC_ROOT}/{self.claim}"


def location(uri: str, revision: str | None = None) -> Location:
    """The contract's view of a URI: pvc:// gets its path inside the pod; the rest is fetched by the runtime."""
    loc = parse_uri(uri)
    if loc.scheme == "pvc":
        path = f"{PVC_ROOT}/{loc.authority}" + (f"/{loc.path}" if loc.path else "")
        return Location(uri=uri, local_path=path, revision=revision)
    if loc.scheme == "local":
        return Location(uri=uri, local_path=loc.path, revision=revision)
    return Location(uri=uri, revision=revision)


def claim_mounts(read: Iterable[str], write: Iterable[str]) -> list[ClaimMount]:
    """One mount per claim; read-write when any location on it is written."""
    writable = {parse_uri(u).authority for u in write if parse_uri(u).scheme == "pvc"}
    claims = {parse_uri(u).authority for u in [*read, *write] if parse_uri(u).scheme == "pvc"}
    return [ClaimMount(c, read_only=c not in writable) for c in sorted(claims)]


def claim_volumes(mounts: Iterable[ClaimMount]) -> list[dict[str, Any]]:
    return [
        {"name": m.volume_name, "persistentVolumeClaim": {"claimName": m.claim, "readOnly": m.read_only}}
        for m in mounts
    ]


def claim_volume_mounts(mounts: Iterable[ClaimMount]) -> list[dict[str, Any]]:
    return [{"name": m.volume_name, "mountPath": m.mount_path, "readOnly": m.read_only} for m in mounts]
