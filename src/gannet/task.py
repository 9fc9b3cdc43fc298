"""Message contract v1: what backends publish, and the result record Gannet keeps.

The schema is strict (unknown fields are rejected) so that a typo in a publisher is a
clear quarantine reason instead of a silently ignored option.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from gannet.errors import ErrorCode, PermanentError

SCHEMA_VERSION = 1
TENANT_ID_PATTERN = r"^[a-z0-9-]{1,63}$"
BUCKET_NAME = r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"
GS_URL = re.compile(rf"^gs://(?P<bucket>{BUCKET_NAME})/(?P<name>.+)$")
MAX_URL_LENGTH = 2048
MAX_OBJECT_NAME_BYTES = 1024
# The lowest confidence threshold anything may ask for (ultralytics validates at this).
# Below it nearly every one of a model's anchors passes: 300 segments on a 12 MP photo,
# their boxes 60 times its area, 3.6 GB and 30 s of a runner's CPU to make their masks.
MIN_CONFIDENCE = 0.001


class GsUrl(str):
    """A gs:// URL, parsed once: it is still the string the publisher sent (results and
    rows carry it as is), and it knows its bucket and object name."""

    bucket: str
    name: str

    @classmethod
    def parse(cls, url: str) -> GsUrl:
        """The URL as a GsUrl, or ValueError saying what a valid one looks like."""
        match = GS_URL.match(url) if len(url) <= MAX_URL_LENGTH else None
        if match is None:
            raise ValueError(
                "must look like gs://BUCKET/TENANT_ID/path/to/image.jpg "
                f"(at most {MAX_URL_LENGTH} characters)"
            )
        # Cloud Storage's limit: no such object can exist, and a read of one is a 400
        # that would be retried as any other failure until Pub/Sub dead-lettered it.
        if len(match["name"].encode()) > MAX_OBJECT_NAME_BYTES:
            raise ValueError(
                f"object name is longer than Cloud Storage's {MAX_OBJECT_NAME_BYTES} bytes (UTF-8)"
            )
        parsed = cls(url)
        parsed.bucket, parsed.name = match["bucket"], match["name"]
        return parsed


def _storable(value: str) -> str:
    """Refuse what PostgreSQL's text and Pub/Sub's attributes cannot hold: a NUL (libpq
    cuts the text there, PostgreSQL refuses it in a parameter) or an unpaired surrogate,
    which JSON's \\u escapes can carry and UTF-8 cannot. Let through, either one failed
    the write of the row or dead letter meant to record the bad task, on the callback
    thread, and the exception stopped the daemon's stream."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (an unpaired surrogate)") from None
    return value


def _printable(text: str) -> str:
    """`text` made storable (NUL and unpaired surrogates written as escapes): for what a
    failed row and a dead letter quote from a body that was refused."""
    return text.encode(errors="backslashreplace").decode().replace("\x00", "\\x00")


def _gs_url(value: object) -> GsUrl:
    if isinstance(value, GsUrl):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return GsUrl.parse(_storable(value.strip()))


ImageUrl = Annotated[GsUrl, PlainValidator(_gs_url), WithJsonSchema({"type": "string"})]
Text = Annotated[str, AfterValidator(_storable)]


class TaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    confidence_override: float | None = Field(None, ge=MIN_CONFIDENCE, le=1.0)


