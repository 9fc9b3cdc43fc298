"""The path of a message through the daemon's own parts, in-process: the real pipeline
and model, the runner pool, the Settler, PostgreSQL, the GCS emulator and a streaming
pull from the Pub/Sub emulator. Only the process around them (`gannet run`) is missing,
so these run in seconds where the daemon tests take tens of seconds.

The parts are built and the model warmed once for the module (daemon.build, as the
daemon does); each test opens its own stream on the module's subscription and closes it
before looking at what was acked. An unacked message stays invisible while its lease
lasts, so `Stack.unacked` ends the leases of the test's messages first (ack deadline 0):
an acked message stays gone, any other comes back.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from conftest import SAMPLES, SCENES, expected_counts, make_stack, wait_until

from gannet import daemon
from gannet.dev.local_services import free_port
from gannet.dev.publish import make_task
from gannet.dispatch import Dispatcher
from gannet.errors import ErrorCode
from gannet.metrics import Metrics
from gannet.outcome import Decision, Settler, shutdown
from gannet.sink import Sink
from gannet.subscriber import Subscriber


@pytest.fixture(scope="module")
def served(services, tmp_path_factory):
    """One module-wide Stack and the daemon's parts on it, warmed, runners started."""
    stack = make_stack(services, tmp_path_factory.mktemp("dispatch"))
    parts = daemon.build(stack.settings, Metrics())
    pool = parts.dispatcher.pool
    try:
        parts.pipeline.warm(parts.devices)
        pool.start()
        yield stack, parts
    finally:
        pool.stop_accepting()
        pool.join(10)
        parts.callbacks.close()
        parts.close(30)


@pytest.fixture(autouse=True)
def streams(served):
    """After each test, whatever it left in the queues (only a failed test leaves
    anything) is removed, so that one failure does not fail the tests after it."""
    opened: list[Delivered] = []
    yield opened
    stack, _ = served
    stack.unacked([m for delivered in opened for m in delivered.messages], wait_s=0)
    stack.pull(stack.settings.dead_letter_subscription, timeout_s=1)  # returns at once


class Delivered:
    """Records each message the stream delivers, then hands it to the real callback."""

    def __init__(self, on_message: Any) -> None:
        self.on_message = on_message
        self.messages: list[Any] = []
        self._lock = threading.Lock()
        self.stream: Any = None  # the stream's future, once started: done when it stops

    def __call__(self, message: Any) -> None:
        with self._lock:
            self.messages.append(message)
        self.on_message(message)


def open_stream(
    served, streams: list[Delivered], dispatcher: Dispatcher
) -> tuple[Delivered, Subscriber]:
    """A started stream feeding `dispatcher`, opened as `gannet run` opens it: its acks
    go out together, and its stop waits until every message it delivered is settled."""
    stack, parts = served
    delivered = Delivered(dispatcher.on_message)
    streams.append(delivered)
    subscriber = Subscriber(
        parts.subscriber_client,
        stack.settings.subscription_path(),
        4,
        delivered,
        acks=dispatcher.settlers[dispatcher.first_lane].acks,
        settled=dispatcher.wait_settled,
    )
    delivered.stream = subscriber.start()
    return delivered, subscriber


@contextmanager
def pulling(
    served, streams: list[Delivered], dispatcher: Dispatcher | None = None
) -> Iterator[Delivered]:
    """A stream feeding the daemon's dispatcher (or `dispatcher`); closed at the end after
    every message it delivered has been settled."""
    delivered, subscriber = open_stream(served, streams, dispatcher or served[1].dispatcher)
    try:
        yield delivered
    finally:
        stopped = subscriber.stop_pulling(timeout=10)
        closed = subscriber.wait_closed(timeout=30)
    assert stopped and closed, "the stream did not close"


def count(parts, name: str, **labels: str) -> float:
    return parts.metrics.registry.get_sample_value(name, labels) or 0.0


def runner_starts(parts) -> float:
    """Tasks a runner began: the committed-result lookup is a runner's first stage."""
    return count(parts, "gannet_stage_seconds_count", stage="lookup")


def pod(
    stack, parts, holder: str = "pod-b", claim_ttl_s: float = 60, settlers: Any = None
) -> Dispatcher:
    """Another worker on the module's parts (its own runners, not started, and its own
    name in task claims), as a second pod would be; `settlers`: instead of the module's."""
    return Dispatcher(
        parts.pipeline,
        parts.sink,
        parts.storage,
        settlers or parts.dispatcher.settlers,
        parts.metrics,
        stack.settings.results_bucket,
        stack.settings.max_body_bytes,
        parts.devices,
        1,
        holder=holder,
        claim_ttl_s=claim_ttl_s,
    )


def without_runners(stack, parts) -> Dispatcher:
    """A Dispatcher on the module's parts whose runner pool takes no more work, as
    during a shutdown."""
    dispatcher = pod(stack, parts)
    assert dispatcher.pool.stop_accepting() == []
    return dispatcher


