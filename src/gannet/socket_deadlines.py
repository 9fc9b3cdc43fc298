"""A request's socket shut at its deadline, from a thread of its own: the GCS requests
of every task (gcs_http), tenants' result callbacks (callback) and the round trips to
PostgreSQL (pgexec, sink) each have one.

Why: a socket's timeout bounds each read and write, not the request, so a server (or a
middlebox on the way) that trickles its answer a byte every few seconds, or stalls a TLS
handshake the same way, would hold the waiting thread for as long as it liked. Shutting
the socket ends a blocked read or write at once; what that read made of the answer (an
end of file; headers cut short even parse as complete) is the caller's timeout: `forget`
says whether the deadline struck. A request only registers and leaves (a lock and a
dict: no system call, no clock check per read); the thread sleeps until the nearest
deadline, and only a request whose deadline is nearer than that wakes it.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time


class SocketDeadlines:
    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._cond = threading.Condition()
        self._running: dict[object, tuple[float, socket.socket | int | None]] = {}
        self._expired: set[object] = set()
        self._wakes_at = math.inf  # the thread's next look
        self._thread: threading.Thread | None = None

    def watch(
        self, owner: object, deadline: float, sock: socket.socket | int | None = None
    ) -> None:
        """Shut `sock` (a socket, or a file descriptor: libpq's) at `deadline`
        (time.monotonic()) unless `owner` is forgotten by then. Without `sock`, the
        owner's own `sock` at that moment (an http.client connection's: None while it
        connects, which its caller then checks)."""
        with self._cond:
            self._running[owner] = (deadline, sock)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self._thread_name, daemon=True
                )
                self._thread.start()
            elif deadline < self._wakes_at:
                self._cond.notify()

    def forget(self, owner: object) -> bool:
        """Stops watching; True when the deadline had shut the socket."""
        with self._cond:
            self._running.pop(owner, None)
            if owner in self._expired:
                self._expired.discard(owner)
                return True
            return False

    def expire_all(self) -> None:
        """Every socket watched now shut at once (a shutdown that will not wait)."""
        with self._cond:
            for owner, (_, sock) in self._running.items():
                self._running[owner] = (0.0, sock)
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                nearest = math.inf
                for owner, (deadline, sock) in list(self._running.items()):
                    if deadline <= now:
                        del self._running[owner]
                        self._expired.add(owner)
                        _shut(sock if sock is not None else getattr(owner, "sock", None))
                    else:
                        nearest = min(nearest, deadline)
                self._wakes_at = nearest
                self._cond.wait(None if nearest == math.inf else nearest - now)


def _shut(sock: socket.socket | int | None) -> None:
    """Ends the blocked reads and writes of another thread on the socket: the plain
    socket's shutdown, also for TLS (SSLSocket's own would drop its TLS state under the
    thread still using it). A file descriptor is shut through a duplicate of it: the
    shutdown acts on the socket both name, and closing the duplicate leaves the owner's
    descriptor open for its owner to close."""
    if sock is None:
        return
    try:
        if isinstance(sock, int):
            with socket.socket(fileno=os.dup(sock)) as dup:
                dup.shutdown(socket.SHUT_RDWR)
        else:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # closed or never connected: nothing is blocked on it
        pass
