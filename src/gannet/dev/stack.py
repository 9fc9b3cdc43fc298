"""What the tests and the bench share: real local services and one test's slice of them.

Services start on free ports; each Stack gets its own topic, subscription, dead-letter
topic and tenant, so tests cannot see each other's messages. The helpers drive Gannet as
a user does: publish, run `gannet` commands in child processes, read rows and dead letters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1

from gannet import clients, sink
from gannet.dev import provision
from gannet.dev.demo import DaemonProcess, fetch_rows, local_settings, wait_for_rows
from gannet.dev.local_services import LocalServices, Ports
from gannet.dev.publish import lane_topic, make_task, publish_tasks, upload_image
from gannet.settings import REPO_ROOT, Settings
from gannet.storage import Storage
from gannet.task import Task

SAMPLES = REPO_ROOT / "samples"
# The test daemons' stream ack deadline: what a stopped or killed daemon leased comes
# back after this (production keeps the default, 60 s), and its claims end as soon.
STREAM_ACK_DEADLINE_S = 10


def fresh_queue(
    services: LocalServices, name: str, ack_deadline_s: int = 30, lanes: str = ""
) -> Settings:
    """Settings with a topic, subscription and dead-letter topic of their own (one per
    lane of `lanes`, GANNET_LANES' form), created."""
    settings = local_settings(
        services,
        topic=f"{name}-tasks",
        subscription=f"{name}-tasks-sub",
        dead_letter_topic=f"{name}-dead",
        lanes=lanes,
    )
    publisher, subscriber = clients.pubsub_clients(settings)
    provision.ensure_pubsub(settings, publisher, subscriber, ack_deadline_s=ack_deadline_s)
    return settings


@contextmanager
def prepared_services(state: Path, pubsub_flow_control: bool = False) -> Iterator[LocalServices]:
    """Services on free ports with the schema and the buckets every test expects."""
    with LocalServices(state, Ports.free(), pubsub_flow_control=pubsub_flow_control) as running:
        base = local_settings(running)
        sink.migrate_as_configured(base.database_url, base.owner_database_url)
        provision.ensure_buckets(
            clients.storage_client(base), [*base.allowed_buckets, base.results_bucket]
        )
        yield running


@dataclass
class Stack:
    """One test's own slice of the services, and helpers to drive it like a user."""

    services: LocalServices
    settings: Settings
    tenant: str
    tmp: Path
    daemons: list[DaemonProcess] = field(default_factory=list)

    @cached_property
    def publisher(self) -> pubsub_v1.PublisherClient:
        return clients.pubsub_clients(self.settings)[0]

    @cached_property
    def subscriber(self) -> pubsub_v1.SubscriberClient:
        return clients.pubsub_clients(self.settings)[1]

    @cached_property
    def storage(self) -> Storage:
        return Storage(clients.storage_client(self.settings))

    def env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        return {
            **self.services.env(),
            "GANNET_TOPIC": s.topic,
            "GANNET_SUBSCRIPTION": s.subscription,
            "GANNET_DEAD_LETTER_TOPIC": s.dead_letter_topic,
            "GANNET_LANES": s.lanes,
            "GANNET_RUNNERS": "2",
            "GANNET_SHUTDOWN_GRACE_S": "20",
            "GANNET_STREAM_ACK_DEADLINE_S": str(STREAM_ACK_DEADLINE_S),
            "GANNET_CLAIM_TTL_S": str(STREAM_ACK_DEADLINE_S),
            **extra,
        }

    def start_daemon(self, **extra: str) -> DaemonProcess:
        daemon = DaemonProcess(self.env(**extra), self.tmp / f"daemon-{len(self.daemons)}.log")
        self.daemons.append(daemon)
        daemon.wait_ready()
        return daemon

    def upload(self, file: str, name: str | None = None, data: bytes | None = None) -> str:
        bucket = self.settings.allowed_buckets[0]
        if data is not None:
            blob_name = f"{self.tenant}/raw/{name or file}"
            self.storage.client.bucket(bucket).blob(blob_name).upload_from_string(data)
            return f"gs://{bucket}/{blob_name}"
        return upload_image(self.storage, bucket, self.tenant, SAMPLES / file, "samples")

    def task(self, image_url: str, pipeline: str = "DETECTION", **kw: Any) -> Task:
        return make_task(
            self.tenant, image_url, pipeline, f"{self.tenant}-{uuid.uuid4().hex[:10]}", **kw
        )

    def publish(self, tasks: list[Task], lane: str | None = None) -> list[str]:
        return publish_tasks(self.publisher, lane_topic(self.settings, lane), tasks)

    def publish_raw(self, body: bytes) -> str:
        return self.publisher.publish(self.settings.topic_path(), body).result(timeout=30)

    def rows(self, task_ids: list[str], tenant: str | None = None) -> dict[str, dict[str, Any]]:
        return fetch_rows(self.settings.database_url, tenant or self.tenant, task_ids)

    def wait_rows(self, task_ids: list[str], timeout_s: float = 120) -> dict[str, dict[str, Any]]:
        return wait_for_rows(
            self.settings.database_url,
            {self.tenant: task_ids},
            timeout_s,
            progress=False,
            poll_s=0.05,
        )

    def pull(self, subscription: str, max_messages: int = 50, timeout_s: float = 5) -> list[Any]:
        """Synchronous pull, acking what it gets: what is left in a subscription."""
        path = self.subscriber.subscription_path(self.settings.project, subscription)
        response = self.subscriber.pull(
            request={"subscription": path, "max_messages": max_messages}, timeout=timeout_s
        )
        if response.received_messages:
            self.subscriber.acknowledge(
                request={
                    "subscription": path,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )
        return [m.message for m in response.received_messages]

    def gannet(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """A `gannet` command as an operator runs it, against this test's own queues
        (`extra`: more GANNET_* variables)."""
        return gannet(*args, env=self.env(**extra), timeout=120)

    def dead_letters(self, count: int, timeout_s: float = 60) -> list[dict[str, Any]]:
        """`gannet dead-letters --json` once it lists `count`; listing removes nothing."""
        deadline = time.monotonic() + timeout_s
        letters: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            done = self.gannet("dead-letters", "--json")
            assert done.returncode == 0, done.stderr
            letters = [json.loads(line) for line in done.stdout.splitlines()]
            if len(letters) >= count:
                return letters
            time.sleep(0.5)
        raise AssertionError(f"{len(letters)} dead letters after {timeout_s}s, not {count}")

    def unacked(self, messages: list[Any], wait_s: float = 0.25) -> list[Any]:
        """Of `messages` (received in this process), those not acked: their leases are
        ended (ack deadline 0), then a pull gets back whatever was not acked. An empty
        pull alone proves nothing: an unacked message stays invisible while leased.

        The ModifyAckDeadline returns once the emulator has made those messages
        available again, and a pull then gets them at once (with no wait at all, too):
        `wait_s` is only a margin, not a lease to wait out."""
        if messages:
            self.subscriber.modify_ack_deadline(
                request={
                    "subscription": self.settings.subscription_path(),
                    "ack_ids": [m.ack_id for m in messages],
                    "ack_deadline_seconds": 0,
                }
            )
        # The emulator answers an empty pull about a second before its deadline.
        return self.pull(self.settings.subscription, timeout_s=1 + wait_s)

    def left_after_leases(self, subscription: str) -> list[Any]:
        """What `subscription` still holds once every lease a stopped daemon had on it
        has run out (STREAM_ACK_DEADLINE_S), acking it: a message whose ack was lost
        stays invisible while leased, so an empty pull at once proves nothing.

        A lease's last extension is no later than the daemon's stop, and the emulator
        gives a message back within 0.1 s of its lease's end (measured: 10.02-10.10 s
        after a 10 s ModifyAckDeadline): 1.5 s past the deadline is ample, and the last
        pull ends with it (the emulator answers an empty pull a second before its own)."""
        deadline = time.monotonic() + STREAM_ACK_DEADLINE_S + 1.5
        while True:
            left_s = deadline - time.monotonic()
            left = self.pull(subscription, timeout_s=min(2.0, max(left_s, 0.0) + 1))
            if left or time.monotonic() >= deadline:
                return left

    def pull_dead_letters(self, expected: int, timeout_s: float = 30) -> list[Any]:
        """The dead letters pulled (and acked) within `timeout_s`, as soon as there are
        `expected` of them: an empty check (`expected` 1, `== []`) takes `timeout_s`."""
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < expected and (left := deadline - time.monotonic()) > 0:
            # The emulator answers an empty pull about a second before its deadline: a
            # pull's own 5 s made a 3 s check take 4.
            got += self.pull(self.settings.dead_letter_subscription, timeout_s=min(5, left + 1))
        return got


def gannet(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The `gannet` command in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gannet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def settled(daemons: list[DaemonProcess], task_ids: set[str]) -> list[tuple[str, str, str | None]]:
    """(task_id, outcome, error_code) of each settled delivery, from the daemons' logs."""
    return [
        (e["task_id"], e["outcome"], e.get("error_code"))
        for daemon in daemons
        for e in daemon.log_entries()
        if e.get("task_id") in task_ids and e.get("outcome")
    ]


def make_stack(
    services: LocalServices, tmp_path: Path, ack_deadline_s: int = 30, lanes: str = ""
) -> Stack:
    suffix = f"q{uuid.uuid4().hex[:8]}"  # Pub/Sub names start with a letter
    settings = fresh_queue(services, suffix, ack_deadline_s, lanes)
    return Stack(services, settings, f"tenant-{suffix}", tmp_path)
