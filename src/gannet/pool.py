"""Runner threads, each pinned to one device, fed from the lanes' queue of jobs.

Several runners per device let download, decode, post-processing and database writes of
one task overlap with inference of another, so the device does not wait for I/O. Pinning
keeps every model a runner touches on its own device. Which lane's job a free runner
takes next is lanes.LaneQueue's choice (by weight, under each lane's cap).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gannet.lanes import URGENCY, LaneQueue
from gannet.outcome import Outcome

log = logging.getLogger(__name__)


def resolve_devices(spec: str) -> list[str]:
    """'auto' -> every visible GPU as cuda:i, or cpu when there is none. A CUDA device
    that torch does not see is a ValueError that says so: found later, at the first
    model load, it was a stack dump from torch's C++ and a message buried in it."""
    if spec.strip() != "auto":
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        _check_cuda(spec, devices)
        return devices
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def _check_cuda(spec: str, devices: list[str]) -> None:
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = f"{count} (cuda:0 to cuda:{count - 1})" if count else "no CUDA device"
    for device in cuda:
        index = device.partition(":")[2] or "0"
        if not index.isdigit() or int(index) >= count:
            raise ValueError(
                f"GANNET_DEVICES={spec}: torch sees {seen}, so {device} cannot be used; "
                "set GANNET_DEVICES=auto (every GPU, else the CPU) or cpu, or check that the "
                "pod has its GPU and driver (nvidia-smi in the container)"
            )


def assign_devices(devices: list[str], runners: int) -> list[str]:
    """Round robin, so N runners spread evenly over the GPUs."""
    return [devices[i % len(devices)] for i in range(runners)]


ItemT = TypeVar("ItemT")


@dataclass(eq=False)
class Job(Generic[ItemT]):
    """One work item handed from a subscriber callback to a runner; the callback waits
    on it. The item is the caller's (dispatch.WorkItem); the pool only moves it."""

    item: ItemT
    lane: str = "default"
    # Set once the job is finished and on_finish has returned: `outcome` is final then.
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    started: bool = False
    # Called once with the outcome, on the thread that finishes the job (its runner, or
    # the one that nacks it at shutdown): there the message is settled, and what was
    # applied may replace `outcome` (a dead letter that could not be published: a nack).
    on_finish: Callable[[Outcome | None], None] | None = None
    _finished: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, outcome: Outcome | None) -> bool:
        """First finisher wins: a shutdown nack and a late runner result cannot both apply."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
            self.outcome = outcome
        try:
            if self.on_finish is not None:
                self.on_finish(outcome)
        finally:
            self.done.set()
        return True

    def claim(self) -> bool:
        """A runner takes the job unless shutdown already answered it."""
        with self._lock:
            if self._finished:
                return False
            self.started = True
            return True


class RunnerPool(Generic[ItemT]):
    def __init__(
        self,
        devices: list[str],
        runners: int,
        handle: Callable[[ItemT, str], Outcome],
        on_abandon: Callable[[ItemT], Outcome],
        lanes: dict[str, tuple[int, int | None]] | None = None,
    ) -> None:
        """`handle(item, device)` runs on a runner thread; `on_abandon(item)` answers a
        job still running when the grace period is over (a nack). `lanes`: name ->
        (weight, cap); by default one lane, "default", without a cap."""
        self._handle = handle
        self._on_abandon = on_abandon
        self.queue: LaneQueue[Job[ItemT]] = LaneQueue(lanes or {"default": (1, None)})
        self._accepting = True
        self._lock = threading.Lock()
        self._in_flight: dict[Job[ItemT], float] = {}  # job -> when its runner took it
        self.devices = assign_devices(devices, runners)
        self._threads = [
            threading.Thread(
                target=self._loop, args=(device,), name=f"runner-{i}-{device}", daemon=True
            )
            for i, device in enumerate(self.devices)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        log.info("runners started", extra={"fields": {"devices": self.devices}})

    def submit(self, job: Job[ItemT]) -> bool:
        with self._lock:
            if not self._accepting:
                return False
            self.queue.put(job.lane, job)
            return True

    def waiting(self, lane: str | None = None) -> int:
        """Jobs leased from Pub/Sub that no runner has started (of one lane, or all)."""
        return self.queue.waiting(lane)

    def running(self, lane: str | None = None) -> int:
        return self.queue.running(lane)

    def _loop(self, device: str) -> None:
        while (got := self.queue.get()) is not None:
            lane, job = got
            URGENCY.set(self.queue.weight(lane))  # for the batcher: this job's lane
            try:
                if job.claim():
                    self._run(job, device)
            finally:
                self.queue.finished(lane)

    def _run(self, job: Job[ItemT], device: str) -> None:
        with self._lock:
            self._in_flight[job] = time.monotonic()
        outcome: Outcome | None
        try:
            outcome = self._handle(job.item, device)
        except Exception:
            log.exception("runner crashed on a job; it will be nacked")
            outcome = None
        finally:
            with self._lock:
                self._in_flight.pop(job, None)
        job.finish(outcome)

    def longest_running_s(self) -> float:
        """How long the oldest running job has run (0 with none): the daemon's watch
        for a runner that will never return."""
        with self._lock:
            oldest = min(self._in_flight.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def stop_accepting(self) -> list[Job[ItemT]]:
        """Stop taking jobs and return the ones no runner has started yet."""
        with self._lock:
            self._accepting = False
        return self.queue.close()

    def abandon_running(self) -> int:
        """Answer jobs still running past the grace period, so their callbacks can nack."""
        with self._lock:
            running = list(self._in_flight)
        return sum(job.finish(self._on_abandon(job.item)) for job in running)

    def join(self, timeout: float, abort: threading.Event | None = None) -> bool:
        """Wait for running jobs; True when every runner finished within `timeout`.
        `abort` (a second SIGTERM) ends the wait early."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            while thread.is_alive() and not (abort is not None and abort.is_set()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                thread.join(min(left, 0.1))
        return not any(t.is_alive() for t in self._threads)
