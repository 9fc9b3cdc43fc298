"""A lane's lease follows the pod's pace (lease.py): it grows while runners sit idle
behind a full lease, and shrinks back, never below GANNET_MAX_MESSAGES, while messages
wait in the pod."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import SCENES, pubsub_as_pods_meet_it, scraped

from gannet.lease import next_lease


@pytest.mark.parametrize(
    ("lease", "starved", "crowded", "unused", "expected"),
    [
        (8, 0.10, 0.0, 0.0, 10),  # starved: a quarter more
        (2, 0.5, 0.0, 0.0, 3),  # at least one more
        (30, 0.5, 0.0, 0.0, 32),  # up to the ceiling
        (32, 0.5, 0.0, 0.0, 32),
        (8, 0.09, 0.0, 0.0, 8),  # idle now and then: as it is
        (12, 0.2, 0.6, 0.0, 15),  # starved counts first: a runner idle is the cost to avoid
        (20, 0.0, 0.5, 0.0, 19),  # crowded and never starved: one less
        (20, 0.02, 0.9, 0.0, 19),
        (20, 0.05, 0.9, 0.0, 20),  # crowded but starved now and then: as it is
        (8, 0.0, 1.0, 0.0, 8),  # never below the floor
        (12, 0.0, 0.49, 0.0, 12),
        (20, 0.0, 0.0, 0.9, 19),  # no backlog: back towards the floor
        (20, 0.0, 0.0, 0.89, 20),
    ],
)
def test_the_next_lease_follows_the_lanes_samples(lease, starved, crowded, unused, expected):
    assert next_lease(lease, 8, 32, starved, crowded, unused) == expected


def test_a_daemon_behind_a_distant_pubsub_leases_more_and_loses_nothing(stack):
    """Pub/Sub 300 ms away (gannet.dev.relay) and sending a stream a message only when an
    ack has freed one of its slots (gannet.dev.pubsub_gate), as Pub/Sub does. A daemon
    with 2 runners leasing 2: after each task its slot is out for the ack's window and a
    round trip, and its runner waits for it. The daemon leases more, says so in its log
    and in gannet_lane_lease_messages, and every task still succeeds on its first
    delivery, acked (none comes back)."""
    with pubsub_as_pods_meet_it(stack, latency_ms=300) as distant:
        daemon = stack.start_daemon(
            GANNET_RUNNERS="2",
            GANNET_MAX_MESSAGES="2",
            GANNET_PUBSUB_EMULATOR_HOST=distant.pubsub_emulator_host,
        )
        url = stack.upload(SCENES[0]["file"])
        tasks = [stack.task(url) for _ in range(40)]
        # The gauge read all along: once the tasks are done the lease shrinks back,
        # a step every 2 s, and may be at 2 again by the time their rows are read.
        leases: list[float] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                leases.append(
                    scraped(daemon.metrics_port, "gannet_lane_lease_messages", lane="default")
                )

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        stack.publish(tasks)
        try:
            rows = stack.wait_rows([t.task_id for t in tasks])
        finally:
            done.set()
            watcher.join()
        assert len(rows) == len(tasks)
        assert {r["status"] for r in rows.values()} == {"succeeded"}
        assert {r["delivery_attempt"] for r in rows.values()} == {1}
        assert daemon.stop() == 0
    assert max(leases) > 2
    resized = [
        json.loads(line)["to"]
        for line in daemon.log_path.read_text().splitlines()
        if '"lease resized"' in line
    ]
    assert max(resized, default=0) > 2
    # Nothing nacked back at the stop (it would be there at once; lost acks: the log).
    assert stack.pull(stack.settings.subscription, timeout_s=1.25) == []
    assert "acks not delivered" not in daemon.log_path.read_text()
