"""Does the Pub/Sub emulator spread a subscription's messages over two streaming pulls?

Pub/Sub itself stops sending on a stream once its client's flow control
(max_outstanding_messages, which google-cloud-pubsub sends in the stream's first
request) is reached, so two daemon processes on one subscription share its messages.
This starts the local services (the emulator behind gannet's relay), opens two
subscribers of 2 messages each on one subscription, publishes N messages (before the
subscribers open, as a backlog, or after), and prints how many each subscriber ran.
Each callback sleeps 0.3 s, standing in for a task.

Run: .venv/bin/python scripts/measure_emulator_flow_control.py [N]
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler
from google.cloud.pubsub_v1.types import FlowControl

from gannet.dev.local_services import LocalServices, Ports

PROJECT = "gannet-local"


def run(n: int, backlog: bool) -> Counter[str]:
    publisher = pubsub_v1.PublisherClient()
    admin = pubsub_v1.SubscriberClient()
    name = "backlog" if backlog else "live"
    topic = publisher.topic_path(PROJECT, f"flow-{name}")
    subscription = admin.subscription_path(PROJECT, f"flow-{name}")
    publisher.create_topic(name=topic)
    admin.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    ran: Counter[str] = Counter()
    lock = threading.Lock()
    done = threading.Event()

    def callback(who: str) -> Callable[[Any], None]:
        def handle(message: Any) -> None:
            time.sleep(0.3)
            with lock:
                ran[who] += 1
                if sum(ran.values()) >= n:
                    done.set()
            message.ack()

        return handle

    def publish() -> None:
        for future in [publisher.publish(topic, str(i).encode()) for i in range(n)]:
            future.result()

    if backlog:
        publish()
    streams = []
    for who in ("A", "B"):
        scheduler = ThreadScheduler(ThreadPoolExecutor(max_workers=2))
        streams.append(
            pubsub_v1.SubscriberClient().subscribe(
                subscription,
                callback(who),
                flow_control=FlowControl(max_messages=2),
                scheduler=scheduler,
            )
        )
        time.sleep(1.0)  # both streams are open before any message is sent (live)
    if not backlog:
        publish()
    done.wait(10 + n)
    for stream in streams:
        stream.cancel()
    return ran


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    with LocalServices(Path(tempfile.mkdtemp(prefix="gannet-flow-")), Ports.free()) as services:
        os.environ["PUBSUB_EMULATOR_HOST"] = services.pubsub_host
        for backlog in (True, False):
            ran = run(n, backlog)
            when = "published before the streams opened" if backlog else "published after"
            print(f"{n} messages {when}: subscriber A ran {ran['A']}, B ran {ran['B']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
