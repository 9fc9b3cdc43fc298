"""SIGTERM and SIGINT handled on a thread of their own, never inside the signal handler.

Why: Python runs a signal handler in the main thread between two bytecodes, wherever that
thread is. If it is inside `Event.wait` (the daemon's main loop) or `Popen.wait` (the
supervisor's), holding the lock that the handler's `Event.set` then takes, the process
deadlocks: a lock is not re-entrant, and the thread that holds it is the one now waiting
for it. The signal module's documentation warns of exactly this, and it happened here: a
daemon that never stopped on SIGTERM, its main thread in `Event.set` under
`Condition._acquire_restore` (docs/benchmark.md). On GKE such a pod would sit out its
termination grace period and be killed, its running tasks with it.

So the handler only writes the signal's number to a pipe (a system call: no Python lock),
and a daemon thread reads the pipe and calls `on_signal`, where taking locks is safe.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


def on_signals(on_signal: Callable[[int], None], *signums: signal.Signals) -> threading.Thread:
    """Call `on_signal(signum)` on the thread returned for each of `signums` received from
    now on (default SIGTERM and SIGINT). Main thread only, as signal.signal is."""
    signums = signums or (signal.SIGTERM, signal.SIGINT)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # a full pipe drops a signal, never blocks the handler

    def handler(signum: int, frame: FrameType | None) -> None:
        try:
            os.write(write_fd, bytes([signum]))
        except BlockingIOError:  # thousands of signals not yet read: this one adds nothing
            pass

    def deliver() -> None:
        while True:
            received = os.read(read_fd, 64)
            for signum in received:
                try:
                    on_signal(signum)
                except Exception:  # a failed handler must not end the thread: log it
                    log.exception("handling signal %d failed", signum)

    thread = threading.Thread(target=deliver, name="gannet-signals", daemon=True)
    thread.start()
    for signum in signums:
        signal.signal(signum, handler)
    return thread
