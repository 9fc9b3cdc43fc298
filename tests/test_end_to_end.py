"""The path of one message through real services: publish -> row + result JSON -> ack."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from conftest import SAMPLES, SCENES, expected_counts, scraped, settled

from gannet.daemon import batch_scheduling
from gannet.dev.demo import DaemonProcess


def test_gannet_publish_names_the_flag_at_fault_and_the_topic_it_could_not_reach(stack):
    """A bad flag is named before anything is uploaded; a topic that does not exist is an
    error that says what to check, exit 1, not a traceback."""
    image = str(SAMPLES / SCENES[0]["file"])
    args = ("publish", "--tenant", stack.tenant, "--pipeline", "DETECTION")
    bad = stack.gannet(*args, "--confidence", "5", image)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "error: --confidence:" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stdout == ""  # the output stays JSON lines, errors on stderr
    uploads = stack.storage.client.list_blobs("gannet-images", prefix=f"{stack.tenant}/uploads/")
    assert list(uploads) == []  # refused before the upload

    lost = stack.gannet(*args, image, GANNET_TOPIC="no-such-topic")
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert "was not published to" in lost.stderr and "no-such-topic" in lost.stderr
    assert "Traceback" not in lost.stderr

    # What the daemon would refuse is refused here, before anything is published: a
    # URL under another tenant's prefix, or outside any tenant's.
    for url in ("gs://gannet-images/someone-else/a.jpg", "gs://gannet-images/../a.jpg"):
        refused = stack.gannet(*args, url)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "image_outside_tenant" in refused.stderr and "Traceback" not in refused.stderr
        assert refused.stdout == ""
    # A local image, its bucket missing: said, not a traceback.
    missing = stack.gannet(*args, image, GANNET_ALLOWED_BUCKETS="no-such-images")
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "could not upload" in missing.stderr and "no-such-images" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_publish_to_row_to_ack(stack):
    """Every published task gets one succeeded row whose counts match the image, the
    same result JSON in GCS, and is acked (nothing is left in the subscription)."""
    entries = SCENES[:3]
    tasks = [stack.task(stack.upload(e["file"]), session_id="s1") for e in entries]
    daemon = stack.start_daemon()
    stack.publish(tasks)
    rows = stack.wait_rows([t.task_id for t in tasks])
    assert len(rows) == len(tasks)

    for task, entry in zip(tasks, entries, strict=True):
        row = rows[task.task_id]
        assert row["status"] == "succeeded", row
        assert row["tenant_id"] == stack.tenant and row["session_id"] == "s1"
        assert row["result"]["detection"]["counts"] == expected_counts(entry), entry["file"]
        assert row["result_uri"] == f"gs://gannet-results/{stack.tenant}/{task.task_id}.json"
        bucket, name = row["result_uri"][5:].split("/", 1)
        stored = json.loads(stack.storage.client.bucket(bucket).blob(name).download_as_bytes())
        assert stored["detection"] == row["result"]["detection"]
        assert stored["task_id"] == task.task_id and "processed_at" in stored
        assert row["timings"]["total_ms"] > 0 and row["delivery_attempt"] == 1

    succeeded = scraped(daemon.metrics_port, "gannet_messages_total", outcome="succeeded")
    assert succeeded == len(tasks)
    assert daemon.stop() == 0
    # Acked: nothing comes back to a new puller, even once the daemon's leases are over.
    assert "acks not delivered" not in daemon.log_path.read_text()
    assert stack.left_after_leases(stack.settings.subscription) == []


def thread_policies(pid: int) -> tuple[set[int], Counter[int]]:
    """The scheduling policy of every thread of process `pid`, and how many threads
    run at each nice value (`ps -L -o nice` shows an operator the same)."""
    policies, nices = set(), Counter[int]()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            policies.add(os.sched_getscheduler(int(task.name)))
            stat = (task / "stat").read_text()
        except (ProcessLookupError, FileNotFoundError):  # a thread that ended meanwhile
            continue
        nices[int(stat.rpartition(")")[2].split()[16])] += 1
    return policies, nices


def test_daemon_threads_run_under_sched_batch_and_decode_nicer_unless_turned_off(stack):
    """By default every thread of a running daemon (runners, batcher, Pub/Sub client,
    health server) is SCHED_BATCH, as `chrt -p` shows an operator, and its decode
    threads, one per runner, run 10 nicer than the rest (offload.py); with
    GANNET_SCHED_BATCH=false and GANNET_DECODE_NICE=0 they keep SCHED_OTHER, and there
    are no decode threads."""
    # The two daemons start side by side (each loads torch and its model: seconds of CPU
    # apiece); each is looked at on its own, once ready.
    default, turned_off = (
        DaemonProcess(stack.env(**extra), stack.tmp / f"daemon-{name}.log")
        for name, extra in (
            ("default", {"GANNET_RUNNERS": "3"}),
            ("off", {"GANNET_SCHED_BATCH": "false", "GANNET_DECODE_NICE": "0"}),
        )
    )
    stack.daemons += [default, turned_off]  # stopped by the fixture if an assertion fails
    default.wait_ready()
    turned_off.wait_ready()
    policies, nices = thread_policies(default.proc.pid)
    assert policies == {os.SCHED_BATCH}
    assert nices[10] == 3 and set(nices) == {0, 10}
    assert default.stop() == 0
    policies, nices = thread_policies(turned_off.proc.pid)
    assert policies == {os.SCHED_OTHER}
    assert set(nices) == {0}
    assert turned_off.stop() == 0


def test_a_refused_sched_batch_is_a_warning_not_a_failed_start(monkeypatch, caplog):
    """A pod whose seccomp profile refuses sched_setscheduler still starts, and its log
    says why its threads keep the default policy. (The refusal is simulated: this
    machine's kernel lets any process lower its own policy.)"""

    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING, logger="gannet.daemon"):
        batch_scheduling()
    assert "could not switch to SCHED_BATCH" in caplog.text


def test_redelivered_task_with_result_is_acked_without_inference(stack):
    """Delivery is at least once: a task whose result is committed is acked again
    without running the model, and its row is not rewritten."""
    task = stack.task(stack.upload(SCENES[0]["file"]))
    daemon = stack.start_daemon()
    stack.publish([task])
    first = stack.wait_rows([task.task_id])[task.task_id]
    stack.publish([task])  # the same task_id again, as a redelivery would bring it
    deadline = time.monotonic() + 30
    outcomes: list[str] = []
    while time.monotonic() < deadline:
        outcomes = [o for _, o, _ in settled([daemon], {task.task_id})]
        if len(outcomes) >= 2:
            break
        time.sleep(0.2)
    assert outcomes == ["succeeded", "duplicate"]
    again = stack.rows([task.task_id])[task.task_id]
    assert again["updated_at"] == first["updated_at"]
    # One model call in all: the first delivery's (warm-up does not go through a batch).
    assert scraped(daemon.metrics_port, "gannet_batch_size_count") == 1
