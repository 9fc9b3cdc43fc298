"""Acks sent to Pub/Sub by the daemon, a window's together, and each slot freed after.

Why not `message.ack()`: the client library frees a message's flow-control slot only
once its Acknowledge request has returned, and one dispatcher thread per stream sends
those requests one after another, each after waiting up to 10 ms to gather more. So
behind a distant Pub/Sub every slot also waited for the requests in flight before its
own: with a 20 ms round trip, 4 runners and 8 leased, the pod fed its model 117 images/s
where sending the requests here gave 168 (docs/benchmark.md, "Acks sent by the daemon").

So a settled message's ack waits here up to `window_s` to go with the others in one
Acknowledge request (at about a hundred a second, one request each was a cost of its
own on the daemon's cores and GIL), on a sender thread of this lane's, so that a request
in flight does not hold up the next. When the request has returned, each message is
dropped from the client's lease management (`Message.drop`, the public call that frees
its slot without another request).

What it costs: an ack leaves up to `window_s` later. The message's row is committed
before it is queued here, so a crash in between, or a request that fails (logged,
and the messages dropped all the same, as the client does with an ack it could
not send), brings the task back after its ack deadline; a redelivered task whose success
is committed is acked as a duplicate without inference.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1

log = logging.getLogger(__name__)

WINDOW_S = 0.02
# Requests in flight at once, per lane: a window's acks leave every 20 ms, so 4 keep up
# with a round trip to Pub/Sub of up to 80 ms before one waits for another.
SENDERS = 4
# One request's ceiling, retries included: at shutdown the last acks are waited for
# within the grace period (GANNET_SHUTDOWN_GRACE_S).
REQUEST_TIMEOUT_S = 5.0
# Ack ids per request (Pub/Sub takes up to 2500, and at most 512 KB).
MAX_IDS = 1000


class Acks:
    def __init__(
        self,
        client: pubsub_v1.SubscriberClient,
        subscription_path: str,
        window_s: float = WINDOW_S,
    ) -> None:
        self._client = client
        self._subscription = subscription_path
        self._window_s = window_s
        self._pending: list[Any] = []
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
            if self._pending:
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
            self._client.acknowledge(
                subscription=self._subscription,
                ack_ids=[m.ack_id for m in messages],
                timeout=REQUEST_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - logged; the redelivery recovers them
            result = "ack failed"
            log.warning(
                "acks not delivered; Pub/Sub redelivers these after their ack deadline, "
                "and each is acked as a duplicate without inference",
                extra={"fields": {"acks": len(messages), "error": repr(exc)}},
            )
        finally:
            for message in messages:
                _end_subscribe_span(message, result)
                message.drop()


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
