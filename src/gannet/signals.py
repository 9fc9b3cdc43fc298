"""SIGTERM and SIGINT handled on a thread of their own, never inside the signal handler.

Why: Python runs a signal handler in the main thread between two bytecodes, wherever that
thread is. If it is inside `Event.wait` (the daemon's main loop) or `Popen.wait` (the
supervisor's), holding the lock that the handler's `Event.set` then takes, the process
deadlocks: a lock is not re-entrant, and the thread that holds it is the one now waiting
for it. The signal module's documentation warns of exactly this, and it happened here: a
daemon that never stopped on SIGTERM, its main thread in `Event.set` under
`Condition._acquire_restore` (docs/benchmark.md). On GKE such a pod would sit out its
termination grace period and be killed, its running tasks with it.

So the signal's number goes to a pipe (a system call: no Python lock), and a daemon
thread reads the pipe and calls `on_signal`, where taking locks is safe. The write is
CPython's own, in its C-level handler (`signal.set_wakeup_fd`), not in a Python handler:
the kernel hands a process's signal to any thread that does not block it (it does when
the main thread already has one pending: a terminal's Ctrl-C and a supervisor's SIGTERM
a moment apart), and a Python handler runs only once the main thread next wakes, which a
main thread blocked in an untimed wait (the supervisor's `Popen.wait`) may never do
(tests/test_signals.py). The C handler writes from whichever thread takes the signal.
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
    now on (default SIGTERM and SIGINT). Main thread only, as signal.signal is; it takes
    the process's one wakeup fd (nothing else here sets one: no asyncio loop)."""
    signums = signums or (signal.SIGTERM, signal.SIGINT)
    wanted = {int(signum) for signum in signums}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # a full pipe drops a signal, never blocks the handler
    # Every signal with a Python handler is written there, by the C handler, whatever
    # thread the kernel handed it to; a full pipe drops it (thousands not yet read: this
    # one adds nothing) without the warning CPython would print.
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def handler(signum: int, frame: FrameType | None) -> None:
        """Runs later on the main thread, and has nothing left to do: installing it is
        what makes CPython's C handler catch the signal and write it to the pipe."""

    def deliver() -> None:
        while True:
            received = os.read(read_fd, 64)
            for signum in received:
                if signum not in wanted:  # another handler's signal (SIGINT's default)
                    continue
                try:
                    on_signal(signum)
                except Exception:  # a failed handler must not end the thread: log it
                    log.exception("handling signal %d failed", signum)

    thread = threading.Thread(target=deliver, name="gannet-signals", daemon=True)
    thread.start()
    for signum in signums:
        signal.signal(signum, handler)
    return thread
