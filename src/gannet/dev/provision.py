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
from google.protobuf import duration_pb2

from gannet.settings import Settings

log = logging.getLogger(__name__)


def ensure_pubsub(
    settings: Settings,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    ack_deadline_s: int = 30,
    max_delivery_attempts: int = 5,
    min_backoff_s: int = 1,
    max_backoff_s: int = 10,
) -> None:
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
                "retry_policy": {
                    "minimum_backoff": duration_pb2.Duration(seconds=min_backoff_s),
                    "maximum_backoff": duration_pb2.Duration(seconds=max_backoff_s),
                },
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
