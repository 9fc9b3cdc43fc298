"""The span recorder (spans.py) against a real OTLP gRPC receiver.

The daemon's traces are checked end to end in test_tracing.py; here, what the recorder
itself promises: what a span carries arrives as OTLP says it should, sampling follows
the parent (the publisher's choice) and the ratio, and a receiver that is down or a
queue that overflows costs spans, never a task.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry import context, trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from gannet import spans as spans_module
from gannet.dev.trace_receiver import TraceReceiver
from gannet.spans import Recorder, otlp_channel, otlp_sender


@pytest.fixture
def receiver() -> Iterator[TraceReceiver]:
    recv = TraceReceiver()
    yield recv
    recv.stop()


def recorder_to(endpoint: str, ratio: float = 1.0) -> Recorder:
    return Recorder({"service.instance.id": "test-1"}, ratio, otlp_sender(otlp_channel(endpoint)))


def test_a_span_arrives_with_its_parent_kind_attributes_events_links_and_status(
    receiver: TraceReceiver,
) -> None:
    recorder = recorder_to(receiver.endpoint)
    tracer = recorder.get_tracer("gannet", "1")
    elsewhere = SpanContext(0xAB, 0xCD, is_remote=True, trace_flags=TraceFlags(1))
    with tracer.start_as_current_span(
        "task", kind=SpanKind.CONSUMER, attributes={"gannet.task_id": "t-1", "n": 3}
    ) as parent:
        with (
            pytest.raises(ValueError),
            tracer.start_as_current_span("decode", links=[Link(elsewhere)]) as child,
        ):
            child.set_attribute("ratio", 0.5)
            child.set_attribute("flags", ["a", "b"])
            child.set_attribute("delta", -2)
            child.add_event("halfway")
            raise ValueError("not a JPEG")
        parent.set_attribute("ok", True)
    recorder.shutdown()
    got = {s.name: s for s in receiver.spans}
    task, decode = got["task"], got["decode"]
    assert decode.trace_id == task.trace_id and decode.parent_id == task.span_id
    assert task.parent_id == ""
    assert task.kind == "SPAN_KIND_CONSUMER" and decode.kind == "SPAN_KIND_INTERNAL"
    assert task.attributes == {"gannet.task_id": "t-1", "n": 3, "ok": True}
    assert task.instance == "test-1" and task.scope == "gannet"
    assert decode.attributes["ratio"] == 0.5
    assert decode.attributes["delta"] == -2
    assert [v.string_value for v in decode.attributes["flags"].values] == ["a", "b"]
    assert decode.error and not task.error
    assert decode.events == ["halfway", "exception"]
    assert decode.links == [(f"{0xAB:032x}", f"{0xCD:016x}")]
    assert task.start_ns <= decode.start_ns <= decode.end_ns <= task.end_ns


def test_a_span_is_exported_as_it_was_when_it_ended(receiver: TraceReceiver) -> None:
    """Writes to a span after its end are ignored, as the OpenTelemetry SDK ignores
    them. The Pub/Sub client's lease manager adds events to a message's `subscribe`
    span after acks.py has ended it: they showed after the span's end in the trace, and
    a write while the shipper encoded the span could fail the export thread (the dict
    changed size during iteration), which would end tracing for the process."""
    recorder = recorder_to(receiver.endpoint)
    span = recorder.get_tracer("gannet", "1").start_span("subscribe", attributes={"a": 1})
    span.end()
    span.set_attribute("late", True)
    span.set_attributes({"later": 2})
    span.add_event("modack start")
    span.set_status(trace.StatusCode.ERROR, "late")
    span.update_name("renamed")
    recorder.shutdown()
    (got,) = receiver.spans
    assert (got.name, got.attributes, got.events, got.error) == ("subscribe", {"a": 1}, [], False)


def test_sampling_follows_the_publisher_and_keeps_new_traces_at_the_ratio(
    receiver: TraceReceiver,
) -> None:
    recorder = recorder_to(receiver.endpoint, ratio=0.0)
    tracer = recorder.get_tracer("gannet")
    unsampled = tracer.start_span("new trace at ratio 0")
    assert not unsampled.is_recording()
    child = tracer.start_span("its child", context=trace.set_span_in_context(unsampled))
    assert not child.is_recording()
    assert child.get_span_context().trace_id == unsampled.get_span_context().trace_id
    # A publisher that sampled its trace: the task is kept whatever the ratio.
    published = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1))
    kept = tracer.start_span(
        "continued", context=trace.set_span_in_context(trace.NonRecordingSpan(published))
    )
    assert kept.is_recording()
    for span in (unsampled, child, kept):
        span.end()
    recorder.shutdown()
    assert [(s.name, s.trace_id, s.parent_id) for s in receiver.spans] == [
        ("continued", f"{0x1234:032x}", f"{0x5678:016x}")
    ]
    # Sampling alone: these spans are sent nowhere.
    ratio_half = Recorder({}, 0.5, send=lambda request, timeout_s: None)
    kept_share = (
        sum(ratio_half.get_tracer("t").start_span("s").is_recording() for _ in range(4000)) / 4000
    )
    ratio_half.shutdown()
    assert 0.45 < kept_share < 0.55


def test_a_receiver_that_hangs_costs_spans_not_tasks(caplog: pytest.LogCaptureFixture) -> None:
    """A receiver that takes the connection and never answers, the worst a collector
    can do (a refused port fails at once, so it could not show a wait): while the
    shipper waits on it, spans are still recorded at once; the export times out, and
    its spans are logged as lost, with the export's error."""
    caplog.set_level(logging.WARNING, logger="gannet.spans")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)  # the kernel completes the handshake; nothing ever answers
        export = otlp_sender(otlp_channel(f"http://127.0.0.1:{hung.getsockname()[1]}"))
        waiting, returned = threading.Event(), threading.Event()

        def send(request: object, _timeout_s: float) -> None:
            waiting.set()
            try:
                export(request, 1.0)
            finally:
                returned.set()

        recorder = Recorder({"service.instance.id": "test-1"}, 1.0, send, every_s=0.05)
        tracer = recorder.get_tracer("gannet")
        with tracer.start_as_current_span("first"):
            pass
        assert waiting.wait(10), "the shipper never sent"
        for _ in range(100):
            with tracer.start_as_current_span("step"):
                pass
        assert not returned.is_set(), "recording waited on the export"
        recorder.shutdown(timeout_s=2)
    assert "in exports that failed (StatusCode.DEADLINE_EXCEEDED)" in caplog.text


