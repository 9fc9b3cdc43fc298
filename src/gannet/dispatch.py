"""The path of one message, start to end, in one place.

On the subscriber's callback thread (one per leased message, of one lane's stream):
  1. parse: the body becomes a Task (its gs:// URL parsed once, into a GsUrl), or the
     message is quarantined as bad input;
  2. cheap checks: the tenant's config, the pipeline's steps (looked up once) and the image
     URL's bucket and prefix. Poison is quarantined here and never takes a runner;
  3. hand a frozen WorkItem to the runner pool, in the message's lane, and return; the
     client library keeps extending the message's lease until it is settled. Which lane a
     free runner serves next is lanes.py's choice. A second delivery of a task already
     running in this pod waits for the first and follows its outcome instead (single
     flight);
  4. settle (Delivery.settle): the lane's Settler (outcome.py) acks, nacks or
     dead-letters, on the thread that learns the outcome: the runner, or the callback
     thread for poison, a second delivery and a pool that no longer takes work.
With tracing on (tracing.py), the message's span is current on the callback thread and,
handed over in the WorkItem, on its runner; each stage is a span under it.
On a runner thread, `process` does the work that costs: the committed-result lookup and
the task's claim (one transaction; another pod's live claim is a nack with a delay),
fetch, decode, the steps (models through the ModelCache), the result JSON, the row, and
the result callback after the commit; then the runner settles the message.

Why the runner settles, not the callback thread waiting for it: that wait was a sleep
and a wake-up of one more thread per message; without it the daemon switches 30 times
per image instead of 35, at 3 % less CPU (docs/benchmark.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from google.cloud.pubsub_v1.subscriber.message import Message

from gannet.callback import Callbacks
from gannet.errors import ErrorCode, GannetError, PermanentError, TransientError
from gannet.metrics import Metrics
from gannet.outcome import Decision, Outcome, Settler, shutdown
from gannet.pipeline import Pipeline, Route
from gannet.pool import Job, RunnerPool
from gannet.sink import ClaimLost, Sink
from gannet.stages import Timer, by_stage, ignore
from gannet.storage import Storage, encode_json
from gannet.task import Task, TaskResult, identify, parse_task

if TYPE_CHECKING:
    from gannet.tracing import TaskSpan, Tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """What a runner needs for one task, checked and looked up by the callback thread."""

    task: Task
    route: Route
    delivery_attempt: int | None
    trace: TaskSpan | None = None  # tracing on: the message's span
    queued_ns: int = 0  # tracing on: when it was handed to the pool


class Dispatcher:
    """Turns messages into Outcomes and hands them to the Settler; never raises."""

    def __init__(
        self,
        pipeline: Pipeline,
        sink: Sink,
        storage: Storage,
        settlers: dict[str, Settler],
        metrics: Metrics,
        results_bucket: str,
        max_body_bytes: int,
        devices: list[str],
        runners: int,
        callbacks: Callbacks | None = None,
        *,
        holder: str,
        claim_ttl_s: float,
        stage_cpu: bool = False,
        tracing: Tracing | None = None,
        lanes: dict[str, tuple[int, int | None]] | None = None,
    ) -> None:
        """`settlers`: each lane's Settler, by lane name, the first lane's first; `lanes`:
        name -> (weight, cap) (default: one lane per settler, weight 1, no cap).
        `holder` names this worker in task claims (unique per process); a claim keeps
        other workers off a task for `claim_ttl_s` unless released earlier."""
        self.pipeline = pipeline
        self.sink = sink
        self.storage = storage
        self.settlers = settlers
        self.first_lane = next(iter(settlers))
        self.metrics = metrics
        self.results_bucket = results_bucket
        self.max_body_bytes = max_body_bytes
        self.callbacks = callbacks
        self.holder = holder
        self.claim_ttl_s = claim_ttl_s
        self.tracing = tracing
        self._observe_wall = by_stage(metrics.stage_seconds, "observe")
        self._charge_cpu = by_stage(metrics.stage_cpu_seconds, "inc") if stage_cpu else ignore
        # Single flight within the pod: task_id -> the job of the delivery being run.
        self._in_flight: dict[str, Job[WorkItem]] = {}
        self._in_flight_lock = threading.Lock()
        # Messages taken by on_message and not settled yet, by lane: a stream that
        # stops waits for them (wait_settled), so that their acks still go out.
        self._unsettled: Counter[str] = Counter()
        self._unsettled_changed = threading.Condition()
        # Why a CUDA device of this process can run nothing any more (_check_device);
        # the daemon then exits, to be started afresh.
        self.device_lost: str | None = None
        # Started by the daemon; a job still running after the grace period is nacked.
        self.pool: RunnerPool[WorkItem] = RunnerPool(
            devices,
            runners,
            self.process,
            on_abandon=lambda item: shutdown(item.task),
            lanes=lanes or {name: (1, None) for name in settlers},
        )

    # ------------------------------------------------------------ callback thread

    def on_message_of(self, lane: str) -> Callable[[Message], None]:
        """The callback of one lane's stream."""
        return lambda message: self.on_message(message, lane)

    def on_message(self, message: Message, lane: str | None = None) -> None:
        """The subscriber's callback: parse and check the message, then hand it to a
        runner, which settles it when done (or settle it here: poison, a second delivery,
        shutdown). Returns without waiting for the runner."""
        lane = lane or self.first_lane
        span = self.tracing.start_task(message) if self.tracing is not None else None
        with span.active() if span is not None else nullcontext():
            delivery = Delivery(self, message, lane, span)
            try:
                outcome = self.outcome_of(
                    message.data,
                    message.delivery_attempt,
                    lambda item: self.hand_over(item, lane, span, delivery.settle),
                    self._timer(),
                )
            except Exception as exc:
                # A bug, not a verdict on the message: nacked (its dead-letter policy
                # takes over after max delivery attempts), and the stream goes on. Let
                # out, the exception would stop the stream, and the daemon with it.
                log.exception(
                    "unexpected error checking a message; it will be retried",
                    extra={"fields": {"message_id": message.message_id}},
                )
                outcome = _unexpected(exc)
            except BaseException:
                delivery.escaped()
                raise
            if outcome is not None:
                delivery.settle(outcome)

    def hand_over(
        self,
        item: WorkItem,
        lane: str,
        span: TaskSpan | None,
        settle: Callable[[Outcome], Outcome],
    ) -> Outcome | None:
        """Queue the item for a runner, which calls `settle` with the outcome (None is
        returned); a second delivery of a task this pod is already running waits for the
        first here and follows its outcome instead (returned). Unless the first was
        quarantined and this one is another task under that id (a corrected republish):
        acked as a duplicate of the refused one, it never ran, and its id kept the
        refusal's failed row, where another pod would have run it."""
        task = item.task
        if span is not None:
            item = replace(item, trace=span, queued_ns=time.time_ns())
        job: Job[WorkItem] = Job(item, lane)
        job.on_finish = lambda outcome: self._finished(job, settle, outcome)
        while True:
            with self._in_flight_lock:
                first = self._in_flight.setdefault(task.task_id, job)
            if first is job or first.item.task.tenant_id != task.tenant_id:
                break
            first.done.wait()  # the first is forgotten by now: the id's slot is free
            quarantined = first.outcome is not None and (
                first.outcome.decision is Decision.QUARANTINE
            )
            if not quarantined or first.item.task == task:
                return _follow(first.outcome, task)
        # A task_id another tenant is running here does not wait: its claim refuses it.
        if self.pool.submit(job):
            return None
        refused = shutdown(task)
        # Finished without settling (the caller settles this delivery): a delivery of
        # the same task that found the job meanwhile is waiting on it, and follows.
        job.on_finish = None
        job.finish(refused)
        self._forget(job)
        return refused

    def _finished(
        self, job: Job[WorkItem], settle: Callable[[Outcome], Outcome], outcome: Outcome | None
    ) -> None:
        """On the thread that finished the job (its runner, or shutdown's). A delivery
        waiting on the job follows what was applied: had it followed a quarantine whose
        dead letter then failed, its ack would have removed a message meant to come back."""
        self._forget(job)
        job.outcome = settle(outcome or _runner_crashed(job.item.task))

    def wait_settled(self, lane: str | None = None) -> None:
        """Block until every message of the lane that on_message took has been acked,
        nacked or quarantined. At shutdown the daemon nacks what no runner started and,
        after the grace period, what is still running, so this returns."""
        lane = lane or self.first_lane
        with self._unsettled_changed:
            self._unsettled_changed.wait_for(lambda: self._unsettled[lane] == 0)

    def _count_unsettled(self, lane: str, change: int) -> None:
        with self._unsettled_changed:
            self._unsettled[lane] += change
            if not self._unsettled[lane]:
                self._unsettled_changed.notify_all()

    def _forget(self, job: Job[WorkItem]) -> None:
        with self._in_flight_lock:
            if self._in_flight.get(job.item.task.task_id) is job:
                del self._in_flight[job.item.task.task_id]

    def outcome_of(
        self,
        body: bytes,
        delivery_attempt: int | None,
        run: Callable[[WorkItem], Outcome | None],
        timer: Timer | None = None,
    ) -> Outcome | None:
        """Parse, check, then `run(item)` (hand to a runner, or run here). None: the
        runner settles the message."""
        with (timer or self._timer()).stage("receive"):
            try:
                task = parse_task(body, self.max_body_bytes)
            except PermanentError as err:
                # An oversized body is not parsed for its ids (no failed row; the dead
                # letter says why): up to Pub/Sub's 10 MB, one parse held the GIL 1.2 s,
                # every thread of the daemon stopped (an object of a million keys).
                too_large = err.code is ErrorCode.BODY_TOO_LARGE
                task_id, tenant_id = (None, None) if too_large else identify(body)
                return self._reject(task_id, tenant_id, None, err, delivery_attempt)
            try:
                route = self.pipeline.check(task)
            except PermanentError as err:
                return self.reject(task, err, delivery_attempt)
        return run(WorkItem(task, route, delivery_attempt))

    def _timer(self) -> Timer:
        """A Timer that feeds the stage histogram (and, with GANNET_STAGE_CPU, the stage
        CPU counter)."""
        spans = self.tracing.stage_spans() if self.tracing is not None else None
        return Timer(self._observe_wall, self._charge_cpu, spans)

    def outcome_here(self, body: bytes, delivery_attempt: int | None, device: str) -> Outcome:
        """The whole path on the calling thread, without runners: the bench's
        one-message-at-a-time worker and the tests use it."""
        outcome = self.outcome_of(body, delivery_attempt, lambda item: self.process(item, device))
        assert outcome is not None  # process always answers
        return outcome

    # ------------------------------------------------------------ runner thread

    def process(self, item: WorkItem, device: str) -> Outcome:
        """The costly part of one task, on a runner thread pinned to `device`."""
        if item.trace is None:
            return self._process_guarded(item, device)
        with item.trace.active():
            item.trace.waited(item.queued_ns, item.route.loaded.config.industry)
            return self._process_guarded(item, device)

    def _process_guarded(self, item: WorkItem, device: str) -> Outcome:
        """`process`, every exception turned into an Outcome."""
        task = item.task
        try:
            return self._process(item, device)
        except PermanentError as err:
            return self.reject(task, err, item.delivery_attempt)
        except TransientError as err:
            return Outcome(Decision.NACK, "retry", err, task)
        except Exception as exc:
            if _is_out_of_memory(exc):
                oom = TransientError(ErrorCode.OUT_OF_MEMORY, str(exc))
                return Outcome(Decision.NACK, "retry", oom, task)
            log.exception(
                "unexpected error; the message will be retried",
                extra={"task_id": task.task_id, "tenant_id": task.tenant_id},
            )
            self._check_device(device)
            return _unexpected(exc, task)

    def _check_device(self, device: str) -> None:
        """After an unexpected error on a runner of a CUDA device: whether the device
        still runs work. Some CUDA errors (an illegal memory access, a kernel's fault, an
        uncorrectable ECC error) are sticky: every later CUDA call of the process fails
        the same way until it exits. Such a daemon stayed live and nacked every message
        it leased, quickly, so it took the subscription's redeliveries from the healthy
        pods and ran good tasks into the dead-letter policy (5 attempts). An error that
        one input caused (a kernel refusing a shape) leaves the device usable: only that
        task is nacked, and the pod stays. The daemon's loop reads `device_lost`."""
        if self.device_lost is None and (lost := device_lost(device)) is not None:
            self.device_lost = lost
            log.critical(
                "the GPU can run no more work; the daemon exits to be started afresh",
                extra={"fields": {"device": device, "error": lost}},
            )

    def _process(self, item: WorkItem, device: str) -> Outcome:
        task = item.task
        timer = self._timer()
        started = time.perf_counter()
        with timer.stage("lookup"):
            start = self.sink.start(task.task_id, task.tenant_id, self.holder, self.claim_ttl_s)
        existing = start.success
        if existing is not None:
            # Its callback, if any, was owed in the commit (callback_outbox.py): sent
            # by the pod that committed, or by another if that one stopped first.
            fields = {"result_uri": existing["result_uri"]}
            return Outcome(Decision.ACK, "duplicate", task=task, fields=fields)
        if not start.claimed:  # another pod runs it now: come back when its claim ends
            busy = TransientError(ErrorCode.TASK_BUSY, "another worker is running this task")
            return Outcome(Decision.NACK, "busy", busy, task, retry_after_s=start.retry_after_s)
        try:
            return self._run_claimed(item, device, timer, started)
        except BaseException:
            self._release(task)
            raise

    def _run_claimed(self, item: WorkItem, device: str, timer: Timer, started: float) -> Outcome:
        """The task's claim is ours: run it, then write the result object and commit the
        row in one fenced step (sink.save_claimed), so the object at result_uri is
        always the committed attempt's, even if the claim passed on while we ran."""
        task = item.task
        result = self.pipeline.run(task, item.route, device, timer)
        inferred = {"inferred": True}  # in the outcome's log line: the model ran to the end
        name = f"{task.tenant_id}/{task.task_id}.json"
        uri = f"gs://{self.results_bucket}/{name}"
        with timer.stage("result_json"):
            body = encode_json(result)
        with timer.stage("sink"):
            timings = {
                **timer.timings,
                "total_ms": round((time.perf_counter() - started) * 1000, 2),
            }
            record = TaskResult(
                task_id=task.task_id,
                tenant_id=task.tenant_id,
                pipeline=task.pipeline,
                status="succeeded",
                result=result,
                result_uri=uri,
                delivery_attempt=item.delivery_attempt,
                timings=timings,
                session_id=task.session_id,
                image_id=task.image_id,
                image_url=task.image_url,
            )
            try:
                saved = self.sink.save_claimed(
                    record,
                    self.holder,
                    lambda: self._write_result(name, body, timer),
                    result_json=body,
                    callback_url=task.callback_url,
                )
            except ClaimLost as lost:  # ran past the claim's TTL and another pod took over
                return Outcome(
                    Decision.NACK, "busy", lost, task, inferred, retry_after_s=lost.retry_after_s
                )
            except TransientError as err:  # nothing committed: the next delivery reruns it
                self._release(task)
                return Outcome(Decision.NACK, "retry", err, task, inferred)
        self._observe_wall("total", time.perf_counter() - started)
        if saved:
            self._callback(task, result, uri)
        return Outcome(
            Decision.ACK,
            "succeeded" if saved else "duplicate",
            task=task,
            fields={"result_uri": uri, "counts": _counts(result), **timings, **inferred},
        )

    def _write_result(self, name: str, body: bytes, timer: Timer) -> None:
        with timer.stage("gcs_write"):
            self.storage.write(self.results_bucket, name, body, "application/json")

    def _release(self, task: Task) -> None:
        """The task failed under our claim: give the claim up so that its redelivery (or
        another pod) need not wait for it to expire."""
        try:
            self.sink.release(task.task_id, task.tenant_id, self.holder)
        except GannetError as err:
            log.warning(
                "could not release the task's claim; it expires on its own",
                extra={"task_id": task.task_id, "fields": {"error": str(err)}},
            )

    def _callback(self, task: Task, result: dict[str, Any], uri: str) -> None:
        """After the commit, never before; whatever happens here, the task stays acked."""
        if self.callbacks is None or not task.callback_url:
            return
        try:
            self.callbacks.submit(task, result, uri)
        except Exception:
            log.exception(
                "could not queue the callback; the committed result stands",
                extra={"task_id": task.task_id, "tenant_id": task.tenant_id},
            )

    # ------------------------------------------------------------ bad input

    def reject(self, task: Task, err: PermanentError, delivery_attempt: int | None) -> Outcome:
        return self._reject(task.task_id, task.tenant_id, task, err, delivery_attempt)

    def _reject(
        self,
        task_id: str | None,
        tenant_id: str | None,
        task: Task | None,
        err: PermanentError,
        delivery_attempt: int | None,
    ) -> Outcome:
        """Record a failed row where the task is identifiable, then quarantine. Not for a
        task_id another tenant owns: the owner may have no row yet (its task still
        running), and a failed row under this tenant would take the id from it."""
        fields: dict[str, Any] = {"task_id": task_id, "tenant_id": tenant_id}
        if task_id and tenant_id and err.code is not ErrorCode.TASK_ID_CONFLICT:
            try:
                self.sink.save(
                    TaskResult(
                        task_id=task_id,
                        tenant_id=tenant_id,
                        pipeline=task.pipeline if task else None,
                        status="failed",
                        error_code=str(err.code),
                        error=err.message,
                        delivery_attempt=delivery_attempt,
                        image_url=task.image_url if task else None,
                        session_id=task.session_id if task else None,
                        image_id=task.image_id if task else None,
                    )
                )
            except TransientError as db_err:
                return Outcome(Decision.NACK, "retry", db_err, task, fields)
            except PermanentError as conflict:
                fields["row_error"] = str(conflict)
        return Outcome(Decision.QUARANTINE, "quarantined", err, task, fields)


