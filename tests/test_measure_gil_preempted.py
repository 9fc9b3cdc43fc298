"""scripts/measure_gil_preempted.py's reading of a recording: the GIL-held time of one
process split into running, waiting for a core and asleep, and who took the core.

Fed perf's own text format (`perf script -F pid,tid,time,event,trace`) written out by
hand: recording it needs root, perf and uprobes, which CI need not have."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "measure_gil_preempted.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("measure_gil_preempted", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(SCRIPT.parent))  # as when run: it imports a sibling by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def _switch(at: float, prev: int, state: str, next_comm: str, nxt: int) -> str:
    return (
        f"   1/{prev}  {at:.6f}:   sched:sched_switch: prev_comm=x prev_pid={prev} "
        f"prev_prio=120 prev_state={state} ==> next_comm={next_comm} next_pid={nxt} "
        "next_prio=120"
    )


def test_a_holder_taken_off_its_core_counts_as_preempted_by_who_took_it(
    script: ModuleType,
) -> None:
    """Thread 11 of process 10 holds the GIL for 10 ms: 3 of them off its core while
    java ran there (runnable), 2 asleep in a page fault; thread 12 then holds it 1 ms.
    A switch of a thread that does not hold the GIL changes nothing."""
    script._PIDS.update({11: 10, 12: 10, 99: 99})
    lines = [
        "10/11  1.000000: probe_libpython3:take_gil__return: (1 <- 2)",
        _switch(1.001, 11, "R", "java", 99),
        _switch(1.004, 99, "S", "python", 11),
        _switch(1.005, 11, "D", "swapper/0", 0),
        _switch(1.007, 0, "R", "python", 11),
        _switch(1.008, 12, "S", "python", 99),  # 12 holds nothing
        "10/11  1.010000: probe_libpython3:drop_gil: (3)",
        "10/12  1.010000: probe_libpython3:take_gil__return: (1 <- 2)",
        "10/12  1.011000: probe_libpython3:drop_gil: (3)",
        "99/99  1.012000: probe_libpython3:take_gil__return: (1 <- 2)",  # another process
    ]
    found = script.split("\n".join(lines), pid=10)
    assert found.held == pytest.approx(0.011)
    assert found.preempted == pytest.approx(0.003)
    assert found.asleep == pytest.approx(0.002)
    assert found.running == pytest.approx(0.006)
    assert found.by_whom == {"java": pytest.approx(0.003)}
    assert found.overlap == 0


def test_two_holders_at_once_are_reported_as_missed_events(script: ModuleType) -> None:
    lines = [
        "10/11  1.000000: probe_libpython3:take_gil__return: (1 <- 2)",
        "10/12  1.002000: probe_libpython3:take_gil__return: (1 <- 2)",  # 11's drop missed
        "10/12  1.003000: probe_libpython3:drop_gil: (3)",
    ]
    found = script.split("\n".join(lines), pid=10)
    assert found.overlap == pytest.approx(0.001)
