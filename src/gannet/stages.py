"""Where one task's time and CPU go, stage by stage.

Wall time per stage is what a task's `timings` and the stage histogram show: how long a
user waited, and on what. CPU per stage is what decides how many images one pod can feed
its GPU: a stage's CPU is the thread CPU of the thread doing it, exclusive of the stages
nested in it (a step's own work, without the pre- and post-processing inside it), summed
into one counter per stage. `gannet bench --plumbing` reads that counter to split the
daemon's CPU per image by stage. With tracing on, each stage is also a span
(tracing.py); with it off, a stage pays one `is None` check for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

Observe = Callable[[str, float], None]  # (stage, seconds)


class Spans(Protocol):
    """Opens a span per stage (tracing.StageSpans)."""

    def enter(self, name: str) -> object: ...

    def exit(self, opened: object, error: BaseException | None) -> None: ...


def ignore(stage: str, seconds: float) -> None:
    """Keeps nothing: the default sink for CPU seconds, and the observer of callers that
    want no timings at all (warm-up, tools)."""


def by_stage(metric: Any, method: str) -> Observe:
    """`metric.labels(stage).<method>(value)` as an Observe, each stage's child (and its
    bound method) looked up once. Why: prometheus_client's labels() checks its arguments
    and takes a lock on every call, a dozen times per task on the runner, under the GIL
    (docs/benchmark.md, "The GIL-held figure")."""
    children: dict[str, Callable[[float], None]] = {}

    def observe(stage: str, value: float) -> None:
        record = children.get(stage)
        if record is None:
            record = children.setdefault(stage, getattr(metric.labels(stage), method))
        record(value)

    return observe


class Timer:
    """One task's stages on one thread; not shared between threads."""

    def __init__(
        self, observe: Observe, charge_cpu: Observe = ignore, spans: Spans | None = None
    ) -> None:
        """`observe(stage, wall seconds)` once per stage; `charge_cpu(stage, cpu
        seconds)` whenever a stage ends or a nested one begins; `spans` when tracing."""
        self._seconds: dict[str, float] = {}
        self._observe = observe
        self._charge = charge_cpu
        self.spans = spans
        self._open: list[str] = []
        self._cpu_mark = 0.0
        self._cpu = charge_cpu is not ignore  # the clock is a syscall: only when asked

    @property
    def timings(self) -> dict[str, float]:
        """Milliseconds per stage, as "<stage>_ms", rounded to 0.01 (a stage run more than
        once per task, such as tiles or crops, adds up). Rounded here, once per read,
        rather than at every stage's end."""
        return {f"{name}_ms": round(s * 1000, 2) for name, s in self._seconds.items()}

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    def _switch(self, to: str | None) -> None:
        """Charge the CPU since the last switch to the stage open until now."""
        if self._cpu:
            now = time.thread_time()
            if self._open:
                self._charge(self._open[-1], now - self._cpu_mark)
            self._cpu_mark = now
        if to is not None:
            self._open.append(to)

    def _close(self, name: str, seconds: float) -> None:
        self._switch(None)
        self._open.pop()
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds
        self._observe(name, seconds)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        spans = self.timer.spans
        self.opened = spans.enter(self.name) if spans is not None else None
        self.timer._switch(self.name)
        self.started = time.perf_counter()

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.timer._close(self.name, time.perf_counter() - self.started)
        if self.opened is not None:
            self.timer.spans.exit(self.opened, error)  # type: ignore[union-attr]
