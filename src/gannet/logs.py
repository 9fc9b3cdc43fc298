"""One JSON object per line on stdout, with the field names Cloud Logging understands.

`kubectl logs -f` and Cloud Logging both read these lines; `severity` and `message` are
what Cloud Logging keys on, the task fields make one task's story greppable.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

TASK_FIELDS = (
    "task_id",
    "tenant_id",
    "pipeline",
    "delivery_attempt",
    "duration_ms",
    "outcome",
    "error_code",
    "device",
    "model",
    "message_id",
)


class JsonFormatter(logging.Formatter):
    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        """`fields` go on every line (a supervised process's index)."""
        super().__init__()
        self._fields = fields or {}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "logger": record.name,
            "thread": record.threadName,
            **self._fields,
        }
        for field in TASK_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["stack_trace"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fields: dict[str, Any] | None = None) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries are chatty at INFO about stream reconnects; keep their warnings.
    for noisy in ("google.cloud.pubsub_v1", "google.api_core", "urllib3", "ultralytics"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
