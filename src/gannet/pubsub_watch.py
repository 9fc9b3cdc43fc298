"""Says when Pub/Sub stops answering, and when it answers again.

Why: the Pub/Sub client reopens a broken stream on its own, silently, for as long as it
takes. With Pub/Sub unreachable (an egress or NAT fault, a firewall change) a pod wrote
no line and stayed live and ready, its runners idle while the backlog grew: only an
alert on no task succeeding caught it, 25 minutes later. A thread asks for one
subscription every WATCH_S (one cheap call, whatever the traffic), and the outage is a
log line at its start, one every REPEAT_S while it lasts and one at its end, and the
time of the last answer a gauge the alert rules read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from google.api_core import exceptions as gexc
from prometheus_client import Gauge

log = logging.getLogger(__name__)

WATCH_S = 30.0
ASK_TIMEOUT_S = 10.0
REPEAT_S = 300.0  # an outage that lasts is said again this often


class PubSubWatch:
    def __init__(
        self,
        ask: Callable[[float], object],
        last_reached: Gauge,
        every_s: float = WATCH_S,
        ask_timeout_s: float = ASK_TIMEOUT_S,
    ) -> None:
        """`ask(timeout_s)`: a call to Pub/Sub that raises when it does not answer."""
        self._ask = ask
        self._ask_timeout_s = ask_timeout_s
        self._last_reached = last_reached
        self._every_s = every_s
        self._stop = threading.Event()
        self.down_since: float | None = None  # monotonic, while Pub/Sub does not answer
        self._said_at = 0.0

    def start(self) -> None:
        self._last_reached.set(time.time())  # it answered at start-up
        threading.Thread(target=self._run, name="gannet-pubsub-watch", daemon=True).start()

    def stop(self) -> None:
        """Not waited for: an answer in flight only sets a gauge."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self.check()
            except Exception:  # the thread must go on: a stale gauge would page for nothing
                log.exception("the Pub/Sub watch's check failed unexpectedly; it goes on")

    def check(self) -> None:
        try:
            self._ask(self._ask_timeout_s)
        except gexc.ClientError:
            pass  # a refusal (403, 404) is an answer: Pub/Sub is reachable
        except gexc.GoogleAPIError as exc:  # unavailable, a deadline, retries spent
            self._failed(exc)
            return
        self._last_reached.set(time.time())
        if self.down_since is not None:
            log.info(
                "Pub/Sub answers again; the streams resume on their own",
                extra={"fields": {"down_s": round(time.monotonic() - self.down_since)}},
            )
            self.down_since = None

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
        elif now - self._said_at < REPEAT_S:
            return
        self._said_at = now
        log.error(
            "Pub/Sub does not answer: no message can arrive, nor an ack leave, until it "
            "does (the streams retry on their own); check the pod's egress to "
            "pubsub.googleapis.com (NetworkPolicy, NAT, firewall) and Pub/Sub's status",
            extra={
                "fields": {
                    "error": f"{exc.__class__.__name__}: {exc}",
                    "down_s": round(now - self.down_since),
                }
            },
        )
