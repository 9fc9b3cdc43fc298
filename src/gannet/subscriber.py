"""Streaming pull with flow control, on our own executor, a lease that can change, and a
clean stop.

Each leased message's callback hands it to the runners and returns; the client library
keeps extending the message's lease until it is acked, nacked or dropped and, on
shutdown, waits for every callback (`await_callbacks_on_shutdown=True`) and then, in
`_Scheduler`, for every message to be settled, so that their acks reach Pub/Sub before
the stream closes.
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
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
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
    call cleanly; the cancel that follows is then a no-op. Until the server has ended
    it, the stream is still read: what it sent meanwhile would otherwise stay leased to
    this pod until the stream's ack deadline.
    """

    def polite_close(rpc: Any) -> None:
        call = getattr(rpc, "call", None)
        requests = getattr(rpc, "_request_queue", None)
        # The resumable stream's close calls the plain one's, which is wrapped too: a call
        # already waited for is not waited for twice.
        waited = getattr(rpc, "_gannet_waited_for", None) is call
        if call is not None and requests is not None and call.is_active() and not waited:
            rpc._gannet_waited_for = call
            requests.put(None)  # the request generator ends: gRPC sends END_STREAM
            deadline = time.monotonic() + 2.0
            while call.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
        close(rpc)

    polite_close.__wrapped__ = close  # type: ignore[attr-defined]
    return polite_close


# Both: the resumable stream (the client library's) marks itself finished before it
# calls the plain one's close, and its reading thread stops at that mark, leaving unread
# whatever the server still sends. Wrapped first, it reads on while the server ends
# the call, and those messages are nacked once it has (`_Scheduler`).
for _rpc_class in (bidi.BidiRpc, bidi.ResumableBidiRpc):
    if not hasattr(_rpc_class.close, "__wrapped__"):
        _rpc_class.close = _close_politely(_rpc_class.close)  # type: ignore[method-assign]


# Receipt modacks in flight at once, per stream: with one response every few ms and
# Pub/Sub tens of ms away, several are on their way at a time.
RECEIPT_SENDERS = 4
# How long a nack or lease change waits for the receipt modacks sent before it.
RECEIPT_WAIT_S = 5.0
# How long a stream ended for a new lease may take to end before it is cancelled.
REOPEN_WAIT_S = 2.0

_receipt_thread = threading.local()


