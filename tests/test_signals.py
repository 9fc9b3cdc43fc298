"""A stop signal that lands while the main thread holds a lock must still stop the process
(signals.py). Each case runs in a child interpreter: a deadlock there is a timeout here,
and this process's own signal handlers stay as they are."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# The main thread holds the lock that Event.set takes, as it does for a moment inside
# Event.wait each time the daemon's main loop wakes, and gets SIGTERM right then: Python
# runs the handler in that thread, inside the `with`. The stop must take effect once the
# lock is let go.
HOLD_THE_LOCK_AND_SIGNAL = """
import os, signal, threading, time
{install}
with stop._cond:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handler runs in here, the lock held
print("stopped" if stop.wait(5) else "not stopped", flush=True)
"""

WATCHED = """
from gannet.signals import on_signals
stop = threading.Event()
on_signals(lambda signum: stop.set())
"""

IN_THE_HANDLER = """
stop = threading.Event()
def handler(signum, frame):
    print("in the handler", flush=True)
    stop.set()
signal.signal(signal.SIGTERM, handler)
"""


def run_child(install: str, timeout_s: float) -> subprocess.CompletedProcess[str] | None:
    code = HOLD_THE_LOCK_AND_SIGNAL.format(install=textwrap.dedent(install))
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return None  # deadlocked (the child is killed on timeout)


def test_a_stop_signal_during_a_held_lock_is_handled_once_the_lock_is_free() -> None:
    done = run_child(WATCHED, timeout_s=20)
    assert done is not None, "the process deadlocked on its own lock"
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped"


def test_the_same_signal_handled_inside_the_handler_deadlocks() -> None:
    """Why signals.py exists: the handler the daemon had (Event.set in the handler)
    never returns here (a child that stops answers within a second). If this ever fails,
    Python changed and signals.py may go.

    The handler says when it starts: a child whose handler returns exits about 0.2 s
    later (the rest of its sleep), so one still running 2 s after that is deadlocked."""
    code = HOLD_THE_LOCK_AND_SIGNAL.format(install=textwrap.dedent(IN_THE_HANDLER))
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "in the handler"
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=2)
    finally:
        child.kill()
        child.communicate()


def test_every_signal_reaches_the_callback_with_its_number() -> None:
    code = textwrap.dedent(
        """
        import os, signal, threading
        from gannet.signals import on_signals
        got = []
        both = threading.Event()
        def on_signal(signum):
            got.append(signum)
            if len(got) == 2:
                both.set()
        on_signals(on_signal)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert both.wait(5), got
        print(sorted(got) == sorted([signal.SIGTERM, signal.SIGINT]), flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_a_signal_the_kernel_hands_to_another_thread_is_not_left_waiting() -> None:
    """The kernel may hand a process's signal to any of its threads: it does when the
    main thread already has one pending (a Ctrl-C and a supervisor's SIGTERM a moment
    apart). Python then runs its handler only once the main thread next wakes, and a
    main thread blocked in an untimed wait (the supervisor's Popen.wait) may never. Here
    the main thread blocks SIGTERM, so that another thread has to take it."""
    code = textwrap.dedent(
        """
        import os, signal, threading
        from gannet.signals import on_signals
        stop = threading.Event()
        on_signals(lambda signum: stop.set())
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)
        print("stopped" if stop.wait(5) else "not stopped", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped"