def test_a_valid_task_gets_a_succeeded_row_with_the_right_counts_and_is_acked(served, streams):
    """A task for a sample image: one succeeded row whose counts match what the image is
    known to contain, counted as succeeded, and the message acked."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[0]["file"]))
    succeeded = count(parts, "gannet_messages_total", outcome="succeeded")
    with pulling(served, streams) as delivered:
        stack.publish([task])
        row = stack.wait_rows([task.task_id], timeout_s=60)[task.task_id]

    assert row["status"] == "succeeded", row
    assert row["result"]["detection"]["counts"] == expected_counts(SCENES[0])
    assert row["delivery_attempt"] == 1
    assert row["result_uri"] == f"gs://gannet-results/{stack.tenant}/{task.task_id}.json"
    assert count(parts, "gannet_messages_total", outcome="succeeded") == succeeded + 1
    assert len(delivered.messages) == 1
    assert stack.unacked(delivered.messages) == []


def test_a_body_that_is_not_json_is_quarantined_without_taking_a_runner(served, streams):
    """Bad JSON goes to the dead-letter topic with error_code bad_json and is acked; no
    runner ever starts on it."""
    stack, parts = served
    started = runner_starts(parts)
    with pulling(served, streams) as delivered:
        message_id = stack.publish_raw(b"{not json")
        dead = stack.pull_dead_letters(1, timeout_s=15)

    assert [m.data for m in dead] == [b"{not json"]
    attributes = dead[0].attributes
    assert attributes["error_code"] == "bad_json" and attributes["error"]
    assert attributes["original_message_id"] == message_id
    assert attributes["subscription"] == stack.settings.subscription
    assert runner_starts(parts) == started
    assert stack.unacked(delivered.messages) == []


def test_poison_whose_dead_letter_cannot_be_published_is_nacked_not_lost(served, streams, caplog):
    """When Pub/Sub refuses the dead letter (here its topic does not exist), the poison
    message is nacked, never acked: it comes back, and after the subscription's delivery
    attempts Pub/Sub's own dead-letter policy moves it. The log says why."""
    stack, parts = served
    lane = parts.dispatcher.first_lane
    missing = stack.settings.path("topics", "no-such-dead-letter-topic")
    settler = Settler(
        parts.publisher,
        missing,
        stack.settings.subscription,
        parts.metrics,
        parts.dispatcher.settlers[lane].acks,
        lane,
    )
    dispatcher = pod(stack, parts, settlers={lane: settler})
    retries = count(parts, "gannet_messages_total", outcome="retry")
    with pulling(served, streams, dispatcher) as delivered:
        stack.publish_raw(b"{not json, no dead letter")
        wait_until(
            lambda: count(parts, "gannet_messages_total", outcome="retry") > retries, "a nack"
        )

    lines = [r for r in caplog.records if r.msg.startswith("could not publish")]
    said = lines[0].getMessage() if lines else ""
    assert f"topic {missing}: it does not exist" in said and "GANNET_DEAD_LETTER_TOPIC" in said
    assert said.endswith("nacking instead")
    assert all("not found" in r.fields["error"].lower() for r in lines)  # Pub/Sub's answer
    # Not acked: still in the subscription, or already moved there by Pub/Sub's policy.
    back = stack.unacked(delivered.messages) or stack.pull_dead_letters(1, timeout_s=5)
    assert b"{not json, no dead letter" in {m.data for m in back}


def test_an_unknown_pipeline_is_quarantined_with_a_failed_row(served, streams):
    """A task naming a pipeline its tenant's config does not have: a failed row with the
    reason, the message dead-lettered with the task id and acked, no runner used."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[0]["file"]))
    body = json.dumps({**json.loads(task.model_dump_json()), "pipeline": "NO_SUCH_PIPELINE"})
    started = runner_starts(parts)
    with pulling(served, streams) as delivered:
        stack.publish_raw(body.encode())
        dead = stack.pull_dead_letters(1, timeout_s=15)

    assert [m.data for m in dead] == [body.encode()]
    assert dead[0].attributes["error_code"] == "unknown_pipeline"
    assert dead[0].attributes["task_id"] == task.task_id
    row = stack.rows([task.task_id])[task.task_id]
    assert (row["status"], row["error_code"]) == ("failed", "unknown_pipeline")
    assert runner_starts(parts) == started
    assert stack.unacked(delivered.messages) == []


def test_an_oversized_body_is_quarantined_without_being_parsed(served, streams, monkeypatch):
    """A body over GANNET_MAX_BODY_BYTES is dead-lettered with body_too_large and acked,
    and is never parsed for its ids (so it gets no failed row): up to Pub/Sub's 10 MB
    such a parse held the GIL over a second, every thread of the daemon stopped. The
    daemon's `identify` (the parse for the ids) is replaced by one that records its
    calls and finds no ids, so that a parse shows even where it would find none."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[0]["file"]))
    limit = parts.dispatcher.max_body_bytes
    body = task.model_dump_json().encode().ljust(limit + 1)  # valid but for its size
    parsed: list[bytes] = []
    monkeypatch.setattr("gannet.dispatch.identify", lambda b: parsed.append(b) or (None, None))
    with pulling(served, streams) as delivered:
        stack.publish_raw(body)
        dead = stack.pull_dead_letters(1, timeout_s=15)

    assert [m.data for m in dead] == [body]
    assert dead[0].attributes["error_code"] == "body_too_large"
    assert f"{limit + 1} bytes; the limit is {limit}" in dead[0].attributes["error"]
    assert "task_id" not in dead[0].attributes and parsed == []
    assert stack.rows([task.task_id]) == {}
    assert stack.unacked(delivered.messages) == []


