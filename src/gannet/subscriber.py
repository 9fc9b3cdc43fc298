"""Streaming pull with flow control, on our own executor, and a clean stop.

Each leased message gets a callback thread that waits for its runner, so the client
library keeps extending the message's lease while it waits and, on shutdown,
`await_callbacks_on_shutdown=True` lets the final ack or nack of every running callback
reach Pub/Sub before the stream closes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.futures import StreamingPullFuture
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler
from google.cloud.pubsub_v1.types import FlowControl

log = logging.getLogger(__name__)


class Subscriber:
    def __init__(
        self,
        client: pubsub_v1.SubscriberClient,
        subscription_path: str,
        max_messages: int,
        on_message: Callable[[Any], None],
        max_lease_s: int = 3600,
    ) -> None:
        self.client = client
        self.subscription_path = subscription_path
        self.max_messages = max_messages
        self.on_message = on_message
        self.max_lease_s = max_lease_s
        # The default scheduler runs only 10 callbacks at once; ours runs one per lease.
        self._executor = ThreadPoolExecutor(
            max_workers=max_messages, thread_name_prefix="pubsub-callback"
        )
        self._future: StreamingPullFuture | None = None
        self._closed = threading.Event()

    def start(self) -> StreamingPullFuture:
        flow = FlowControl(
            max_messages=self.max_messages,
            max_bytes=512 * 1024 * 1024,
            max_lease_duration=self.max_lease_s,
        )
        self._future = self.client.subscribe(
            self.subscription_path,
            callback=self.on_message,
            flow_control=flow,
            scheduler=ThreadScheduler(executor=self._executor),
            await_callbacks_on_shutdown=True,
        )
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

    def stop(self, timeout: float) -> bool:
        """Stop pulling; wait up to `timeout` for running callbacks to ack or nack."""
        future = self._future
        if future is None:
            return True
        future.cancel()
        try:
            future.result(timeout=timeout)
        except TimeoutError:
            log.warning("callbacks still running after the grace period")
            return False
        except Exception as exc:  # noqa: BLE001 - the stream's own error, already logged
            log.info("stream closed", extra={"fields": {"reason": repr(exc)}})
        return True
