#!/usr/bin/env python3
"""Do a process's threads wait for a core while another core is idle?

The plumbing bench reports both for one daemon: its threads waited about 6 ms per image
for a core, while about 0.45 of the machine's cores ran nothing on average. Averages
cannot say whether the two happen at the same moments (a scheduler that leaves a core
idle while work waits) or at different ones (bursts: every core busy, then nothing
runnable). This records the kernel's scheduler events on every CPU for a few seconds
(`perf sched record`: needs perf and root), and lines up each wait of the process's
threads for a core with the CPUs' idle periods, on a 10-microsecond grid.

    .venv/bin/python scripts/measure_sched_overlap.py --pid PID [--seconds 4]

Run it while the process is busy, e.g. during `gannet bench --plumbing --sizes 640x480
--images 12000 --rounds 1 --runners-sweep 4 --no-gil --no-trace`, with PID the daemon's
(`pgrep -f gannet.dev.replay`). Recording costs CPU itself, so the machine is busier
while it runs than the bench's own figures show.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

GRID_S = 10e-6
# perf sched timehist: time, [cpu], task (comm[tid/pid] or <idle>), wait, sch delay, run (ms)
LINE = re.compile(r"^\s*([\d.]+)\s+\[(\d+)\]\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def record(seconds: float, out: Path) -> str:
    subprocess.run(
        ["perf", "sched", "record", "-a", "-o", str(out), "--", "sleep", str(seconds)],
        check=True,
        capture_output=True,
    )
    return subprocess.run(
        ["perf", "sched", "timehist", "-i", str(out)], check=True, capture_output=True, text=True
    ).stdout


def overlap(timehist: str, tids: set[int], cpus: int) -> dict[str, float]:
    waits: list[tuple[float, float]] = []  # (start, end) of a thread's wait for a core
    idle: list[tuple[int, float, float]] = []  # (cpu, start, end) of the idle task's runs
    for line in timehist.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        end_s, cpu, task, _, delay_ms, run_ms = match.groups()
        switched_in = float(end_s) - float(run_ms) / 1000
        if "<idle>" in task:
            idle.append((int(cpu), switched_in, float(end_s)))
            continue
        thread = re.search(r"\[(\d+)(?:/\d+)?\]", task)
        if thread and int(thread.group(1)) in tids and float(delay_ms) > 0:
            waits.append((switched_in - float(delay_ms) / 1000, switched_in))
    if not waits:
        raise SystemExit("no thread of the process waited for a core: is it busy?")
    start, stop = min(w[0] for w in waits), max(w[1] for w in waits)
    cells = int((stop - start) / GRID_S) + 1
    waiting = np.zeros(cells, np.int32)
    for a, b in waits:
        waiting[int((a - start) / GRID_S) : int((b - start) / GRID_S)] += 1
    idle_cpus = np.zeros((cpus, cells), bool)
    for cpu, a, b in idle:
        first, last = max(0, int((a - start) / GRID_S)), min(cells, int((b - start) / GRID_S))
        if last > first:
            idle_cpus[cpu, first:last] = True
    any_idle = idle_cpus.any(axis=0)
    return {
        "seconds": stop - start,
        "threads waiting for a core, mean": float(waiting.mean()),
        "idle cores, mean": float(idle_cpus.sum(axis=0).mean()),
        "share of time a thread waits": float((waiting > 0).mean()),
        "share of time a thread waits while a core is idle": float(
            ((waiting > 0) & any_idle).mean()
        ),
        "share of the wait time during which a core is idle": float(
            (waiting * any_idle).sum() / waiting.sum()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, required=True, help="the process to look at")
    parser.add_argument("--seconds", type=float, default=4.0, help="how long to record")
    args = parser.parse_args()
    tids = {int(t) for t in os.listdir(f"/proc/{args.pid}/task")}
    with tempfile.TemporaryDirectory() as tmp:
        timehist = record(args.seconds, Path(tmp) / "sched.data")
    for name, value in overlap(timehist, tids, os.cpu_count() or 1).items():
        print(f"{name:52} {value:.3f}")


if __name__ == "__main__":
    main()