def test_a_collector_that_is_down_is_said_once_a_while_not_every_half_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens at the endpoint: every export fails at once. Each one logged two
    warning lines, four a second per process, for as long as the collector was down,
    drowning the daemon's own lines (and billed by Cloud Logging). The losses are summed
    into one line now and then, and the count of every lost span still adds up."""
    caplog.set_level(logging.WARNING, logger="gannet.spans")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: refused
        send = otlp_sender(otlp_channel(f"http://127.0.0.1:{port}"))
        recorder = Recorder({}, 1.0, send, every_s=0.05)
        tracer = recorder.get_tracer("gannet")
        recorded = 0
        until = time.monotonic() + 1.5  # about 30 exports
        while time.monotonic() < until:
            tracer.start_span("step").end()
            recorded += 1
            time.sleep(0.01)
        recorder.shutdown(timeout_s=1.0)
    lines = [r.getMessage() for r in caplog.records]
    assert 1 <= len(lines) <= 3, lines
    failed = [int(line.split(", ")[1].split()[0]) for line in lines]  # "N in exports"
    assert sum(failed) == recorded
    assert all("StatusCode.UNAVAILABLE" in ln for ln, n in zip(lines, failed, strict=True) if n)


class _SlowCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """A collector that takes each export and answers only once released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exports = 0

    def Export(self, request: object, context: object) -> object:
        self.exports += 1
        self.release.wait(30)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_shutdown_against_a_collector_that_does_not_answer_keeps_to_its_timeout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon gives the last spans what is left of its grace period (daemon.py:
    at most 5 s). Against a collector that takes requests and never answers, shutdown
    waited for the shipper's export in flight (10 s) and then sent every queued batch,
    each with a timeout of its own: with a full queue, minutes past the pod's
    terminationGracePeriodSeconds. It must return within its timeout and say what it did
    not send."""
    monkeypatch.setattr(spans_module, "MAX_PER_REQUEST", 10)
    collector = _SlowCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        recorder = Recorder({}, 1.0, otlp_sender(otlp_channel(endpoint)), every_s=0.05)
        tracer = recorder.get_tracer("gannet")
        for _ in range(50):  # five requests' worth
            tracer.start_span("step").end()
        deadline = time.monotonic() + 10
        while not collector.exports and time.monotonic() < deadline:
            time.sleep(0.01)
        assert collector.exports, "the shipper never sent"
        with caplog.at_level(logging.WARNING, logger="gannet.spans"):
            started = time.monotonic()
            recorder.shutdown(timeout_s=1.0)
            took = time.monotonic() - started
        assert took < 2.0, f"shutdown(timeout_s=1) took {took:.1f} s"
        assert "not sent at shutdown" in caplog.text
    finally:
        collector.release.set()
        server.stop(grace=None)


def test_spans_over_the_queue_limit_are_dropped_and_said(
    receiver: TraceReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(spans_module, "MAX_QUEUED", 10)
    recorder = Recorder({}, 1.0, otlp_sender(otlp_channel(receiver.endpoint)), every_s=60)
    tracer = recorder.get_tracer("gannet")
    for _ in range(25):
        tracer.start_span("step").end()
    with caplog.at_level(logging.WARNING, logger="gannet.spans"):
        recorder.shutdown()
    assert len(receiver.spans) == 10
    assert "15 over the queue's 10" in caplog.text


def test_the_current_span_is_the_recorders_for_log_lines() -> None:
    """logs.py reads trace.get_current_span(): it must see a RecordedSpan's ids (the
    span is sent nowhere: export is the receiver tests' part)."""
    recorder = Recorder({}, 1.0, send=lambda request, timeout_s: None)
    span = recorder.get_tracer("gannet").start_span("task")
    token = context.attach(trace.set_span_in_context(span))
    try:
        current = trace.get_current_span().get_span_context()
        assert current.span_id == span.get_span_context().span_id
        assert current.trace_flags.sampled
    finally:
        context.detach(token)
        span.end()
        recorder.shutdown()


