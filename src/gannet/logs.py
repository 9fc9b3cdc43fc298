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

from opentelemetry import trace

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
    "lane",
)


class JsonFormatter(logging.Formatter):
    def __init__(
        self, fields: dict[str, Any] | None = None, trace_project: str | None = None
    ) -> None:
        """`fields` go on every line (a supervised process's index). With tracing on,
        `trace_project` is the project whose Cloud Trace holds the traces: a line written
        while a span is current carries its trace and span ids, and Cloud Logging shows it
        with that trace."""
        super().__init__()
        self._fields = fields or {}
        self._trace_project = trace_project

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
        if self._trace_project is not None:
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                trace_id = f"projects/{self._trace_project}/traces/{span.trace_id:032x}"
                entry["logging.googleapis.com/trace"] = trace_id
                entry["logging.googleapis.com/spanId"] = f"{span.span_id:016x}"
                entry["logging.googleapis.com/trace_sampled"] = span.trace_flags.sampled
        if record.exc_info:
            entry["stack_trace"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str)


def configure(
    level: str = "INFO", fields: dict[str, Any] | None = None, trace_project: str | None = None
) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(fields, trace_project))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The lines show no caller and no process. With these off, as the logging HOWTO's
    # "Optimization" section describes, a record no longer walks the stack for its
    # caller nor asks for the process id (a syscall): the daemon logs a line per task.
    logging._srcfile = None
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # google-api-core, when the first client is made, stops the "google" logger passing
    # records to the root unless that logger was configured: every warning and error of
    # the Google client libraries (a stream that failed, a thread that did not stop)
    # then went to stderr as bare text, with no severity, time or logger, past this
    # handler. Its level set, it counts as configured and its records come here; at
    # WARNING, as Python's last-resort handler printed them (their INFO is chatty).
    google = logging.getLogger("google")
    google.setLevel(max(logging.WARNING, root.level))
    google.propagate = True
    # Client libraries are chatty at INFO about stream reconnects; keep their warnings.
    for noisy in ("google.cloud.pubsub_v1", "google.api_core", "urllib3", "ultralytics"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
