"""Names and owner labels derived from an owner's name, valid wherever Kubernetes puts them.

An object's name is a DNS-1123 subdomain of up to 253 characters (dots and a leading digit
allowed). What kubeforge derives from it must often be shorter or stricter:

- label values: at most 63 characters of ``[A-Za-z0-9-_.]``, alphanumeric at both ends;
- child names: DNS-1123 labels (``[a-z0-9-]``, at most 63): an Indexed Job's pods get the
  hostname ``<job>-<index>`` and a volume name is a label too; a Service's (and a JobSet's)
  name is a DNS-1035 label, which also starts with a letter.

The owner's name is used unchanged where it fits. Otherwise a readable prefix is kept and a
hash of the whole name appended, so two owners sharing a 63-character prefix (or differing
only in a dot) still get different children and labels. The owner label's hashed form joins
the two with ``_``, which no object name contains: a name can never equal the hashed label of
another name (the controller finds children by this label, so this is what keeps one owner
from adopting another's children). Child names cannot use ``_``; a name spelled on purpose
like another's hashed child name only makes the second apply fail (two controller references).
"""

from __future__ import annotations

import hashlib
import re

DNS_LABEL_MAX = 63
LABEL_VALUE_MAX = 63
# An Indexed Job's pods are named <job>-<index>-<random>; their hostname is <job>-<index>,
# which must be a DNS label: leave room for "-" and a 5-digit index.
JOB_NAME_MAX = DNS_LABEL_MAX - 6
HASH_LENGTH = 10  # hex digits of sha256: 40 bits, against accidents (anyone who can create objects
# in the namespace can label their own objects as kubeforge's anyway)

DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LETTER_PREFIX = "kf"  # put before a name that must start with a letter and does not


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:HASH_LENGTH]


def owner_label(name: str) -> str:
    """The owner-name label value of ``name``'s children: the name itself when it fits in a label value
    (every object name of at most 63 characters is a valid one), else ``<prefix>_<hash of the name>``."""
    if len(name) <= LABEL_VALUE_MAX:
        return name
    head = name[: LABEL_VALUE_MAX - 1 - HASH_LENGTH].rstrip("-.")
    return f"{head}_{digest(name)}"


def child_name(owner: str, suffix: str = "", limit: int = DNS_LABEL_MAX, *, letter_first: bool = False) -> str:
    """``<owner>-<suffix>`` when that is a DNS label of at most ``limit`` characters (a DNS-1035 label
    with ``letter_first``), else ``<readable prefix>-<hash of owner>-<suffix>``. ``suffix`` is one of
    kubeforge's constants (already a DNS label part); every child of one owner shares the hash."""
    tail = f"-{suffix}" if suffix else ""
    plain = owner + tail
    pattern = DNS_1035_LABEL if letter_first else DNS_1123_LABEL
    if len(plain) <= limit and pattern.fullmatch(plain):
        return plain
    head = re.sub(r"[^a-z0-9]+", "-", owner.lower()).strip("-")
    if not head or (letter_first and not head[0].isalpha()):
        head = f"{LETTER_PREFIX}-{head}".rstrip("-")
    keep = limit - len(tail) - 1 - HASH_LENGTH
    if keep < 1:
        raise ValueError(f"no room for a name under {limit} characters with the suffix {suffix!r}")
    head = head[:keep].rstrip("-")
    return f"{head}-{digest(owner)}{tail}"
