"""One thread per (model, device) that owns the model and runs requests as batches.

Ultralytics models are not thread-safe, so exactly one thread ever calls a model. Runner
threads hand it prepared inputs and wait on a future; requests that queued while the last
forward pass ran (or within `window_s` of each other) and have the same shape share one
forward pass, which is where a GPU earns its keep.

With lanes, a request carries its task's urgency (its lane's weight, lanes.URGENCY): of
what is queued, the most urgent requests run first, in a pass of their own, and the rest
wait for the next pass (once: then they run with whatever comes). So an interactive task
does not share, and wait for, a forward pass full of bulk images, and bulk is delayed by
at most one pass. With one lane every request is equally urgent and nothing changes.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import SpanContext

from gannet.tracing import forward_span

log = logging.getLogger(__name__)

ForwardFn = Callable[[list[Any]], Sequence[Any]]  # inputs of one group -> one answer each


class BatcherClosed(RuntimeError):
    """The model was evicted or the daemon is stopping; ask the cache again."""


@dataclass
class _Request:
    item: Any
    link: SpanContext | None = None  # tracing on: the submitting task's span
    urgency: int = 0  # its lane's weight: the most urgent requests queued run first
    future: Future[Any] = field(default_factory=Future)


_STOP = object()


class _Inbox:
    """What runners hand the batcher thread, and its wake-up.

    Why not queue.Queue: its put wakes a sleeping batcher inside Condition.notify, a
    futex wake made with the GIL held. With a mean batch near 1 the batcher sleeps before
    nearly every photo, and py-spy --gil put 14 % of the daemon's GIL-held time at
    4032x3024 in that one call (docs/benchmark.md). Here a put wakes the batcher only
    when it sleeps, by an eventfd write (Linux), during which the GIL is free; a wake
    that comes after the batcher stopped waiting is read, and ignored, at its next wait."""

    def __init__(self) -> None:
        self._items: deque[_Request | object] = deque()
        self._lock = threading.Lock()  # held only for a few bytecodes, never across a wait
        self._sleeping = False
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def put(self, items: Sequence[_Request | object]) -> None:
        with self._lock:
            self._items.extend(items)
            wake, self._sleeping = self._sleeping, False
        if wake:
            os.eventfd_write(self._fd, 1)

    def get(self, timeout: float | None = None) -> _Request | object | None:
        """The oldest item; None if `timeout` seconds pass first (0: do not wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._items:
                    self._sleeping = False
                    return self._items.popleft()
                if deadline is not None and deadline <= time.monotonic():
                    self._sleeping = False
                    return None
                self._sleeping = True
            wait_ms = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
            if self._poll.poll(wait_ms):  # the batcher is the only reader: a count waits
                os.eventfd_read(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class Batcher:
    def __init__(
        self,
        name: str,
        forward: ForwardFn,
        max_batch: int,
        window_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        group: Callable[[Any], Hashable] = lambda item: None,
        on_start: Callable[[], None] = lambda: None,
        on_cpu: Callable[[float], None] | None = None,
    ) -> None:
        """`group` says which inputs can share one call of `forward` (same tensor shape);
        `on_start` runs in the batcher's own thread before anything else (torch's CPU
        thread count is a per-thread setting); `on_batch(size, wall seconds)` after each
        forward pass, and `on_cpu(this thread's CPU seconds)` when given (its clock is a
        syscall; torch's own worker threads are not in that CPU)."""
        self.name = name
        self._on_start = on_start
        self._forward = forward
        self._group = group
        self._max_batch = max_batch
        self._window_s = window_s
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._on_cpu = on_cpu
        self._inbox = _Inbox()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(
        self, items: Sequence[Any], link: SpanContext | None = None, urgency: int = 0
    ) -> list[Future[Any]]:
        """`link`: the span a traced forward pass links back to (tracing.current_link);
        `urgency`: the task's lane weight (lanes.URGENCY)."""
        with self._close_lock:
            if self._closed:
                raise BatcherClosed(self.name)
            requests = [_Request(item, link, urgency) for item in items]
            self._inbox.put(requests)
        return [r.future for r in requests]

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put([_STOP])

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _collect(self, held: list[_Request]) -> tuple[list[_Request], bool]:
        batch = list(held)
        deadline = time.monotonic() + self._window_s
        while len(batch) < self._max_batch:
            item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            if item is _STOP:
                return batch, True
            assert isinstance(item, _Request)
            batch.append(item)
        return batch, False

    def _run(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        cpu_started = time.thread_time() if self._on_cpu else 0.0
        links = [r.link for r in batch if r.link is not None]
        try:
            if links:
                with forward_span(self.name, links, len(batch)):
                    results = self._forward([r.item for r in batch])
            else:
                results = self._forward([r.item for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"model returned {len(results)} results for {len(batch)}")
        except Exception as exc:  # noqa: BLE001 - handed to every waiting runner
            for request in batch:
                request.future.set_exception(exc)
            return
        self._on_batch(len(batch), time.perf_counter() - started)
        if self._on_cpu:
            self._on_cpu(time.thread_time() - cpu_started)
        for request, result in zip(batch, results, strict=True):
            request.future.set_result(result)

    def _loop(self) -> None:
        self._on_start()
        stopping = False
        held: list[_Request] = []  # less urgent requests that wait for the next pass
        while held or not stopping:
            if not held:
                item = self._inbox.get()
                if item is _STOP:
                    break
                assert isinstance(item, _Request)
                held = [item]
            batch = held
            if not stopping:
                batch, stopping = self._collect(held)
            urgent = max(r.urgency for r in batch)
            now = [r for r in batch if r.urgency == urgent]
            held = [r for r in batch if r.urgency != urgent]
            for request in held:  # held once: next time they go with whatever comes
                request.urgency = urgent
            groups: dict[Hashable, list[_Request]] = {}
            for request in now:
                groups.setdefault(self._group(request.item), []).append(request)
            for group in groups.values():
                self._run(group)
        # Anything submitted after close (cannot happen) or left behind gets an answer.
        while (item := self._inbox.get(timeout=0)) is not None:
            if isinstance(item, _Request):
                item.future.set_exception(BatcherClosed(self.name))
        self._inbox.close()
