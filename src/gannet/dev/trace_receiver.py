"""A local OTLP trace endpoint: what a collector receives, kept in memory.

`gannet demo --trace` and `gannet bench --plumbing` point the daemon's OTLP exporter
(GANNET_TRACE_EXPORTER=otlp) here, and the tests read what arrived. It speaks the
collector's wire protocol (opentelemetry-proto's TraceService over gRPC), so the daemon
exports exactly as it would to a real collector.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    instance: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    error: bool
    kind: str  # SPAN_KIND_CONSUMER, ...
    events: list[str]  # their names
    scope: str  # the instrumentation scope: gannet, or the Pub/Sub client's

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, keep: Callable[[trace_service_pb2.ExportTraceServiceRequest], None]) -> None:
        self._keep = keep

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._keep(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    Span(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        instance=str(resource.get("service.instance.id")),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        links=[(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                        error=s.status.code == trace_pb2.Status.STATUS_CODE_ERROR,
                        kind=trace_pb2.Span.SpanKind.Name(s.kind),
                        events=[e.name for e in s.events],
                        scope=ss.scope.name,
                    )
                )
    return spans


class TraceReceiver:
    """Listens on 127.0.0.1 until `stop()`; `endpoint` is GANNET_TRACE_OTLP_ENDPOINT.

    Requests are kept as they arrived and read into Spans when asked for: while
    `gannet bench` measures a traced daemon, the receiver, which shares the machine,
    costs what a collector's gRPC server would, no more."""

    def __init__(self) -> None:
        self._requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _Service(self._keep), self._server
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def _keep(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            requests, self._requests = self._requests, []
            for request in requests:
                self._spans.extend(_spans(request))
            return list(self._spans)

    def settings(self) -> dict[str, str]:
        """The Settings fields that send a process's traces here."""
        return {"trace_exporter": "otlp", "trace_otlp_endpoint": self.endpoint}

    def env(self) -> dict[str, str]:
        """The same, as a child process's environment."""
        return {f"GANNET_{k.upper()}": v for k, v in self.settings().items()}

    def wait_for(self, done: Callable[[list[Span]], bool], timeout_s: float = 30) -> list[Span]:
        """The spans once `done(spans)`; raises TimeoutError with what did arrive."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({s.name for s in spans})
                raise TimeoutError(f"spans did not arrive in {timeout_s} s; got {names}")
            time.sleep(0.2)

    def stop(self) -> None:
        self._server.stop(grace=None)


def task_trace(spans: list[Span], task_id: str) -> list[Span]:
    """Every span of the trace of the task's `gannet task` span."""
    tasks = [s for s in spans if s.attributes.get("gannet.task_id") == task_id]
    if not tasks:
        return []
    return [s for s in spans if s.trace_id == tasks[0].trace_id]


def format_tree(spans: list[Span]) -> str:
    """One trace as an indented tree: name, duration, the attributes that say most."""
    children: dict[str, list[Span]] = {}
    ids = {s.span_id for s in spans}
    roots = []
    for s in sorted(spans, key=lambda s: s.start_ns):
        if s.parent_id and s.parent_id in ids:
            children.setdefault(s.parent_id, []).append(s)
        else:
            roots.append(s)
    shown = ("gannet.outcome", "gannet.error_code", "image.width", "image.height")
    lines: list[str] = []

    def walk(span: Span, depth: int) -> None:
        notes = " ".join(
            f"{k.split('.')[-1]}={span.attributes[k]}" for k in shown if k in span.attributes
        )
        lines.append(f"{'  ' * depth}{span.name:<{40 - 2 * depth}} {span.ms:8.1f} ms  {notes}")
        for child in children.get(span.span_id, []):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return "\n".join(line.rstrip() for line in lines)
