"""Read Kubernetes-style YAML files (one or many documents) with errors a person can act on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Document:
    body: Any
    index: int  # 0-based position in the file
    count: int  # documents in the file

    @property
    def where(self) -> str:
        """'' for a one-document file, else '#2' (1-based) to say which document."""
        return "" if self.count == 1 else f"#{self.index + 1}"

    @property
    def label(self) -> str:
        if not isinstance(self.body, Mapping):
            return ""
        meta = self.body.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        kind = self.body.get("kind")
        if kind and name:
            return f" ({kind}/{name})"
        return f" ({kind})" if kind else ""


def read_documents(path: Path) -> tuple[list[Document], str | None]:
    """(documents, None) or ([], a one-line reason the file cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], "no such file"
    except IsADirectoryError:
        return [], "is a directory, not a YAML file"
    except (OSError, UnicodeDecodeError) as err:
        return [], f"cannot read: {err}"
    try:
        bodies = [b for b in yaml.safe_load_all(text) if b is not None]
    except yaml.YAMLError as err:
        return [], f"invalid YAML: {_yaml_reason(err)}"
    if not bodies:
        return [], "holds no YAML document"
    return [Document(b, i, len(bodies)) for i, b in enumerate(bodies)], None


def _yaml_reason(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return problem