def test_a_message_that_arrives_while_the_runners_stop_is_nacked_for_another_pod(served, streams):
    """A pod whose runners no longer take work (shutting down) nacks what still arrives:
    the task is not run, and the message is redelivered to the next puller."""
    stack, parts = served
    stopping = without_runners(stack, parts)
    task = stack.task(stack.upload(SCENES[0]["file"]))
    shutdowns = count(parts, "gannet_messages_total", outcome="shutdown")
    started = runner_starts(parts)
    with pulling(served, streams, stopping) as delivered:
        stack.publish([task])
        deadline = time.monotonic() + 15
        while count(parts, "gannet_messages_total", outcome="shutdown") == shutdowns:
            assert time.monotonic() < deadline, "the message was never settled"
            time.sleep(0.05)

    # Pulled as it is: the stream leased it for 60 s, so only a nack that reached
    # Pub/Sub brings it back now (Stack.unacked would end the lease itself).
    again: list[Any] = []
    deadline = time.monotonic() + 10
    while not again and time.monotonic() < deadline:
        again = stack.pull(stack.settings.subscription, timeout_s=2)
    assert [json.loads(m.data)["task_id"] for m in again] == [task.task_id]
    # Pub/Sub may hand a nacked message straight back to the same stream while it is
    # still open; each delivery to the stopping pod is nacked again, none is run.
    taken = [json.loads(m.data)["task_id"] for m in delivered.messages]
    assert taken and set(taken) == {task.task_id}
    settled = count(parts, "gannet_messages_total", outcome="shutdown") - shutdowns
    assert settled == len(taken)
    assert runner_starts(parts) == started
    assert stack.rows([task.task_id]) == {}


def test_a_message_still_running_when_its_stream_stops_is_acked_before_the_stream_ends(
    served, streams
):
    """The callback returns once a runner has the message, and the runner settles it. A
    stream that stops meanwhile (SIGTERM) waits for that: it ends only after the task is
    committed and its ack sent, so the message is not delivered again."""
    stack, parts = served
    dispatcher = pod(stack, parts, holder="pod-stopping-stream")  # its runner waits
    task = stack.task(stack.upload(SCENES[0]["file"]))
    delivered, subscriber = open_stream(served, streams, dispatcher)
    try:
        stack.publish([task])
        deadline = time.monotonic() + 15
        while dispatcher.pool.waiting() < 1:
            assert time.monotonic() < deadline, "the message never reached the pool"
            time.sleep(0.02)
        subscriber.stop_pulling_async()
        assert subscriber.stream_closed.wait(10), "the stream did not stop pulling"
        assert not subscriber.wait_closed(timeout=1), "ended with a message unsettled"
    finally:
        dispatcher.pool.start()
    try:
        assert subscriber.wait_closed(timeout=60), "the stream did not end once settled"
    finally:
        dispatcher.pool.stop_accepting()
        dispatcher.pool.join(10)

    assert stack.rows([task.task_id])[task.task_id]["status"] == "succeeded"
    assert len(delivered.messages) == 1
    assert stack.unacked(delivered.messages) == []


def test_a_settle_that_raises_nacks_the_message_and_keeps_the_runner(served, streams, monkeypatch):
    """A runner settles its message; a bug there (the Settler raising, injected once)
    must neither end the runner's thread nor leave the message leased until its lease
    runs out: it is logged and nacked, comes back at once, and the same runner answers
    the redelivery (a duplicate: the row was committed before the settle)."""
    stack, parts = served
    dispatcher = pod(stack, parts, holder="pod-settle-raises")  # one runner
    settler = dispatcher.settlers[dispatcher.first_lane]
    settle = settler.settle
    labels: list[str] = []

    def raises_once(message: Any, outcome: Any, duration_s: float) -> Any:
        labels.append(outcome.label)
        if len(labels) == 1:
            raise RuntimeError("injected: the settle failed")
        return settle(message, outcome, duration_s)

    monkeypatch.setattr(settler, "settle", raises_once)
    task = stack.task(stack.upload(SCENES[0]["file"]))
    dispatcher.pool.start()
    try:
        with pulling(served, streams, dispatcher) as delivered:
            stack.publish([task])
            deadline = time.monotonic() + 30
            while len(labels) < 2:
                assert time.monotonic() < deadline, f"not redelivered and settled: {labels}"
                time.sleep(0.05)
    finally:
        dispatcher.pool.stop_accepting()
        dispatcher.pool.join(10)

    assert labels == ["succeeded", "duplicate"]
    assert len(delivered.messages) == 2
    assert stack.unacked(delivered.messages) == []


