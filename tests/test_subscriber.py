"""The streaming-pull subscriber in-process, against the real Pub/Sub emulator.

What a pod's users notice of it: every message is delivered and its ack sticks; no more
messages run at once than flow control allows; on stop, a callback still running gets
to settle its ack and new messages go to the next puller instead of a dead stream; a
nack brings the message back with a higher delivery attempt.

An unacked message stays invisible while its lease lasts, so "a pull gets nothing" alone
cannot tell an ack from a lost one. `Stack.unacked` therefore first ends every lease the
test's messages still have (ack deadline 0, as if it ran out) and then pulls: an acked
message stays gone, any other comes back.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import Started, pubsub_as_pods_meet_it, pubsub_at, wait_until
from google.api_core import exceptions as gexc

from gannet import clients
from gannet.acks import Acks
from gannet.dev.local_services import free_port
from gannet.metrics import Metrics
from gannet.settings import Settings
from gannet.subscriber import Subscriber

WAIT_S = 15


@contextmanager
def subscribed(
    stack,
    max_messages: int,
    on_message: Callable[[Any], None],
    gate: threading.Event | None,
    settings: Settings | None = None,
    most_messages: int | None = None,
) -> Iterator[Subscriber]:
    """A started Subscriber on the stack's subscription, always stopped at the end;
    through `settings`' Pub/Sub when given."""
    subscriber = Subscriber(
        clients.pubsub_clients(settings or stack.settings)[1],
        stack.settings.subscription_path(),
        max_messages,
        on_message,
        most_messages=most_messages,
    )
    subscriber.start()
    try:
        yield subscriber
    finally:
        if gate is not None:
            gate.set()  # a failed assertion must not leave callbacks blocked
        subscriber.stop_pulling(timeout=10)
        subscriber.wait_closed(timeout=10)


def pulled_by_another(stack, count: int, within_s: float) -> list[bytes]:
    """What another pod pulls from the subscription within `within_s` (up to `count`)."""
    pulled: list[bytes] = []
    deadline = time.monotonic() + within_s
    while len(pulled) < count and time.monotonic() < deadline:
        pulled += [m.data for m in stack.pull(stack.settings.subscription, timeout_s=2)]
    return pulled


class Recorder:
    """A callback that records each delivery, optionally waits on `gate`, then does
    `settle(message)` (ack by default). Tracks how many callbacks run at once."""

    def __init__(
        self,
        gate: threading.Event | None = None,
        settle: Callable[[Any], None] = lambda m: m.ack(),
    ) -> None:
        self.gate = gate
        self.settle = settle
        self.delivered: list[Any] = []
        self.finished: list[Any] = []
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, message: Any) -> None:
        with self._lock:
            self.delivered.append(message)
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            if self.gate is not None:
                assert self.gate.wait(WAIT_S), "the test never opened the gate"
            self.settle(message)
        finally:
            with self._lock:
                self.running -= 1
                self.finished.append(message)

    def data(self) -> list[bytes]:
        with self._lock:
            return sorted(m.data for m in self.delivered)


def test_every_message_is_delivered_once_and_its_ack_sticks(stack):
    """Five messages, a callback that acks: each is delivered exactly once, and none
    comes back even when every lease is ended."""
    bodies = sorted(f"message-{i}".encode() for i in range(5))
    recorder = Recorder()
    with subscribed(stack, 4, recorder, None) as subscriber:
        for body in bodies:
            stack.publish_raw(body)
        wait_until(lambda: len(recorder.finished) == len(bodies), "five messages acked")
        assert subscriber.stop_pulling(timeout=10) is True
        assert subscriber.wait_closed(timeout=10) is True
    assert recorder.data() == bodies
    assert all(m.delivery_attempt == 1 for m in recorder.delivered)
    assert stack.unacked(recorder.delivered) == []


def test_flow_control_runs_at_most_max_messages_callbacks_at_once(stack):
    """max_messages=2 and six messages whose callbacks block: two run, the other four
    wait their turn; once the work can finish, all six run (never more than two at
    once) and each is acked."""
    gate = threading.Event()
    recorder = Recorder(gate)
    bodies = sorted(f"held-{i}".encode() for i in range(6))
    with subscribed(stack, 2, recorder, gate):
        for body in bodies:
            stack.publish_raw(body)
        wait_until(lambda: len(recorder.delivered) >= 2, "two callbacks running")
        time.sleep(1.0)  # room for a third callback to start, if flow control let it
        assert len(recorder.delivered) == 2 and recorder.running == 2

        gate.set()
        wait_until(lambda: len(recorder.finished) == len(bodies), "all six acked")
    assert recorder.data() == bodies
    assert recorder.peak == 2
    assert stack.unacked(recorder.delivered) == []


