"""Where the ack is decided: every message ends as ack, nack or quarantine, nothing else.

- success: result committed, then ack.
- TransientError (database, GCS, timeout, out of memory): nack; the subscription's retry
  policy backs off and its dead-letter policy takes over after max delivery attempts.
- PermanentError (bad input): a failed row where the task is identifiable, the message
  published to the dead-letter topic with error_code / error attributes, then ack.
- a redelivered task whose success is committed: ack without running the models.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from gannet.callback import Callbacks
from gannet.errors import ErrorCode, GannetError, PermanentError, TransientError
from gannet.metrics import Metrics
from gannet.pipeline import Pipeline, Timer
from gannet.pipeline_config import LoadedConfig
from gannet.sink import Sink
from gannet.storage import Storage
from gannet.task import Task, TaskResult, identify

log = logging.getLogger(__name__)


class Decision(StrEnum):
    ACK = "ack"
    NACK = "nack"
    QUARANTINE = "quarantine"


@dataclass
class Outcome:
    decision: Decision
    label: str  # succeeded | duplicate | quarantined | retry | shutdown | error
    error: GannetError | None = None
    task: Task | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def shutdown(task: Task | None) -> Outcome:
    """Nack: the message goes straight back to the subscription for another pod."""
    return Outcome(
        Decision.NACK,
        "shutdown",
        TransientError(ErrorCode.SHUTDOWN, "worker is shutting down"),
        task,
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    return exc.__class__.__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class Processor:
    """Turns one task into an Outcome, on a runner thread; never raises."""

    def __init__(
        self,
        pipeline: Pipeline,
        sink: Sink,
        storage: Storage,
        results_bucket: str,
        metrics: Metrics,
        callbacks: Callbacks | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.sink = sink
        self.storage = storage
        self.results_bucket = results_bucket
        self.metrics = metrics
        self.callbacks = callbacks

    def process(
        self, task: Task, loaded: LoadedConfig, delivery_attempt: int | None, device: str
    ) -> Outcome:
        """Runs on a runner thread, after the callback's cheap checks passed."""
        timer = Timer(lambda stage, s: self.metrics.stage_seconds.labels(stage).observe(s))
        started = time.perf_counter()
        try:
            with timer.stage("lookup"):
                existing = self.sink.find_success(task.task_id, task.tenant_id)
            if existing is not None:
                if task.callback_url and existing["callback_status"] is None:
                    # The last pod stopped between the commit and the callback: send it
                    # now (callbacks are at least once; receivers dedupe on task_id).
                    self._callback(task, existing["result"], existing["result_uri"])
                return Outcome(
                    Decision.ACK,
                    "duplicate",
                    task=task,
                    fields={"result_uri": existing["result_uri"]},
                )
            result = self.pipeline.run(task, loaded, device, timer)
            with timer.stage("sink"):
                uri = self.storage.write_json(
                    self.results_bucket, f"{task.tenant_id}/{task.task_id}.json", result
                )
                timings = {
                    **timer.timings,
                    "total_ms": round((time.perf_counter() - started) * 1000, 2),
                }
                saved = self.sink.save(
                    TaskResult(
                        task_id=task.task_id,
                        tenant_id=task.tenant_id,
                        pipeline=task.pipeline,
                        status="succeeded",
                        result=result,
                        result_uri=uri,
                        delivery_attempt=delivery_attempt,
                        timings=timings,
                        session_id=task.session_id,
                        image_id=task.image_id,
                        image_url=task.image_url,
                    )
                )
            self.metrics.stage_seconds.labels("total").observe(time.perf_counter() - started)
            if saved:
                self._callback(task, result, uri)
            return Outcome(
                Decision.ACK,
                "succeeded" if saved else "duplicate",
                task=task,
                fields={"result_uri": uri, "counts": _counts(result), **timings},
            )
        except PermanentError as err:
            return self.reject(task, err, delivery_attempt)
        except TransientError as err:
            return Outcome(Decision.NACK, "retry", err, task)
        except Exception as exc:
            if _is_out_of_memory(exc):
                return Outcome(
                    Decision.NACK, "retry", TransientError(ErrorCode.OUT_OF_MEMORY, str(exc)), task
                )
            log.exception(
                "unexpected error; the message will be retried",
                extra={"task_id": task.task_id, "tenant_id": task.tenant_id},
            )
            return Outcome(
                Decision.NACK,
                "error",
                TransientError(ErrorCode.DEPENDENCY_UNAVAILABLE, repr(exc)),
                task,
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

    def reject_body(
        self, body: bytes, err: PermanentError, delivery_attempt: int | None
    ) -> Outcome:
        """A body that is not a valid Task: record what can be identified, quarantine."""
        task_id, tenant_id = identify(body)
        return self._reject(task_id, tenant_id, None, err, delivery_attempt)

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
        """Record a failed row where the task is identifiable, then quarantine."""
        fields: dict[str, Any] = {"task_id": task_id, "tenant_id": tenant_id}
        if task_id and tenant_id:
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


class Settler:
    """Applies an Outcome to the Pub/Sub message; the only place that acks or nacks."""

    def __init__(
        self,
        publisher: pubsub_v1.PublisherClient,
        dead_letter_topic_path: str,
        subscription: str,
        metrics: Metrics,
    ) -> None:
        self.publisher = publisher
        self.dead_letter_topic_path = dead_letter_topic_path
        self.subscription = subscription
        self.metrics = metrics

    def settle(self, message: Any, outcome: Outcome, duration_s: float) -> None:
        decision = outcome.decision
        if decision is Decision.QUARANTINE and not self._quarantine(message, outcome):
            decision = Decision.NACK  # not dead-lettered: keep it, never lose a message
            outcome = Outcome(Decision.NACK, "retry", outcome.error, outcome.task, outcome.fields)
        if decision is Decision.NACK:
            message.nack()
        else:
            message.ack()
        self.metrics.messages.labels(outcome.label).inc()
        self._log(message, outcome, duration_s)

    def _quarantine(self, message: Any, outcome: Outcome) -> bool:
        error = outcome.error
        attributes = {
            "error_code": str(error.code) if error else "unknown",
            "error": (error.message if error else "unknown")[:1024],
            "original_message_id": str(message.message_id),
            "subscription": self.subscription,
        }
        task_id = outcome.task.task_id if outcome.task else outcome.fields.get("task_id")
        if task_id:
            attributes["task_id"] = str(task_id)
        if message.delivery_attempt:
            attributes["delivery_attempt"] = str(message.delivery_attempt)
        try:
            future = self.publisher.publish(self.dead_letter_topic_path, message.data, **attributes)
            future.result(timeout=30)
            return True
        except (gexc.GoogleAPICallError, FutureTimeout, gexc.RetryError) as exc:
            log.error(
                "could not publish to the dead-letter topic; nacking instead",
                extra={"task_id": task_id, "fields": {"error": str(exc)}},
            )
            return False

    def _log(self, message: Any, outcome: Outcome, duration_s: float) -> None:
        task = outcome.task
        extra: dict[str, Any] = {
            "outcome": outcome.label,
            "message_id": message.message_id,
            "delivery_attempt": message.delivery_attempt,
            "duration_ms": round(duration_s * 1000, 1),
            "task_id": task.task_id if task else outcome.fields.get("task_id"),
            "tenant_id": task.tenant_id if task else outcome.fields.get("tenant_id"),
            "pipeline": task.pipeline if task else None,
            "fields": {
                k: v for k, v in outcome.fields.items() if k not in ("task_id", "tenant_id")
            },
        }
        if outcome.error is not None:
            extra["error_code"] = str(outcome.error.code)
            extra["fields"]["error"] = outcome.error.message
        level = {
            "succeeded": logging.INFO,
            "duplicate": logging.INFO,
            "quarantined": logging.WARNING,
            "shutdown": logging.INFO,
        }.get(outcome.label, logging.WARNING)
        log.log(level, f"task {outcome.label}", extra=extra)


def _counts(result: dict[str, Any]) -> dict[str, int]:
    for key in ("estimation", "detection"):
        section = result.get(key)
        if isinstance(section, dict) and isinstance(section.get("counts"), dict):
            return section["counts"]
    return {}
