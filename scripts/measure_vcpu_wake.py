#!/usr/bin/env python3
"""How long one CPU takes to wake a thread on another, idle CPU: a byte sent back and
forth through two pipes between two processes, each pinned to its own CPU.

Why: the plumbing bench's single daemon process waits for a core while part of the
machine is idle (docs/benchmark.md). On a virtual machine an idle vCPU halts, and waking
it goes through the host; this shows how long that takes here, so that it can be weighed
against the daemon's context switches per image. Linux's guest halt polling
(/sys/module/haltpoll/parameters/guest_halt_poll_ns, root only) keeps an idle vCPU
polling for that long before it halts:

    python3 scripts/measure_vcpu_wake.py
"""

from __future__ import annotations

import os
import time

ROUNDS = 5000


def round_trip_us(first: int, second: int) -> float:
    """Mean µs for a byte to go from a process on CPU `first` to one on `second` and back."""
    from_parent, to_child = os.pipe()  # (read end, write end)
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo, on `second`
        os.sched_setaffinity(0, {second})
        for _ in range(ROUNDS):
            os.read(from_parent, 1)
            os.write(to_parent, b"x")
        os._exit(0)
    os.sched_setaffinity(0, {first})
    time.sleep(0.1)
    started = time.perf_counter()
    for _ in range(ROUNDS):
        os.write(to_child, b"x")
        os.read(from_child, 1)
    elapsed = time.perf_counter() - started
    os.waitpid(pid, 0)
    for fd in (to_child, from_parent, to_parent, from_child):
        os.close(fd)
    return elapsed / ROUNDS * 1e6


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs")
    poll = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"
    if os.path.exists(poll):
        with open(poll) as f:
            print(f"guest_halt_poll_ns: {f.read().strip()}")
    first, second = cpus[0], cpus[1]
    same, across = round_trip_us(first, first), round_trip_us(first, second)
    print(f"one CPU ({first}):          {same:6.1f} µs a round trip")
    print(f"two CPUs ({first} and {second}):  {across:6.1f} µs a round trip")


if __name__ == "__main__":
    main()
