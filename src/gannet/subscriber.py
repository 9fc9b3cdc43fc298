"""Streaming pull with flow control, on our own executor, and a clean stop.

Each leased message gets a callback thread that waits for its runner, so the client
library keeps extending the message's lease while it waits and, on shutdown,
`await_callbacks_on_shutdown=True` lets the final ack or nack of every running callback
reach Pub/Sub before the stream closes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import bidi
from google.cloud.pubsub_v1.subscriber._protocol.streaming_pull_manager import (
    StreamingPullManager,
)
from google.cloud.pubsub_v1.subscriber.futures import StreamingPullFuture
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler
from google.cloud.pubsub_v1.types import FlowControl

from gannet.acks import Acks

log = logging.getLogger(__name__)


def _close_politely(close: Callable[[Any], None]) -> Callable[[Any], None]:
    """Half-close the request stream and let the server end the call before cancelling.

    The client library ends a streaming pull with an RST_STREAM (cancel). The Pub/Sub
    emulator of gcloud 528 fails on that (NoSuchMethodError in onRstStreamRead) and keeps
    leasing messages to the dead stream, so nothing reaches the next pod until the stream
    ack deadline passes. Ending our side of the stream first lets any server finish the
    call cleanly; the cancel that follows is then a no-op.
    """

    def polite_close(rpc: Any) -> None:
        call = getattr(rpc, "call", None)
        requests = getattr(rpc, "_request_queue", None)
        if call is not None and requests is not None and call.is_active():
            requests.put(None)  # the request generator ends: gRPC sends END_STREAM
            deadline = time.monotonic() + 2.0
            while call.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
        close(rpc)

    polite_close.__wrapped__ = close  # type: ignore[attr-defined]
    return polite_close


if not hasattr(bidi.BidiRpc.close, "__wrapped__"):
    bidi.BidiRpc.close = _close_politely(bidi.BidiRpc.close)  # type: ignore[method-assign]


# Receipt modacks in flight at once, per stream: with one response every few ms and
# Pub/Sub tens of ms away, several are on their way at a time.
RECEIPT_SENDERS = 4
# How long a nack or lease change waits for the receipt modacks sent before it.
RECEIPT_WAIT_S = 5.0

_receipt_thread = threading.local()


class _Manager(StreamingPullManager):  # type: ignore[misc] # the client library is untyped
    """Hands each response's messages over without waiting for their receipt modack.

    The client sends a ModifyAckDeadline request for every response it receives, on the
    one thread that reads the stream, and hands the response's messages over only when
    that request has returned. Pub/Sub sends a stream a message only when an ack has
    freed one of its slots, so at a fast model's rate the responses are small and many,
    and that thread spends a round trip on each: with Pub/Sub 20 ms away, 4 runners and
    8 leased got 51 images/s, 160 with this (docs/benchmark.md, "Pub/Sub's flow
    control, and the receipt modack").

    Here the receipt goes out on a sender thread of its own, and the messages go on at
    once. Receipts that arrive while every sender is busy leave together in one
    request, so requests cannot pile up behind a slow Pub/Sub. So that a receipt cannot
    land after a later nack or deadline change of the same message (and lease it again
    for a minute), those wait until every receipt queued or sent before them has
    returned. With exactly-once delivery the client needs the receipt's answer first
    (the ack ids that expired): there it still waits, as before.

    Private methods of google-cloud-pubsub 2.44 are overridden here (as `_close_politely`
    wraps one of api_core's): a release that renames them makes the receipt wait again,
    and `tests/test_subscriber.py`'s receipt test then fails."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._receipts = ThreadPoolExecutor(
            RECEIPT_SENDERS,
            thread_name_prefix="gannet-receipt",
            initializer=lambda: setattr(_receipt_thread, "is_one", True),
        )
        self._receipts_lock = threading.Lock()
        self._receipts_in_flight: list[Future[None]] = []
        # Received and not yet sent: a free sender takes them all in one request, so when
        # responses come faster than the requests return, the requests do not pile up.
        self._unsent_ids: list[str] = []
        self._unsent_spans: list[Any] = []
        self.add_close_callback(lambda _manager, _reason: self._receipts.shutdown(wait=False))

    def _send_lease_modacks(
        self,
        ack_ids: Any,
        ack_deadline: float,
        opentelemetry_data: Any = None,
        warn_on_invalid: bool = True,
        receipt_modack: bool = False,
    ) -> set[str]:
        if not receipt_modack or self._exactly_once_delivery_enabled():
            expired: set[str] = super()._send_lease_modacks(
                ack_ids, ack_deadline, opentelemetry_data, warn_on_invalid, receipt_modack
            )
            return expired
        with self._receipts_lock:
            self._unsent_ids.extend(ack_ids)
            self._unsent_spans.extend(opentelemetry_data or ())
            # As acks.py keeps its requests: those that returned are let go at each send.
            self._receipts_in_flight = [f for f in self._receipts_in_flight if not f.done()]
            try:
                self._receipts_in_flight.append(
                    self._receipts.submit(self._send_receipts, ack_deadline)
                )
                return set()
            except RuntimeError:  # closing, its senders shut down: send here, as the client
                pass
        self._send_receipts(ack_deadline)
        return set()

    def _send_receipts(self, ack_deadline: float) -> None:
        """A receipt modack that fails is logged, as the client logs its own: the message
        is still handed over, and Pub/Sub keeps it leased to the stream until the stream's
        ack deadline, which the leaser goes on extending."""
        with self._receipts_lock:
            ack_ids, spans = self._unsent_ids, self._unsent_spans
            self._unsent_ids, self._unsent_spans = [], []
        if not ack_ids:  # an earlier sender took them
            return
        try:
            super()._send_lease_modacks(ack_ids, ack_deadline, spans, False, True)
        except Exception:
            log.exception("a receipt modack failed", extra={"fields": {"messages": len(ack_ids)}})

    def send_unary_modack(self, *args: Any, **kwargs: Any) -> Any:
        """Every modack but a receipt: after the receipts queued or sent before it."""
        if not getattr(_receipt_thread, "is_one", False):
            with self._receipts_lock:
                earlier = list(self._receipts_in_flight)
            futures.wait(earlier, timeout=RECEIPT_WAIT_S)
        return super().send_unary_modack(*args, **kwargs)


class _Scheduler(ThreadScheduler):  # type: ignore[misc] # the client library is untyped
    """Tells us when the stream has stopped: the client library shuts the scheduler down
    right after it stops consuming, before it waits for running callbacks and before it
    stops the threads that extend leases and send acks. A callback returns once it has
    handed its message to a runner, so this also waits until every message is settled
    (`settled`); then the acks they queued are sent and their requests waited for
    (acks.py), while the client still holds the messages' leases."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        stream_closed: threading.Event,
        acks: Acks | None,
        settled: Callable[[], None] | None,
    ) -> None:
        super().__init__(executor=executor)
        self._stream_closed = stream_closed
        self._acks = acks
        self._settled = settled

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Any]:
        self._stream_closed.set()
        dropped: list[Any] = super().shutdown(await_msg_callbacks=await_msg_callbacks)
        if await_msg_callbacks and self._settled is not None:
            self._settled()
        if self._acks is not None:
            self._acks.flush()
        return dropped


class Subscriber:
    def __init__(
        self,
        client: pubsub_v1.SubscriberClient,
        subscription_path: str,
        max_messages: int,
        on_message: Callable[[Any], None],
        stream_ack_deadline_s: int = 60,
        max_lease_s: int = 3600,
        acks: Acks | None = None,
        settled: Callable[[], None] | None = None,
    ) -> None:
        """`acks`: where on_message's acks wait to go out together; flushed when the
        stream stops. `settled`: blocks until every message on_message took is settled
        (Dispatcher.wait_settled), for a callback that returns before that."""
        self.acks = acks
        self.settled = settled
        self.client = client
        self.subscription_path = subscription_path
        self.max_messages = max_messages
        self.on_message = on_message
        self.max_lease_s = max_lease_s
        self.stream_ack_deadline_s = stream_ack_deadline_s
        # The default scheduler runs only 10 callbacks at once; ours runs one per lease.
        self._executor = ThreadPoolExecutor(
            max_workers=max_messages, thread_name_prefix="pubsub-callback"
        )
        self._future: StreamingPullFuture | None = None
        self.stream_closed = threading.Event()

    def start(self) -> StreamingPullFuture:
        flow = FlowControl(
            max_messages=self.max_messages,
            max_bytes=512 * 1024 * 1024,
            max_lease_duration=self.max_lease_s,
            # Also the stream's ack deadline: how long messages leased by a pod that died
            # (or by a stream the Pub/Sub emulator failed to close) stay invisible.
            min_duration_per_lease_extension=self.stream_ack_deadline_s,
            max_duration_per_lease_extension=self.stream_ack_deadline_s,
        )
        manager = _Manager(
            self.client,
            self.subscription_path,
            flow_control=flow,
            scheduler=_Scheduler(self._executor, self.stream_closed, self.acks, self.settled),
            await_callbacks_on_shutdown=True,
        )
        self._future = StreamingPullFuture(manager)
        manager.open(callback=self.on_message, on_callback_error=self._future.set_exception)
        log.info(
            "streaming pull open",
            extra={
                "fields": {
                    "subscription": self.subscription_path,
                    "max_messages": self.max_messages,
                }
            },
        )
        return self._future

    def check_exists(self) -> None:
        """Fail at start-up with a clear message instead of a silently dead stream."""
        self.client.get_subscription(request={"subscription": self.subscription_path})

    def stop_pulling(self, timeout: float = 10.0) -> bool:
        """Close the stream and wait until no more messages can arrive.

        Nacks must come after this: a message nacked while the stream is still open is
        sent straight back into the stream that is closing, and is stuck there until
        its lease runs out instead of going to another pod at once.
        """
        if self._future is None:
            return True
        self.stop_pulling_async()
        return self.stream_closed.wait(timeout)

    def stop_pulling_async(self) -> None:
        """Start closing the stream (the client library closes it on a thread of its
        own); `stream_closed` is set once no more messages can arrive. Several lanes'
        streams close at once this way."""
        if self._future is None:
            self.stream_closed.set()
            return
        self._future.cancel()

    def wait_closed(self, timeout: float) -> bool:
        """Wait up to `timeout` for running callbacks to ack or nack, and the stream to end."""
        future = self._future
        if future is None:
            return True
        try:
            future.result(timeout=timeout)
        except TimeoutError:
            log.warning("callbacks still running after the grace period")
            return False
        except Exception as exc:  # noqa: BLE001 - the stream's own error, already logged
            log.info("stream closed", extra={"fields": {"reason": repr(exc)}})
        return True
