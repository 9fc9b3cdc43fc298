"""Each lane's lease follows the pod's pace: grown while runners sit idle because every
leased message is taken, shrunk back while leased messages wait for a runner.

Why: a message holds one of its stream's `GANNET_MAX_MESSAGES` slots from Pub/Sub's send
until its ack has reached Pub/Sub, and Pub/Sub sends the next only then. So with a fast
model a slot spends much of its turn outside the runners: in the ack's window, on the
ack's way to Pub/Sub and the next message's way back. With Pub/Sub 20 ms away, 4 runners
leasing 8 fed the model 115 images/s and leasing 16 fed it 158 (docs/benchmark.md,
"Pub/Sub's flow control, and the receipt modack"). A fixed lease sized for that would
hoard messages behind busy runners when the model is slow (the shipped pipelines), while
another pod idles; and what a fast model needs depends on Pub/Sub's round trip, which
the operator does not know.

How: every SAMPLE_S a thread looks at each lane. The lane is *starved* when a runner
is idle, none of the lane's messages waits for one, every slot of its lease is taken
(the client's flow-control load is 1) and it runs fewer tasks than its cap: the lease,
not the work, holds the runner back. It is *crowded* when some of its messages wait in
the pod for a runner, and *unused* when none of its messages is in the pod. Every
DECIDE_S, a lane starved in at least STARVED of its samples leases a quarter more, up
to `GANNET_LEASE_GROWTH` x its configured lease; one hardly starved (CALM) and crowded
in at least CROWDED of them, or unused in UNUSED, leases one less, down to the
configured lease, which stays the floor (the HPA's per-pod target is sized against it).
A lane with no backlog never fills its lease, so it never grows. Pub/Sub takes a new
lease on a new stream (subscriber.py, `_Manager.resize`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gannet.metrics import Metrics

log = logging.getLogger(__name__)

SAMPLE_S = 0.025
DECIDE_S = 2.0
STARVED = 0.10  # share of a period's samples with a runner idle behind a full lease
CALM = 0.02  # at most this share starved, a lease may shrink (a lease that just grew
# would otherwise shrink at once: a fast lane's messages come in bursts, so at the lease
# it needs it is both crowded and, now and then, starved)
CROWDED = 0.50  # share of a period's samples with the lane's messages waiting in the pod
UNUSED = 0.90  # share of a period's samples with none of the lane's messages in the pod


class Stream(Protocol):
    """What the sizer needs of a lane's subscriber."""

    max_messages: int

    def load(self) -> float: ...

    def resize(self, max_messages: int) -> None: ...


class Runners(Protocol):
    """What the sizer needs of the runner pool."""

    def waiting(self, lane: str | None = None) -> int: ...

    def running(self, lane: str | None = None) -> int: ...


def next_lease(
    lease: int, floor: int, ceiling: int, starved: float, crowded: float, unused: float
) -> int:
    """The lease for the next period, from the share of this period's samples in which
    the lane was starved, crowded, and had none of its messages in the pod."""
    if starved >= STARVED and lease < ceiling:
        return min(ceiling, max(lease + 1, math.ceil(lease * 1.25)))
    if starved <= CALM and (crowded >= CROWDED or unused >= UNUSED) and lease > floor:
        return lease - 1  # one at a time: a lease stops where starving begins
    return lease


@dataclass
class LaneLease:
    name: str
    stream: Stream
    floor: int
    ceiling: int
    cap: int | None  # the most of its tasks that may run at once
    samples: int = 0
    starved: int = 0
    crowded: int = 0
    unused: int = 0


class LeaseSizer:
    def __init__(
        self,
        lanes: list[LaneLease],
        pool: Runners,
        runners: int,
        metrics: Metrics,
        sample_s: float = SAMPLE_S,
        decide_s: float = DECIDE_S,
    ) -> None:
        self._lanes = lanes
        self._pool = pool
        self._runners = runners
        self._sample_s = sample_s
        self._every = max(1, round(decide_s / sample_s))
        self._gauges: dict[str, Callable[[float], None]] = {}
        for lane in lanes:
            self._gauges[lane.name] = metrics.lane_lease.labels(lane.name).set
            self._gauges[lane.name](lane.stream.max_messages)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gannet-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Before the streams stop: a stream closing is not resized."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(self._sample_s):
            self.sample()
            ticks += 1
            if ticks % self._every == 0:
                self.decide()

    def sample(self) -> None:
        pool = self._pool
        idle = pool.running() < self._runners
        for lane in self._lanes:
            lane.samples += 1
            running = pool.running(lane.name)
            if pool.waiting(lane.name):
                lane.crowded += 1
            elif idle and lane.stream.load() >= 1.0 and (lane.cap is None or running < lane.cap):
                lane.starved += 1
            elif not running:
                lane.unused += 1

    def decide(self) -> None:
        for lane in self._lanes:
            if not lane.samples:
                continue
            n = lane.samples
            starved, crowded, unused = lane.starved / n, lane.crowded / n, lane.unused / n
            lane.samples = lane.starved = lane.crowded = lane.unused = 0
            lease = lane.stream.max_messages
            leased = next_lease(lease, lane.floor, lane.ceiling, starved, crowded, unused)
            if leased == lease:
                continue
            log.info(
                "lease resized",
                extra={
                    "lane": lane.name,
                    "fields": {
                        "from": lease,
                        "to": leased,
                        "starved": round(starved, 2),
                        "crowded": round(crowded, 2),
                        "unused": round(unused, 2),
                    },
                },
            )
            lane.stream.resize(leased)
            self._gauges[lane.name](leased)
