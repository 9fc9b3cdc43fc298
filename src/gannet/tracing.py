"""One trace per task, from the backend's publish to the committed row.

Off by default (GANNET_TRACE_EXPORTER=off): then the daemon builds no Tracing, every
`tracing` is None, and a stage pays one `is None` check. On, with `otlp` (a collector)
or `cloud_trace` (Cloud Trace, authenticated by the pod's Workload Identity):

- the Pub/Sub client's own OpenTelemetry support is turned on (clients.py), so a task
  published by a traced backend continues the backend's trace: the client's `subscribe`
  span is a child of the publisher's span, and a message without that context starts a
  trace of its own;
- each message gets a `gannet task` span under the client's `subscribe` span, carrying
  task_id, tenant_id, pipeline, delivery_attempt, outcome (as applied: a quarantine
  whose dead letter was refused is a nack) and error_code;
- every Timer stage (stages.py: receive, lookup, fetch, decode, the steps, inference,
  sink, gcs_write, settle; not the sub-millisecond UNTRACED_STAGES) is a child span of
  the stage or task it runs in, on whichever thread runs it: the runner attaches the
  task's context before it starts, after a `wait for a runner` span. A stage is
  recorded as a tuple when it ends (StageSpans), and never becomes the current span:
  the task's span is the one log lines and links name;
- a batched forward pass is one span in the model's batcher thread, linked to the
  `gannet task` span of every task in the batch, with the batch size (recorded when
  one of them is sampled, whatever the ratio of new traces);
- log lines written inside a task carry its trace and span ids in the fields Cloud
  Logging links on (logs.py).

The tracer provider is spans.py's Recorder: the message path only records spans, in
microseconds; one thread sends them as OTLP, in batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from random import getrandbits
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, Status, StatusCode

from gannet import __version__
from gannet.spans import Recorder, RecorderTracer, cloud_trace_channel, otlp_channel, otlp_sender

if TYPE_CHECKING:
    from gannet.outcome import Outcome
    from gannet.settings import Settings

TRACER = "gannet"
SCOPE = (TRACER, __version__)  # the instrumentation scope of our spans


class Tracing:
    """The daemon's tracer provider and what the message path asks of it."""

    def __init__(self, provider: Recorder) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(*SCOPE)

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
        return TaskSpan(self.provider, span)

    def stage_spans(self) -> StageSpans | None:
        """For a Timer on this thread: the stages of the task whose span is current, or
        None when there is none or its trace is not sampled (its stages then cost
        nothing)."""
        context = trace.get_current_span().get_span_context()
        if not context.trace_flags.sampled:
            return None
        return StageSpans(self.provider, context)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is buffered; spans recorded after this are dropped."""
        self.provider.shutdown(timeout_s)


class TaskSpan:
    """One message's span, handed from the callback thread to its runner."""

    def __init__(self, recorder: Recorder, span: trace.Span) -> None:
        self._recorder = recorder
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
        task = self.span.get_span_context()
        if task.trace_flags.sampled:
            wait = (task.trace_id, getrandbits(64), task.span_id, "wait for a runner")
            _record(self._recorder, *wait, since_ns, None)
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
    """One task's stages on one thread, as spans: a Timer's `spans` (stages.py).

    A stage costs the message path two clock reads and a tuple: it is recorded as a
    spans.Record when it ends, with no span object and no switch of the current
    context. Its parent is the stage it runs in, or the task."""

    def __init__(self, recorder: Recorder, task: SpanContext) -> None:
        self._recorder = recorder
        self._trace_id = task.trace_id
        self._open = [task.span_id]

    def enter(self, name: str) -> object:
        if name in UNTRACED_STAGES:
            return None
        span_id = getrandbits(64)
        opened = (name, span_id, self._open[-1], time.time_ns())
        self._open.append(span_id)
        return opened

    def exit(self, opened: object, error: BaseException | None) -> None:
        """Only for what `enter` opened (the Timer skips its Nones)."""
        name, span_id, parent_id, start_ns = cast("tuple[str, int, int, int]", opened)
        self._open.pop()
        failed = None if error is None else type(error).__name__
        _record(self._recorder, self._trace_id, span_id, parent_id, name, start_ns, failed)


def _record(
    recorder: Recorder,
    trace_id: int,
    span_id: int,
    parent_id: int,
    name: str,
    start_ns: int,
    error: str | None,
) -> None:
    """One of our spans that ends now, queued as a spans.Record (no span object)."""
    recorder.ended((SCOPE, trace_id, span_id, parent_id, name, start_ns, time.time_ns(), error))


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
    """A batched forward pass, linked to the span of every task that rode in it.

    `links` are sampled tasks (current_link), so the pass is recorded whatever
    GANNET_TRACE_SAMPLE_RATIO: it is a new trace, which the ratio would otherwise decide,
    and a task kept in its trace would lose its forward pass."""
    tracer = trace.get_tracer(*SCOPE)
    attributes: dict[str, str | int] = {"gannet.model": model, "gannet.batch_size": size}
    kept = [Link(c) for c in links]
    if isinstance(tracer, RecorderTracer):  # tracing on (off, no task is sampled: no links)
        span = tracer.start_linked_span("forward", kept, attributes)
    else:  # another tracer provider than ours (set by whoever embeds the daemon)
        span = tracer.start_span("forward", links=kept, attributes=attributes)
    with trace.use_span(span, end_on_exit=True):
        yield