def test_stop_waits_for_a_running_callback_and_its_ack_sticks(stack):
    """stop_pulling returns while a callback is still working; wait_closed then waits for
    it, and the ack it sends after the stream stopped still reaches Pub/Sub."""
    gate = threading.Event()
    recorder = Recorder(gate)
    with subscribed(stack, 4, recorder, gate) as subscriber:
        stack.publish_raw(b"in flight at shutdown")
        wait_until(lambda: len(recorder.delivered) == 1, "the callback running")
        assert subscriber.stop_pulling(timeout=10) is True
        assert recorder.finished == []

        opener = threading.Timer(0.5, gate.set)  # the work finishes after the stop
        opener.start()
        assert subscriber.wait_closed(timeout=10) is True
        assert len(recorder.finished) == 1, "wait_closed returned before the callback"
    assert stack.unacked(recorder.delivered) == []


def test_acks_held_for_a_batch_are_sent_before_the_stream_stops(stack):
    """The daemon hands acks over together (acks.py). One still waiting when the stream
    stops must reach Pub/Sub before the client stops sending: with a window far longer
    than the test, only the flush at shutdown can send it."""
    gate = threading.Event()
    client = clients.pubsub_clients(stack.settings)[1]
    acks = Acks(client, stack.settings.subscription_path(), window_s=3600)
    recorder = Recorder(gate, settle=acks.ack)
    subscriber = Subscriber(client, stack.settings.subscription_path(), 4, recorder, acks=acks)
    subscriber.start()
    try:
        for body in (b"first", b"second", b"in flight at shutdown"):
            stack.publish_raw(body)
        wait_until(lambda: len(recorder.delivered) == 3, "three callbacks running")
        assert subscriber.stop_pulling(timeout=10) is True
        threading.Timer(0.3, gate.set).start()  # they settle after the stop
        assert subscriber.wait_closed(timeout=10) is True
    finally:
        gate.set()
        acks.close()
    assert len(recorder.finished) == 3
    assert stack.unacked(recorder.delivered) == []


def test_acks_sent_by_the_daemon_stick_and_free_their_flow_control_slots(stack):
    """acks.py sends the Acknowledge requests itself and then drops each message from
    the client's lease management. With 2 messages leased at most, 8 messages all pass
    only if each ack frees its slot; none comes back when every lease is ended."""
    client = clients.pubsub_clients(stack.settings)[1]
    acks = Acks(client, stack.settings.subscription_path())
    recorder = Recorder(settle=acks.ack)
    bodies = sorted(f"slot {i}".encode() for i in range(8))
    try:
        with subscribed(stack, 2, recorder, None):
            for body in bodies:
                stack.publish_raw(body)
            wait_until(lambda: len(recorder.finished) == len(bodies), "eight messages settled")
            acks.flush()
    finally:
        acks.close()
    assert recorder.data() == bodies
    assert recorder.peak <= 2
    assert stack.unacked(recorder.delivered) == []


