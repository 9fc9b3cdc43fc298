"""Crashes and shutdowns lose nothing and duplicate nothing.

These start and kill real daemons against the emulators, so they are marked slow; they
still run in CI (`make test` runs every test). They get services of their own, so that
another module's leftover leases cannot decide whether a redelivery arrives.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from conftest import SCENES, make_stack, prepared_services, scraped, settled, wait_until


def _wait_for_some(stack, task_ids, at_least, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = stack.rows(task_ids)
        if len(rows) >= at_least:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} results after {timeout_s}s")


def _readyz(port: int) -> int:
    """/readyz status, polled briefly: the signal handler runs within milliseconds."""
    deadline = time.monotonic() + 2
    status = 0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        time.sleep(0.02)
    return status


@pytest.fixture(scope="module")
def own_services(tmp_path_factory):
    with prepared_services(tmp_path_factory.mktemp("reliability-services")) as running:
        yield running


@pytest.fixture
def own_stack(own_services, tmp_path):
    made = make_stack(own_services, tmp_path, ack_deadline_s=10)
    yield made
    for daemon in made.daemons:  # a failed assertion must not leave a daemon running
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(timeout=30)


@pytest.mark.slow
def test_kill_9_mid_task_then_restart_loses_nothing_and_reruns_nothing_committed(own_stack):
    """SIGKILL gives no chance to clean up: unacked messages come back after the ack
    deadline, and the restarted daemon finishes them; no task is lost, and no task the
    killed daemon had committed runs its model again (it is acked as a duplicate).

    The local Pub/Sub emulator sits behind gannet.dev.relay: the emulator never notices
    a killed subscriber's stream on its own and keeps handing messages to it."""
    stack = own_stack
    url = stack.upload(SCENES[1]["file"])
    tasks = [stack.task(url) for _ in range(48)]  # enough that the kill lands mid-batch
    ids = [t.task_id for t in tasks]
    first = stack.start_daemon(GANNET_RUNNERS="2")
    stack.publish(tasks)
    _wait_for_some(stack, ids, at_least=2)
    first.proc.send_signal(signal.SIGKILL)
    first.stop(timeout_s=10)
    committed_at_kill = set(stack.rows(ids))  # a killed daemon commits nothing more
    assert len(committed_at_kill) < len(tasks), "the kill must land mid-batch"

    second = stack.start_daemon()
    try:  # redelivery comes after the 10 s stream ack deadline; 60 s is plenty
        rows = stack.wait_rows(ids, timeout_s=60)
    finally:
        second.stop()
    assert set(rows) == set(ids), f"lost after kill -9: {set(ids) - set(rows)}"
    assert all(r["status"] == "succeeded" for r in rows.values())
    # The second daemon never ran the model on a task the killed one had committed, and
    # committed each of the others once; or found it committed, if the killed daemon's
    # last COMMIT, sent before the kill, landed after the snapshot.
    entries = [e for e in second.log_entries() if e.get("task_id") in ids]
    inferred = Counter(e["task_id"] for e in entries if e.get("inferred") is True)
    again = {t: inferred[t] for t in committed_at_kill if inferred[t]}
    assert not again, f"committed before the kill, inferred again after it: {again}"
    settled_as = Counter((e["task_id"], e["outcome"]) for e in entries)
    for t in set(ids) - committed_at_kill:
        succeeded, duplicate = settled_as[t, "succeeded"], settled_as[t, "duplicate"]
        assert succeeded == 1 or (succeeded == 0 and duplicate), (t, succeeded, duplicate)
    # The second daemon got the killed daemon's leases as redeliveries (attempt > 1).
    assert any(r["delivery_attempt"] and r["delivery_attempt"] > 1 for r in rows.values())


@pytest.mark.slow
def test_sigterm_mid_batch_then_restart_loses_and_duplicates_nothing(own_stack):
    """SIGTERM: readiness drops at once, running tasks finish and are acked, queued ones
    are nacked and go to the next daemon; no task is processed to success twice."""
    stack = own_stack
    url = stack.upload(SCENES[2]["file"])
    # Enough tasks that the SIGTERM lands mid-batch however fast this machine runs
    # them: with 16, a fast hour once finished them all before the poll saw two.
    tasks = [stack.task(url) for _ in range(48)]
    ids = [t.task_id for t in tasks]
    first = stack.start_daemon(GANNET_RUNNERS="2", GANNET_MAX_MESSAGES="8")
    stack.publish(tasks)
    _wait_for_some(stack, ids, at_least=2)
    # Queued messages to nack when the signal lands: the emulator delivers in bursts, and
    # between them the queue can be empty (2 runners cannot start 3 in the moment after).
    wait_until(
        lambda: scraped(first.metrics_port, "gannet_messages_leased_waiting") >= 3,
        "3 messages waiting",
        60,
    )
    first.proc.send_signal(signal.SIGTERM)
    assert _readyz(first.metrics_port) == 503, "readiness must drop as soon as SIGTERM lands"
    started = time.monotonic()
    assert first.proc.wait(timeout=60) == 0  # one SIGTERM: a second one would force
    first.stop()
    assert time.monotonic() - started < 25, "must exit within the grace period"
    done_by_first = stack.rows(ids)
    assert len(done_by_first) < len(ids), "SIGTERM must land mid-batch"

    second = stack.start_daemon()
    try:
        rows = stack.wait_rows(ids, timeout_s=120)
    finally:
        second.stop()
    assert set(rows) == set(ids) and all(r["status"] == "succeeded" for r in rows.values())
    outcomes = Counter((t, o) for t, o, _ in settled(stack.daemons, set(ids)))
    for task_id in ids:
        assert outcomes[(task_id, "succeeded")] == 1, task_id
        # Acks of finished work reached Pub/Sub before exit: nothing came back as a duplicate.
        assert outcomes[(task_id, "duplicate")] == 0, task_id
    nacked = sum(n for (_, outcome), n in outcomes.items() if outcome == "shutdown")
    assert nacked >= 1, "queued messages are nacked on shutdown, not held"


