"""A gRPC front to the Pub/Sub emulator that keeps each streaming pull within its flow control.

Why it exists: the gcloud 528 emulator ignores a stream's `max_outstanding_messages` and
sends a subscription's messages down it as they come, so the client library holds what
its flow control will not yet hand over, and each message is already in the process
when a slot frees. Pub/Sub itself stops sending at the limit and sends the next message
only when an ack has reached it; the client then modacks each response on receipt
before it hands the messages over. Neither round trip happens against the bare
emulator, so a bench there cannot see what they cost a pod (`gannet bench --plumbing
--pubsub-flow-control`).

What it does: StreamingPull is served here. Each stream keeps the ack ids it was sent
and not yet acked, nacked or expired, and pulls from the emulator (unary Pull, which
waits for messages) only as many as its limit leaves room for. Acknowledge and
ModifyAckDeadline (unary, or within the stream) go on to the emulator and free or
extend the slots; every other call goes on unchanged, as bytes. `max_outstanding_bytes`
is not enforced (gannet's messages are small). Run as `python -m gannet.dev.pubsub_gate
LISTEN TARGET`, behind gannet.dev.relay as the emulator itself would be.

A stream the client half-closes ends at once, as on the emulator, even while a Pull for
it waits there. What such a Pull brings later was never sent, so to Pub/Sub never
delivered; given back to the emulator (a nack), it came again as a second delivery
attempt, which a test of the lease (whose stream ends at each change) then saw about
once in 15 runs. It waits here instead for a stream of its subscription (one waiting
for messages takes it at once; a stream ended for a new lease is followed by the next
at once), and goes back to the emulator if none has taken it within CARRY_S, or at
once when the gate stops.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from google.pubsub_v1 import types

log = logging.getLogger("gannet.dev.pubsub_gate")

_SUBSCRIBER = "/google.pubsub.v1.Subscriber/"
_PULL_WAIT_S = 1.0  # a full stream's wait for an ack, so that an ended stream is noticed
# The emulator answers a Pull with no messages about a second before the Pull's deadline
# (here after about 9 s). A Pull this gate ended by its own deadline first (1 s, once)
# could have been answered with messages the emulator had already leased: they were lost
# to every stream for the subscription's ack deadline (a test waited two minutes for its
# last task). With the emulator answering first, it answers every Pull, with messages
# or none.
_PULL_TIMEOUT_S = 10.0
_UNLIMITED = 1000  # what Pub/Sub leases to a stream that asks for no limit (0)
# How long messages pulled for a stream that ended wait for the next stream of their
# subscription before they are given back: a client reopens within a round trip.
CARRY_S = 1.0
_GIVE_BACK_TIMEOUT_S = 5.0


class Stream:
    """One streaming pull's unacked messages: ack id -> when its deadline passes."""

    def __init__(self, limit: int, deadline_s: float) -> None:
        self.limit = limit or _UNLIMITED
        self.deadline_s = deadline_s
        self.unacked: dict[str, float] = {}
        self.ended = threading.Event()


class _Pull:
    """A Pull in flight for a stream; `abandoned` once the stream stopped waiting for it
    (it ended, or took carried messages instead): what it brings is then carried."""

    def __init__(self, future: Any, subscription: str) -> None:
        self.future = future
        self.subscription = subscription
        self.abandoned = False


