"""The runner pool in-process, with real threads: which device a job runs on, that every
job is answered exactly once, and what shutdown does to queued and running jobs.

The daemon tests see these only through a child process and its logs; here each case is
forced with threading.Event gates, so a job is known to be running (or queued) when the
test acts, instead of hoping a sleep was long enough.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from gannet.outcome import Decision, Outcome, shutdown
from gannet.pool import Job, RunnerPool, assign_devices

WAIT_S = 10  # a gate or a job that takes longer than this is a failure, not slowness


def done(item: str) -> Outcome:
    return Outcome(Decision.ACK, "succeeded", fields={"item": item})


class Gated:
    """A handler that records each call and, for the items named in `hold`, waits on
    `release` after saying it has `entered`."""

    def __init__(self, hold: set[str]) -> None:
        self.hold = hold
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[tuple[str, str, str]] = []  # (item, device, thread name)
        self._lock = threading.Lock()

    def __call__(self, item: str, device: str) -> Outcome:
        with self._lock:
            self.calls.append((item, device, threading.current_thread().name))
        if item in self.hold:
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the job"
        return done(item)


def abandoned(item: str) -> Outcome:
    return shutdown(None)


def test_assign_devices_spreads_runners_round_robin():
    """N runners over the GPUs: each device gets its turn, none gets two ahead."""
    assert assign_devices(["cuda:0", "cuda:1", "cuda:2"], 5) == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:0",
        "cuda:1",
    ]
    assert assign_devices(["cpu"], 3) == ["cpu", "cpu", "cpu"]


def test_runners_are_pinned_to_their_device_and_every_job_is_answered_once():
    """Four runners over two devices run at the same time, each always on its own
    device; 40 jobs are each handled once and answered with their own result."""
    meet = threading.Barrier(4, timeout=WAIT_S)  # passes only if 4 runners run at once
    calls: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def handle(item: str, device: str) -> Outcome:
        with lock:
            calls.append((item, device, threading.current_thread().name))
        if item.startswith("meet"):
            meet.wait()
        return done(item)

    pool: RunnerPool[str] = RunnerPool(["cuda:0", "cuda:1"], 4, handle, abandoned)
    assert pool.devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    pool.start()
    jobs = [Job(f"meet-{i}") for i in range(4)] + [Job(f"job-{i}") for i in range(36)]
    try:
        assert all(pool.submit(job) for job in jobs)
        assert all(job.done.wait(WAIT_S) for job in jobs)
    finally:
        pool.stop_accepting()
        assert pool.join(WAIT_S)

    assert [job.outcome.fields["item"] for job in jobs] == [job.item for job in jobs]
    assert Counter(item for item, _, _ in calls) == Counter(job.item for job in jobs)
    devices_of_thread: dict[str, set[str]] = {}
    for _, device, thread in calls:
        devices_of_thread.setdefault(thread, set()).add(device)
    # The barrier only passes with 4 runners in it at once: two per device.
    meeting = {thread for item, _, thread in calls if item.startswith("meet")}
    assert len(meeting) == 4
    assert all(len(devices) == 1 for devices in devices_of_thread.values())
    assert all(thread.endswith(next(iter(d))) for thread, d in devices_of_thread.items())
    assert Counter(next(iter(d)) for d in devices_of_thread.values()) == {
        "cuda:0": 2,
        "cuda:1": 2,
    }


def test_stop_accepting_returns_the_unstarted_jobs_and_refuses_new_ones():
    """With the one runner busy, queued jobs come back from stop_accepting (for the
    caller to nack) and never run; a later submit is refused; the running job still
    finishes with its own result."""
    handler = Gated(hold={"running"})
    pool: RunnerPool[str] = RunnerPool(["cpu"], 1, handler, abandoned)
    pool.start()
    running, queued = Job("running"), [Job("queued-1"), Job("queued-2")]
    assert pool.submit(running)
    assert handler.entered.wait(WAIT_S)
    assert all(pool.submit(job) for job in queued)
    assert (pool.running(), pool.waiting()) == (1, 2)

    left = pool.stop_accepting()
    assert left == queued
    late = Job("late")
    assert pool.submit(late) is False

    handler.release.set()
    assert pool.join(WAIT_S)
    assert running.outcome is not None and running.outcome.fields["item"] == "running"
    assert [item for item, _, _ in handler.calls] == ["running"]
    assert not any(job.done.is_set() for job in [*queued, late])
    assert (pool.running(), pool.waiting()) == (0, 0)


def test_a_job_past_the_grace_period_is_abandoned_and_a_late_result_cannot_overwrite_it():
    """join(timeout) gives up on a job that runs past it; abandon_running answers it with
    on_abandon's outcome (a nack) at once, and when the runner finishes later its result
    is dropped: the first answer stands."""
    handler = Gated(hold={"slow"})
    pool: RunnerPool[str] = RunnerPool(["cpu"], 1, handler, lambda item: shutdown(None))
    pool.start()
    slow = Job("slow")
    assert pool.submit(slow)
    assert handler.entered.wait(WAIT_S)
    assert pool.stop_accepting() == []

    assert pool.join(0.2) is False
    assert not slow.done.is_set()
    assert pool.abandon_running() == 1
    assert slow.done.is_set()
    assert slow.outcome is not None
    assert (slow.outcome.decision, slow.outcome.label) == (Decision.NACK, "shutdown")

    handler.release.set()  # the runner now returns "succeeded", too late
    assert pool.join(WAIT_S)
    assert (slow.outcome.decision, slow.outcome.label) == (Decision.NACK, "shutdown")
    assert pool.abandon_running() == 0


def test_a_job_answered_before_a_runner_reaches_it_never_runs():
    """A job answered while still queued (say by a shutdown nack) is skipped by the
    runner that dequeues it: the message is not worked on after it was nacked."""
    handler = Gated(hold={"busy"})
    pool: RunnerPool[str] = RunnerPool(["cpu"], 1, handler, abandoned)
    pool.start()
    busy, answered, after = Job("busy"), Job("answered"), Job("after")
    assert pool.submit(busy)
    assert handler.entered.wait(WAIT_S)
    assert pool.submit(answered) and pool.submit(after)
    assert answered.finish(shutdown(None))
    handler.release.set()
    assert after.done.wait(WAIT_S)
    pool.stop_accepting()
    assert pool.join(WAIT_S)
    assert [item for item, _, _ in handler.calls] == ["busy", "after"]
    assert answered.outcome is not None and answered.outcome.label == "shutdown"


def test_join_returns_early_when_abort_is_set():
    """A second SIGTERM (the abort event) ends the wait for running work at once, long
    before the grace period is over."""
    handler = Gated(hold={"slow"})
    pool: RunnerPool[str] = RunnerPool(["cpu"], 2, handler, abandoned)
    pool.start()
    slow = Job("slow")
    assert pool.submit(slow)
    assert handler.entered.wait(WAIT_S)
    pool.stop_accepting()
    abort = threading.Event()
    timer = threading.Timer(0.2, abort.set)
    timer.start()
    try:
        started = time.monotonic()
        assert pool.join(60, abort=abort) is False
        assert time.monotonic() - started < 5
        assert abort.is_set()
        assert pool.abandon_running() == 1
    finally:
        timer.cancel()
        handler.release.set()
    assert pool.join(WAIT_S)
    assert slow.outcome is not None and slow.outcome.label == "shutdown"


def test_a_handler_that_raises_answers_none_and_the_runner_goes_on():
    """A crash in the handler answers its job with None (the callback then nacks, so the
    message is retried) and the runner thread survives to run the next job."""

    def handle(item: str, device: str) -> Outcome:
        if item == "bad":
            raise RuntimeError("boom")
        return done(item)

    pool: RunnerPool[str] = RunnerPool(["cpu"], 1, handle, abandoned)
    pool.start()
    bad, good = Job("bad"), Job("good")
    try:
        assert pool.submit(bad) and pool.submit(good)
        assert bad.done.wait(WAIT_S) and good.done.wait(WAIT_S)
    finally:
        pool.stop_accepting()
        assert pool.join(WAIT_S)
    assert bad.outcome is None
    assert good.outcome is not None and good.outcome.fields["item"] == "good"
