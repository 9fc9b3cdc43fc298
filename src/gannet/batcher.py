"""One thread per (model, device) that owns the model and runs requests as batches.

Ultralytics models are not thread-safe, so exactly one thread ever calls a model. Runner
threads hand it prepared inputs and wait on an Answer; requests that queued while the last
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
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import SpanContext

from gannet.tracing import forward_span

log = logging.getLogger(__name__)

ForwardFn = Callable[[list[Any]], Sequence[Any]]  # inputs of one group -> one answer each


class BatcherClosed(RuntimeError):
    """The model was evicted or the daemon is stopping; ask the cache again."""


class _Eventfd:
    """A wake-up that lets go of the GIL on both sides: an eventfd, and a poll on it.
    Closed when nothing refers to it any more."""

    __slots__ = ("_poll", "fd")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def wake(self) -> None:
        os.eventfd_write(self.fd, 1)

    def wait(self, timeout_s: float | None) -> None:
        """Until woken or `timeout_s` passes. A wake that came before the wait counts:
        then it returns at once (one reader per eventfd, so the count waits for it)."""
        if self._poll.poll(None if timeout_s is None else timeout_s * 1000):
            os.eventfd_read(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class _ThreadWake(threading.local):
    """Each waiting thread's _Eventfd, made at its first wait."""

    wake: _Eventfd | None = None

    def get(self) -> _Eventfd:
        if self.wake is None:
            self.wake = _Eventfd()
        return self.wake


_THREAD_WAKE = _ThreadWake()


class Answer:
    """One request's answer.

    Why not concurrent.futures.Future: its set_result wakes the waiting runner inside
    Condition.notify_all, a futex wake made with the GIL held, once per image. py-spy
    --gil put 2.9 % of the daemon's GIL-held samples at 640x480 in that call
    (docs/benchmark.md). Here the batcher sets the answer, then writes the waiting
    thread's eventfd, and os.eventfd_write lets go of the GIL around the system call, as
    the batcher's own wake-up does (_Inbox).

    No lock: a waiter names itself before it looks at `_done`, and the batcher sets
    `_done` before it looks for a waiter, so (each step whole under the GIL) at least
    one of them sees the other. A wake that finds the answer already read is harmless."""

    __slots__ = ("_done", "_error", "_value", "_waiter")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._waiter: _Eventfd | None = None

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> Any:
        """The answer, or the error the model call raised; TimeoutError after `timeout`
        seconds. One thread waits on an answer (its runner)."""
        if not self._done:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._waiter = wake = _THREAD_WAKE.get()
            while not self._done:
                wait_s = None if deadline is None else deadline - time.monotonic()
                if wait_s is not None and wait_s <= 0:
                    raise TimeoutError("no answer from the batcher in time")
                # A wake meant for an earlier answer may still be counted: then this
                # returns at once and the loop looks again.
                wake.wait(wait_s)
        if self._error is not None:
            raise self._error
        return self._value

    def give(self, value: Any, error: BaseException | None) -> None:
        """Sets the answer and wakes its waiter, for an answer given on its own
        (offload.py); the batcher sets a pass's answers first, then wakes each thread
        once (_answer)."""
        waiter = self._set(value, error)
        if waiter is not None:
            waiter.wake()

    def _set(self, value: Any, error: BaseException | None) -> _Eventfd | None:
        """Sets the answer; returns who to wake (_answer wakes each thread once)."""
        self._value, self._error = value, error
        self._done = True
        return self._waiter


def _answer(requests: Sequence[_Request], values: Sequence[Any] | BaseException) -> None:
    """Each request's answer (or all the same error), then one wake per waiting thread:
    a runner that submitted several inputs (a sliced photo's tiles) is woken once."""
    if isinstance(values, BaseException):
        wakes = {r.answer._set(None, values) for r in requests}
    else:
        wakes = {r.answer._set(v, None) for r, v in zip(requests, values, strict=True)}
    for wake in wakes:
        if wake is not None:
            wake.wake()


@dataclass
class _Request:
    item: Any
    link: SpanContext | None = None  # tracing on: the submitting task's span
    urgency: int = 0  # its lane's weight: the most urgent requests queued run first
    answer: Answer = field(default_factory=Answer)


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
        self._wake = _Eventfd()

    def put(self, items: Sequence[_Request | object]) -> None:
        with self._lock:
            self._items.extend(items)
            wake, self._sleeping = self._sleeping, False
        if wake:
            self._wake.wake()

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
            self._wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._wake.close()


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
    ) -> list[Answer]:
        """`link`: the span a traced forward pass links back to (tracing.current_link);
        `urgency`: the task's lane weight (lanes.URGENCY)."""
        with self._close_lock:
            if self._closed:
                raise BatcherClosed(self.name)
            requests = [_Request(item, link, urgency) for item in items]
            self._inbox.put(requests)
        return [r.answer for r in requests]

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
            _answer(batch, exc)
            return
        self._on_batch(len(batch), time.perf_counter() - started)
        if self._on_cpu:
            self._on_cpu(time.thread_time() - cpu_started)
        _answer(batch, results)

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
                _answer([item], BatcherClosed(self.name))
        self._inbox.close()
