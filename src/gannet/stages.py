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
from typing import Protocol

Observe = Callable[[str, float], None]  # (stage, seconds)


class Spans(Protocol):
    """Opens a span per stage (tracing.StageSpans)."""

    def enter(self, name: str) -> object: ...

    def exit(self, opened: object, error: BaseException | None) -> None: ...


def ignore(stage: str, seconds: float) -> None:
    """Keeps nothing: the default sink for CPU seconds, and the observer of callers that
    want no timings at all (warm-up, tools)."""


class Timer:
    """One task's stages on one thread; not shared between threads."""

    def __init__(
        self, observe: Observe, charge_cpu: Observe = ignore, spans: Spans | None = None
    ) -> None:
        """`observe(stage, wall seconds)` once per stage; `charge_cpu(stage, cpu
        seconds)` whenever a stage ends or a nested one begins; `spans` when tracing."""
        self.timings: dict[str, float] = {}
        self._observe = observe
        self._charge = charge_cpu
        self.spans = spans
        self._open: list[str] = []
        self._cpu_mark = 0.0
        self._cpu = charge_cpu is not ignore  # the clock is a syscall: only when asked

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
        key = f"{name}_ms"  # a stage run more than once per task (tiles, crops) adds up
        self.timings[key] = round(self.timings.get(key, 0.0) + seconds * 1000, 2)
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
