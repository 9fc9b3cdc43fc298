"""Where the ack is decided: every message ends as ack, nack or quarantine, nothing else.

dispatch.py turns a message into an Outcome; the Settler here applies it, and is the only
code that acks, nacks or dead-letters (but for dispatch.py's nack of a message whose
settle itself raised, as the client library does for a callback that raises).

- success: result committed, then ack.
- TransientError (database, GCS, timeout, out of memory): nack; the subscription's retry
  policy backs off and its dead-letter policy takes over after max delivery attempts.
- PermanentError (bad input): a failed row where the task is identifiable, the message
  published to the dead-letter topic with error_code / error attributes, then ack.
- a redelivered task whose success is committed: ack without running the models.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from gannet.acks import Acks
from gannet.errors import ErrorCode, GannetError, TransientError
from gannet.metrics import Metrics
from gannet.task import Task

log = logging.getLogger(__name__)

MAX_ACK_DEADLINE_S = 600


class Decision(StrEnum):
    ACK = "ack"
    NACK = "nack"
    QUARANTINE = "quarantine"


@dataclass
class Outcome:
    decision: Decision
    label: str  # succeeded | duplicate | quarantined | retry | busy | shutdown | error
    error: GannetError | None = None
    task: Task | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    # A nack that should not come back before this (another worker holds the task).
    retry_after_s: float | None = None


def shutdown(task: Task | None) -> Outcome:
    """Nack: the message goes straight back to the subscription for another pod."""
    return Outcome(
        Decision.NACK,
        "shutdown",
        TransientError(ErrorCode.SHUTDOWN, "worker is shutting down"),
        task,
    )


class Settler:
    """Applies an Outcome to the Pub/Sub message; the only place that acks or nacks (but
    for Delivery.settle's nack when this raised). One per lane: poison goes to the lane's
    own dead-letter topic."""

    def __init__(
        self,
        publisher: pubsub_v1.PublisherClient,
        dead_letter_topic_path: str,
        subscription: str,
        metrics: Metrics,
        acks: Acks,
        lane: str = "default",
    ) -> None:
        """`acks`: where acks wait a few milliseconds to go out together (acks.py)."""
        self.acks = acks
        self.publisher = publisher
        self.dead_letter_topic_path = dead_letter_topic_path
        self.subscription = subscription
        self.metrics = metrics
        self.lane = lane
        self._latency = metrics.lane_latency.labels(lane)

    def settle(self, message: Any, outcome: Outcome, duration_s: float) -> Outcome:
        """Apply the outcome; returns what was applied (a quarantine whose dead letter
        Pub/Sub refused is a nack)."""
        if outcome.decision is Decision.QUARANTINE and not self._quarantine(message, outcome):
            # Not dead-lettered: keep it, never lose a message.
            outcome = Outcome(Decision.NACK, "retry", outcome.error, outcome.task, outcome.fields)
        decision = outcome.decision
        if decision is Decision.NACK and outcome.retry_after_s:
            # A nack with a delay: the lease is set to end when the other worker's claim
            # does, and the client stops extending it. Pub/Sub allows at most 600 s.
            message.modify_ack_deadline(min(MAX_ACK_DEADLINE_S, math.ceil(outcome.retry_after_s)))
            message.drop()
        elif decision is Decision.NACK:
            message.nack()
        else:
            self.acks.ack(message)
            if outcome.label == "succeeded":  # committed just now: publish -> commit
                self._latency.observe(max(0.0, time.time() - message.publish_time.timestamp()))
        self.metrics.messages.labels(outcome.label).inc()
        self._log(message, outcome, duration_s)
        return outcome

    def _quarantine(self, message: Any, outcome: Outcome) -> bool:
        error = outcome.error
        attributes = {
            "error_code": str(error.code) if error else "unknown",
            "error": (error.message if error else "unknown")[:1024],
            "original_message_id": str(message.message_id),
            "subscription": self.subscription,
        }
        replayed_from = message.attributes.get("replayed_from")
        if replayed_from:  # `gannet dead-letters --replay`'s copy: the backend's id stays
            attributes["replayed_from"] = replayed_from
            attributes["original_message_id"] = (
                message.attributes.get("original_message_id") or attributes["original_message_id"]
            )
        task_id = outcome.task.task_id if outcome.task else outcome.fields.get("task_id")
        if task_id:
            attributes["task_id"] = str(task_id)
        if message.delivery_attempt:
            attributes["delivery_attempt"] = str(message.delivery_attempt)
        try:
            future = self.publisher.publish(self.dead_letter_topic_path, message.data, **attributes)
            future.result(timeout=30)
            return True
        except (gexc.GoogleAPICallError, FutureTimeout, gexc.RetryError) as exc:
            # Which topic, and for a missing one what to do: an operator reading this
            # line had only Pub/Sub's "404 Topic not found" to go on.
            missing = (
                ": it does not exist (terraform creates it; else correct "
                "GANNET_DEAD_LETTER_TOPIC, to which an extra lane adds -LANE)"
                if isinstance(exc, gexc.NotFound)
                else ""
            )
            log.error(
                "could not publish to the dead-letter topic %s%s; nacking instead",
                self.dead_letter_topic_path,
                missing,
                extra={"task_id": task_id, "fields": {"error": str(exc)}},
            )
            return False

    def _log(self, message: Any, outcome: Outcome, duration_s: float) -> None:
        task = outcome.task
        extra: dict[str, Any] = {
            "outcome": outcome.label,
            "message_id": message.message_id,
            "delivery_attempt": message.delivery_attempt,
            "duration_ms": round(duration_s * 1000, 1),
            "task_id": task.task_id if task else outcome.fields.get("task_id"),
            "tenant_id": task.tenant_id if task else outcome.fields.get("tenant_id"),
            "pipeline": task.pipeline if task else None,
            "lane": self.lane,
            "fields": {
                k: v for k, v in outcome.fields.items() if k not in ("task_id", "tenant_id")
            },
        }
        if outcome.error is not None:
            extra["error_code"] = str(outcome.error.code)
            extra["fields"]["error"] = outcome.error.message
        level = {
            "succeeded": logging.INFO,
            "duplicate": logging.INFO,
            "quarantined": logging.WARNING,
            "shutdown": logging.INFO,
            "busy": logging.INFO,
        }.get(outcome.label, logging.WARNING)
        log.log(level, f"task {outcome.label}", extra=extra)
