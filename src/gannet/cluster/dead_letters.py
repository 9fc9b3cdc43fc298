"""`gannet dead-letters`: what sits in the dead-letter subscription, and replaying it.

Two kinds of message end up there (docs/architecture.md, outcomes). Poison that the daemon
quarantined carries `error_code` / `error` attributes. A task that failed
max_delivery_attempts times on a transient error (database or GCS down) is forwarded by
Pub/Sub's dead-letter policy without them; it is listed as `retries_exhausted`. Once the
cause is fixed (the outage is over, the missing image uploaded, the pipeline added to
the config) the operator replays those messages to the tasks topic. The daemon is
idempotent on task_id, so replaying a task that has a committed result does no harm.

Listing leaves every message where it was: the leases of the pull are given back at
once (ack deadline 0). A replay acks a dead letter only after its copy has been
published, so a failure half-way loses nothing; at worst a task is replayed twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from gannet.task import identify
from gannet.text import format_table

RETRIES_EXHAUSTED = "retries_exhausted"
_PULL_BATCH = 100
_LEASE_S = 120  # long enough to list and replay what one run pulled


@dataclass
class DeadLetter:
    ack_id: str
    message_id: str
    published: str
    data: bytes
    error_code: str
    error: str
    task_id: str | None
    tenant_id: str | None
    attempts: str | None  # delivery attempts before Pub/Sub gave up, where it says

    def summary(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "published": self.published,
            "error_code": self.error_code,
            "error": self.error,
            "task_id": self.task_id,
            "tenant_id": self.tenant_id,
            "attempts": self.attempts,
        }


def _letter(received: Any) -> DeadLetter:
    message = received.message
    attributes = dict(message.attributes)
    task_id, tenant_id = identify(message.data)
    code = attributes.get("error_code")
    return DeadLetter(
        ack_id=received.ack_id,
        message_id=message.message_id,
        published=message.publish_time.isoformat() if message.publish_time else "",
        data=message.data,
        error_code=code or RETRIES_EXHAUSTED,
        error=attributes.get("error")
        or "failed every delivery attempt on a transient error; see the daemon's logs",
        task_id=attributes.get("task_id") or task_id,
        tenant_id=tenant_id,
        attempts=attributes.get("delivery_attempt")
        or attributes.get("CloudPubSubDeadLetterSourceDeliveryCount"),
    )


def pull(subscriber: pubsub_v1.SubscriberClient, path: str, limit: int) -> list[DeadLetter]:
    """Lease up to `limit` dead letters; the caller must ack or release every one."""
    letters: list[DeadLetter] = []
    while len(letters) < limit:
        try:
            response = subscriber.pull(
                request={
                    "subscription": path,
                    "max_messages": min(_PULL_BATCH, limit - len(letters)),
                },
                # A pull waits for messages to arrive: long for the first, so an empty
                # subscription is told from a slow one; then short, to stop soon.
                timeout=10 if not letters else 2,
            )
        except gexc.DeadlineExceeded:
            break
        if not response.received_messages:
            break
        batch = [_letter(r) for r in response.received_messages]
        _set_lease(subscriber, path, batch, _LEASE_S)
        letters += batch
    return letters


def _chunks(letters: list[DeadLetter]) -> list[list[str]]:
    ids = [d.ack_id for d in letters]
    return [ids[i : i + _PULL_BATCH] for i in range(0, len(ids), _PULL_BATCH)]


def _set_lease(
    subscriber: pubsub_v1.SubscriberClient, path: str, letters: list[DeadLetter], seconds: int
) -> None:
    for ack_ids in _chunks(letters):
        subscriber.modify_ack_deadline(
            request={"subscription": path, "ack_ids": ack_ids, "ack_deadline_seconds": seconds}
        )


def release(subscriber: pubsub_v1.SubscriberClient, path: str, letters: list[DeadLetter]) -> None:
    """Give the leases back: the messages are at once available again, untouched."""
    _set_lease(subscriber, path, letters, 0)


def replay(
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    topic_path: str,
    path: str,
    letters: list[DeadLetter],
) -> tuple[list[DeadLetter], list[tuple[DeadLetter, str]]]:
    """Publish each body to the tasks topic, then ack its dead letter.

    Returns (replayed, failed with the reason); the failed ones are released."""
    futures = [
        (d, publisher.publish(topic_path, d.data, replayed_from=d.message_id)) for d in letters
    ]
    replayed: list[DeadLetter] = []
    failed: list[tuple[DeadLetter, str]] = []
    for letter, future in futures:
        try:
            future.result(timeout=60)
            replayed.append(letter)
        except (gexc.GoogleAPICallError, gexc.RetryError, TimeoutError) as exc:
            failed.append((letter, str(exc)))
    for ack_ids in _chunks(replayed):
        subscriber.acknowledge(request={"subscription": path, "ack_ids": ack_ids})
    release(subscriber, path, [d for d, _ in failed])
    return replayed, failed


def select(
    letters: list[DeadLetter], codes: list[str] | None, tenant: str | None
) -> list[DeadLetter]:
    return [
        d
        for d in letters
        if (not codes or d.error_code in codes) and (tenant is None or d.tenant_id == tenant)
    ]


def _table(letters: list[DeadLetter]) -> str:
    rows = [
        [
            d.message_id,
            d.published[:19],
            d.error_code,
            d.task_id or "-",
            d.tenant_id or "-",
            d.error if len(d.error) <= 70 else d.error[:67] + "...",
        ]
        for d in letters
    ]
    return format_table(
        ["message", "dead-lettered (UTC)", "error_code", "task_id", "tenant", "error"], rows
    )


def main(
    args: argparse.Namespace,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    topic_path: str,
    subscription_path: str,
    lane: str | None = None,
) -> int:
    """One lane's dead letters (`lane` names it in the output when there are several):
    listed, or replayed to that lane's own topic."""
    if args.replay and not (args.code or args.all):
        print(
            "error: say what to replay: --code CODE (repeatable; e.g. "
            f"--code {RETRIES_EXHAUSTED} after an outage) or --all",
            file=sys.stderr,
        )
        return 2
    try:
        letters = pull(subscriber, subscription_path, args.limit)
    except gexc.NotFound:
        print(
            f"error: subscription {subscription_path} does not exist; "
            "pass --subscription (terraform names it gannet-dead-letter-sub)",
            file=sys.stderr,
        )
        return 2
    except gexc.PermissionDenied as exc:
        print(
            f"error: not allowed to pull {subscription_path} ({exc.message}); your account "
            "needs roles/pubsub.subscriber there (and roles/pubsub.publisher on the tasks "
            "topic to replay)",
            file=sys.stderr,
        )
        return 2
    chosen = select(letters, args.code, args.tenant)
    chosen_ids = {d.ack_id for d in chosen}
    others = [d for d in letters if d.ack_id not in chosen_ids]
    replayed: list[DeadLetter] = []
    failed: list[tuple[DeadLetter, str]] = []
    try:
        if args.replay:
            replayed, failed = replay(publisher, subscriber, topic_path, subscription_path, chosen)
        else:
            release(subscriber, subscription_path, chosen)
    finally:
        release(subscriber, subscription_path, others)

    if args.json:
        for letter in replayed if args.replay else chosen:
            extra: dict[str, Any] = {"replayed_to": topic_path} if args.replay else {}
            if lane is not None:
                extra["lane"] = lane
            print(json.dumps({**letter.summary(), **extra}))
    elif args.replay:
        print(f"replayed {len(replayed)} of {len(chosen)} to {topic_path}; dead letters acked")
    else:
        _print_listing(letters, chosen, subscription_path, args.limit)
    for letter, reason in failed:
        print(f"error: could not replay {letter.message_id} ({reason}); it stays", file=sys.stderr)
    return 1 if failed else 0


def _print_listing(
    letters: list[DeadLetter], chosen: list[DeadLetter], path: str, limit: int
) -> None:
    if not letters:
        print(f"{path} is empty")
        return
    if chosen:
        print(_table(chosen))
    by_code = Counter(d.error_code for d in chosen)
    summary = ", ".join(f"{n} {code}" for code, n in by_code.most_common()) or "none match"
    more = " (there may be more: raise --limit)" if len(letters) >= limit else ""
    print(f"\n{len(chosen)} of {len(letters)} dead letters shown: {summary}{more}")
    print("Nothing was removed. Replay with --replay --code CODE once the cause is fixed.")
