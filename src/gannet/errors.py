"""The two kinds of failure, because the kind alone decides what happens to a message.

A PermanentError will fail the same way on every delivery (bad input), so the message is
quarantined and acked. A TransientError may succeed later (a dependency is down), so the
message is nacked and Pub/Sub's retry and dead-letter policies take over.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable reasons, sent as the `error_code` attribute on dead-lettered messages."""

    BODY_TOO_LARGE = "body_too_large"
    BAD_JSON = "bad_json"
    SCHEMA_ERROR = "schema_error"
    UNKNOWN_TENANT = "unknown_tenant"
    UNKNOWN_PIPELINE = "unknown_pipeline"
    IMAGE_OUTSIDE_TENANT = "image_outside_tenant"
    BUCKET_NOT_ALLOWED = "bucket_not_allowed"
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_UNDECODABLE = "image_undecodable"
    IMAGE_TOO_LARGE = "image_too_large"
    TASK_ID_CONFLICT = "task_id_conflict"
    # The tenant's own model (gs://MODELS_BUCKET/models/TENANT/...) cannot serve: its
    # file is corrupt, of another kind, too large, or lacks a class the filters name.
    TENANT_MODEL_INVALID = "tenant_model_invalid"
    # Transient codes, never dead-lettered by the daemon: a log line's `error_code` only.
    # The metrics count the outcome (gannet_messages_total{outcome="retry"|"busy"|
    # "shutdown"}), not the code.
    MODEL_UNAVAILABLE = "model_unavailable"  # a model that cannot be loaded or listed
    DEPENDENCY_UNAVAILABLE = "dependency_unavailable"
    OUT_OF_MEMORY = "out_of_memory"
    SHUTDOWN = "shutdown"
    TASK_BUSY = "task_busy"  # another worker holds the task's claim


# The codes a message the daemon dead-letters can carry: the permanent ones, listed first.
_ALL = list(ErrorCode)
DEAD_LETTER_CODES = tuple(_ALL[: _ALL.index(ErrorCode.MODEL_UNAVAILABLE)])


class GannetError(Exception):
    """Base for failures with a code; the message is meant for the task's publisher."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PermanentError(GannetError):
    """Retrying cannot help: record, dead-letter with the reason, ack."""


class TransientError(GannetError):
    """Retrying may help: nack so Pub/Sub redelivers with backoff."""


class BadModelFile(ValueError):
    """A model file that can never serve, whatever the retries: it is not a model
    (corrupt, truncated, not a pickle ultralytics reads), another kind of model than
    configured, or over the size limit. The model cache makes it permanent for a
    tenant's own model (its tasks quarantined with the reason, on their rows), and
    transient for an industry model (a config check rejects those before they serve)."""


class CommandError(RuntimeError):
    """A command cannot go on (no credentials, a service that did not start); the text
    says what to do next. The CLI prints it and exits 2 instead of a traceback."""
