"""The runtime's log lines: readable text by default, one JSON object per line with KUBEFORGE_LOG_FORMAT=json
(for log pipelines such as Loki or Elasticsearch; the operator takes the same variable, as kopf's JSON format).

A JSON line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the process's ``rank`` where
known, and ``exception`` with the traceback when one is logged.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping

from kubeforge.runtime.contract import ENV_LOG_FORMAT

FORMATS = ("text", "json")


class JSONFormatter(logging.Formatter):
    def __init__(self, rank: int | None = None):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.rank is not None:
            line["rank"] = self.rank
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def log_format(env: Mapping[str, str] | None = None) -> str:
    """``json`` or ``text`` (anything else: text, so a typo never silences the logs)."""
    value = (os.environ if env is None else env).get(ENV_LOG_FORMAT, "").strip().lower()
    return value if value in FORMATS else "text"


def configure(level: int, text_format: str, *, rank: int | None = None, env: Mapping[str, str] | None = None) -> None:
    """logging.basicConfig with the format the environment asks for."""
    handler = logging.StreamHandler()
    formatter = JSONFormatter(rank) if log_format(env) == "json" else logging.Formatter(text_format)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