def test_a_check_that_raises_nacks_the_message_and_keeps_the_stream(
    served, streams, monkeypatch, caplog
):
    """A bug in the callback thread's checks (an exception that is no GannetError,
    injected once into pipeline.check) must not stop the stream, as an exception let out
    of the callback does (the daemon would exit, and the message would kill the next one
    too): the message is logged and nacked, comes back, and succeeds; a task published
    after it is not held up."""
    stack, parts = served
    check = parts.pipeline.check
    raised: list[str] = []

    def raises_once(task: Any) -> Any:
        if not raised:
            raised.append(task.task_id)
            raise RuntimeError("injected: the check failed")
        return check(task)

    monkeypatch.setattr(parts.pipeline, "check", raises_once)
    first, second = (stack.task(stack.upload(SCENES[0]["file"])) for _ in range(2))
    errors = count(parts, "gannet_messages_total", outcome="error")
    with pulling(served, streams) as delivered:
        stack.publish([first])
        wait_until(lambda: bool(raised), "the first task checked", timeout_s=30)
        stack.publish([second])
        rows = stack.wait_rows([first.task_id, second.task_id], timeout_s=60)
        assert not delivered.stream.done(), "the stream stopped"

    assert raised == [first.task_id]
    assert {row["status"] for row in rows.values()} == {"succeeded"}
    assert count(parts, "gannet_messages_total", outcome="error") == errors + 1
    assert "unexpected error checking a message" in caplog.text
    assert len(delivered.messages) == 3  # the first twice
    assert stack.unacked(delivered.messages) == []


def test_outcome_here_runs_a_task_on_the_calling_thread_and_a_repeat_is_a_duplicate(served):
    """The one-at-a-time path (the bench's worker) needs no runner: on a dispatcher whose
    runners take no work, the task runs to a succeeded row on this thread. The same task
    again is a duplicate, answered from the committed row without another model call."""
    stack, parts = served
    dispatcher = without_runners(stack, parts)
    task = stack.task(stack.upload(SCENES[0]["file"]))
    body = task.model_dump_json().encode()
    model_calls = count(parts, "gannet_batch_size_count")

    first = dispatcher.outcome_here(body, 1, "cpu")
    assert (first.decision, first.label) == (Decision.ACK, "succeeded")
    assert first.fields["counts"] == expected_counts(SCENES[0])
    row = stack.rows([task.task_id])[task.task_id]
    assert row["status"] == "succeeded"
    assert row["result"]["detection"]["counts"] == expected_counts(SCENES[0])
    assert count(parts, "gannet_batch_size_count") == model_calls + 1

    again = dispatcher.outcome_here(body, 2, "cpu")
    assert (again.decision, again.label) == (Decision.ACK, "duplicate")
    assert again.fields["result_uri"] == row["result_uri"]
    assert count(parts, "gannet_batch_size_count") == model_calls + 1
    assert stack.rows([task.task_id])[task.task_id]["updated_at"] == row["updated_at"]


def model_calls(parts) -> float:
    return count(parts, "gannet_stage_seconds_count", stage="detection")


def result_object(parts, uri: str) -> dict[str, Any]:
    bucket, name = uri.removeprefix("gs://").split("/", 1)
    return json.loads(parts.storage.client.bucket(bucket).blob(name).download_as_bytes())


