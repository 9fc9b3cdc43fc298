"""One trace per task, from the backend's publish to the committed row.

Off by default (GANNET_TRACE_EXPORTER=off): then the daemon builds no Tracing, every
`tracing` is None, and a stage pays one `is None` check. On, with `otlp` (a collector)
or `cloud_trace` (Cloud Trace, authenticated by the pod's Workload Identity):

- the Pub/Sub client's own OpenTelemetry support is turned on (clients.py), so a task
  published by a traced backend continues the backend's trace: the client's `subscribe`
  span is a child of the publisher's span, and a message without that context starts a
  trace of its own;
- each message gets a `gannet task` span under the client's `subscribe` span, carrying
  task_id, tenant_id, pipeline, delivery_attempt, outcome and error_code;
- every Timer stage (stages.py: receive, lookup, fetch, decode, the steps, inference,
  sink, gcs_write, settle; not the sub-millisecond UNTRACED_STAGES) is a child span of
  the stage or task it runs in, on whichever thread runs it: the runner attaches the
  task's context before it starts, after a `wait for a runner` span;
- a batched forward pass is one span in the model's batcher thread, linked to the
  `inference` span of every task in the batch, with the batch size;
- log lines written inside a task carry its trace and span ids in the fields Cloud
  Logging links on (logs.py).

The tracer provider is spans.py's Recorder: the message path only records spans, in
microseconds; one thread sends them as OTLP, in batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import Token
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, Status, StatusCode

from gannet import __version__
from gannet.spans import Recorder, cloud_trace_channel, otlp_channel, otlp_sender

if TYPE_CHECKING:
    from gannet.outcome import Outcome
    from gannet.settings import Settings

TRACER = "gannet"


class Tracing:
    """The daemon's tracer provider and what the message path asks of it."""

    def __init__(self, provider: Recorder) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER, __version__)
        self.stages = StageSpans(self.tracer)

    @classmethod
    def from_settings(cls, settings: Settings, instance: str) -> Tracing | None:
        """None when tracing is off. Sets the global provider, which the Pub/Sub client's
        spans use."""
        if not settings.traced:
            return None
        if settings.trace_exporter == "cloud_trace":
            channel = cloud_trace_channel()
        else:
            channel = otlp_channel(settings.trace_otlp_endpoint)
        provider = Recorder(
            {
                "service.name": "gannet",
                "service.version": __version__,
                "service.instance.id": instance,
                "gcp.project_id": settings.project,  # Cloud Trace's OTLP endpoint needs it
            },
            # Follow the publisher's decision; sample new traces at the ratio.
            settings.trace_sample_ratio,
            otlp_sender(channel),
        )
        trace.set_tracer_provider(provider)
        return cls(provider)

    def start_task(self, message: Any) -> TaskSpan:
        """The span of one message, under the Pub/Sub client's `subscribe` span (which
        continues the publisher's trace) when the client traced the message."""
        data = getattr(message, "opentelemetry_data", None)
        subscribe = data.subscribe_span if data is not None else None
        parent = trace.set_span_in_context(subscribe) if subscribe is not None else None
        span = self.tracer.start_span(
            "gannet task",
            context=parent if parent is not None else otel_context.Context(),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.message.id": str(getattr(message, "message_id", "")),
                "gannet.delivery_attempt": message.delivery_attempt or 1,
            },
        )
        return TaskSpan(self.tracer, span)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is buffered; spans recorded after this are dropped."""
        self.provider.shutdown(timeout_s)


class TaskSpan:
    """One message's span, handed from the callback thread to its runner."""

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self.span = span
        self.context = trace.set_span_in_context(span)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make the task the current span on this thread (log lines, stage spans)."""
        token = otel_context.attach(self.context)
        try:
            yield
        finally:
            otel_context.detach(token)

    def waited(self, since_ns: int, industry: str) -> None:
        """On the runner: the time the task queued for it, as a span of its own."""
        self._tracer.start_span("wait for a runner", start_time=since_ns).end()
        self.span.set_attribute("gannet.industry", industry)

    def finish(self, outcome: Outcome | None) -> None:
        span = self.span
        if outcome is None:  # an exception left on_message: the client nacks the message
            span.set_status(Status(StatusCode.ERROR, "no outcome"))
            span.end()
            return
        task = outcome.task
        if task is not None:
            span.set_attributes(
                {
                    "gannet.task_id": task.task_id,
                    "gannet.tenant_id": task.tenant_id,
                    "gannet.pipeline": task.pipeline,
                }
            )
        span.set_attribute("gannet.outcome", outcome.label)
        if outcome.error is not None:
            span.set_attribute("gannet.error_code", outcome.error.code.value)
            span.set_status(Status(StatusCode.ERROR, outcome.error.code.value))
        span.end()


# Stages that are no span of their own: sub-millisecond CPU work whose time the task's
# `timings` and the stage histogram already show. Three more spans per task would add
# about a tenth to what tracing costs the daemon (docs/benchmark.md).
UNTRACED_STAGES = frozenset({"preprocess", "postprocess", "result_json"})


class StageSpans:
    """Spans for Timer stages (stages.py): each a child of whatever span is current on
    the thread, and current itself while it runs, so stages nest."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def enter(self, name: str) -> object:
        if name in UNTRACED_STAGES:
            return None
        span = self._tracer.start_span(name)
        return span, otel_context.attach(trace.set_span_in_context(span))

    def exit(self, opened: object, error: BaseException | None) -> None:
        """Only for what `enter` opened (the Timer skips its Nones)."""
        span, token = cast("tuple[trace.Span, Token[otel_context.Context]]", opened)
        otel_context.detach(token)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()


def current_link() -> SpanContext | None:
    """The current span's context, to link a batched forward pass to it; None when
    tracing is off or this task's trace is not sampled (a forward pass whose tasks are
    all unsampled records no span)."""
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid and context.trace_flags.sampled else None


def annotate(attributes: dict[str, Any]) -> None:
    """Attributes on the current span, when one is recording."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


@contextmanager
def forward_span(model: str, links: list[SpanContext], size: int) -> Iterator[None]:
    """A batched forward pass, linked to the span of every task that rode in it."""
    tracer = trace.get_tracer(TRACER, __version__)
    with tracer.start_as_current_span(
        "forward",
        links=[Link(c) for c in links],
        attributes={"gannet.model": model, "gannet.batch_size": size},
    ):
        yield
