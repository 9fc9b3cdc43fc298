"""CPU-heavy calls that let go of the GIL (a large photo's decode), run on threads of a
lower priority, so that they yield a core to the threads that hold the GIL.

Why: on a pod whose cores are all busy decoding large photos, the kernel preempts a
thread that holds the GIL as readily as any other, and while it waits for a core every
other Python thread waits for the GIL. At 4032x3024 decoding is three quarters of the
daemon's CPU, and there a thread held the GIL about 2.3 ms per image where the same
steps at 640x480 held it 1.7 (docs/benchmark.md, "Decoding at a lower priority"). The
decoder's threads here are niced (`setpriority` on the thread, Linux's per-thread nice,
no privilege needed to lower oneself), so the scheduler gives the GIL holder the core
first and the decode the rest; no work is skipped, only its order on a busy core.

A runner hands the call over and waits, as for the batcher (batcher.Answer: the
answer's wake-up lets go of the GIL); each runner has at most one call here at a time,
so there are as many threads as runners and none waits for another.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from gannet.batcher import Answer

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Answer]


class Offload:
    def __init__(
        self,
        threads: int,
        nice: int,
        name: str,
        on_cpu: Callable[[float], None] | None = None,
    ) -> None:
        """`nice`: added to each thread's nice value (0 to 19); `on_cpu(thread CPU
        seconds)` after each call when given, so that the stage that handed it over is
        charged its CPU (stages.py; the clock is a syscall)."""
        self._nice = nice
        self._on_cpu = on_cpu
        self._calls: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on one of the threads: its value, or the exception it
        raised, raised here."""
        answer = Answer()
        with self._close_lock:
            if self._closed:  # a runner left running past the shutdown's grace period
                return fn(*args, **kwargs)
            self._calls.put((fn, args, kwargs, answer))
        value: T = answer.result()
        return value

    def close(self) -> None:
        """The calls handed over finish first; then the threads end."""
        with self._close_lock:
            self._closed = True
            for _ in self._threads:
                self._calls.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        try:
            me = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + self._nice)
            )
        except OSError as exc:  # not Linux, or refused: the calls run at the usual priority
            log.warning(
                "could not lower this thread's priority; its calls compete with the "
                "threads that hold the GIL",
                extra={"fields": {"thread": threading.current_thread().name, "error": str(exc)}},
            )
        while (call := self._calls.get()) is not None:
            fn, args, kwargs, answer = call
            started = time.thread_time() if self._on_cpu else 0.0
            value, error = None, None
            try:
                value = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - raised again in the runner that waits
                error = exc
            if self._on_cpu:  # before the runner goes on: its stage is charged by then
                self._on_cpu(time.thread_time() - started)
            answer.give(value, error)