class TwoAtOnce:
    """Two deliveries of one body in flight together, deterministically: the first is
    queued on runners that have not started, then the second arrives, and must not
    queue a job of its own. `release()` starts the runners; `outcomes` fill in after.
    Settling records the outcome and applies it as `applied` says (by default as is)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        body: bytes,
        applied: Any = None,
        second: bytes = b"",
        queued: int = 1,
    ) -> None:
        """`second`: the second delivery's body, if not the first's; `queued`: the jobs
        the two deliveries queue (1: the second waits on the first's)."""
        self.dispatcher = dispatcher
        self.applied = applied or (lambda outcome: outcome)
        self.outcomes: list[Any] = []
        bodies = (body, second or body)
        self.threads = [
            threading.Thread(target=self._deliver, args=(b, n))
            for n, b in enumerate(bodies, start=1)
        ]
        self.threads[0].start()
        deadline = time.monotonic() + 10
        while dispatcher.pool.waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.threads[1].start()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert dispatcher.pool.waiting() == queued, "the second delivery's job"
            time.sleep(0.01)

    def _deliver(self, body: bytes, attempt: int) -> None:
        settled = threading.Event()

        def settle(outcome: Any) -> Any:
            self.outcomes.append(outcome)
            settled.set()
            return self.applied(outcome)

        lane = self.dispatcher.first_lane
        run = functools.partial(self.dispatcher.hand_over, lane=lane, span=None, settle=settle)
        outcome = self.dispatcher.outcome_of(body, attempt, run)
        if outcome is not None:  # answered on this thread (the second delivery)
            settle(outcome)
        settled.wait(60)

    def wait(self) -> list[Any]:
        for thread in self.threads:
            thread.join(60)
        return self.outcomes

    def run(self) -> list[Any]:
        """Start the runners, wait for both outcomes, stop the runners."""
        self.dispatcher.pool.start()
        try:
            return self.wait()
        finally:
            self.dispatcher.pool.stop_accepting()
            self.dispatcher.pool.join(10)


def test_a_task_delivered_twice_at_once_runs_the_model_once(served):
    """Pub/Sub is at least once and a publisher's retry delivers the same task twice at
    once: the second delivery waits for the first, is acked as a duplicate, and the
    result object at result_uri is the committed row's."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[1]["file"]))
    dispatcher = pod(stack, parts, holder="pod-single-flight")
    calls = model_calls(parts)
    both = TwoAtOnce(dispatcher, task.model_dump_json().encode())
    outcomes = both.run()
    assert sorted(o.label for o in outcomes) == ["duplicate", "succeeded"]
    assert all(o.decision is Decision.ACK for o in outcomes)
    assert model_calls(parts) == calls + 1
    row = stack.rows([task.task_id])[task.task_id]
    assert result_object(parts, row["result_uri"]) == row["result"]


def test_a_corrected_republish_waiting_on_its_refused_first_copy_runs(served):
    """A backend republishes a task under the same id with its image fixed while the
    bad copy is still in this pod: the corrected one waited for the bad one and was
    acked as its duplicate when it was quarantined. It never ran, and the id kept the
    refusal's failed row (another pod would have run it). It runs now; the same body
    twice still follows the first."""
    stack, parts = served
    bucket = stack.settings.allowed_buckets[0]
    bad = stack.task(f"gs://{bucket}/{stack.tenant}/no-such-photo.jpg")
    fixed = bad.model_copy(update={"image_url": stack.upload(SCENES[1]["file"])})
    dispatcher = pod(stack, parts, holder="pod-corrected")
    both = TwoAtOnce(
        dispatcher, bad.model_dump_json().encode(), second=fixed.model_dump_json().encode()
    )
    outcomes = both.run()
    assert sorted(o.label for o in outcomes) == ["quarantined", "succeeded"]
    row = stack.rows([bad.task_id])[bad.task_id]
    assert row["status"] == "succeeded" and row["image_url"] == fixed.image_url

    again = stack.task(f"gs://{bucket}/{stack.tenant}/no-such-photo.jpg")
    twice = TwoAtOnce(pod(stack, parts, holder="pod-twice"), again.model_dump_json().encode())
    assert sorted(o.label for o in twice.run()) == ["duplicate", "quarantined"]


def test_a_delivery_that_waited_is_nacked_when_the_first_is(served):
    """The first delivery is nacked (here: the pod stops before a runner took it); the
    one that waited on it is nacked too, so neither is lost."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[1]["file"]))
    dispatcher = pod(stack, parts, holder="pod-stopping")
    both = TwoAtOnce(dispatcher, task.model_dump_json().encode())
    for job in dispatcher.pool.stop_accepting():
        job.finish(shutdown(job.item.task))
    outcomes = both.wait()
    assert [o.decision for o in outcomes] == [Decision.NACK, Decision.NACK]
    assert stack.rows([task.task_id]) == {}


def test_a_delivery_that_waited_is_nacked_when_the_firsts_dead_letter_fails(served):
    """The first delivery is quarantined (its image does not exist) but its dead letter
    cannot be published, so it is nacked instead; the one that waited on it is nacked
    too, not acked as a duplicate, which would have removed the message that had to come
    back. The refused publish is stood in for by the settling (a real one is tested in
    test_poison_whose_dead_letter_cannot_be_published_is_nacked_not_lost)."""
    stack, parts = served
    bucket = stack.settings.allowed_buckets[0]
    task = stack.task(f"gs://{bucket}/{stack.tenant}/no-such-photo.jpg")
    dispatcher = pod(stack, parts, holder="pod-dead-letter-fails")

    def refused(outcome: Any) -> Any:
        if outcome.decision is not Decision.QUARANTINE:
            return outcome
        return replace(outcome, decision=Decision.NACK, label="retry")

    both = TwoAtOnce(dispatcher, task.model_dump_json().encode(), applied=refused)
    outcomes = both.run()
    assert [o.decision for o in outcomes] == [Decision.QUARANTINE, Decision.NACK]


def test_a_task_another_pod_runs_is_nacked_with_a_delay_and_taken_over_after_a_crash(served):
    """Across pods the claim in PostgreSQL decides: pod A claimed the task and died
    without committing. Pod B never infers while A's claim holds; its nack asks to come
    back when the claim runs out, and then B takes the task over."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[1]["file"]))
    assert parts.sink.start(task.task_id, task.tenant_id, "pod-a", ttl_s=2.0).claimed
    pod_b = pod(stack, parts, holder="pod-b")
    body = task.model_dump_json().encode()
    calls = model_calls(parts)

    busy = pod_b.outcome_here(body, 1, "cpu")
    assert (busy.decision, busy.label) == (Decision.NACK, "busy")
    assert busy.retry_after_s is not None and 0 < busy.retry_after_s <= 2.0
    assert model_calls(parts) == calls
    assert stack.rows([task.task_id]) == {}

    time.sleep(busy.retry_after_s + 0.2)
    done = pod_b.outcome_here(body, 2, "cpu")
    assert (done.decision, done.label) == (Decision.ACK, "succeeded")
    assert model_calls(parts) == calls + 1


def test_a_task_id_owned_by_another_tenant_is_refused_before_any_download(served):
    """The owner's task_id, published for another tenant: refused as task_id_conflict
    before the image is read or a model runs, nothing written under the other tenant's
    prefix, and the owner's row untouched."""
    stack, parts = served
    owner_task = stack.task(stack.upload(SCENES[0]["file"]))
    assert parts.dispatcher.outcome_here(owner_task.model_dump_json().encode(), 1, "cpu").label == (
        "succeeded"
    )
    owner_row = stack.rows([owner_task.task_id])[owner_task.task_id]
    other = f"other-{stack.tenant}"
    bucket = stack.settings.allowed_buckets[0]
    parts.storage.client.bucket(bucket).blob(f"{other}/x.jpg").upload_from_filename(
        str(SAMPLES / SCENES[0]["file"])
    )
    stolen = make_task(other, f"gs://{bucket}/{other}/x.jpg", "DETECTION", owner_task.task_id)
    reads, calls = count(parts, "gannet_stage_seconds_count", stage="fetch"), model_calls(parts)

    refused = parts.dispatcher.outcome_here(stolen.model_dump_json().encode(), 1, "cpu")
    assert refused.decision is Decision.QUARANTINE
    assert refused.error is not None and refused.error.code is ErrorCode.TASK_ID_CONFLICT
    assert owner_task.tenant_id not in refused.error.message
    assert count(parts, "gannet_stage_seconds_count", stage="fetch") == reads
    assert model_calls(parts) == calls
    results = parts.storage.client.list_blobs(stack.settings.results_bucket, prefix=f"{other}/")
    assert list(results) == []
    assert stack.rows([owner_task.task_id])[owner_task.task_id] == owner_row


def test_a_task_id_another_tenant_is_still_running_stays_its_owners(served):
    """The owner's task is running on another pod (its claim live, no row yet) when the
    same task_id arrives for another tenant: that one is refused as task_id_conflict,
    not nacked as busy, and refusing it writes no row, so the owner's commit still
    lands."""
    stack, parts = served
    owner_task = stack.task(stack.upload(SCENES[0]["file"]))
    assert parts.sink.start(owner_task.task_id, owner_task.tenant_id, "pod-a", 60).claimed
    other = f"other-{stack.tenant}"
    bucket = stack.settings.allowed_buckets[0]
    parts.storage.client.bucket(bucket).blob(f"{other}/y.jpg").upload_from_filename(
        str(SAMPLES / SCENES[0]["file"])
    )
    stolen = make_task(other, f"gs://{bucket}/{other}/y.jpg", "DETECTION", owner_task.task_id)

    refused = pod(stack, parts, holder="pod-b").outcome_here(
        stolen.model_dump_json().encode(), 1, "cpu"
    )
    assert refused.decision is Decision.QUARANTINE
    assert refused.error is not None and refused.error.code is ErrorCode.TASK_ID_CONFLICT
    assert stack.rows([owner_task.task_id], tenant=other) == {}

    done = pod(stack, parts, holder="pod-a").outcome_here(
        owner_task.model_dump_json().encode(), 1, "cpu"
    )
    assert (done.decision, done.label) == (Decision.ACK, "succeeded")
    assert stack.rows([owner_task.task_id])[owner_task.task_id]["status"] == "succeeded"


def test_another_tenants_task_of_a_running_task_id_is_refused_not_its_duplicate(served):
    """Two tenants' tasks of one task_id in one pod at once: the second does not wait on
    the first and follow it (it would be acked as its duplicate, with no row and no dead
    letter: silently lost); it runs, and the claim refuses it as task_id_conflict."""
    stack, parts = served
    owner_task = stack.task(stack.upload(SCENES[1]["file"]))
    other = f"other2-{stack.tenant}"
    bucket = stack.settings.allowed_buckets[0]
    parts.storage.client.bucket(bucket).blob(f"{other}/z.jpg").upload_from_filename(
        str(SAMPLES / SCENES[0]["file"])
    )
    stolen = make_task(other, f"gs://{bucket}/{other}/z.jpg", "DETECTION", owner_task.task_id)
    both = TwoAtOnce(
        pod(stack, parts, holder="pod-two-tenants"),
        owner_task.model_dump_json().encode(),
        second=stolen.model_dump_json().encode(),
        queued=2,
    )
    by_tenant = {o.task.tenant_id: o for o in both.run()}
    assert by_tenant[owner_task.tenant_id].label == "succeeded"
    refused = by_tenant[other]
    assert refused.decision is Decision.QUARANTINE
    assert refused.error is not None and refused.error.code is ErrorCode.TASK_ID_CONFLICT


def test_a_busy_task_comes_back_when_the_claim_ends_not_in_a_nack_storm(served, streams):
    """Through the real stream: another pod holds the task's claim for 5 s. The nack
    asks Pub/Sub to keep the message away until then (modack to the claim's end, then
    the client lets go), so it comes back once, after the claim ended, and succeeds;
    a plain nack would have come back every second or two and been busy each time."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[1]["file"]))
    assert parts.sink.start(task.task_id, task.tenant_id, "pod-a", ttl_s=5.0).claimed
    busy = count(parts, "gannet_messages_total", outcome="busy")
    with pulling(served, streams) as delivered:
        stack.publish([task])
        row = stack.wait_rows([task.task_id], timeout_s=60)[task.task_id]
    assert row["status"] == "succeeded" and row["delivery_attempt"] == 2
    assert count(parts, "gannet_messages_total", outcome="busy") == busy + 1
    assert len(delivered.messages) == 2


class Paused:
    """Pod A's pipeline, paused after the model ran and before the result is written:
    as a task that runs longer than its claim's TTL. The model and steps are real."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.ran = threading.Event()
        self.go_on = threading.Event()

    def check(self, task: Any) -> Any:
        return self.pipeline.check(task)

    def run(self, *args: Any) -> Any:
        result = self.pipeline.run(*args)
        self.ran.set()
        assert self.go_on.wait(60)
        return result


def test_a_task_taken_over_after_its_claim_ran_out_keeps_the_committed_attempts_object(served):
    """Pod A runs past its 1 s claim; pod B takes the task over and commits. When A
    finishes it writes nothing: the row is B's, the object at result_uri is B's (the
    same processed_at), and A's delivery is acked as a duplicate of B's."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[1]["file"]))
    body = task.model_dump_json().encode()
    pod_a = pod(stack, parts, holder="pod-slow", claim_ttl_s=1.0)
    pod_a.pipeline = paused = Paused(parts.pipeline)  # type: ignore[assignment]
    outcomes: list[Any] = []
    slow = threading.Thread(target=lambda: outcomes.append(pod_a.outcome_here(body, 1, "cpu")))
    slow.start()
    try:
        assert paused.ran.wait(60)
        time.sleep(1.2)  # A's claim has run out
        taken_over = pod(stack, parts, holder="pod-fast").outcome_here(body, 2, "cpu")
        assert taken_over.label == "succeeded"
    finally:
        paused.go_on.set()
        slow.join(60)
    [late] = outcomes
    assert (late.decision, late.label) == (Decision.ACK, "duplicate"), (late.error, late.fields)
    row = stack.rows([task.task_id])[task.task_id]
    assert row["delivery_attempt"] == 2
    assert result_object(parts, row["result_uri"]) == row["result"]


def test_a_redelivery_after_the_commit_leaves_the_result_object_alone(served):
    """A late duplicate (the first pod's ack was lost) is acked as a duplicate without a
    model call, and the object at result_uri still equals the committed row."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[1]["file"]))
    body = task.model_dump_json().encode()
    assert pod(stack, parts, holder="pod-first").outcome_here(body, 1, "cpu").label == "succeeded"
    calls = model_calls(parts)
    again = pod(stack, parts, holder="pod-second").outcome_here(body, 2, "cpu")
    assert (again.decision, again.label) == (Decision.ACK, "duplicate")
    assert model_calls(parts) == calls
    row = stack.rows([task.task_id])[task.task_id]
    assert row["delivery_attempt"] == 1
    assert result_object(parts, row["result_uri"]) == row["result"]


def test_a_result_that_cannot_be_written_is_nacked_not_acked(served, streams):
    """The result object cannot be written (here the pod's results bucket does not exist,
    a deployment's mistake that is fixed without republishing; GCS failing the upload
    is the same error): nothing is committed, so the message is nacked, never acked,
    and the task's claim is given up at once. The message comes back, and another pod
    that can write results runs it to a success without waiting for the claim."""
    stack, parts = served
    dispatcher = pod(stack, parts, holder="pod-no-results-bucket")
    dispatcher.results_bucket = f"no-such-results-{uuid.uuid4().hex[:8]}"
    task = stack.task(stack.upload(SCENES[1]["file"]))
    retries = count(parts, "gannet_messages_total", outcome="retry")
    dispatcher.pool.start()
    try:
        with pulling(served, streams, dispatcher) as delivered:
            stack.publish([task])
            wait_until(
                lambda: count(parts, "gannet_messages_total", outcome="retry") > retries,
                "a nack",
                timeout_s=60,
            )
    finally:
        dispatcher.pool.stop_accepting()
        dispatcher.pool.join(10)

    assert stack.rows([task.task_id]) == {}
    # Not acked: still in the subscription (or moved by its dead-letter policy).
    back = stack.unacked(delivered.messages) or stack.pull_dead_letters(1, timeout_s=5)
    assert [json.loads(m.data)["task_id"] for m in back] == [task.task_id]
    body = task.model_dump_json().encode()
    done = pod(stack, parts, holder="pod-with-results").outcome_here(body, 2, "cpu")
    assert (done.decision, done.label) == (Decision.ACK, "succeeded")


class RaisesOnce:
    """The module's pipeline, whose first run raises an exception that no code path
    expects: a bug, injected, since no input is known to make one."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.raised = 0

    def check(self, task: Any) -> Any:
        return self.pipeline.check(task)

    def run(self, *args: Any) -> Any:
        if not self.raised:
            self.raised += 1
            raise RuntimeError("injected: a bug in a step")
        return self.pipeline.run(*args)


def test_an_unexpected_error_on_a_runner_nacks_the_message_and_its_redelivery_succeeds(
    served, streams, caplog
):
    """An exception that is no GannetError, raised while a runner runs the task, says
    nothing about the message: it is logged and nacked (outcome error), not
    quarantined. No failed row, no dead letter; the message comes back at once and
    succeeds on its second delivery."""
    stack, parts = served
    dispatcher = pod(stack, parts, holder="pod-runner-bug")
    dispatcher.pipeline = raising = RaisesOnce(parts.pipeline)  # type: ignore[assignment]
    task = stack.task(stack.upload(SCENES[1]["file"]))
    errors = count(parts, "gannet_messages_total", outcome="error")
    dispatcher.pool.start()
    try:
        with pulling(served, streams, dispatcher) as delivered:
            stack.publish([task])
            row = stack.wait_rows([task.task_id], timeout_s=60)[task.task_id]
    finally:
        dispatcher.pool.stop_accepting()
        dispatcher.pool.join(10)

    assert raising.raised == 1
    assert (row["status"], row["delivery_attempt"]) == ("succeeded", 2), row
    assert count(parts, "gannet_messages_total", outcome="error") == errors + 1
    assert "unexpected error; the message will be retried" in caplog.text
    assert stack.pull_dead_letters(1, timeout_s=2) == []
    assert len(delivered.messages) == 2
    assert stack.unacked(delivered.messages) == []


def test_poison_whose_failed_row_cannot_be_written_is_nacked_until_it_can(served, streams):
    """A task naming a pipeline its tenant does not have, while PostgreSQL cannot be
    reached (a pod's sink on a port where no server listens): its failed row cannot be
    written, so the message is nacked (retry), not dead-lettered and acked, which would
    leave the publisher no row saying why, ever. Once the database answers, the
    redelivery gets its failed row and its dead letter."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[0]["file"]))
    body = json.dumps({**json.loads(task.model_dump_json()), "pipeline": "NO_SUCH_PIPELINE"})
    down = Sink(f"postgresql://gannet@127.0.0.1:{free_port()}/gannet", timeout_s=0.5)
    down.pool.open(wait=False)
    dispatcher = pod(stack, parts, holder="pod-database-down")
    dispatcher.sink = down
    retries = count(parts, "gannet_messages_total", outcome="retry")
    quarantined = count(parts, "gannet_messages_total", outcome="quarantined")

    def settled() -> bool:
        return (
            count(parts, "gannet_messages_total", outcome="retry") > retries
            or count(parts, "gannet_messages_total", outcome="quarantined") > quarantined
        )

    try:
        with pulling(served, streams, dispatcher):
            stack.publish_raw(body.encode())
            wait_until(settled, "the message settled", timeout_s=30)
    finally:
        down.close()
    assert count(parts, "gannet_messages_total", outcome="quarantined") == quarantined
    assert stack.pull_dead_letters(1, timeout_s=2) == []
    assert stack.rows([task.task_id]) == {}

    with pulling(served, streams) as delivered:  # the module's pod: the database answers
        dead = stack.pull_dead_letters(1, timeout_s=30)
    assert [m.data for m in dead] == [body.encode()]
    assert dead[0].attributes["error_code"] == "unknown_pipeline"
    row = stack.rows([task.task_id])[task.task_id]
    assert (row["status"], row["error_code"]) == ("failed", "unknown_pipeline")
    assert stack.unacked(delivered.messages) == []


def test_a_task_whose_claim_passed_to_a_pod_still_running_it_is_nacked_not_acked(served):
    """Pod A runs past its 1 s claim, and pod B takes the task over but has not committed
    (it may still fail). When A finishes it writes nothing, neither object nor row, and
    its delivery is nacked with a delay until B's claim ends: acked, the task would be
    lost if B then failed."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[1]["file"]))
    body = task.model_dump_json().encode()
    pod_a = pod(stack, parts, holder="pod-overtaken", claim_ttl_s=1.0)
    pod_a.pipeline = paused = Paused(parts.pipeline)  # type: ignore[assignment]
    outcomes: list[Any] = []
    slow = threading.Thread(target=lambda: outcomes.append(pod_a.outcome_here(body, 1, "cpu")))
    slow.start()
    try:
        assert paused.ran.wait(60)
        time.sleep(1.2)  # A's claim has run out
        assert parts.sink.start(task.task_id, task.tenant_id, "pod-b", ttl_s=30).claimed
    finally:
        paused.go_on.set()
        slow.join(60)
    [late] = outcomes
    assert (late.decision, late.label) == (Decision.NACK, "busy"), (late.error, late.fields)
    assert late.retry_after_s is not None and 0 < late.retry_after_s <= 30
    assert stack.rows([task.task_id]) == {}
    name = f"{task.tenant_id}/{task.task_id}.json"
    assert not parts.storage.client.bucket(stack.settings.results_bucket).blob(name).exists()


def test_a_task_that_failed_on_a_runner_gives_its_claim_up_at_once(served):
    """A runner's attempt that ends in an exception (here one no code path expects,
    injected) is nacked and gives the task's claim up: its redelivery, on another pod,
    runs at once instead of waiting out the claim as busy."""
    stack, parts = served
    task = stack.task(stack.upload(SCENES[1]["file"]))
    body = task.model_dump_json().encode()
    pod_a = pod(stack, parts, holder="pod-failing")
    pod_a.pipeline = RaisesOnce(parts.pipeline)  # type: ignore[assignment]
    failed = pod_a.outcome_here(body, 1, "cpu")
    assert (failed.decision, failed.label) == (Decision.NACK, "error")
    again = pod(stack, parts, holder="pod-next").outcome_here(body, 2, "cpu")
    assert (again.decision, again.label) == (Decision.ACK, "succeeded"), (again.error, again.fields)
