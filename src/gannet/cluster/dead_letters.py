"""`gannet dead-letters`: what sits in the dead-letter subscription; replaying or
discarding it.

Two kinds of message end up there (docs/architecture.md, outcomes). Poison that the daemon
quarantined carries `error_code` / `error` attributes. A task that failed
max_delivery_attempts times on a transient error (database or GCS down) is forwarded by
Pub/Sub's dead-letter policy without them; it is listed as `retries_exhausted`. Once the
cause is fixed (the outage is over, the missing image uploaded, the pipeline added to
the config) the operator replays those messages to the tasks topic. The daemon is
idempotent on task_id, so replaying a task that has a committed result does no harm.

Listing leaves every message where it was: the leases of the pull are given back at
once (ack deadline 0) when the run ends. A replay goes batch by batch as the letters are
pulled, and acks a dead letter only after its copy has been published, so a failure
half-way loses nothing; at worst a task is replayed twice. A replay that stops at
--limit says so and exits 1: run it again for the rest. A run replays each body once:
a replayed task whose cause is not fixed is dead-lettered again while the run goes on,
and was pulled and replayed again, up to --limit times (997 copies of one letter).

--discard acks the chosen letters without replaying them: a letter handled otherwise (the
backend told of its bad tasks, a task no longer wanted) stayed until Pub/Sub dropped it
31 days later, holding GannetDeadLettersUnhandled on, and the only way to remove it was
`gcloud pubsub subscriptions seek`, which acks every letter before a time, the ones not
yet handled with them. --message picks letters one by one, by the id the listing shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from gannet.errors import DEAD_LETTER_CODES
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
    original_message_id: str  # the id the backend's publish returned (or this letter's)

    def summary(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "original_message_id": self.original_message_id,
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
        original_message_id=attributes.get("original_message_id") or message.message_id,
    )


def batches(
    subscriber: pubsub_v1.SubscriberClient, path: str, limit: int
) -> Iterator[list[DeadLetter]]:
    """Lease dead letters a batch at a time, `limit` at most in all; the caller must ack
    or release every one. A batch is leased for _LEASE_S from its pull: one taken longer
    ago may come back in a later batch under a new ack id (same message_id)."""
    pulled = 0
    while pulled < limit:
        try:
            response = subscriber.pull(
                request={"subscription": path, "max_messages": min(_PULL_BATCH, limit - pulled)},
                # A pull waits for messages to arrive: long for the first, so an empty
                # subscription is told from a slow one; then short, to stop soon.
                timeout=10 if not pulled else 2,
            )
        except gexc.DeadlineExceeded:
            return
        if not response.received_messages:
            return
        batch = [_letter(r) for r in response.received_messages]
        _set_lease(subscriber, path, batch, _LEASE_S)
        pulled += len(batch)
        yield batch


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

    Returns (replayed, failed with the reason); the failed ones stay leased."""
    # The backend's message id goes with the copy: dead-lettered again, its letter still
    # names what the backend sent (integrating.md: the only way to match a body that
    # was not JSON).
    futures = [
        (
            d,
            publisher.publish(
                topic_path,
                d.data,
                replayed_from=d.message_id,
                original_message_id=d.original_message_id,
            ),
        )
        for d in letters
    ]
    replayed: list[DeadLetter] = []
    failed: list[tuple[DeadLetter, str]] = []
    for letter, future in futures:
        try:
            future.result(timeout=60)
            replayed.append(letter)
        except (gexc.GoogleAPICallError, gexc.RetryError, TimeoutError) as exc:
            failed.append((letter, str(exc)))
    _ack(subscriber, path, replayed)
    return replayed, failed


def _ack(subscriber: pubsub_v1.SubscriberClient, path: str, letters: list[DeadLetter]) -> None:
    for ack_ids in _chunks(letters):
        subscriber.acknowledge(request={"subscription": path, "ack_ids": ack_ids})