class Delivery:
    """One message between its callback and its settling, which happens exactly once, on
    whichever thread learns the outcome."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        message: Message,
        lane: str,
        span: TaskSpan | None,
    ) -> None:
        self.message = message
        self.lane = lane
        self.span = span
        self._settler = dispatcher.settlers[lane]
        self._started = time.perf_counter()
        self._dispatcher = dispatcher
        dispatcher._count_unsettled(lane, 1)

    def settle(self, outcome: Outcome) -> Outcome:
        """Ack, nack or quarantine (outcome.py); returns what was applied. On a runner
        this must not raise: it would end the runner's thread."""
        applied = outcome
        try:
            with self.span.active() if self.span is not None else nullcontext():
                with self._dispatcher._timer().stage("settle"):  # a Timer is per thread
                    elapsed = time.perf_counter() - self._started
                    applied = self._settler.settle(self.message, outcome, elapsed)
        except Exception as exc:  # as the client does for a callback that raises: nack
            log.exception(
                "could not settle the message; nacking it for redelivery",
                extra={"fields": {"message_id": self.message.message_id}},
            )
            self.message.nack()  # only queues the request: does not raise
            applied = _unexpected(exc, outcome.task, outcome.fields)
        finally:
            # What was applied, as the log line and the metrics say it: a quarantine
            # whose dead letter was refused is a nack, and the trace must not say gone.
            self._done(applied)
        return applied

    def escaped(self) -> None:
        """A BaseException (an Exception is nacked in on_message) left the callback
        before any outcome: the client library logs it, nacks the message and stops the
        stream (the daemon then shuts down)."""
        self._done(None)

    def _done(self, outcome: Outcome | None) -> None:
        if self.span is not None:
            self.span.finish(outcome)
        self._dispatcher._count_unsettled(self.lane, -1)