class CountedAcks(Acks):
    """Acks that record how many ack ids each Acknowledge request carried."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[int] = []

    def _request(self, ack_ids: list[str]) -> None:
        self.requests.append(len(ack_ids))
        super()._request(ack_ids)


def test_acks_that_trickle_in_go_a_few_to_a_request_and_a_lone_one_still_leaves(stack):
    """At a slow pace, one settled message every 10 ms where the window is 20 ms (a pod
    on large photos), each request used to carry one or two acks, so each image paid a
    whole request of the daemon's GIL and Pub/Sub's CPU. Now a window with fewer than
    `few` acks waits for more, up to the longest wait from the oldest: twelve acks go
    in requests of four or more (but the last, which may be left with fewer), three or
    four requests instead of about six. A lone ack still leaves within that wait, and
    every ack sticks."""
    client = clients.pubsub_clients(stack.settings)[1]
    acks = CountedAcks(client, stack.settings.subscription_path(), few=4, longest_wait_s=0.3)
    recorder = Recorder(settle=lambda message: None)  # settled below, one by one
    bodies = sorted(f"trickle {i}".encode() for i in range(13))
    try:
        with subscribed(stack, len(bodies), recorder, None):
            for body in bodies:
                stack.publish_raw(body)
            wait_until(lambda: len(recorder.delivered) == len(bodies), "all delivered")
            *trickle, lone = recorder.delivered
            for message in trickle:
                acks.ack(message)
                time.sleep(0.01)
            wait_until(lambda: sum(acks.requests) == len(trickle), "the twelve acks sent")
            assert len(acks.requests) <= 4, acks.requests
            assert all(n >= 4 for n in acks.requests[:-1]), acks.requests
            acks.ack(lone)  # alone, it leaves once it has waited 0.3 s: well within 5
            wait_until(lambda: sum(acks.requests) == len(bodies), "the lone ack sent", 5)
            assert acks.requests[-1] == 1
    finally:
        acks.close()
    assert stack.unacked(recorder.delivered) == []


def test_an_ack_request_that_fails_is_logged_and_frees_the_slot_all_the_same(stack, caplog):
    """Acknowledge sent for a subscription Pub/Sub does not know fails (NotFound). The
    failure is logged, and the message is dropped from lease management anyway: the next
    message is delivered instead of waiting behind a slot that is never freed, and the
    unacked one comes back later, as after a crash (then acked as a duplicate). Each lost
    ack is counted, so that a pod whose acks keep failing shows on its metrics and not
    only in its log (its outcomes still say succeeded)."""
    client = clients.pubsub_clients(stack.settings)[1]
    project = stack.settings.project
    metrics = Metrics()
    acks = Acks(
        client,
        f"projects/{project}/subscriptions/no-such-sub",
        lost=metrics.acks_failed.labels("default").inc,
    )
    recorder = Recorder(settle=acks.ack)
    try:
        with subscribed(stack, 1, recorder, None):
            stack.publish_raw(b"first")
            stack.publish_raw(b"second")
            wait_until(lambda: len(recorder.finished) >= 2, "the second message delivered")
            acks.flush()
    finally:
        acks.close()
    assert {m.data for m in recorder.delivered} >= {b"first", b"second"}
    assert "acks not delivered" in caplog.text
    failed = metrics.registry.get_sample_value("gannet_acks_failed_total", {"lane": "default"})
    assert failed == len(recorder.delivered)
    came_back = {m.data for m in stack.unacked(recorder.delivered)}
    assert came_back == {b"first", b"second"}


def test_an_ack_request_waits_for_pubsub_within_its_time(stack, caplog):
    """Pub/Sub is out of reach when an ack leaves: nothing listens where the acks'
    client points until a relay to the emulator starts there a second later. The
    request waits for the channel to connect (within acks.REQUEST_TIMEOUT_S) instead of
    failing at once, so the ack sticks: none is logged as undelivered, and the message
    does not come back."""
    port = free_port()
    unreachable = pubsub_at(stack, port)
    acks = Acks(clients.pubsub_clients(unreachable)[1], stack.settings.subscription_path())
    recorder = Recorder(settle=acks.ack)
    relay = None
    try:
        with subscribed(stack, 1, recorder, None):
            stack.publish_raw(b"acked late")
            wait_until(lambda: len(recorder.finished) == 1, "the message settled")
            time.sleep(1.0)
            relay = Started("gannet.dev.relay", str(stack.services.ports.pubsub), port=port)
            acks.flush()
    finally:
        acks.close()
        if relay is not None:
            relay.stop()
    assert "acks not delivered" not in caplog.text
    assert stack.unacked(recorder.delivered) == []


ROUND_TRIP_MS = 1000


@pytest.fixture
def distant_pubsub(stack) -> Iterator[Settings]:
    """The session's Pub/Sub as a pod meets Pub/Sub itself, every round trip taking
    ROUND_TRIP_MS."""
    with pubsub_as_pods_meet_it(stack, ROUND_TRIP_MS) as settings:
        yield settings


def test_a_message_is_handed_over_before_its_receipt_modack_returns(stack, distant_pubsub):
    """The client library modacks each response it receives, and on its own hands the
    messages over only when that request has returned: a round trip added to every
    message's turn through a slot, and with Pub/Sub sending a message each time an ack
    frees a slot, a pod's pace (subscriber._Manager).

    Here Pub/Sub is a 1 s round trip away and the subscriber leases one message at a
    time. A turn is then the lone ack's wait in acks.py (100 ms), the ack's way to
    Pub/Sub and the next message's way back: about 1.1 s. Waiting for the receipt as
    well makes it about 2 s (2.03 s each with a 20 ms wait, measured with the client's
    own manager)."""
    client = clients.pubsub_clients(distant_pubsub)[1]
    acks = Acks(client, distant_pubsub.subscription_path())
    arrived: list[float] = []

    def settle(message: Any) -> None:
        arrived.append(time.monotonic())
        acks.ack(message)

    recorder = Recorder(settle=settle)
    bodies = sorted(f"turn {i}".encode() for i in range(4))
    for body in bodies:
        stack.publish_raw(body)
    try:
        with subscribed(stack, 1, recorder, None, settings=distant_pubsub):
            wait_until(lambda: len(recorder.finished) == len(bodies), "four turns", 30)
            acks.flush()
    finally:
        acks.close()
    assert recorder.data() == bodies
    turns = [round(later - earlier, 2) for earlier, later in itertools.pairwise(arrived)]
    assert all(0.9 < turn < 1.6 for turn in turns), f"seconds between deliveries: {turns}"


@pytest.fixture
def gated_pubsub(stack) -> Iterator[Settings]:
    """The session's Pub/Sub holding each stream to its lease, as Pub/Sub itself does,
    with no added latency."""
    with pubsub_as_pods_meet_it(stack) as settings:
        yield settings


def settles_to(count: Callable[[], int], expected: int, what: str) -> None:
    """`count()` reaches `expected` and stays there for half a second (no more arrive)."""
    wait_until(lambda: count() >= expected, what)
    time.sleep(0.5)
    assert count() == expected, f"{what}: {count()}, not {expected}"


def test_a_resized_lease_reaches_pubsub_on_a_reopened_stream_and_loses_nothing(stack, gated_pubsub):
    """Pub/Sub reads a stream's lease only when the stream opens. Leasing 2, the pod is
    sent 2 of 8 messages; resized to 5, its stream is reopened, Pub/Sub sends the new
    stream more, and 3 more callbacks run while the first 2 still hold theirs (the
    client's own flow control counts those); resized to 1, the rest come one at a time.
    Every message is delivered exactly once and acked."""
    client = clients.pubsub_clients(gated_pubsub)[1]
    acks = Acks(client, gated_pubsub.subscription_path())
    gate = threading.Event()
    recorder = Recorder(gate, settle=acks.ack)
    bodies = sorted(f"resized {i}".encode() for i in range(8))
    for body in bodies:
        stack.publish_raw(body)
    try:
        with subscribed(stack, 2, recorder, gate, gated_pubsub, most_messages=5) as subscriber:
            settles_to(lambda: len(recorder.delivered), 2, "delivered while leasing 2")
            assert subscriber.load() == 1.0
            subscriber.resize(5)
            settles_to(lambda: len(recorder.delivered), 5, "delivered after leasing 5")
            subscriber.resize(1)
            gate.set()
            wait_until(lambda: len(recorder.finished) == len(bodies), "all eight settled")
            acks.flush()
            assert not subscriber._future.done(), "the stream must live on after a resize"
    finally:
        acks.close()
    assert recorder.data() == bodies  # each once
    assert stack.unacked(recorder.delivered) == []


def acked_one_by_one(client: Any, settings: Settings, messages: list[Any]) -> None:
    """Ack each message and free its slot, one after another: each ack lets Pub/Sub send
    the stream one more message, in a response of its own."""
    for message in messages:
        client.acknowledge(subscription=settings.subscription_path(), ack_ids=[message.ack_id])
        message.drop()
        time.sleep(0.3)


def acked_at_once(client: Any, settings: Settings, messages: list[Any]) -> None:
    """Ack the messages in one request and free their slots."""
    client.acknowledge(
        subscription=settings.subscription_path(), ack_ids=[m.ack_id for m in messages]
    )
    for message in messages:
        message.drop()


def test_a_lease_shrunk_while_the_client_holds_back_loses_nothing_pubsub_sent(stack, gated_pubsub):
    """The client stops reading its stream when every slot is taken and reads on only
    once a fifth of them are free, so under load what Pub/Sub sends after an ack often
    waits unread in the stream. Leasing 8, all 8 running, one acked: Pub/Sub sends a
    ninth, which waits there. The lease shrinks to 7 (lease.py, a crowded lane) and the
    stream is ended for the new lease: that ninth message must still reach the pod.
    Unread, the stream could not end, was cancelled 2 s later, and the message came back
    only after its ack deadline (30 s here, 60 s in a pod)."""
    client = clients.pubsub_clients(gated_pubsub)[1]
    recorder = Recorder(settle=lambda message: None)  # settled below
    bodies = sorted(f"shrunk {i}".encode() for i in range(10))
    for body in bodies:
        stack.publish_raw(body)
    with subscribed(stack, 8, recorder, None, gated_pubsub) as subscriber:
        settles_to(lambda: len(recorder.delivered), 8, "delivered while leasing 8")
        acked_one_by_one(client, gated_pubsub, recorder.delivered[:1])
        subscriber.resize(7)
        time.sleep(2.5)  # slow tasks: nothing settles while the stream ends and reopens
        acked_one_by_one(client, gated_pubsub, recorder.delivered[1:8])
        wait_until(lambda: len(recorder.delivered) == 10, "the last two delivered", 10)
        acked_one_by_one(client, gated_pubsub, recorder.delivered[8:])
        assert not subscriber._future.done(), "the stream must live on after a resize"
    assert recorder.data() == bodies  # each once
    assert stack.unacked(recorder.delivered) == []


def test_a_message_held_while_its_stream_ends_runs_once_a_slot_frees(stack):
    """Pub/Sub 600 ms away (300 ms each way), a lease of 2, both messages running. Both
    are acked, so Pub/Sub sends two more in one response; before it arrives the lease
    grows to 3 (lease.py, runners idle), which ends the stream for a new one. The client
    still counts the two acked messages until their slots are freed (acks.py frees them
    when the ack's request has returned), so the third runs and the fourth goes on
    hold. Once the slots are freed the fourth must run. It stayed on hold for good: the
    client hands held messages over only while it has stopped reading the stream, and
    it reads on while a stream ends; no response came after it, and the pod sat idle."""
    gate = Started("gannet.dev.pubsub_gate", str(stack.services.ports.pubsub))
    relay = Started("gannet.dev.relay", str(gate.port), "--latency-ms=600")
    near, far = pubsub_at(stack, gate.port), pubsub_at(stack, relay.port)
    acker = clients.pubsub_clients(near)[1]  # acks reach the gate at once
    recorder = Recorder(settle=lambda message: None)  # settled below
    bodies = [f"held {i}".encode() for i in range(4)]
    for body in bodies[:2]:
        stack.publish_raw(body)
    try:
        with subscribed(stack, 2, recorder, None, far, most_messages=3) as subscriber:
            settles_to(lambda: len(recorder.delivered), 2, "delivered while leasing 2")
            for body in bodies[2:]:
                stack.publish_raw(body)
            acked = recorder.delivered[:2]
            acker.acknowledge(
                subscription=near.subscription_path(), ack_ids=[m.ack_id for m in acked]
            )
            subscriber.resize(3)  # the next two are on their way, 300 ms off
            settles_to(lambda: len(recorder.delivered), 3, "delivered while two slots count")
            for message in acked:
                message.drop()
            wait_until(lambda: len(recorder.delivered) == 4, "the held message handed over", 5)
            acked_at_once(acker, near, recorder.delivered[2:])
    finally:
        relay.stop()
        gate.stop()
    assert recorder.data() == bodies
    assert stack.unacked(recorder.delivered) == []


def test_a_resized_lease_holds_the_callbacks_the_client_runs_at_once(stack, caplog):
    """The emulator sends all it has whatever the lease, so there the client's own flow
    control is the lease: resized from 2 to 4, the messages it held back start at once.
    The subscriber notices that the server ignores the lease and leaves the stream open
    (ending it would strand what the emulator assigned to it and had not sent)."""
    caplog.set_level(logging.INFO, logger="gannet.subscriber")
    gate = threading.Event()
    recorder = Recorder(gate)
    for i in range(6):
        stack.publish_raw(f"held {i}".encode())
    with subscribed(stack, 2, recorder, gate, most_messages=4) as subscriber:
        settles_to(lambda: recorder.running, 2, "callbacks running while leasing 2")
        subscriber.resize(4)
        settles_to(lambda: recorder.running, 4, "callbacks running after leasing 4")
        gate.set()
        wait_until(lambda: len(recorder.finished) == 6, "all six settled")
        assert not subscriber._future.done(), "the stream must live on after a resize"
    assert "more messages than its lease" in caplog.text
    assert stack.unacked(recorder.delivered) == []
    assert sorted(m.data for m in recorder.delivered) == [f"held {i}".encode() for i in range(6)]


def test_a_nacked_message_comes_back_with_a_higher_delivery_attempt(stack):
    """A nack (a transient error) returns the message to the subscription; it is
    delivered again, counted as attempt 2, and the ack of that attempt sticks."""

    def nack_first(message: Any) -> None:
        if message.delivery_attempt == 1:
            message.nack()
        else:
            message.ack()

    recorder = Recorder(settle=nack_first)
    with subscribed(stack, 4, recorder, None):
        stack.publish_raw(b"retry me")
        wait_until(lambda: len(recorder.finished) >= 2, "a second delivery")
    attempts = [(m.data, m.delivery_attempt) for m in recorder.delivered]
    assert attempts[:2] == [(b"retry me", 1), (b"retry me", 2)]
    assert stack.unacked(recorder.delivered) == []


def test_after_stop_new_messages_go_to_the_next_puller_at_once(stack):
    """Once stopped, the subscriber's stream is really gone: messages published next are
    pulled by another pod at once, not leased to a dead stream until its deadline (what
    the emulator does after a plain cancel, to all but the last of them)."""
    recorder = Recorder()
    with subscribed(stack, 4, recorder, None) as subscriber:
        stack.publish_raw(b"before the stop")
        wait_until(lambda: len(recorder.finished) == 1, "the first message acked")
        assert subscriber.stop_pulling(timeout=10) is True
        assert subscriber.wait_closed(timeout=10) is True

    bodies = [f"after the stop {i}".encode() for i in range(5)]
    for body in bodies:
        stack.publish_raw(body)
    assert sorted(pulled_by_another(stack, len(bodies), within_s=3)) == bodies
    assert recorder.data() == [b"before the stop"]


def test_messages_that_arrive_while_the_stream_closes_go_to_the_next_puller_at_once(stack, caplog):
    """A stream ends when the server ends it, and Pub/Sub (here 150 ms away each way)
    still sends what it had on its way. A stopping pod refuses those messages;
    nacked while the stream was still open, they went straight back down it and came
    back to anyone only after their lease (28 s in this test). Held until the stream has
    ended and nacked then, the next pod pulls them at once, and no callback ran them."""
    caplog.set_level(logging.INFO, logger="gannet.subscriber")
    stopping = threading.Event()
    recorder = Recorder(settle=lambda m: m.nack() if stopping.is_set() else m.ack())
    bodies = [f"on the way {i}".encode() for i in range(3)]
    with pubsub_as_pods_meet_it(stack, latency_ms=300) as settings:
        with subscribed(stack, 4, recorder, None, settings=settings) as subscriber:
            stack.publish_raw(b"before the stop")
            wait_until(lambda: len(recorder.finished) == 1, "the first message acked")
            for body in bodies:
                stack.publish_raw(body)
            stopping.set()  # as the daemon's pool stops taking work
            subscriber.stop_pulling_async()
            assert subscriber.stream_closed.wait(10)
            assert subscriber.wait_closed(timeout=10)
    assert sorted(pulled_by_another(stack, len(bodies), within_s=5)) == bodies
    assert recorder.data() == [b"before the stop"]
    # They did arrive in the close (else this test shows nothing): the stream held them.
    assert "arrived while the stream closed" in caplog.text


def test_what_pubsub_sent_while_the_client_held_back_goes_to_the_next_puller_at_once(
    stack, gated_pubsub
):
    """A pod under load stops: every slot of its lease is taken, so the client has
    stopped reading its stream, and what Pub/Sub sent after the last acks waits there
    unread. Leasing 20, all 20 running, 4 acked one by one: Pub/Sub sends 4 more, in 4
    responses. The stop must read them while the server ends the stream, and they are
    nacked once it has: the next pod pulls them at once. Unread, the stream could not
    end: the stop waited 2 s twice, then cancelled it, and 3 of the 4 came back only
    after their ack deadline (30 s here)."""
    client = clients.pubsub_clients(gated_pubsub)[1]
    recorder = Recorder(settle=lambda message: None)  # settled below
    settled = threading.Event()
    subscriber = Subscriber(
        client, gated_pubsub.subscription_path(), 20, recorder, settled=lambda: settled.wait(10)
    )
    for i in range(24):
        stack.publish_raw(f"loaded {i:02}".encode())
    subscriber.start()
    try:
        settles_to(lambda: len(recorder.delivered), 20, "delivered while leasing 20")
        acked_one_by_one(client, gated_pubsub, recorder.delivered[:4])
        started = time.monotonic()
        subscriber.stop_pulling_async()
        assert subscriber.stream_closed.wait(10)
        took = time.monotonic() - started
        # The stream has ended: the other 16 are only settled now, and the pace that made
        # Pub/Sub send one message per ack above (0.3 s apiece) does nothing here.
        acked_at_once(client, gated_pubsub, recorder.delivered[4:20])
        settled.set()
        assert subscriber.wait_closed(timeout=10)
    finally:
        settled.set()
        subscriber.stop_pulling(timeout=10)
    on_the_way = [f"loaded {i:02}".encode() for i in range(20, 24)]
    assert sorted(pulled_by_another(stack, 4, within_s=5)) == on_the_way
    assert len(recorder.delivered) == 20, "a stopping stream ran what arrived"
    assert took < 2.0, f"the stream took {took:.1f} s to stop"


def test_a_missing_subscription_fails_the_start_up_check(stack):
    """A wrong GANNET_SUBSCRIPTION is an error at start-up, not a silently dead stream."""
    client = clients.pubsub_clients(stack.settings)[1]
    project = stack.settings.project
    missing = Subscriber(client, f"projects/{project}/subscriptions/no-such-sub", 4, print)
    with pytest.raises(gexc.NotFound):
        missing.check_exists()
    Subscriber(client, stack.settings.subscription_path(), 4, print).check_exists()


def test_a_subscription_without_retry_or_dead_letter_policy_is_warned_of(stack):
    """A subscription made by hand may lack terraform's policies: without a retry policy
    a nacked message comes back at once (a missing bucket: 50 retries a second at 89 %
    of a core, every task's attempts spent within a second); without a dead-letter
    policy a task that keeps failing is retried until the retention drops it; with one
    to another topic its dead letters land where `gannet dead-letters` does not look.
    A retry policy without a minimum backoff has Pub/Sub's default (10 s): no warning.
    Read from real subscriptions, the emulator's (which keep what they were made with)."""
    from gannet.subscriber import policy_warnings

    project = stack.settings.project
    topic = stack.settings.topic_path()
    dead = f"projects/{project}/topics/{stack.settings.dead_letter_topic}"
    made = {
        "bare": {},
        "kept": {
            "retry_policy": {"minimum_backoff": {"seconds": 10}},
            "dead_letter_policy": {"dead_letter_topic": dead, "max_delivery_attempts": 5},
        },
        "max-only": {
            "retry_policy": {"maximum_backoff": {"seconds": 600}},
            "dead_letter_policy": {"dead_letter_topic": topic, "max_delivery_attempts": 5},
        },
        "hasty": {
            "retry_policy": {"minimum_backoff": {"nanos": 100_000_000}},
            "dead_letter_policy": {"dead_letter_topic": dead, "max_delivery_attempts": 5},
        },
    }
    said: dict[str, list[str]] = {}
    try:
        for name, policies in made.items():
            path = f"projects/{project}/subscriptions/{stack.tenant}-{name}"
            stack.subscriber.create_subscription(request={"name": path, "topic": topic, **policies})
            subscription = Subscriber(stack.subscriber, path, 4, print).check_exists()
            said[name] = policy_warnings(subscription, dead)
    finally:
        for name in made:
            path = f"projects/{project}/subscriptions/{stack.tenant}-{name}"
            stack.subscriber.delete_subscription(request={"subscription": path})
    assert len(said["bare"]) == 2
    assert "has no retry policy" in said["bare"][0] and "10 s to 600 s" in said["bare"][0]
    assert "has no dead-letter policy" in said["bare"][1]
    assert said["kept"] == []
    assert len(said["max-only"]) == 1 and f"goes to {topic}, not" in said["max-only"][0]
    assert len(said["hasty"]) == 1 and "waits 0.1 s at least" in said["hasty"][0]
