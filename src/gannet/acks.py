"""Acks sent to Pub/Sub by the daemon, a window's together, and each slot freed after.

Why not `message.ack()`: the client library frees a message's flow-control slot only
once its Acknowledge request has returned, and one dispatcher thread per stream sends
those requests one after another, each after waiting up to 10 ms to gather more. So
behind a distant Pub/Sub every slot also waited for the requests in flight before its
own: with a 20 ms round trip, 4 runners and 8 leased, the pod fed its model 117 images/s
where sending the requests here gave 168 (docs/benchmark.md, "Acks sent by the daemon").

So a settled message's ack waits here to go with the others in one Acknowledge request
(at about a hundred a second, one request each was a cost of its own on the daemon's
cores and GIL), on a sender thread of this lane's, so that a request in flight does not
hold up the next. The acks leave at the end of a `window_s` window if there are at
least `few` of them, else at the end of the first window after the oldest has waited
`longest_wait_s`: at 4032x3024 (about 80 images/s) a 20 ms window gathered one or two,
and each image paid nearly a request of its own; with four or more to a request the
daemon's GIL-held time per image fell by 5 % and Pub/Sub's CPU per image by a fifth
(docs/benchmark.md, "A few acks to a request"). At a few hundred images/s every window
has more than `few`, and nothing waits longer than before. When the request has
returned, each message is dropped from the client's lease management (`Message.drop`,
the public call that frees its slot without another request).

The request goes straight to the client's own gRPC channel (`Acknowledge`, a raw protobuf
request, the routing and client headers the library sends, UNAVAILABLE retried here
within REQUEST_TIMEOUT_S): the library's layers above it (proto-plus, api_core's retry,
timeout and error wrappers, its logging interceptor) held the GIL for about as long as
gRPC's own call, some 5 % of the daemon's GIL-held time per image at 4032x3024, where a
request then carried one or two acks (docs/benchmark.md, "Ack requests on the client's
channel").

What it costs: an ack leaves up to `window_s` later, or up to `longest_wait_s` (and a
window) at a slow pace, holding its flow-control slot meanwhile (lease.py leases more
when the runners wait for slots). A task's row is committed (a poison message's dead
letter published) before its ack is queued here, so a crash in between, or a request
that fails (logged and counted, `lost`, and the messages dropped all the same, as the
client does with an ack it could not send), brings the message back after its ack
deadline: a redelivered task whose success is committed is acked as a duplicate without
inference, a poison message dead-lettered again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
import grpc
from google.api_core.gapic_v1 import routing_header
from google.protobuf import empty_pb2
from google.pubsub_v1.services.subscriber.transports.base import DEFAULT_CLIENT_INFO
from google.pubsub_v1.types import pubsub

log = logging.getLogger(__name__)

WINDOW_S = 0.02
# A window's acks leave at its end only if there are this many; fewer wait for more,
# until the oldest has waited LONGEST_WAIT_S.
FEW_ACKS = 4
LONGEST_WAIT_S = 0.1
# Requests in flight at once, per lane: a window's acks leave every 20 ms, so 4 keep up
# with a round trip to Pub/Sub of up to 80 ms before one waits for another.
SENDERS = 4
# One request's ceiling, retries included: at shutdown the last acks are waited for
# within the grace period (GANNET_SHUTDOWN_GRACE_S).
REQUEST_TIMEOUT_S = 5.0
# Ack ids per request (Pub/Sub takes up to 2500, and at most 512 KB).
MAX_IDS = 1000
# The first wait before a request answered UNAVAILABLE is sent again, doubled each time
# (the library's own policy retries only that code, from 0.1 s).
RETRY_FIRST_S = 0.1

ACKNOWLEDGE = "/google.pubsub.v1.Subscriber/Acknowledge"
_REQUEST = pubsub.AcknowledgeRequest.pb()  # the protobuf class under proto-plus's


class Acks:
    def __init__(
        self,
        client: pubsub_v1.SubscriberClient,
        subscription_path: str,
        window_s: float = WINDOW_S,
        few: int = FEW_ACKS,
        longest_wait_s: float = LONGEST_WAIT_S,
        lost: Callable[[int], None] | None = None,
    ) -> None:
        """`lost(n)`: n acks whose request failed (the daemon counts them by lane: the
        outcome counter has already counted those messages as settled, and a pod whose
        acks keep failing would otherwise show it only in its log)."""
        self._lost = lost
        self._subscription = subscription_path
        self._acknowledge = client.transport.grpc_channel.unary_unary(
            ACKNOWLEDGE,
            request_serializer=_REQUEST.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        # What the library sends with each request: the subscription, which Pub/Sub
        # routes by, and the client's name and versions.
        self._metadata = (
            routing_header.to_grpc_metadata((("subscription", subscription_path),)),  # type: ignore[no-untyped-call]
            DEFAULT_CLIENT_INFO.to_grpc_metadata(),  # type: ignore[no-untyped-call]
        )
        self._window_s = window_s
        self._few = few
        self._longest_wait_s = longest_wait_s
        self._pending: list[Any] = []
        self._oldest = 0.0  # when the first of `_pending` was queued (monotonic)
        self._in_flight: list[Future[None]] = []
        self._lock = threading.Lock()
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="gannet-ack-send")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gannet-acks", daemon=True)
        self._thread.start()

    def ack(self, message: Any) -> None:
        """Queue a settled message's ack; its request leaves within `window_s`."""
        traced = message.opentelemetry_data
        if traced is not None:  # as Message.ack() ends the client's process span
            traced.add_process_span_event("ack called")
            traced.end_process_span()
        with self._lock:
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending.append(message)

    def flush(self) -> None:
        """Send every queued ack now, and wait until every request sent has returned."""
        self._send_pending()
        with self._lock:
            in_flight = list(self._in_flight)
        for sent in in_flight:
            sent.result()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self.flush()
        self._senders.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stop.wait(self._window_s):
            pending = len(self._pending)
            if pending >= self._few or (
                pending and time.monotonic() - self._oldest >= self._longest_wait_s
            ):
                self._send_pending()

    def _send_pending(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            self._in_flight = [f for f in self._in_flight if not f.done()]
            for start in range(0, len(batch), MAX_IDS):
                chunk = batch[start : start + MAX_IDS]
                self._in_flight.append(self._senders.submit(self._send, chunk))

    def _send(self, messages: list[Any]) -> None:
        result = "acked"
        try:
            self._request([m.ack_id for m in messages])
        except Exception as exc:  # noqa: BLE001 - logged; the redelivery recovers them
            result = "ack failed"
            log.warning(
                "acks not delivered; Pub/Sub redelivers these after their ack deadline: "
                "a committed task is then acked as a duplicate without inference, a "
                "quarantined one dead-lettered again",
                extra={"fields": {"acks": len(messages), "error": repr(exc)}},
            )
            if self._lost is not None:
                self._lost(len(messages))
        finally:
            for message in messages:
                _end_subscribe_span(message, result)
                message.drop()

    def _request(self, ack_ids: list[str]) -> None:
        """One Acknowledge, sent again while Pub/Sub answers UNAVAILABLE, within
        REQUEST_TIMEOUT_S in all. wait_for_ready: a channel still connecting (or
        reconnecting) is waited for within that time rather than failing at once."""
        request = _REQUEST(subscription=self._subscription, ack_ids=ack_ids)
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        wait = RETRY_FIRST_S
        while True:
            left = deadline - time.monotonic()
            try:
                self._acknowledge(
                    request, timeout=left, metadata=self._metadata, wait_for_ready=True
                )
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or left <= wait:
                    raise
            time.sleep(wait)
            wait *= 2


def _end_subscribe_span(message: Any, result: str) -> None:
    """With the client's OpenTelemetry tracing on (GANNET_TRACE_EXPORTER), each message
    has a `subscribe` span that its own ack path ends once the request has returned; the
    daemon's task span is its child (tracing.py), so it must end here instead, or the
    trace loses its link to the publisher."""
    traced = message.opentelemetry_data
    if traced is not None:
        traced.add_subscribe_span_event("ack end")
        traced.set_subscribe_span_result(result)
        traced.end_subscribe_span()
