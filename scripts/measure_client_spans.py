#!/usr/bin/env python3
"""What the Pub/Sub client's own spans cost the daemon per message, with tracing on.

The client (google-cloud-pubsub) opens its spans through the OpenTelemetry API, on the
daemon's tracer provider (gannet.spans.Recorder). This replays, on the real client
code (SubscribeOpenTelemetry), what the client does for each message the daemon acks:
the `subscribe` span with its attributes and four events, the concurrency-control and
scheduler spans, and per batch of 8 the receipt `modack` and the `ack` spans; then the
shipper's encoding of them all. It prints thread CPU per message, the medians of
interleaved rounds, with every span recorded and with the two queue spans left out
(not recorded, as a sampler that dropped them would): what leaving them out would save.

    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_client_spans.py [messages] [rounds]
"""

from __future__ import annotations

import statistics
import sys
import time

from google.cloud.pubsub_v1.open_telemetry.subscribe_opentelemetry import (
    SubscribeOpenTelemetry,
    start_ack_span,
    start_modack_span,
)
from google.pubsub_v1 import types
from opentelemetry import trace
from opentelemetry.util._decorator import _agnosticcontextmanager

from gannet.spans import Recorder

QUEUE_SPANS = frozenset({"subscriber concurrency control", "subscriber scheduler"})

SUBSCRIPTION = "projects/gannet-local/subscriptions/gannet-tasks-sub"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Switch(trace.TracerProvider):
    """The global provider can be set once: this one forwards to the recorder in use,
    leaving out the spans named in `left_out`."""

    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self.left_out: frozenset[str] = frozenset()

    def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
        assert self.recorder is not None
        return LeavingOut(self, self.recorder.get_tracer(*args, **kwargs))  # type: ignore[arg-type]


class LeavingOut(trace.Tracer):
    def __init__(self, switch: Switch, tracer: trace.Tracer) -> None:
        self._switch, self._tracer = switch, tracer

    def start_span(self, name: str, *args: object, **kwargs: object) -> trace.Span:
        if name in self._switch.left_out:
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, *args, **kwargs)  # type: ignore[arg-type]

    @_agnosticcontextmanager
    def start_as_current_span(self, name: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if name in self._switch.left_out:
            yield trace.INVALID_SPAN
            return
        with self._tracer.start_as_current_span(name, *args, **kwargs) as span:  # type: ignore[arg-type]
            yield span


def one_message(message: types.PubsubMessage) -> SubscribeOpenTelemetry:
    data = SubscribeOpenTelemetry(message)
    data.start_subscribe_span(SUBSCRIPTION, False, "ack-" + message.message_id, 1)
    data.add_subscribe_span_event("modack start")
    data.add_subscribe_span_event("modack end")
    data.start_subscribe_concurrency_control_span()
    data.end_subscribe_concurrency_control_span()
    data.start_subscribe_scheduler_span()
    data.end_subscribe_scheduler_span()
    data.add_subscribe_span_event("ack start")
    data.add_subscribe_span_event("ack end")
    data.set_subscribe_span_result("acked")
    data.end_subscribe_span()
    return data


def measure(switch: Switch, left_out: frozenset[str], messages: list[types.PubsubMessage]) -> float:
    """Thread CPU per message (us): the client's span calls plus the shipper's encoding."""
    recorder = Recorder({"service.name": "gannet"}, 1.0, lambda request, timeout_s: None, 3600)
    switch.recorder, switch.left_out = recorder, left_out
    started = time.thread_time()
    done = [one_message(m) for m in messages]
    for i in range(0, len(done), 8):
        links = [trace.Link(d.subscribe_span.get_span_context()) for d in done[i : i + 8]]
        project, subscription = "gannet-local", "gannet-tasks-sub"
        start_modack_span(links, subscription, 8, 60, project, "_send_lease_modacks", True).end()
        start_ack_span(subscription, 8, project, links).end()
    recorder.flush()
    spent = time.thread_time() - started
    recorder.shutdown(timeout_s=1)
    return spent / len(messages) * 1e6


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    messages = [
        types.PubsubMessage(
            data=b'{"task_id": "t"}' * 10,
            message_id=str(i),
            attributes={"googclient_traceparent": TRACEPARENT},
        )
        for i in range(count)
    ]
    switch = Switch()
    trace.set_tracer_provider(switch)
    every, fewer = [], []
    for _ in range(rounds):
        every.append(measure(switch, frozenset(), messages))
        fewer.append(measure(switch, QUEUE_SPANS, messages))
    print(f"{count} messages, medians of {rounds} interleaved rounds, thread CPU per message:")
    print(f"  every client span recorded:  {statistics.median(every):6.1f} us")
    print(f"  without the two queue spans: {statistics.median(fewer):6.1f} us")


if __name__ == "__main__":
    main()