@dataclass
class Walk:
    """One run over a dead-letter subscription, by message_id: what it left leased
    (listed, or not chosen, or failed to replay), what it handled (replayed, or with
    --discard acked), whether it saw the end (False: it stopped at --limit)."""

    held: dict[str, DeadLetter] = field(default_factory=dict)
    handled: dict[str, DeadLetter] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # message_id -> why, held
    chosen: set[str] = field(default_factory=set)  # message_ids chosen to handle
    bodies: set[bytes] = field(default_factory=set)  # digests of the bodies replayed
    repeated: set[str] = field(default_factory=set)  # message_ids held: a body replayed
    complete: bool = False


def walk(
    args: argparse.Namespace,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    topic_path: str,
    path: str,
    done: Walk,
) -> None:
    """Replay (with --replay) or ack (with --discard) the chosen letters batch by batch
    as they are pulled, so that none waits out its lease while the rest is pulled, and
    hold every other one to the end (released by the caller: given back at once, it
    would be pulled again). A letter that comes back (its lease ran out) is known by its
    message_id: one already handled is acked again (the first ack came too late to
    count), another one is held under its new ack id."""
    pulled = 0
    for batch in batches(subscriber, path, args.limit):
        pulled += len(batch)
        again = [d for d in batch if d.message_id in done.handled]
        _ack(subscriber, path, again)
        fresh = [d for d in batch if d.message_id not in done.handled]
        chosen = select(fresh, args.code, args.tenant, args.message)
        if args.replay:
            chosen = _once(chosen, done)
            handled, failed = replay(publisher, subscriber, topic_path, path, chosen)
        elif args.discard:
            _ack(subscriber, path, chosen)
            handled, failed = chosen, []
        else:
            handled, failed = [], []
        done.chosen.update(d.message_id for d in handled)
        done.chosen.update(d.message_id for d, _ in failed)
        done.failed.update((d.message_id, reason) for d, reason in failed)
        done.bodies.update(_digest(d) for d in handled)
        for letter in handled:  # one may have failed before, and come back
            done.handled[letter.message_id] = letter
            done.held.pop(letter.message_id, None)
            done.failed.pop(letter.message_id, None)
        done.held.update((d.message_id, d) for d in fresh if d.message_id not in done.handled)
    done.complete = pulled < args.limit


def _once(letters: list[DeadLetter], done: Walk) -> list[DeadLetter]:
    """Those whose body this run has not replayed yet (nor one before them here); the
    others are held, each a replayed task dead-lettered again (or sent twice)."""
    chosen = []
    here: set[bytes] = set()
    for letter in letters:
        digest = _digest(letter)
        if digest in done.bodies or digest in here:
            done.repeated.add(letter.message_id)
            continue
        here.add(digest)
        chosen.append(letter)
    return chosen


def _digest(letter: DeadLetter) -> bytes:
    return hashlib.blake2b(letter.data, digest_size=16).digest()


def select(
    letters: list[DeadLetter],
    codes: list[str] | None,
    tenant: str | None,
    messages: list[str] | None,
) -> list[DeadLetter]:
    return [
        d
        for d in letters
        if (not codes or d.error_code in codes)
        and (tenant is None or d.tenant_id == tenant)
        and (not messages or d.message_id in messages)
    ]


# The error codes a dead letter can carry: the daemon's permanent ones, Pub/Sub's
# forwarding, and the daemon's "unknown" (a refusal without an error).
CODES = (*(c.value for c in DEAD_LETTER_CODES), RETRIES_EXHAUSTED, "unknown")