def _unexpected(
    exc: Exception, task: Task | None = None, fields: dict[str, Any] | None = None
) -> Outcome:
    """An exception no code path expected (logged where it was caught): nacked, since
    another delivery may succeed, and Pub/Sub's dead-letter policy ends the retries."""
    unknown = TransientError(ErrorCode.DEPENDENCY_UNAVAILABLE, repr(exc))
    return Outcome(Decision.NACK, "error", unknown, task, fields or {})


def _runner_crashed(task: Task) -> Outcome:
    """A job the pool answered with no outcome: its runner crashed outside `process`
    (logged there). Nack: another delivery may succeed."""
    crashed = TransientError(ErrorCode.DEPENDENCY_UNAVAILABLE, "the runner crashed")
    return Outcome(Decision.NACK, "error", crashed, task)


def _follow(first: Outcome | None, task: Task) -> Outcome:
    """The outcome of a delivery that waited for the same task's delivery in this pod:
    acked as a duplicate once the first settled for good, nacked if the first was."""
    if first is None:
        return _runner_crashed(task)
    if first.decision is Decision.NACK:
        return Outcome(
            Decision.NACK, first.label, first.error, task, retry_after_s=first.retry_after_s
        )
    return Outcome(Decision.ACK, "duplicate", task=task, fields={"followed": first.label})


def device_lost(device: str) -> str | None:
    """Why `device` can run no more CUDA work, or None: it can, or it is no CUDA device.
    Asked only after an error. A sticky error is returned by every later call, this
    stream synchronize too; the default stream's, not the device's: a batcher may be
    recording a CUDA graph on a stream of its own meanwhile, which the legacy default
    stream does not wait for and a device synchronize would."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        torch.cuda.default_stream(device).synchronize()
    except RuntimeError as exc:  # torch.AcceleratorError, a RuntimeError
        return f"{device}: {exc}"
    return None


def _is_out_of_memory(exc: BaseException) -> bool:
    return exc.__class__.__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _counts(result: dict[str, Any]) -> dict[str, int]:
    for key in ("estimation", "detection"):
        section = result.get(key)
        if isinstance(section, dict) and isinstance(section.get("counts"), dict):
            counts: dict[str, int] = section["counts"]
            return counts
    return {}