def test_a_tasks_stages_are_spans_nested_as_they_ran(receiver: TraceReceiver) -> None:
    """Stages are recorded as tuples (tracing.StageSpans), not span objects: they must
    still arrive as spans under the task, nested, with a failed stage marked."""
    from gannet.stages import Timer
    from gannet.tracing import UNTRACED_STAGES, StageSpans

    recorder = recorder_to(receiver.endpoint)
    task = recorder.get_tracer("gannet").start_span("gannet task")
    timer = Timer(lambda stage, s: None, spans=StageSpans(recorder, task.get_span_context()))
    with timer.stage("fetch"):
        pass
    with pytest.raises(OSError), timer.stage("detection"):
        with timer.stage(next(iter(UNTRACED_STAGES))):
            pass
        with timer.stage("inference"):
            pass
        raise OSError("disk gone")
    task.end()
    recorder.shutdown()
    got = {s.name: s for s in receiver.spans}
    assert set(got) == {"gannet task", "fetch", "detection", "inference"}
    root = got["gannet task"]
    assert got["fetch"].parent_id == root.span_id and not got["fetch"].error
    assert got["detection"].parent_id == root.span_id and got["detection"].error
    assert got["inference"].parent_id == got["detection"].span_id
    assert {s.trace_id for s in got.values()} == {root.trace_id}
    assert got["detection"].start_ns <= got["inference"].start_ns
    assert got["inference"].end_ns <= got["detection"].end_ns