class _Manager(StreamingPullManager):  # type: ignore[misc] # the client library is untyped
    """Hands each response's messages over without waiting for their receipt modack, and
    takes a new lease (`resize`, below).

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

    Private methods of google-cloud-pubsub 2.44 are overridden here, and api_core's
    private `_request_queue` and `_wrapped` are read (as `_close_politely` wraps one of
    api_core's methods): a release that renames them makes the receipt wait again, or a
    resize end the stream, and `tests/test_subscriber.py`'s receipt or resize tests then
    fail."""

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
        # Calls ended by `resize`: their end reopens the stream instead of closing it.
        self._ended_calls: list[Any] = []
        self._ended_lock = threading.Lock()
        # The leases of the last streams opened: their messages may still be out, so
        # Pub/Sub may have leased this client as many as their sum.
        self._leases: list[int] = [self.flow_control.max_messages]
        self._lease_ignored = False
        # While a call is being ended (by `resize`, or by `close`), the stream is read
        # whatever the load: see `maybe_pause_consumer`.
        self._ending_call = False
        self._stopping = False

    def _on_response(self, response: Any) -> None:
        """A server that sends more than the lease allows (the gcloud emulator sends all
        it has) would lose what it assigned to a stream that `resize` ends and had not
        sent yet, until the messages' ack deadline: a lease then changes on the client
        alone, with the stream left open. What such a server sent beyond the lease waits
        unread in the stream while every slot is taken, its lease not extended, and the
        emulator sends it again after each ack deadline (up to the dead-letter policy's
        attempts): duplicates, which a committed success acks without inference. Read
        on instead, the whole backlog would wait in the client's hold, extended every
        few seconds; this stays emulator-only (a review measured it: no extension came
        late), so it is left as it is (`GANNET_STREAM_ACK_DEADLINE_S`)."""
        super()._on_response(response)
        leaser = self._leaser
        allowed = sum(self._leases)
        if not self._lease_ignored and leaser is not None and leaser.message_count > allowed:
            self._lease_ignored = True
            log.info(
                "Pub/Sub sent this stream more messages than its lease (as the gcloud "
                "emulator does); a new lease will be kept by the client alone",
                extra={"fields": {"leased": leaser.message_count, "lease": allowed}},
            )

    def maybe_pause_consumer(self) -> None:
        """Not while a call is being ended. The client stops reading the stream when every
        slot is taken and reads on only once a fifth of them are free, so under load what
        Pub/Sub sent after the last acks often waits unread in the stream; and gRPC ends
        a call only once what it received has been read. Unread, a call ended for a new
        lease or at a stop was cancelled after REOPEN_WAIT_S (or two waits of 2 s at a
        stop), and what it held came back only after its ack deadline. Read, the
        messages beyond the lease wait in the client's own hold, leased and not run (or,
        at a stop, held and nacked: `_Scheduler`); the next response on a new call
        pauses the reading again if every slot is still taken."""
        super().maybe_pause_consumer()
        # After it, not before: set after this check, the flag was set after the pause,
        # and whoever set it resumes the reading next.
        if self._ending_call or self._stopping:
            self._read_on()

    def _read_on(self) -> None:
        consumer = self._consumer
        if consumer is not None:
            consumer.resume()

    def maybe_resume_consumer(self) -> None:
        """A slot freed: held messages go out, whether or not the stream is being read.
        The client releases them here only while its reading is paused, as it always is
        on its own while it holds messages (a full lease pauses it). While a call ends,
        `maybe_pause_consumer` reads on, so a message that arrived then with every slot
        taken stayed on hold until the stream's next response; with none to come, for
        good: the last task of a batch sat in a pod left idle, in about 1 run in 15 of
        the test of a distant Pub/Sub's lease (`tests/test_subscriber.py`'s test of a
        message held while its stream ends shows it at once). Not at a stop: what is on
        hold then is nacked when the stream has ended, as the client does."""
        with self._pause_resume_lock:
            consumer = self._consumer
            if (
                self._messages_on_hold.size
                and not self._stopping
                and consumer is not None
                and not consumer.is_paused
                and self._scheduler is not None
                and self._leaser is not None
            ):
                self._maybe_release_messages()
        super().maybe_resume_consumer()

    def close(self, reason: Any = None) -> None:
        """The stop: the stream is read until the server has ended it (`_close_politely`),
        even with every slot taken (`maybe_pause_consumer`)."""
        self._stopping = True
        self._read_on()
        super().close(reason)

    def resize(self, max_messages: int) -> None:
        """Lease up to `max_messages` from now on.

        The client's own flow control takes the new limit at once (messages it holds
        back go to callbacks if there is room now). Pub/Sub reads a stream's limit only
        from the request that opens it, so the stream is ended and opened again with the
        new one: our side of it is half-closed, the server ends the call after what it
        has sent (nothing is lost in between), and that end is taken as one to recover
        from, as the client recovers from Pub/Sub ending a stream. Leases are extended
        and acks sent by requests of their own, so the messages the pod holds keep
        theirs. The gcloud emulator and gannet.dev.pubsub_gate end a half-closed stream
        at once; whether Pub/Sub itself does was not checked from here. Until it has,
        the call is read whatever the load (`maybe_pause_consumer`). A call still open
        after REOPEN_WAIT_S is cancelled, and a message Pub/Sub had sent on it that the
        client had not read then comes back after the stream's ack deadline. Against a
        server that ignores the lease (`_on_response`), only the client's changes."""
        with self._pause_resume_lock:
            self._flow_control = self.flow_control._replace(max_messages=max_messages)
        rpc = self._rpc
        call = getattr(rpc, "call", None)
        if not (self._lease_ignored or self._closed) and call is not None and call.is_active():
            self._leases = [*self._leases[-2:], max_messages]
            with self._ended_lock:
                self._ended_calls = [*self._ended_calls[-3:], call]
            self._ending_call = True
            self._read_on()
            rpc._request_queue.put(None)  # the request generator ends: END_STREAM
            cancel = threading.Timer(REOPEN_WAIT_S, lambda: call.is_active() and call.cancel())
            cancel.daemon = True
            cancel.start()
        self.maybe_resume_consumer()

    def _ended_by_resize(self, exception: BaseException) -> bool:
        """Whether a stream's end is one `resize` asked for. gRPC's callback passes the
        call (the one api_core's wrapper of it wraps); reading a call that ended with an
        error raises api_core's error for it, whose `response` is that call; one that
        ended cleanly raises StopIteration to the thread reading it, which is then the
        call being replaced (still current) or one replaced already (the current call is
        the new, open one)."""
        if self._closed:
            return False
        with self._ended_lock:
            ended = list(self._ended_calls)
        ours = {id(c) for call in ended for c in (call, getattr(call, "_wrapped", call))}
        if id(exception) in ours or id(getattr(exception, "response", None)) in ours:
            return True
        if isinstance(exception, StopIteration):
            current = getattr(self._rpc, "call", None)
            return current is not None and (
                any(current is call for call in ended) or current.is_active()
            )
        return False

    def _should_recover(self, exception: BaseException) -> bool:
        return self._ended_by_resize(exception) or bool(super()._should_recover(exception))

    def _should_terminate(self, exception: BaseException) -> bool:
        return not self._ended_by_resize(exception) and bool(super()._should_terminate(exception))

    def _get_initial_request(self, stream_ack_deadline_seconds: int) -> Any:
        """The request that opens a stream, with the lease as it is now. An end of stream
        that `resize` queued for a call that ended first must not end the new one."""
        requests = getattr(self._rpc, "_request_queue", None)
        if requests is not None:
            with requests.mutex:
                kept = [request for request in requests.queue if request is not None]
                requests.queue.clear()
                requests.queue.extend(kept)
        self._ending_call = False  # the call `resize` ended is over: a new one opens
        return super()._get_initial_request(stream_ack_deadline_seconds)

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
    (acks.py), while the client still holds the messages' leases.

    Messages that arrive once the stream is `closing` (the server ends the call after
    what it has already sent) are held, not run: a stopping pod would refuse them, and a
    nack while the stream is open sends the message straight back down it, where it
    stays until its lease runs out. Returned from `shutdown` as not dispatched, they are
    nacked by the client library once the stream has ended, and go to another pod."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        closing: threading.Event,
        stream_closed: threading.Event,
        acks: Acks | None,
        settled: Callable[[], None] | None,
    ) -> None:
        super().__init__(executor=executor)
        self._closing = closing
        self._stream_closed = stream_closed
        self._acks = acks
        self._settled = settled
        self._held: list[Any] = []
        self._held_lock = threading.Lock()

    def schedule(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._closing.is_set() and args:
            with self._held_lock:
                self._held.append(args[0])  # the message, as the client library passes it
            return
        super().schedule(callback, *args, **kwargs)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Any]:
        self._stream_closed.set()
        dropped: list[Any] = super().shutdown(await_msg_callbacks=await_msg_callbacks)
        with self._held_lock:
            if self._held:
                log.info(
                    "messages that arrived while the stream closed are nacked now",
                    extra={"fields": {"nacked": len(self._held)}},
                )
            dropped += self._held
            self._held = []
        if await_msg_callbacks and self._settled is not None:
            self._settled()
        if self._acks is not None:
            self._acks.flush()
        return dropped


