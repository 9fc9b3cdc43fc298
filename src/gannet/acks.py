"""Acks handed to the Pub/Sub client together, a few milliseconds apart.

Why: the client's dispatcher thread sends one Acknowledge RPC for what it finds in its
queue within 10 ms of starting to wait, and that wait starts before the first item
arrives. At about a hundred images a second the acks arrive about 10 ms apart, so
nearly every ack was an RPC of its own, with its own leaser and flow-control
bookkeeping, on the daemon's cores and under its GIL (docs/benchmark.md). Handed over
together, a window's acks go in one RPC.

What it costs: an ack leaves up to `window_s` later. The message's row is committed
before it is queued here, so a crash in between redelivers a task whose success is
committed, which is acked as a duplicate without inference; its flow-control slot is
held that much longer.
"""

from __future__ import annotations

import threading
from typing import Any

WINDOW_S = 0.02


class Acks:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._pending: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gannet-acks", daemon=True)
        self._thread.start()

    def ack(self, message: Any) -> None:
        """Queue a settled message's ack; the client gets it within `window_s`."""
        with self._lock:
            self._pending.append(message)

    def flush(self) -> None:
        """Hand every queued ack to the client now."""
        with self._lock:
            batch, self._pending = self._pending, []
        for message in batch:
            message.ack()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._window_s):
            if self._pending:
                self.flush()