class Gate(grpc.GenericRpcHandler):  # type: ignore[misc] # grpc is untyped
    def __init__(self, upstream: grpc.Channel) -> None:
        self._upstream = upstream
        self._pull = upstream.unary_unary(
            _SUBSCRIBER + "Pull",
            request_serializer=types.PullRequest.serialize,
            response_deserializer=types.PullResponse.deserialize,
        )
        self._ack = upstream.unary_unary(
            _SUBSCRIBER + "Acknowledge", request_serializer=types.AcknowledgeRequest.serialize
        )
        self._modack = upstream.unary_unary(
            _SUBSCRIBER + "ModifyAckDeadline",
            request_serializer=types.ModifyAckDeadlineRequest.serialize,
        )
        self._lock = threading.Condition()
        self._owner: dict[str, Stream] = {}  # ack id -> the stream it was sent on
        # subscription -> messages pulled for a stream that ended before they were sent
        self._carried: dict[str, list[Any]] = {}
        self._closing = False

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        if method == _SUBSCRIBER + "StreamingPull":
            return grpc.stream_stream_rpc_method_handler(
                self._streaming_pull,
                request_deserializer=types.StreamingPullRequest.deserialize,
                response_serializer=types.StreamingPullResponse.serialize,
            )
        if method == _SUBSCRIBER + "Acknowledge":
            return self._forward(method, self._acked)
        if method == _SUBSCRIBER + "ModifyAckDeadline":
            return self._forward(method, self._modacked)
        return self._forward(method)

    # -- unary calls: forwarded as bytes, acks and modacks read on the way ----------------

    def _forward(
        self, method: str, seen: Callable[[bytes], None] | None = None
    ) -> grpc.RpcMethodHandler:
        call = self._upstream.unary_unary(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                reply: bytes = call(request, timeout=context.time_remaining())
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            if seen is not None:  # once the emulator has it, as Pub/Sub frees the slot
                seen(request)
            return reply

        return grpc.unary_unary_rpc_method_handler(handle)

    def _acked(self, raw: bytes) -> None:
        self._release(types.AcknowledgeRequest.deserialize(raw).ack_ids)

    def _modacked(self, raw: bytes) -> None:
        request = types.ModifyAckDeadlineRequest.deserialize(raw)
        self._extend(request.ack_ids, request.ack_deadline_seconds)

    def _release(self, ack_ids: Any) -> None:
        with self._lock:
            for ack_id in ack_ids:
                stream = self._owner.pop(ack_id, None)
                if stream is not None:
                    stream.unacked.pop(ack_id, None)
            self._lock.notify_all()

    def _extend(self, ack_ids: Any, seconds: int) -> None:
        if seconds == 0:  # a nack
            self._release(ack_ids)
            return
        until = time.monotonic() + seconds
        with self._lock:
            for ack_id in ack_ids:
                stream = self._owner.get(ack_id)
                if stream is not None and ack_id in stream.unacked:
                    stream.unacked[ack_id] = until

    # -- the streaming pull ---------------------------------------------------------------

    def _streaming_pull(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        first = next(requests)
        stream = Stream(first.max_outstanding_messages, first.stream_ack_deadline_seconds or 10)
        subscription = first.subscription
        reader = threading.Thread(
            target=self._read,
            args=(requests, stream, subscription),
            name="gate-stream-reader",
            daemon=True,
        )
        reader.start()
        try:
            while not stream.ended.is_set() and context.is_active():
                room = self._room(stream)
                if room == 0:
                    continue
                received = self._pulled(stream, subscription, room, context)
                if not received:
                    continue
                if stream.ended.is_set() or not context.is_active():
                    self._carry(subscription, received)  # never sent, so never delivered
                    break
                until = time.monotonic() + stream.deadline_s
                with self._lock:
                    for message in received:
                        stream.unacked[message.ack_id] = until
                        self._owner[message.ack_id] = stream
                yield types.StreamingPullResponse(received_messages=received)
        finally:
            stream.ended.set()
            with self._lock:  # what this stream held no longer counts against anything
                for ack_id in stream.unacked:
                    self._owner.pop(ack_id, None)
                stream.unacked.clear()

    def _pulled(
        self, stream: Stream, subscription: str, room: int, context: grpc.ServicerContext
    ) -> list[Any]:
        """Up to `room` messages for the stream: those carried for its subscription, else
        a Pull's. The emulator holds a Pull about 9 s while it has nothing. If the stream
        ends meanwhile, it ends at once all the same (as a half-closed stream does on
        the emulator; waiting, it held a new lease up by 2 s, until the client cancelled
        it); if messages are carried meanwhile (the emulator hands a new message to any
        of the Pulls waiting, an ended stream's too), the stream takes them at once.
        Either way what the Pull brings later is carried."""
        carried = self._take_carried(subscription, room)
        if carried:
            return carried
        pull = _Pull(
            self._pull.future(
                types.PullRequest(subscription=subscription, max_messages=room),
                timeout=_PULL_TIMEOUT_S,
            ),
            subscription,
        )
        pull.future.add_done_callback(lambda _: self._pull_done(pull))
        with self._lock:
            while (
                not pull.future.done()
                and not stream.ended.is_set()
                and context.is_active()
                and not self._carried.get(subscription)
            ):
                self._lock.wait(timeout=_PULL_WAIT_S)
            pull.abandoned = not pull.future.done()  # read by _pull_done under the lock
        if pull.abandoned:
            if stream.ended.is_set() or not context.is_active():
                return []
            return self._take_carried(subscription, room)
        try:
            return list(pull.future.result().received_messages)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                context.abort(exc.code(), exc.details() or "")
            return []

    def _pull_done(self, pull: _Pull) -> None:
        """Wakes the stream waiting for the Pull; carries what an abandoned one brought."""
        with self._lock:
            abandoned = pull.abandoned
            self._lock.notify_all()
        if abandoned and pull.future.exception() is None:
            received = list(pull.future.result().received_messages)
            if received:
                self._carry(pull.subscription, received)

    def _carry(self, subscription: str, received: list[Any]) -> None:
        with self._lock:
            self._carried.setdefault(subscription, []).extend(received)
            closing = self._closing
            self._lock.notify_all()  # a stream waiting in a Pull of its own takes them
        if closing:  # no stream will take them
            self._give_back(subscription, received)
            return
        timer = threading.Timer(CARRY_S, self._give_back, (subscription, received))
        timer.daemon = True
        timer.start()

    def _take_carried(self, subscription: str, room: int) -> list[Any]:
        with self._lock:
            carried = self._carried.get(subscription, [])
            taken, carried[:] = carried[:room], carried[room:]
            return taken

    def _give_back(self, subscription: str, received: list[Any]) -> None:
        """Those of `received` no stream has taken: back to the subscription, a nack."""
        ids = {m.ack_id for m in received}
        with self._lock:
            carried = self._carried.get(subscription, [])
            left = [m for m in carried if m.ack_id in ids]
            carried[:] = [m for m in carried if m.ack_id not in ids]
        if not left:
            return
        try:
            self._modack(
                types.ModifyAckDeadlineRequest(
                    subscription=subscription,
                    ack_ids=[m.ack_id for m in left],
                    ack_deadline_seconds=0,
                ),
                timeout=_GIVE_BACK_TIMEOUT_S,
            )
        except grpc.RpcError as exc:  # the emulator stopping too: they come back later
            log.warning(
                "could not give %d messages back to the emulator (%s): they come back "
                "after their ack deadline",
                len(left),
                exc.code(),
            )

    def close(self) -> None:
        """At the gate's stop: what it carries goes back to the subscription at once, and
        so does what a Pull still in flight brings before the process exits. Left to
        the emulator, it would come back only after the subscription's ack deadline, to
        a next pod that Pub/Sub would have sent it at once. (The gate does not wait for
        its Pulls: the emulator holds an idle one about 9 s.)"""
        with self._lock:
            self._closing = True
            carried = {subscription: list(held) for subscription, held in self._carried.items()}
        for subscription, received in carried.items():
            self._give_back(subscription, received)

    def _room(self, stream: Stream) -> int:
        """How many more messages the stream may be sent, after waiting (briefly) for one
        to be acked when it is full. Expired leases stop counting, as on Pub/Sub."""
        with self._lock:
            now = time.monotonic()
            for ack_id in [a for a, until in stream.unacked.items() if until <= now]:
                del stream.unacked[ack_id]
                self._owner.pop(ack_id, None)
            room = stream.limit - len(stream.unacked)
            if room <= 0:
                self._lock.wait(timeout=_PULL_WAIT_S)
                return 0
            return room

    def _read(self, requests: Iterator[Any], stream: Stream, subscription: str) -> None:
        """The client's later requests on the stream: heartbeats, a new deadline, and acks
        or modacks when a client sends them this way."""
        try:
            for request in requests:
                if request.stream_ack_deadline_seconds:
                    stream.deadline_s = request.stream_ack_deadline_seconds
                if request.ack_ids:
                    self._ack(
                        types.AcknowledgeRequest(subscription=subscription, ack_ids=request.ack_ids)
                    )
                    self._release(request.ack_ids)
                for ack_id, seconds in zip(
                    request.modify_deadline_ack_ids, request.modify_deadline_seconds, strict=True
                ):
                    self._modack(
                        types.ModifyAckDeadlineRequest(
                            subscription=subscription,
                            ack_ids=[ack_id],
                            ack_deadline_seconds=seconds,
                        )
                    )
                    self._extend([ack_id], seconds)
        except grpc.RpcError:
            pass  # the client went away: the stream ends below, as it would on Pub/Sub
        finally:
            stream.ended.set()
            with self._lock:
                self._lock.notify_all()


def serve(listen_port: int, target: str) -> tuple[grpc.Server, Gate]:
    upstream = grpc.insecure_channel(target)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    gate = Gate(upstream)
    server.add_generic_rpc_handlers((gate,))
    server.add_insecure_port(f"127.0.0.1:{listen_port}")
    server.start()
    log.info(
        "serving Pub/Sub on 127.0.0.1:%d, within each stream's flow control, from %s",
        listen_port,
        target,
    )
    return server, gate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gannet.dev.pubsub_gate",
        description="Serve the Pub/Sub emulator's streaming pulls within each stream's flow "
        "control (max_outstanding_messages), as Pub/Sub itself does.",
    )
    parser.add_argument("listen_port", type=int, help="port clients (or the relay) connect to")
    parser.add_argument("target_port", type=int, help="the emulator's port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server, gate = serve(args.listen_port, f"127.0.0.1:{args.target_port}")
    stop.wait()
    server.stop(grace=1).wait()
    gate.close()


if __name__ == "__main__":
    main()