MIN_RETRY_BACKOFF_S = 1.0


def policy_warnings(subscription: Any, dead_letter_topic: str) -> list[str]:
    """What a subscription made by hand may lack, which terraform's has: a retry policy
    (without one a nacked message comes back at once, so a transient failure, a bucket
    or a database gone for seconds, spends a task's delivery attempts within a second
    and the pod retries as fast as it can: 50 times a second, 89 % of its CPU, measured
    on the emulator, which has none) and a dead-letter policy to the lane's dead-letter
    topic (without one a task that keeps failing is retried until the subscription's
    retention drops it; to another topic, it lands where `gannet dead-letters` does not
    look). A retry policy without a minimum backoff has Pub/Sub's default, 10 s."""
    name = subscription.name
    warnings = []
    retry = subscription.retry_policy if "retry_policy" in subscription else None
    if retry is None:
        warnings.append(
            f"subscription {name} has no retry policy: a nacked message comes back at "
            "once, so a transient failure spends a task's delivery attempts within a "
            "second; give it one (terraform's: 10 s to 600 s)"
        )
    elif "minimum_backoff" in retry and retry.minimum_backoff.total_seconds() < MIN_RETRY_BACKOFF_S:
        warnings.append(
            f"subscription {name}'s retry policy waits {retry.minimum_backoff.total_seconds():g} "
            "s at least: a transient failure spends a task's delivery attempts within "
            "seconds; raise its minimum backoff (terraform's: 10 s)"
        )
    dead = subscription.dead_letter_policy if "dead_letter_policy" in subscription else None
    if dead is None or not dead.dead_letter_topic:
        warnings.append(
            f"subscription {name} has no dead-letter policy: a task that keeps failing is "
            "retried until the subscription's retention drops it; give it one "
            f"(terraform's: {dead_letter_topic}, 5 attempts)"
        )
    elif dead.dead_letter_topic != dead_letter_topic:
        warnings.append(
            f"subscription {name}'s dead-letter policy goes to {dead.dead_letter_topic}, not "
            f"to the lane's {dead_letter_topic}, where the daemon quarantines poison and "
            "`gannet dead-letters` looks"
        )
    return warnings


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
        most_messages: int | None = None,
    ) -> None:
        """`acks`: where on_message's acks wait to go out together; flushed when the
        stream stops. `settled`: blocks until every message on_message took is settled
        (Dispatcher.wait_settled), for a callback that returns before that.
        `most_messages`: the largest lease `resize` may set (default `max_messages`)."""
        self.acks = acks
        self.settled = settled
        self.client = client
        self.subscription_path = subscription_path
        self.max_messages = max_messages
        self.on_message = on_message
        self.max_lease_s = max_lease_s
        self.stream_ack_deadline_s = stream_ack_deadline_s
        self.most_messages = max(max_messages, most_messages or 0)
        # The default scheduler runs only 10 callbacks at once; ours runs one per lease.
        self._executor = ThreadPoolExecutor(
            max_workers=self.most_messages, thread_name_prefix="pubsub-callback"
        )
        self._future: StreamingPullFuture | None = None
        self._manager: _Manager | None = None
        self.closing = threading.Event()
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
            scheduler=_Scheduler(
                self._executor, self.closing, self.stream_closed, self.acks, self.settled
            ),
            await_callbacks_on_shutdown=True,
        )
        self._future = StreamingPullFuture(manager)
        self._manager = manager
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

    def resize(self, max_messages: int) -> None:
        """Lease up to `max_messages` from now on (`_Manager.resize`); lease.py decides."""
        self.max_messages = max_messages
        if self._manager is not None:
            self._manager.resize(max_messages)

    def load(self) -> float:
        """The client's flow-control load: leased and handed to callbacks, not yet acked
        or nacked, over the lease (1.0: every slot taken)."""
        return 0.0 if self._manager is None else float(self._manager.load)

    def check_exists(self) -> Any:
        """Fail at start-up with a clear message instead of a silently dead stream. The
        subscription, whose policies the daemon checks (policy_warnings)."""
        return self.client.get_subscription(request={"subscription": self.subscription_path})

    def ask(self, timeout_s: float) -> None:
        """Whether Pub/Sub answers within `timeout_s` (pubsub_watch.py). Retried within
        it: a channel that lost its connection fails calls at once until it reconnects
        (gRPC's backoff, a second or more after Pub/Sub is back)."""
        retry = Retry(
            predicate=if_exception_type(gexc.ServiceUnavailable),
            initial=0.5,
            maximum=2.0,
            timeout=timeout_s,
        )
        self.client.get_subscription(
            request={"subscription": self.subscription_path}, retry=retry, timeout=timeout_s
        )

    def stop_pulling(self, timeout: float = 10.0) -> bool:
        """Close the stream and wait until no more messages can arrive.

        Nacks must come after this: a message nacked while the stream is still open can
        be sent straight back into the stream that is closing. (Those that arrive while
        it closes are held, and nacked by the client library once it has ended.)
        """
        if self._future is None:
            return True
        self.stop_pulling_async()
        return self.stream_closed.wait(timeout)

    def stop_pulling_async(self) -> None:
        """Start closing the stream (the client library closes it on a thread of its
        own); `stream_closed` is set once no more messages can arrive. Several lanes'
        streams close at once this way."""
        self.closing.set()
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
