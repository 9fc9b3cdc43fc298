"""gannet.dev.pubsub_gate, in front of the real Pub/Sub emulator: a streaming pull is sent
at most its `max_outstanding_messages` unacked messages, as by Pub/Sub itself, and an
ack or a nack frees a slot for the next. The emulator alone sends a stream all it has,
which hides from the bench what the client's own round trips cost a pod."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from conftest import pubsub_as_pods_meet_it
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1 import types

from gannet import clients


class RawStream:
    """A streaming pull opened by hand, so that what the server sends is seen as sent
    (the client library holds back what its own flow control does not yet allow)."""

    def __init__(self, client: pubsub_v1.SubscriberClient, subscription: str, limit: int):
        self._requests: queue.Queue[Any] = queue.Queue()
        self._requests.put(
            types.StreamingPullRequest(
                subscription=subscription,
                stream_ack_deadline_seconds=60,
                max_outstanding_messages=limit,
            )
        )
        self.ack_ids: list[str] = []
        self.attempts: list[int] = []  # each message's delivery attempt, in that order
        self.ended = threading.Event()  # the server has ended the call
        self._lock = threading.Lock()
        self._responses = client.streaming_pull(requests=iter(self._requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self._responses:
                with self._lock:
                    self.ack_ids.extend(m.ack_id for m in response.received_messages)
                    self.attempts.extend(m.delivery_attempt for m in response.received_messages)
        except gexc.Cancelled:
            pass  # close()
        finally:
            self.ended.set()

    def received(self, settle_s: float = 0.5) -> list[str]:
        """What arrived, once nothing more has for `settle_s`."""
        seen = -1
        while True:
            with self._lock:
                now = list(self.ack_ids)
            if len(now) == seen:
                return now
            seen = len(now)
            time.sleep(settle_s)

    def end(self) -> None:
        """Half-close, as the daemon ends a stream for a new lease."""
        self._requests.put(None)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


def test_a_stream_is_sent_at_most_its_limit_and_each_ack_or_nack_frees_a_slot(stack):
    for i in range(8):
        stack.publish_raw(f"gated {i}".encode())
    with pubsub_as_pods_meet_it(stack) as gated:
        client = clients.pubsub_clients(gated)[1]
        stream = RawStream(client, stack.settings.subscription_path(), limit=3)
        try:
            first = stream.received()
            assert len(first) == 3, f"sent {len(first)} unacked messages to a stream of 3"
            path = stack.settings.subscription_path()
            client.acknowledge(request={"subscription": path, "ack_ids": first[:2]})
            after_acks = stream.received()
            assert len(after_acks) == 5, "two acks should free two slots, and only two"
            client.modify_ack_deadline(
                request={"subscription": path, "ack_ids": [first[2]], "ack_deadline_seconds": 0}
            )
            assert len(stream.received()) == 6, "a nack frees its slot"
        finally:
            stream.close()


def test_what_a_stream_that_ended_had_pulled_goes_to_the_next_stream_as_a_first_delivery(
    stack,
):
    """The gate's Pull for a stream waits at the emulator when the client ends the stream
    (as the daemon does at each new lease). The stream ends at once, not when that Pull
    returns (up to 2 s later, which held up the next lease as long). A message comes by
    that Pull: Pub/Sub never sent it, so it is no delivery, and the next stream is sent
    it as the first. Given back to the emulator, it came as the second
    (delivery_attempt 2), and a task that ran once looked redelivered."""
    with pubsub_as_pods_meet_it(stack) as gated:
        client = clients.pubsub_clients(gated)[1]
        path = stack.settings.subscription_path()
        ended = RawStream(client, path, limit=1)
        time.sleep(0.5)  # its Pull waits at the emulator, which has nothing yet
        ended.end()
        assert ended.ended.wait(0.5), "a half-closed stream must end at once"
        stack.publish_raw(b"pulled for a stream that ended")
        time.sleep(0.3)  # that Pull has it (another stream's own Pull would get it first)
        stream = RawStream(client, path, limit=1)
        try:
            assert len(stream.received()) == 1
            assert stream.attempts == [1]
            client.acknowledge(request={"subscription": path, "ack_ids": stream.ack_ids})
        finally:
            stream.close()
        assert ended.received() == []
