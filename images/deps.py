"""Print the requirements of kubeforge's core and of the given extras, read from pyproject.toml alone.

The images install these in a layer of their own, before any source is copied, and then kubeforge
itself with ``pip install --no-deps``: a change to operator/ or runtime/ then rebuilds only the last
layer, never the torch or dependency layers. The versions come from requirements/constraints.txt
(``pip install -c``), so this prints the requirements as pyproject.toml states them.

    python images/deps.py pyproject.toml train,megatron > requirements.txt

Standard library only (tomllib): it runs in the bare base image.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_SELF = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*\[([^\]]*)\]\s*$")  # kubeforge[a,b]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The core dependencies, then each extra's (an extra that names the project itself, e.g.
    ``kubeforge[train]``, is expanded), without duplicates, in order. Raises ValueError for an
    unknown extra."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    name = _canonical(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    todo, seen = [e.strip() for e in extras if e.strip()], set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise ValueError(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            own = _SELF.match(req)
            if own and _canonical(own.group(1)) == name:
                todo += [e.strip() for e in own.group(2).split(",")]
            else:
                out.append(req)
    return list(dict.fromkeys(out))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: deps.py PYPROJECT EXTRA[,EXTRA...]", file=sys.stderr)
        return 2
    try:
        lines = requirements(Path(argv[0]), argv[1].split(","))
    except ValueError as e:
        print(f"deps.py: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