class Task(BaseModel):
    """One unit of work; task_id is the idempotency key across redeliveries."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    version: Literal[1] = 1
    task_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/@-]+$")
    tenant_id: str = Field(pattern=TENANT_ID_PATTERN)
    image_url: ImageUrl
    pipeline: Text = Field(min_length=1, max_length=64)
    session_id: Text | None = Field(None, max_length=128)
    image_id: Text | None = Field(None, max_length=128)
    options: TaskOptions = Field(default_factory=TaskOptions)
    callback_url: Text | None = Field(None, max_length=2048)

    @field_validator("task_id")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        """The task_id names the result object, TENANT/TASK_ID.json: a '.' or '..' segment
        there is a name that curl, browsers and path libraries resolve to another object
        (`TENANT/../other/t.json` to `other/t.json`), and one that the GCS emulator
        refuses to store, so such a task ran to its write and was retried until Pub/Sub
        dead-lettered it with no reason."""
        if any(segment in (".", "..") for segment in value.split("/")):
            raise ValueError("must not have a '.' or '..' segment (it names the result object)")
        return value

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        """A scheme in any case (HTTPS:// is a URL too: its task was refused). What else
        a URL may not carry is the callback's to refuse (callback.resolve), not the task's."""
        if value is not None and not re.match(r"^https?://[^\s/]+", value, re.IGNORECASE):
            raise ValueError("must be an http(s) URL")
        return value


def parse_task(body: bytes, max_body_bytes: int) -> Task:
    """Turn a message body into a Task, or raise a PermanentError naming what is wrong."""
    if len(body) > max_body_bytes:
        raise PermanentError(
            ErrorCode.BODY_TOO_LARGE,
            f"message body is {len(body)} bytes; the limit is {max_body_bytes}",
        )
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: arrays or objects nested deeper than the interpreter's stack.
        raise PermanentError(ErrorCode.BAD_JSON, f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PermanentError(ErrorCode.SCHEMA_ERROR, "body must be a JSON object")
    crowded = _crowded(data)
    if crowded:
        raise PermanentError(ErrorCode.SCHEMA_ERROR, crowded)
    try:
        return Task.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = "; ".join(
            f"{'.'.join(_name(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in errors[:MAX_PROBLEMS]
        )  # a field's name is the publisher's, so it may be anything
        if len(errors) > MAX_PROBLEMS:
            problems += f"; and {len(errors) - MAX_PROBLEMS} more"
        raise PermanentError(ErrorCode.SCHEMA_ERROR, _printable(problems)) from exc


# A refusal's reason names this many problems at most, each field's name cut to
# MAX_NAME characters: the reason goes into a failed row, a dead letter and a log line.
MAX_PROBLEMS = 5
MAX_NAME = 64


def _name(part: object) -> str:
    name = str(part)
    return name if len(name) <= MAX_NAME else name[:MAX_NAME] + "..."


def _crowded(data: dict[str, Any]) -> str | None:
    """Why an object of far more fields than a task (or its options) has is refused
    before pydantic validates it: pydantic makes one error per unknown field, and for
    20,000 of them (within the body limit) that cost 0.1 s of GIL and the reason was
    0.8 MB."""
    options = data.get("options")
    parts = (("a task", "", data, Task), ("options", "options.", options, TaskOptions))
    for what, prefix, obj, model in parts:
        if isinstance(obj, dict) and len(obj) > 2 * len(model.model_fields):
            unknown = [k for k in obj if k not in model.model_fields][:MAX_PROBLEMS]
            names = ", ".join(_printable(prefix + _name(k)) for k in unknown)
            most = len(model.model_fields)
            return f"{len(obj)} fields, where {what} has {most} at most (unknown: {names}, ...)"
    return None


def identify(body: bytes) -> tuple[str | None, str | None]:
    """Best-effort (task_id, tenant_id) of an invalid body, so its failure can be recorded."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    task_id, tenant_id = data.get("task_id"), data.get("tenant_id")
    if not (isinstance(task_id, str) and 0 < len(task_id) <= 128 and _is_storable(task_id)):
        task_id = None
    if not (isinstance(tenant_id, str) and re.match(TENANT_ID_PATTERN, tenant_id)):
        tenant_id = None
    return task_id, tenant_id


def _is_storable(value: str) -> bool:
    try:
        return _storable(value) is value
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskResult:
    """What the sink stores for a task: one row in task_results, plus the result JSON.

    A dataclass, not a pydantic model: the daemon builds it from what it has already
    validated, once per task, and validating it again cost 30 µs of a runner's CPU per
    image in the daemon (docs/benchmark.md, "The row's record without validation")."""

    task_id: str
    tenant_id: str
    pipeline: str | None
    status: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = None
    result_uri: str | None = None
    error_code: str | None = None
    error: str | None = None
    delivery_attempt: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    session_id: str | None = None
    image_id: str | None = None
    image_url: str | None = None


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
