"""Spans that cost the message path microseconds, and their export over OTLP.

Why not the OpenTelemetry SDK's TracerProvider: at the about 25 spans per task it was
measured with (ours and the Pub/Sub client's), the SDK's span (a lock, attribute
validation, a processor chain) and its OTLP encoder cost the daemon 5-7 ms of CPU per
image, about 30 % of its throughput (docs/benchmark.md, "What tracing costs"). Here a
span is a small object that keeps its name, ids, times and attributes; ending it appends
it to a queue, where a task's stages go as plain tuples (Record). A shipper thread, twice
a second, writes what ended as one OTLP ExportTraceServiceRequest (otlp.py, straight to
protobuf's wire format) and sends it over gRPC: to a collector, or to Cloud Trace's own
OTLP endpoint (telemetry.googleapis.com).

`Recorder` implements the OpenTelemetry API's TracerProvider, so the Pub/Sub client's
spans and its context propagation run on it unchanged, and so does every
`trace.get_current_span()` (logs.py). What it leaves out of the SDK: span limits (our
attributes are few and known), span processors, trace state and retrying a failed
export. A batch the receiver refuses, or a queue over MAX_QUEUED spans, is dropped and
counted in a warning (a line a minute at most), as is what shutdown's time left
unsent: tracing never holds up a task or the shutdown, nor grows without bound.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.util._decorator import _agnosticcontextmanager

from gannet import otlp

log = logging.getLogger(__name__)

MAX_QUEUED = 50_000  # ended spans waiting for the shipper; beyond it they are dropped
MAX_PER_REQUEST = 2_000  # spans per ExportTraceServiceRequest (well under gRPC's 4 MB)
SHIP_EVERY_S = 0.5
EXPORT_TIMEOUT_S = 10.0
WARN_EVERY_S = 60.0  # at most one warning line about lost spans per minute
CLOUD_TRACE_OTLP = "telemetry.googleapis.com:443"

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_ID_BOUND = 2**64
_getrandbits = random.getrandbits

Scope = tuple[str, str]  # instrumentation scope: (name, version)
# A span recorded as a tuple, without an object or a context switch: a stage of a task
# (tracing.StageSpans). (scope, trace_id, span_id, parent_id, name, start_ns, end_ns, error)
Record = tuple[Scope, int, int, int, str, int, int, str | None]
Send = Callable[[bytes, float], None]  # (an ExportTraceServiceRequest's bytes, timeout_s)


class RecordedSpan(trace.Span):
    """A sampled span: what OTLP needs of it and nothing more."""

    __slots__ = (
        "_context",
        "_recorder",
        "_scope",
        "attributes",
        "end_ns",
        "events",
        "kind",
        "links",
        "name",
        "parent_id",
        "start_ns",
        "status",
    )

    def __init__(
        self,
        recorder: Recorder,
        scope: Scope,
        name: str,
        context: SpanContext,
        parent_id: int,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link] | None,
        start_ns: int | None,
    ) -> None:
        self._recorder = recorder
        self._scope = scope
        self._context = context
        self.name = name
        self.parent_id = parent_id
        self.kind = kind
        self.attributes = attributes
        self.links = links
        self.events: list[tuple[str, int, Mapping[str, Any] | None]] | None = None
        self.status: tuple[StatusCode, str] | None = None
        self.start_ns = start_ns or time.time_ns()
        self.end_ns = 0

    def end(self, end_time: int | None = None) -> None:
        if self.end_ns:
            return
        self.end_ns = end_time or time.time_ns()
        self._recorder.ended(self)

    def get_span_context(self) -> SpanContext:
        return self._context

    # Writes after the end are ignored, as the SDK ignores them: the Pub/Sub client's
    # lease manager writes to a `subscribe` span that acks.py has ended, and the shipper
    # may be encoding it then (a dict that changes size under it fails the export).
    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self.end_ns:
            self.attributes.update(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        if not self.end_ns:
            self.attributes[key] = value

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self.end_ns:
            return
        if self.events is None:
            self.events = []
        self.events.append((name, timestamp or time.time_ns(), attributes))

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if not self.end_ns:
            self.links = [*(self.links or ()), Link(context, attributes)]

    def update_name(self, name: str) -> None:
        if not self.end_ns:
            self.name = name

    def is_recording(self) -> bool:
        return not self.end_ns

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.end_ns:
            return
        if isinstance(status, Status):
            self.status = (status.status_code, status.description or "")
        else:
            self.status = (status, description or "")

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.add_event(
            "exception",
            {
                "exception.type": type(exception).__name__,
                "exception.message": str(exception),
                "exception.stacktrace": "".join(traceback.format_exception(exception)),
                "exception.escaped": escaped,
                **(attributes or {}),
            },
            timestamp,
        )


class RecorderTracer(trace.Tracer):
    def __init__(self, recorder: Recorder, scope: Scope) -> None:
        self._recorder = recorder
        self._scope = scope

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:  # parent-based: follow the parent's (or the publisher's) choice
            trace_id, parent_id, sampled = parent.trace_id, parent.span_id, parent.trace_flags
        else:  # a new trace, kept at the ratio (as the SDK's TraceIdRatioBased decides)
            trace_id, parent_id = _getrandbits(128), 0
            sampled = SAMPLED if trace_id % _ID_BOUND < self._recorder.bound else NOT_SAMPLED
        span_context = SpanContext(trace_id, _getrandbits(64), False, sampled)
        if not sampled.sampled:
            return NonRecordingSpan(span_context)
        return RecordedSpan(
            self._recorder,
            self._scope,
            name,
            span_context,
            parent_id,
            kind,
            dict(attributes) if attributes else {},
            links,
            start_time,
        )

    def start_linked_span(
        self, name: str, links: Sequence[Link], attributes: Mapping[str, Any]
    ) -> trace.Span:
        """A new trace, recorded whatever the ratio: for a span that belongs with other
        traces only through its links, all of them sampled (a forward pass and the
        sampled tasks in its batch; tracing.forward_span). Kept at the ratio, as a new
        trace is, it would be missing from most of those tasks' traces: prod keeps 1 %
        of new traces, so 99 % of the forward passes of its traced tasks."""
        context = SpanContext(_getrandbits(128), _getrandbits(64), False, SAMPLED)
        return RecordedSpan(
            self._recorder,
            self._scope,
            name,
            context,
            0,
            SpanKind.INTERNAL,
            dict(attributes),
            links,
            None,
        )

    @_agnosticcontextmanager  # the API's own decorator for this method
    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(span, end_on_exit, record_exception, set_status_on_exception):
            yield span


class Recorder(trace.TracerProvider):
    """The process's tracer provider: records sampled spans, ships them in batches."""

    def __init__(
        self,
        resource: Mapping[str, Any],
        sample_ratio: float,
        send: Send,
        every_s: float = SHIP_EVERY_S,
    ) -> None:
        self.bound = round(min(max(sample_ratio, 0.0), 1.0) * _ID_BOUND)
        self._resource = otlp.resource(resource)
        self._send = send
        self._deadline: float | None = None  # shutdown's (monotonic): no export after it
        self._tracers: dict[Scope, RecorderTracer] = {}
        self._queue: deque[RecordedSpan | Record] = deque()
        self._dropped = 0
        self._failed = 0
        self._unsent = 0  # queued, or in an export unanswered, when shutdown's time ran out
        self._in_flight = 0  # spans in the export being sent
        self._export_error: grpc.StatusCode | None = None  # the last failed export's
        self._warned_at = -math.inf  # monotonic: the first loss is said at once
        self._ship_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(every_s,), name="gannet-spans", daemon=True
        )
        self._thread.start()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        scope = (instrumenting_module_name, instrumenting_library_version or "")
        tracer = self._tracers.get(scope)
        if tracer is None:
            tracer = self._tracers.setdefault(scope, RecorderTracer(self, scope))
        return tracer

    def ended(self, span: RecordedSpan | Record) -> None:
        """Queue a span that ended (a RecordedSpan's `end`, or a stage's Record)."""
        if len(self._queue) >= MAX_QUEUED:
            self._dropped += 1
            return
        self._queue.append(span)

    def flush(self) -> None:
        """Send every span ended so far (the shipper's job, done now)."""
        with self._ship_lock:
            self._send_queued()
        self._warn_lost()

    def shutdown(self, timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        """Send what is queued and stop the shipper, within `timeout_s` in all; what is not
        sent by then is counted in the warning. Spans ended later are not sent.

        Why a deadline for the whole, not a timeout per request: the daemon gives this
        what is left of its grace period, and against a collector that takes requests
        and never answers, waiting out the shipper's export in flight and then each
        queued request's own timeout took minutes with a full queue, past the pod's
        terminationGracePeriodSeconds. An export still in flight then is left to its
        daemon thread, whose timeout ends it."""
        deadline = time.monotonic() + timeout_s
        self._deadline = deadline  # the shipper's own flush stops at it too
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        if self._ship_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            try:
                self._send_queued()
            finally:
                self._ship_lock.release()
        else:  # the shipper still waits for an export: its spans are not sent either
            self._unsent += self._in_flight
        self._unsent += len(self._queue)
        self._queue.clear()
        self._warn_lost(now=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.flush()

    def _send_queued(self) -> None:
        """Every queued span in requests of MAX_PER_REQUEST, under the ship lock; after
        shutdown's deadline, none."""
        while self._queue:
            timeout_s = EXPORT_TIMEOUT_S
            if self._deadline is not None:
                timeout_s = min(timeout_s, self._deadline - time.monotonic())
                if timeout_s <= 0:
                    return
            spans: list[RecordedSpan | Record] = []
            while self._queue and len(spans) < MAX_PER_REQUEST:
                spans.append(self._queue.popleft())
            self._in_flight = len(spans)
            self._ship(spans, timeout_s)
            self._in_flight = 0

    def _warn_lost(self, now: bool = False) -> None:
        """One line for the spans lost since the last, at most every WARN_EVERY_S (`now`:
        at shutdown, whatever the time). Why not a line per failed export: a collector
        that is down fails every one, twice a second, for as long as it is down."""
        if not (self._dropped or self._failed or self._unsent):
            return
        if not now and time.monotonic() - self._warned_at < WARN_EVERY_S:
            return
        failed = f" ({self._export_error})" if self._failed else ""
        log.warning(
            "trace spans lost: %d over the queue's %d, %d in exports that failed%s, "
            "%d not sent at shutdown",
            self._dropped,
            MAX_QUEUED,
            self._failed,
            failed,
            self._unsent,
        )
        self._dropped = self._failed = self._unsent = 0
        self._warned_at = time.monotonic()

    def _ship(self, spans: list[RecordedSpan | Record], timeout_s: float) -> None:
        by_scope: dict[Scope, list[bytes]] = {}
        for span in spans:
            if isinstance(span, RecordedSpan):
                by_scope.setdefault(span._scope, []).append(_encode(span))
            else:
                by_scope.setdefault(span[0], []).append(_encode_record(span))
        try:
            self._send(otlp.request(self._resource, by_scope), timeout_s)
        except grpc.RpcError as exc:  # said in _warn_lost's next line, with the count
            self._failed += len(spans)
            self._export_error = exc.code()


def otlp_sender(channel: grpc.Channel) -> Send:
    """Export through an OTLP TraceService (a collector, or Cloud Trace's endpoint): the
    request is already bytes (otlp.py), so the call sends them as they are."""
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=None,
        response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
    )

    def send(request: bytes, timeout_s: float) -> None:
        export(request, timeout=timeout_s)

    return send


def otlp_channel(endpoint: str) -> grpc.Channel:
    """`http://host:port` is plaintext (a collector beside the pod); anything else TLS."""
    if endpoint.startswith("http://"):
        return grpc.insecure_channel(endpoint.removeprefix("http://"))
    return grpc.secure_channel(endpoint.removeprefix("https://"), grpc.ssl_channel_credentials())


def cloud_trace_channel() -> grpc.Channel:
    """Cloud Trace's OTLP endpoint, authenticated with Application Default Credentials
    (the pod's Workload Identity on GKE): Google's recommended path since it ingests
    OTLP as it is, where the older Cloud Trace exporter converted every span."""
    import google.auth
    from google.auth.transport.grpc import secure_authorized_channel
    from google.auth.transport.requests import Request

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return secure_authorized_channel(credentials, Request(), CLOUD_TRACE_OTLP)  # type: ignore[no-untyped-call]


def _encode_record(record: Record) -> bytes:
    _, trace_id, span_id, parent_id, name, start_ns, end_ns, error = record
    return otlp.span(
        trace_id.to_bytes(16, "big"),
        span_id.to_bytes(8, "big"),
        parent_id.to_bytes(8, "big"),
        name,
        1,  # INTERNAL
        start_ns,
        end_ns,
        {},
        status=None if error is None else (StatusCode.ERROR.value, error),
    )


def _encode(span: RecordedSpan) -> bytes:
    context = span._context
    return otlp.span(
        context.trace_id.to_bytes(16, "big"),
        context.span_id.to_bytes(8, "big"),
        span.parent_id.to_bytes(8, "big") if span.parent_id else b"",
        span.name,
        span.kind.value + 1,  # OTLP counts kinds from UNSPECIFIED = 0, the API from INTERNAL
        span.start_ns,
        span.end_ns,
        span.attributes,
        span.events or (),
        [
            (
                link.context.trace_id.to_bytes(16, "big"),
                link.context.span_id.to_bytes(8, "big"),
                link.attributes,
            )
            for link in span.links or ()
        ],
        None if span.status is None else (span.status[0].value, span.status[1]),
    )
