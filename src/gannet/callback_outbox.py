"""Callbacks owed, kept in PostgreSQL until their outcome, so that none is lost with a pod.

A success with a callback_url is committed with a row in callback_outbox, held by the
process that committed it (sink.py, migration 8). That process sends the callback
(callback.py) and the outcome deletes the row. While its callbacks wait (queued, behind
a slow receiver, or for a retry), the process renews their rows every quarter of
`GANNET_CALLBACK_LEASE_S`, with the attempts made so far. One it will not send, because
it stops, it hands back: due at once. One whose process died (killed, its node lost,
frozen past the lease) comes due when its lease ends. Every process takes due rows over
at each sweep (FOR UPDATE SKIP LOCKED: two never take one) and sends them as its own,
counting the attempts made before. A process that could not renew for three quarters of
the lease (frozen, or cut off from PostgreSQL) starts no attempt until a renewal tells
it which rows are still its own; those another took over meanwhile it drops. An outcome
PostgreSQL did not take (it was unreachable) is kept here, its row renewed, and written
at the first sweep it answers, so that no pod sends that callback again. A callback may
still come twice (an attempt in flight when its pod froze or died, an outcome still
unwritten when its pod stopped, or one unwritten past the lease): receivers dedupe on
task_id.
"""

from __future__ import annotations

import logging
import threading
import time

from pydantic import ValidationError

from gannet.callback import Callbacks
from gannet.errors import GannetError, TransientError
from gannet.metrics import Metrics
from gannet.sink import OwedCallback, Sink
from gannet.task import Task

log = logging.getLogger(__name__)

# Taken over per sweep at most: a pod that comes up after many died does not queue them
# all at once. Not fewer while this process has its own pending: one tenant's receiver
# down, with tasks flowing, keeps hundreds pending on every pod, and no pod then took
# over another's for any tenant (a review's finding).
SWEEP_LIMIT = 100