class _BlackHole:
    """A TCP server that accepts connections and never answers: a GCS that hangs."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        for conn in [*self.accepted, self.server]:
            conn.close()


@pytest.mark.slow
def test_a_second_sigterm_nacks_running_work_at_once_and_exits(own_stack):
    """Two tasks stuck on a GCS read that never returns: the first SIGTERM waits for
    them (60 s of grace), a second one stops waiting, nacks them and exits 0 within
    seconds; the nacked messages come straight back for another pod."""
    hole = _BlackHole()
    try:
        daemon = own_stack.start_daemon(
            GANNET_STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{hole.port}",
            GANNET_SHUTDOWN_GRACE_S="60",
            GANNET_RUNNERS="2",
            # Leases longer than the wait for the messages below: only a nack that
            # reached Pub/Sub can bring them back within it.
            GANNET_STREAM_ACK_DEADLINE_S="60",
        )
        bucket, tenant = own_stack.settings.allowed_buckets[0], own_stack.tenant
        tasks = [own_stack.task(f"gs://{bucket}/{tenant}/hang-{i}.jpg") for i in range(2)]
        at_start = len(hole.accepted)  # the start's results-bucket check, given up on
        own_stack.publish(tasks)
        deadline = time.monotonic() + 60
        while len(hole.accepted) < at_start + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(hole.accepted) >= at_start + 2, "both runners must be stuck reading the image"

        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(3)
        assert daemon.proc.poll() is None, "the first SIGTERM waits for running work"
        second = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.stop(timeout_s=30) == 0
        assert time.monotonic() - second < 10, "a second SIGTERM must not wait out the grace"
    finally:
        hole.close()
    ids = {t.task_id for t in tasks}
    assert sorted(o for _, o, _ in settled([daemon], ids)) == ["shutdown", "shutdown"]
    assert any("second stop signal" in e.get("message", "") for e in daemon.log_entries())
    back: set[str] = set()
    deadline = time.monotonic() + 30
    while back != ids and time.monotonic() < deadline:
        back |= {
            json.loads(m.data)["task_id"] for m in own_stack.pull(own_stack.settings.subscription)
        }
    assert back == ids, "nacked messages are redelivered at once, not after their lease"


@pytest.mark.slow
def test_a_task_stuck_past_the_stall_limit_restarts_the_daemon_and_is_not_lost(own_stack):
    """A runner that never returns (a GPU hung without an error) left the pod live and
    ready with its GPU idle, the message's lease extended for an hour. Past
    GANNET_TASK_STALL_S the daemon says why, fails /healthz, drains (the stuck task
    nacked) and exits 1 for a restart; the task is not lost. A hung GPU cannot be
    staged here: a real wait stands in for it, the task's claim row held locked by
    another session, which the runner waits on in PostgreSQL."""
    import psycopg

    stack = own_stack
    task = stack.task(stack.upload(SCENES[0]["file"]))
    with psycopg.connect(stack.settings.database_url) as holder:
        holder.execute("SELECT set_config('app.current_tenant', %s, false)", (stack.tenant,))
        holder.execute(
            "INSERT INTO task_claims VALUES (%s, %s, 'elsewhere', now() - interval '1 s')",
            (task.task_id, stack.tenant),
        )
        holder.commit()
        holder.execute("SELECT 1 FROM task_claims WHERE task_id = %s FOR UPDATE", (task.task_id,))
        stuck = stack.start_daemon(GANNET_TASK_STALL_S="2", GANNET_SHUTDOWN_GRACE_S="2")
        stack.publish([task])
        assert stuck.proc.wait(timeout=60) == 1
        stuck.stop()  # exited: closes its log
        said = [e for e in stuck.log_entries() if "GANNET_TASK_STALL_S" in e["message"]]
        assert said and said[0]["severity"] == "CRITICAL", stuck.log_entries()[-5:]
        assert "this process is stuck" in said[0]["message"]
        nacked = [e for e in stuck.log_entries() if e.get("task_id") == task.task_id]
        assert [e.get("outcome") for e in nacked if e.get("outcome")] == ["shutdown"]
    second = stack.start_daemon()
    try:
        rows = stack.wait_rows([task.task_id], timeout_s=60)
    finally:
        second.stop()
    assert rows[task.task_id]["status"] == "succeeded"
