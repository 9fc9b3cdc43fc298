"""Transient failures are nacked and retried, never quarantined and never lost.

PostgreSQL is taken away by cutting the network between the daemon and a real server
(tcp_relay.Relay), which is what a database restart or a failover looks like to the
daemon: open connections reset, new ones refused. Nothing is mocked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import SCENES, expected_counts, settled, wait_until
from tcp_relay import Relay, answers, relay_to

from gannet.errors import TransientError


@pytest.fixture
def db_relay(stack) -> Iterator[tuple[Relay, str]]:
    """A relay to the test PostgreSQL and the database URL that goes through it."""
    relay, through = relay_to(stack.settings.database_url)
    yield relay, through
    relay.close()


def test_database_outage_nacks_and_the_tasks_succeed_when_it_returns(stack, db_relay):
    """While PostgreSQL is unreachable every delivery is nacked (outcome retry,
    dependency_unavailable), nothing is dead-lettered and the daemon keeps running;
    when the database is back the same messages are redelivered and succeed."""
    relay, db_url = db_relay
    daemon = stack.start_daemon(GANNET_DATABASE_URL=db_url, GANNET_DB_TIMEOUT_S="2")
    url = stack.upload(SCENES[0]["file"])
    tasks = [stack.task(url) for _ in range(2)]
    ids = {t.task_id for t in tasks}

    relay.cut()
    stack.publish(tasks)
    wait_until(
        lambda: {t for t, o, _ in settled([daemon], ids) if o == "retry"} == ids,
        "a nack of each task while the database is down",
        60,
    )
    assert stack.rows(list(ids)) == {}
    for _, outcome, code in settled([daemon], ids):
        assert (outcome, code) == ("retry", "dependency_unavailable")
    assert daemon.proc.poll() is None, "an outage must not crash the daemon"

    relay.restore()
    rows = stack.wait_rows(list(ids), timeout_s=90)
    assert set(rows) == ids, "every nacked task comes back and succeeds"
    for row in rows.values():
        assert row["status"] == "succeeded"
        assert row["result"]["detection"]["counts"] == expected_counts(SCENES[0])
        assert row["delivery_attempt"] >= 2, "the success is a redelivery of the nacked one"
    assert stack.pull_dead_letters(1, timeout_s=1) == [], "an outage is not poison"
    assert daemon.stop() == 0


def test_a_database_that_stops_answering_frees_the_runner_at_the_answer_deadline(stack, db_relay):
    """A connection kept open by a peer that no longer answers (a pooler or proxy whose
    server went away; a hung server) gets no help from TCP: the task's round trip is
    dropped at GANNET_DB_ANSWER_DEADLINE_S and the message nacked, where it used to hold
    its runner until the stall watch restarted the pod (10 minutes). Once the database
    answers again, the redelivery succeeds on a new connection."""
    relay, db_url = db_relay
    daemon = stack.start_daemon(
        GANNET_DATABASE_URL=db_url, GANNET_DB_ANSWER_DEADLINE_S="2", GANNET_DB_TIMEOUT_S="2"
    )
    task = stack.task(stack.upload(SCENES[0]["file"]))
    relay.freeze()
    stack.publish([task])
    wait_until(
        lambda: (
            (task.task_id, "retry", "dependency_unavailable") in settled([daemon], {task.task_id})
        ),
        "a nack at the answer deadline",
        30,
    )
    assert any(
        "gave no answer within 2 s" in str(e.get("error", ""))
        for e in daemon.log_entries()
        if e.get("task_id") == task.task_id
    ), "the log says why"

    relay.thaw()
    row = stack.wait_rows([task.task_id], timeout_s=90)[task.task_id]
    assert row["status"] == "succeeded"
    assert row["result"]["detection"]["counts"] == expected_counts(SCENES[0])
    assert daemon.stop() == 0


@pytest.mark.slow
def test_an_outage_that_outlasts_the_retries_is_dead_lettered_and_replays(stack, db_relay):
    """Nothing is lost when a dependency stays down: after the subscription's
    max_delivery_attempts (5) Pub/Sub's dead-letter policy moves the message, body
    intact, to the dead-letter topic; after the outage an operator replays it with
    `gannet dead-letters --replay --code retries_exhausted` and the task succeeds."""
    relay, db_url = db_relay
    daemon = stack.start_daemon(GANNET_DATABASE_URL=db_url, GANNET_DB_TIMEOUT_S="2")
    task = stack.task(stack.upload(SCENES[0]["file"]))
    relay.cut()
    stack.publish([task])

    (letter,) = stack.dead_letters(1, timeout_s=150)
    assert letter["error_code"] == "retries_exhausted" and letter["task_id"] == task.task_id

    def retries() -> int:
        return sum(o == "retry" for _, o, _ in settled([daemon], {task.task_id}))

    # The nack goes out a moment before its log line is written.
    wait_until(lambda: retries() >= 5, "five logged nacks", 5)
    assert retries() == 5, "one nack per delivery attempt, then Pub/Sub gives up"
    assert daemon.proc.poll() is None
    assert stack.rows([task.task_id]) == {}, "no result row for a task never processed"

    relay.restore()
    replayed = stack.gannet("dead-letters", "--replay", "--code", "retries_exhausted")
    assert replayed.returncode == 0 and "replayed 1 of 1" in replayed.stdout, replayed
    row = stack.wait_rows([task.task_id], timeout_s=60).get(task.task_id)
    assert row is not None and row["status"] == "succeeded", row
    assert row["result"]["detection"]["counts"] == expected_counts(SCENES[0])
    assert stack.pull_dead_letters(1, timeout_s=1) == []
    assert daemon.stop() == 0


def test_every_round_trip_of_a_commit_has_the_answer_deadline(services):
    """Each of a commit's round trips, the rollback after a failed result write
    included, is dropped at the answer deadline when the peer stops answering: a
    rollback without one held its runner for as long as the peer kept the connection
    open (a review: still blocked after 20 s with a 2 s deadline). The cursor
    transactions (a failed task's row) have it too. Nothing is mocked but the write
    that fails."""
    from gannet import sink
    from gannet.task import TaskResult

    relay, through = relay_to(services.database_url)
    db = sink.Sink(through, pool_size=1, answer_deadline_s=1.0)
    db.open()
    tenant, task_id = "acme", f"commit-{uuid.uuid4().hex[:8]}"
    record = TaskResult(
        task_id=task_id, tenant_id=tenant, status="succeeded", result={}, pipeline="DETECTION"
    )
    try:
        assert db.start(task_id, tenant, "pod-a", 60.0).claimed
        relay.freeze()  # a cursor transaction (a failed task's row) on the open connection
        failed = TaskResult(
            task_id=f"{task_id}-f", tenant_id=tenant, status="failed", pipeline="DETECTION"
        )
        started = time.monotonic()
        with pytest.raises(TransientError, match="gave no answer within 1 s"):
            db.save(failed)
        assert time.monotonic() - started < 5
        relay.thaw()
        wait_until(
            lambda: answers(lambda: db.find_success("nothing", "acme")),
            "a new connection once the peer answers again",
            30,
        )

        def write_fails_as_the_peer_goes_silent() -> None:
            relay.freeze()
            raise OSError("the result's write failed")

        started = time.monotonic()
        with pytest.raises(OSError, match="the result's write failed"):
            db.save_claimed(record, "pod-a", write_fails_as_the_peer_goes_silent)
        assert time.monotonic() - started < 5, "the rollback waited past its deadline"
    finally:
        relay.thaw()
        relay.close()
        db.close()
