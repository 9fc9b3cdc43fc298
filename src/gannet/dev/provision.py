"""Creates the Pub/Sub and Cloud Storage resources a local run needs.

In production terraform/ creates these; locally (emulators) `gannet demo`, the tests
and the bench call this, with the same shape: a subscription with a retry policy and a
dead-letter policy, a dead-letter topic with its own subscription to inspect poison.
"""

from __future__ import annotations

import logging

import google.cloud.pubsub_v1 as pubsub_v1
import google.cloud.storage as storage
from google.api_core import exceptions as gexc

from gannet.settings import Settings

log = logging.getLogger(__name__)


def ensure_pubsub(
    settings: Settings,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    ack_deadline_s: int = 30,
    max_delivery_attempts: int = 5,
) -> None:
    """The tasks topic and subscription (with the dead-letter policy), the dead-letter
    topic and a subscription on it to read dead letters back.

    No retry policy here, unlike the real subscription (terraform): the gcloud 528
    emulator's backoff queue stalls the whole subscription under load. Expired or nacked
    messages whose redelivery is delayed go into a map keyed by due time; two due in the
    same millisecond share a key, are then queued again on every pull, and the second
    time one comes due it is no longer leased, and a NullPointerException on it repeats
    every 100 ms, ahead of everything queued behind it. A soak with a SIGTERM and two
    kill -9 lost half its tasks to it; without the policy, none. Nacked messages then
    come back at once, as with a retry policy of zero backoff.
    """
    project = settings.project
    for topic in (settings.topic, settings.dead_letter_topic):
        try:
            publisher.create_topic(request={"name": publisher.topic_path(project, topic)})
        except gexc.AlreadyExists:
            pass
    dlq_sub = subscriber.subscription_path(project, settings.dead_letter_subscription)
    try:
        subscriber.create_subscription(
            request={
                "name": dlq_sub,
                "topic": settings.dead_letter_topic_path(),
                "ack_deadline_seconds": 60,
            }
        )
    except gexc.AlreadyExists:
        pass
    try:
        subscriber.create_subscription(
            request={
                "name": settings.subscription_path(),
                "topic": settings.topic_path(),
                "ack_deadline_seconds": ack_deadline_s,
                "dead_letter_policy": {
                    "dead_letter_topic": settings.dead_letter_topic_path(),
                    "max_delivery_attempts": max_delivery_attempts,
                },
            }
        )
    except gexc.AlreadyExists:
        pass


def ensure_buckets(client: storage.Client, names: list[str]) -> None:
    for name in names:
        try:
            client.create_bucket(name)
        except gexc.Conflict:
            pass
