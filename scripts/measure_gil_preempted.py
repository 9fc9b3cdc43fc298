#!/usr/bin/env python3
"""While a thread holds the GIL, is it running, or waiting for a core?

The plumbing bench's GIL figure is wall time: py-spy, in the real-time class, asks at
each tick which thread holds the GIL. A holder that the kernel has taken off its core
(another thread or process ran there) still holds it, and no other Python thread of the
daemon can run meanwhile. On this VM the emulators and PostgreSQL share the daemon's two
cores; in a pod they are remote. This splits the GIL-held time of one process into the
time its holder ran, the time it waited for a core (preempted, still runnable) and the
time it slept holding it (a page fault, a blocking call made without letting go), and
says who took the core.

It records, for every CPU, CPython's `take_gil` returning and `drop_gil` being entered
(uprobes on libpython: needs perf and root; the probes are added once and left in place)
and the kernel's context switches, then walks them in time order.

    .venv/bin/python scripts/measure_gil_preempted.py --pid PID [--seconds 3]

Run it while the process is busy, e.g. during `gannet bench --plumbing --sizes 4032x3024
--images 60000 --rounds 1 --runners-sweep 4 --no-gil --no-trace`, with PID the daemon's
(`pgrep -f gannet.dev.replay`). Each probe costs the process a few microseconds, so it
runs slower while recorded than the bench's own figures show; the shares are what to read.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from count_gil_releases import add_probe  # a sibling: scripts/ is on sys.path

PROBES = ("take_gil%return", "drop_gil")
EVENTS = ("probe_libpython3:take_gil__return", "probe_libpython3:drop_gil", "sched:sched_switch")
# perf script -F pid,tid,time,event,trace
LINE = re.compile(r"^\s*(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$")
SWITCH = re.compile(
    r"prev_comm=(.*?) prev_pid=(\d+) .*?prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)


def record(seconds: float, out: Path) -> str:
    events = [arg for event in EVENTS for arg in ("-e", event)]
    subprocess.run(
        ["perf", "record", *events, "-a", "-o", str(out), "--", "sleep", str(seconds)],
        check=True,
        capture_output=True,
    )
    return subprocess.run(
        ["perf", "script", "-i", str(out), "-F", "pid,tid,time,event,trace"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@dataclass
class Split:
    """Seconds of one process's GIL-held time, by what its holder was doing."""

    seconds: float = 0.0  # the recording's length
    held: float = 0.0
    preempted: float = 0.0  # runnable, off its core
    asleep: float = 0.0  # blocked while holding it
    overlap: float = 0.0  # two holders at once: events missed
    by_whom: dict[str, float] = field(default_factory=dict)  # who took a preempted core

    @property
    def running(self) -> float:
        return self.held - self.preempted - self.asleep


def split(script: str, pid: int) -> Split:
    """Walk the events in time order: per thread of `pid`, whether it holds the GIL and
    whether it is on a core; the held time goes to running, runnable (preempted) or
    asleep, and the time a holder was preempted to whoever took its core."""
    holding: dict[int, float] = {}  # tid -> when it took the GIL
    off: dict[int, tuple[float, str, str]] = {}  # tid -> (switched out at, state, taken by)
    found = Split()
    holders_since = 0.0
    first = last = None
    for line in script.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        event_pid, tid, at, event, trace = match.groups()
        now = float(at)
        first = now if first is None else first
        last = now
        if event.startswith("probe_libpython3:"):
            if int(event_pid) != pid:
                continue
            thread = int(tid)
            if event.endswith("take_gil__return"):
                if holding:  # another thread holds it too: a missed event
                    holders_since = now
                holding[thread] = now
            elif thread in holding:
                if len(holding) > 1:
                    found.overlap += now - holders_since
                found.held += now - holding.pop(thread)
            continue
        switch = SWITCH.search(trace)
        if switch is None:
            continue
        _, prev, state, next_comm, nxt = switch.groups()
        prev_tid, next_tid = int(prev), int(nxt)
        if prev_tid in holding:
            taker = "this process" if _pid_of(next_tid) == pid else next_comm
            off[prev_tid] = (now, state, taker)
        if next_tid in off:
            since, state, taker = off.pop(next_tid)
            if next_tid in holding:
                away = now - since  # switched out while holding it, so since it took it
                if state.startswith("R"):
                    found.preempted += away
                    found.by_whom[taker] = found.by_whom.get(taker, 0.0) + away
                else:
                    found.asleep += away
    found.seconds = (last or 0.0) - (first or 0.0)
    return found


_PIDS: dict[int, int] = {}


def _pid_of(tid: int) -> int:
    """The process a thread belongs to (its Tgid), 0 if it is gone or is the idle task."""
    if tid not in _PIDS:
        try:
            status = Path(f"/proc/{tid}/status").read_text()
        except OSError:
            status = ""
        found = re.search(r"^Tgid:\s+(\d+)", status, re.M)
        _PIDS[tid] = int(found.group(1)) if found else 0
    return _PIDS[tid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, required=True, help="the Python process to look at")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to record")
    args = parser.parse_args()
    for tid in os.listdir(f"/proc/{args.pid}/task"):
        _PIDS[int(tid)] = args.pid
    for probe in PROBES:
        add_probe(probe)
    with tempfile.TemporaryDirectory() as tmp:
        script = record(args.seconds, Path(tmp) / "gil.data")
    found = split(script, args.pid)
    if found.held == 0:
        raise SystemExit("no thread of the process took the GIL: is it a busy Python process?")
    print(f"recorded {found.seconds:.2f} s; the GIL held {found.held / found.seconds:.1%} of it")
    for part, value in (
        ("running", found.running),
        ("preempted", found.preempted),
        ("asleep", found.asleep),
    ):
        share, of_held = value / found.seconds, value / found.held
        print(f"  {part:10} {share:6.1%} of the time, {of_held:6.1%} of the held time")
    for whom, value in sorted(found.by_whom.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    preempted by {whom:16} {value / found.held:6.1%} of the held time")
    print(f"two holders at once (missed events): {found.overlap / found.held:.2%} of the held time")


if __name__ == "__main__":
    main()
