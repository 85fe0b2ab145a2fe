"""Child names derived from the owner's name, always within Kubernetes' length limits.

A name that would be too long is cut and given a short hash of the full name, so two
long names that share a prefix still get different children.
"""

from __future__ import annotations

import hashlib

DNS_LABEL_MAX = 63
# An Indexed Job's pods are named <job>-<index>-<random>; their hostname is <job>-<index>,
# which must be a DNS label: leave room for "-" and a 5-digit index.
JOB_NAME_MAX = DNS_LABEL_MAX - 6


def child_name(owner: str, suffix: str = "", limit: int = DNS_LABEL_MAX) -> str:
    full = f"{owner}-{suffix}" if suffix else owner
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = limit - len(digest) - 1 - (len(suffix) + 1 if suffix else 0)
    head = owner[:keep].rstrip("-.")
    return f"{head}-{digest}-{suffix}" if suffix else f"{head}-{digest}"
