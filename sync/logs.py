"""Structured logs: one JSON object per line, every string passed through password redaction."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .url import redact_text

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as a JSON line: time, level, message and the record's extra fields, redacted."""

    def __init__(self, url: str | None = None) -> None:
        super().__init__()
        self.url = url

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact_text(json.dumps(out, default=str), self.url)


def setup(url: str | None, level: int = logging.INFO, stream: Any = None) -> logging.Handler:
    """Send the ``localstore.sync`` logger to ``stream`` (stderr) as JSON lines; return the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(url))
    logger = logging.getLogger("localstore.sync")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return handler