class Outbox:
    """This process's side of callback_outbox: what callback.Callbacks calls `owed`
    (the outcome recorded, the unsent handed back), and the thread (`callback-outbox`)
    that renews this process's rows and takes over the rows due."""

    def __init__(self, sink: Sink, holder: str, metrics: Metrics) -> None:
        self._sink = sink
        self._holder = holder
        self._metrics = metrics
        self._every_s = sink.callback_lease_s / 4
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        # Outcomes not written yet (PostgreSQL was unreachable): task_id -> (tenant, text),
        # written at the first sweep once it answers. Before, the row of a callback
        # delivered during an outage came due at its lease's end and another pod sent
        # it again. That is now so only for an outage longer than the lease (the rows'
        # leases run out, and another pod may sweep first): in a live review with an
        # 8 s lease, 2 callbacks sent twice in a 5 s outage before, none now; 7 and 7
        # in a 20 s one.
        self._unwritten: dict[str, tuple[str, str]] = {}

    def record(self, task_id: str, tenant_id: str, status: str) -> None:
        try:
            self._write(task_id, tenant_id, status)
        except TransientError as exc:
            with self._lock:
                self._unwritten[task_id] = (tenant_id, status)
            log.warning(
                "callback outcome not written yet: the next sweep writes it",
                extra={
                    "task_id": task_id,
                    "tenant_id": tenant_id,
                    "fields": {"outcome": status, "error": str(exc)},
                },
            )

    def _write(self, task_id: str, tenant_id: str, status: str, kept: bool = False) -> None:
        if self._sink.set_callback_status(task_id, tenant_id, status, self._holder):
            return
        # Kept: its lease ran out before PostgreSQL answered again, and the other
        # worker sends it again. Not kept: an attempt in flight when it was taken over.
        log.log(
            logging.WARNING if kept else logging.INFO,
            "callback outcome not recorded: another worker took the callback over"
            + (" before PostgreSQL answered again, and sends it again" if kept else ""),
            extra={"task_id": task_id, "tenant_id": tenant_id, "fields": {"outcome": status}},
        )

    def _write_unwritten(self) -> None:
        """The outcomes kept, written; TransientError (PostgreSQL still unreachable)
        leaves the rest for the next try. One writer at a time: the stop's last try
        may come while a sweep still runs."""
        with self._writing:
            with self._lock:
                unwritten = list(self._unwritten.items())
            for task_id, kept in unwritten:
                unwritable = False
                try:
                    self._write(task_id, *kept, kept=True)
                except TransientError:
                    unwritable = True
                    raise
                except Exception:  # kept, it would stop every sweep, its renewals with it
                    log.exception(
                        "callback outcome cannot be written: its row comes due and the "
                        "callback is sent again",
                        extra={"task_id": task_id, "tenant_id": kept[0]},
                    )
                finally:
                    with self._lock:
                        if self._unwritten.get(task_id) == kept:  # not kept again meanwhile
                            del self._unwritten[task_id]
                            if unwritable:  # to the back: the others are tried first next
                                self._unwritten[task_id] = kept

    def hand_back(self, unsent: list[tuple[str, int]]) -> None:
        self._sink.hand_back_callbacks(self._holder, unsent)

    def start(self, callbacks: Callbacks) -> None:
        """Sweep for `callbacks` (the ones this process sends) until stop()."""
        callbacks.renewed((), self._sendable_until(time.monotonic()))
        self._thread = threading.Thread(
            target=self._run, args=(callbacks,), name="callback-outbox", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 0.0) -> None:
        """No sweep starts after this; waits up to `timeout_s` for one in flight (what
        it took over is then queued, and handed back by the callbacks' close)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout_s)

    def finish(self, timeout_s: float) -> None:
        """After the callbacks' close: one more try, for up to `timeout_s`, at the
        outcomes not written yet (0: none). Those left come due at their lease's end,
        and another pod sends them again. On a thread of its own: a PostgreSQL that
        stopped answering held the stop for its answer deadline (60 s) in a review."""
        with self._lock:
            if not self._unwritten:
                return
        if timeout_s > 0:
            thread = threading.Thread(
                target=self._finish, name="callback-outbox-finish", daemon=True
            )
            thread.start()
            thread.join(timeout_s)
        with self._lock:
            left = len(self._unwritten)
        if left:
            log.warning(
                "callback outcomes not written before stopping: another pod sends those "
                "callbacks again once this one's lease on them ends",
                extra={"fields": {"unwritten": left}},
            )

    def _finish(self) -> None:
        try:
            self._write_unwritten()
        except TransientError as exc:  # said by finish(), with the count left
            log.info("last try at the kept outcomes failed", extra={"fields": {"error": str(exc)}})

    def _run(self, callbacks: Callbacks) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self.sweep(callbacks)
            except GannetError as exc:  # PostgreSQL unreachable: the next sweep tries again
                log.warning(
                    "could not sweep the callbacks owed", extra={"fields": {"error": str(exc)}}
                )
            except Exception:  # a bug: this thread must live, or its renewals stop with it
                log.exception("sweeping the callbacks owed failed unexpectedly")

    def sweep(self, callbacks: Callbacks) -> int:
        """Write the outcomes kept, renew the rows of what `callbacks` has pending and of
        the outcomes still kept, then take over up to SWEEP_LIMIT due ones and queue
        them there; how many were taken. A kept outcome's row is renewed (one kept
        during the sweep is still pending in `callbacks`, held before its outcome is
        kept, and renewed as such), so this sweep never takes it over and sends it
        again. While a kept outcome cannot be written, the renewals go on and nothing
        is taken over (the error is raised after the renewal)."""
        unwritable: TransientError | None = None
        try:
            self._write_unwritten()
        except TransientError as exc:  # PostgreSQL down: the renewal fails as well
            unwritable = exc
        started = time.monotonic()  # after the writes: one may have waited for a lock
        held = callbacks.held()
        pending = {task_id for task_id, _ in held}
        with self._lock:
            kept = set(self._unwritten) - pending
        mine = held + [(task_id, 0) for task_id in kept]  # 0: the row's count stays
        owned = self._sink.renew_callbacks(self._holder, mine) if mine else set()
        callbacks.renewed(pending - owned, self._sendable_until(started))
        self._forget(kept - owned)
        if unwritable is not None:
            raise unwritable
        if self._stop.is_set():
            return 0
        taken = self._sink.take_callbacks(self._holder, SWEEP_LIMIT)
        for owed in taken:
            self._queue(callbacks, owed)
        if taken:
            log.info(
                "callbacks owed by stopped workers taken over",
                extra={"fields": {"taken": len(taken)}},
            )
        due, oldest_s = self._sink.callbacks_due()  # left for the next sweeps, any pod's
        self._metrics.callbacks_due.set(due)
        self._metrics.callbacks_due_oldest.set(oldest_s)
        self._metrics.callbacks_swept.set_to_current_time()
        return len(taken)

    def _forget(self, lost: set[str]) -> None:
        """Kept outcomes whose rows another worker took over (their lease ran out
        before PostgreSQL answered again): that worker sends and records them."""
        with self._lock:
            dropped = [t for t in lost if self._unwritten.pop(t, None) is not None]
        if dropped:  # not those the stop's last try wrote meanwhile
            log.warning(
                "callback outcomes not written before another worker took the callbacks "
                "over (PostgreSQL did not answer for a lease): they are sent again",
                extra={"fields": {"dropped": len(dropped)}},
            )

    def _sendable_until(self, renewed_at: float) -> float:
        """Until when a renewal made at `renewed_at` (monotonic) lets attempts start: a
        quarter of the lease short of its end, a margin for the clocks and the renewal's
        own round trip."""
        return renewed_at + self._sink.callback_lease_s * 3 / 4

    def _queue(self, callbacks: Callbacks, owed: OwedCallback) -> None:
        try:
            task = Task(
                task_id=owed.task_id,
                tenant_id=owed.tenant_id,
                image_url=owed.image_url,
                pipeline=owed.pipeline,
                session_id=owed.session_id,
                image_id=owed.image_id,
                callback_url=owed.callback_url,
            )
        except ValidationError as exc:  # a row no task of this version could have written
            self.record(owed.task_id, owed.tenant_id, f"failed: not sent, its row: {exc}"[:1000])
            return
        callbacks.submit(task, owed.result, owed.result_uri, owed.attempts)