def refusal(args: argparse.Namespace) -> str | None:
    """What is wrong with the command's arguments, once for every lane; None if nothing.
    A misspelt --code matched nothing and said only `none match` (or `replayed 0 of 0`)."""
    if args.limit < 1:
        return "--limit must be 1 or more"
    if args.replay and args.discard:
        return "--replay republishes the chosen letters, --discard drops them: not both"
    verb = "replay" if args.replay else "discard" if args.discard else None
    if verb and not (args.code or args.message or args.all):
        return (
            f"say what to {verb}: --code CODE (repeatable; e.g. --code "
            f"{RETRIES_EXHAUSTED} after an outage), --message ID (repeatable; the "
            "listing's message column) or --all"
        )
    unknown = [code for code in args.code or [] if code not in CODES]
    if unknown:
        return f"no such --code {', '.join(unknown)}; a dead letter's is one of: {', '.join(CODES)}"
    return None


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
    listed, or replayed to that lane's own topic. The caller has checked `args`
    (refusal)."""
    done = Walk()
    try:
        walk(args, publisher, subscriber, topic_path, subscription_path, done)
    except gexc.NotFound:
        print(
            f"error: subscription {subscription_path} does not exist; check "
            "GANNET_PROJECT, GANNET_DEAD_LETTER_TOPIC and GANNET_LANES (terraform names a "
            "lane's DEAD_LETTER_TOPIC-sub, or DEAD_LETTER_TOPIC-LANE-sub after the first), "
            "or pass --subscription",
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
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        print(
            f"error: Pub/Sub did not answer for {subscription_path} ({exc}); check "
            "GANNET_PROJECT, your credentials (gcloud auth application-default login) and, "
            "against the emulator, PUBSUB_EMULATOR_HOST. Handled so far: "
            f"{len(done.handled)}; the rest comes back within {_LEASE_S} s",
            file=sys.stderr,
        )
        return 2
    finally:
        try:
            release(subscriber, subscription_path, list(done.held.values()))
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            print(
                f"note: could not give the leases back ({exc}); those letters are "
                f"available again within {_LEASE_S} s",
                file=sys.stderr,
            )

    letters = list(done.held.values())
    acting = args.replay or args.discard
    if args.json:
        shown = (
            done.handled.values()
            if acting
            else select(letters, args.code, args.tenant, args.message)
        )
        for letter in shown:
            extra: dict[str, Any] = {}
            if args.replay:
                extra["replayed_to"] = topic_path
            elif args.discard:
                extra["discarded"] = True
            if lane is not None:
                extra["lane"] = lane
            print(json.dumps({**letter.summary(), **extra}))
    elif args.replay:
        print(
            f"replayed {len(done.handled)} of {len(done.chosen)} to {topic_path}; "
            "dead letters acked"
        )
    elif args.discard:
        print(_table(list(done.handled.values())) if done.handled else "none match")
        print(f"\ndiscarded {len(done.handled)} dead letters (acked, not replayed)")
    else:
        chosen = select(letters, args.code, args.tenant, args.message)
        _print_listing(letters, chosen, subscription_path, done)
    for message_id, reason in done.failed.items():
        print(f"error: could not replay {message_id} ({reason}); it stays", file=sys.stderr)
    if done.repeated:
        print(
            f"note: {len(done.repeated)} dead letters not replayed: each has the body of "
            "one this run replayed: dead-lettered again while it ran (its cause is not "
            "fixed yet: list them), or a copy (a message sent, or dead-lettered, twice: "
            "run again to replay it; a task done already is not run again). They stay",
            file=sys.stderr,
        )
    if acting and not done.complete:
        print(
            f"stopped after looking at --limit {args.limit} dead letters: there may be more "
            f"to {'replay' if args.replay else 'discard'}; run the command again (or raise "
            "--limit)",
            file=sys.stderr,
        )
    return 1 if done.failed or (acting and not done.complete) else 0


def _print_listing(
    letters: list[DeadLetter], chosen: list[DeadLetter], path: str, done: Walk
) -> None:
    if not letters:
        print(
            f"{path} is empty (letters another run pulled in the last {_LEASE_S} s and "
            "did not give back, a run killed half way, come back when their lease ends)"
        )
        return
    if chosen:
        print(_table(chosen))
    by_code = Counter(d.error_code for d in chosen)
    summary = ", ".join(f"{n} {code}" for code, n in by_code.most_common()) or "none match"
    more = "" if done.complete else " (there may be more: raise --limit)"
    print(f"\n{len(chosen)} of {len(letters)} dead letters shown: {summary}{more}")
    print(
        "Nothing was removed. Replay with --replay --code CODE once the cause is fixed; "
        "drop letters handled otherwise with --discard --message ID (or --code CODE)."
    )
