"""Creates the Pub/Sub and Cloud Storage resources a local run needs.

In production terraform/ creates these; locally (emulators) `gannet demo`, the tests
and the bench call this, with nearly the same shape: per lane, a subscription with a
dead-letter policy (but no retry policy: `ensure_pubsub` says why), a dead-letter topic
with its own subscription to inspect poison.
"""

from __future__ import annotations

import logging

import google.cloud.pubsub_v1 as pubsub_v1
import google.cloud.storage as storage
from google.api_core import exceptions as gexc

from gannet.lanes import Lane
from gannet.settings import Settings

log = logging.getLogger(__name__)


def ensure_pubsub(
    settings: Settings,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    ack_deadline_s: int = 30,
    max_delivery_attempts: int = 5,
) -> None:
    """For each lane (GANNET_LANES; one by default): the tasks topic and subscription
    (with the dead-letter policy), the dead-letter topic and a subscription on it to read
    dead letters back.

    No retry policy here, unlike the real subscription (terraform): the gcloud 528
    emulator's backoff queue stalls the whole subscription under load. Expired or nacked
    messages whose redelivery is delayed go into a map keyed by due time; two due in the
    same millisecond share a key, are then queued again on every pull, and the second
    time one comes due it is no longer leased, and a NullPointerException on it repeats
    every 100 ms, ahead of everything queued behind it. A soak with a SIGTERM and two
    kill -9 lost half its tasks to it; without the policy, none. Nacked messages then
    come back at once, as with a retry policy of zero backoff.
    """
    for lane in settings.lane_list():
        ensure_lane(settings, lane, publisher, subscriber, ack_deadline_s, max_delivery_attempts)


def ensure_lane(
    settings: Settings,
    lane: Lane,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    ack_deadline_s: int,
    max_delivery_attempts: int,
) -> None:
    """One lane's topic, subscription, dead-letter topic and dead-letter subscription."""
    for topic in (lane.topic, lane.dead_letter_topic):
        try:
            publisher.create_topic(request={"name": settings.path("topics", topic)})
        except gexc.AlreadyExists:
            pass
    subscriptions = {
        lane.dead_letter_subscription: {
            "topic": settings.path("topics", lane.dead_letter_topic),
            "ack_deadline_seconds": 60,
        },
        lane.subscription: {
            "topic": settings.path("topics", lane.topic),
            "ack_deadline_seconds": ack_deadline_s,
            "dead_letter_policy": {
                "dead_letter_topic": settings.path("topics", lane.dead_letter_topic),
                "max_delivery_attempts": max_delivery_attempts,
            },
        },
    }
    for name, request in subscriptions.items():
        try:
            path = settings.path("subscriptions", name)
            subscriber.create_subscription(request={"name": path, **request})
        except gexc.AlreadyExists:
            pass


def ensure_buckets(client: storage.Client, names: list[str]) -> None:
    for name in names:
        try:
            client.create_bucket(name)
        except gexc.Conflict:
            pass
