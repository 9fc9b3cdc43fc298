"""Lanes: several queues (a topic and subscription each) sharing one daemon's runners.

One subscription is one queue, handed out roughly in publish order, so a bulk backfill
published first delays every interactive task behind it however many pods there are.
A lane is its own topic, subscription and dead-letter topic, so a backend picks the lane
by the topic it publishes to. (Not a filter on one topic: the gcloud 528 emulator
accepts subscription filters and ignores them, so they could not be tested here, a filter
cannot be changed after the subscription exists, and a message matching no filter is
dropped without a trace; a wrong topic name fails the publish instead.)

The first lane keeps the names of GANNET_TOPIC, GANNET_SUBSCRIPTION and
GANNET_DEAD_LETTER_TOPIC, so one lane is today's deployment; lane L adds "-L" to each.

`LaneQueue` shares runners between lanes by weight with stride scheduling: a runner that
is free takes the next job of the lane that has had the least service per unit of weight,
among the lanes with work waiting and under their cap. So when every lane has work each
gets its share, and when one is empty the others take every runner (work-conserving). A
lane that had nothing queued (even with tasks running) re-enters at the current virtual
time: idleness banks no credit.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Generic, TypeVar

NAME = re.compile(r"^[a-z][a-z0-9]{0,19}$")
ItemT = TypeVar("ItemT")

# The weight of the lane whose task this thread runs (a runner sets it per job): the
# batcher runs the most urgent queued requests first (batcher.py).
URGENCY: ContextVar[int] = ContextVar("gannet_lane_urgency", default=0)


@dataclass(frozen=True)
class Lane:
    name: str
    weight: int
    cap: int | None  # most of the lane's tasks running at once in one daemon process
    topic: str
    subscription: str
    dead_letter_topic: str

    @property
    def dead_letter_subscription(self) -> str:
        """The dead-letter topic's subscription, named as terraform names it."""
        return f"{self.dead_letter_topic}-sub"


def flow_control(max_messages: int | None, runners: int, cap: int | None) -> int:
    """Messages one lane's stream leases at once, at first and at the least: the
    configured limit (default 2 x runners), and for a capped lane at most 2 x its cap, as
    a capped lane leasing more than it may run would hide work from other pods. The
    daemon (Settings.lane_flow_control) and the HPA simulator's pods metric both use it."""
    leased = max_messages or 2 * runners
    return min(leased, 2 * cap) if cap else leased


def parse_lanes(spec: str, topic: str, subscription: str, dead_letter_topic: str) -> list[Lane]:
    """'interactive:4,bulk:1:2' -> lanes (name:weight[:cap]); '' -> one lane, today's.

    Raises ValueError saying what is wrong and what a valid value looks like."""
    example = "for example 'interactive:4,bulk:1:2' (name:weight[:cap], first lane first)"
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        return [Lane("default", 1, None, topic, subscription, dead_letter_topic)]
    lanes: list[Lane] = []
    for i, entry in enumerate(entries):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not NAME.match(parts[0]):
            raise ValueError(
                f"lane {entry!r}: want name:weight[:cap] with a name of lowercase letters and "
                f"digits (at most 20, starting with a letter); {example}"
            )
        if not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"lane {entry!r}: weight and cap are whole numbers; {example}")
        numbers = [int(p) for p in parts[1:]]
        if any(n < 1 for n in numbers):
            raise ValueError(f"lane {entry!r}: weight and cap are at least 1; {example}")
        name = parts[0]
        if any(lane.name == name for lane in lanes):
            raise ValueError(f"lane {name!r} is declared twice in GANNET_LANES")
        suffix = "" if i == 0 else f"-{name}"
        lanes.append(
            Lane(
                name,
                numbers[0],
                numbers[1] if len(numbers) == 2 else None,
                topic + suffix,
                subscription + suffix,
                dead_letter_topic + suffix,
            )
        )
    return lanes


@dataclass
class _LaneState(Generic[ItemT]):
    weight: int
    cap: int | None
    jobs: deque[ItemT] = field(default_factory=deque)
    running: int = 0
    started: int = 0  # jobs handed to runners since start (tests, the bench)
    virtual: float = 0.0  # service received per unit of weight

    def eligible(self) -> bool:
        return bool(self.jobs) and (self.cap is None or self.running < self.cap)


class LaneQueue(Generic[ItemT]):
    """The runners' queue: jobs wait per lane; `get` picks the lane by weight and cap."""

    def __init__(self, lanes: dict[str, tuple[int, int | None]]) -> None:
        """`lanes`: name -> (weight, cap), in declaration order (the tie-breaker)."""
        self._lanes = {name: _LaneState[ItemT](w, cap) for name, (w, cap) in lanes.items()}
        self._cond = threading.Condition()
        self._now = 0.0  # the virtual time of the last job handed out
        self._closed = False

    def put(self, lane: str, job: ItemT) -> None:
        with self._cond:
            state = self._lanes[lane]
            # Nothing queued, whatever is running: that time banks nothing either (a
            # lane with one long task running would otherwise come back owed the share
            # of everything the others ran meanwhile, and take every runner).
            if not state.jobs:
                state.virtual = max(state.virtual, self._now)
            state.jobs.append(job)
            self._cond.notify()

    def get(self) -> tuple[str, ItemT] | None:
        """Block until some lane may start a job; None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                ready = [(s.virtual, n) for n, s in self._lanes.items() if s.eligible()]
                if ready:
                    break
                self._cond.wait()
            _, name = min(ready, key=lambda r: r[0])  # min keeps the first of equals
            state = self._lanes[name]
            self._now = state.virtual
            state.virtual += 1.0 / state.weight
            state.running += 1
            state.started += 1
            return name, state.jobs.popleft()

    def weight(self, lane: str) -> int:
        return self._lanes[lane].weight

    def finished(self, lane: str) -> None:
        """A job `get` handed out is over: its lane may start another under its cap."""
        with self._cond:
            self._lanes[lane].running -= 1
            self._cond.notify_all()

    def close(self) -> list[ItemT]:
        """Wake every runner to stop, and return the jobs no runner started."""
        with self._cond:
            self._closed = True
            left = [job for state in self._lanes.values() for job in state.jobs]
            for state in self._lanes.values():
                state.jobs.clear()
            self._cond.notify_all()
            return left

    def waiting(self, lane: str | None = None) -> int:
        with self._cond:
            return sum(len(s.jobs) for n, s in self._lanes.items() if lane in (None, n))

    def running(self, lane: str | None = None) -> int:
        with self._cond:
            return sum(s.running for n, s in self._lanes.items() if lane in (None, n))

    def started(self, lane: str) -> int:
        with self._cond:
            return self._lanes[lane].started
