"""A task's timings (its row's `timings`) and the stage metrics, as a user reads them."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from gannet.stages import Timer, by_stage


def test_a_stage_run_twice_adds_up_in_the_timings_and_each_run_is_observed():
    observed: list[tuple[str, float]] = []
    timer = Timer(lambda stage, s: observed.append((stage, s)))
    for _ in range(2):  # as tiles or crops run the same stage once each
        with timer.stage("tile"):
            time.sleep(0.01)
    with timer.stage("sink"):
        pass
    assert [stage for stage, _ in observed] == ["tile", "tile", "sink"]
    tile_s = sum(s for stage, s in observed if stage == "tile")
    assert timer.timings["tile_ms"] == round(tile_s * 1000, 2)
    assert timer.timings["tile_ms"] >= 20
    assert set(timer.timings) == {"tile_ms", "sink_ms"}


def test_by_stage_feeds_each_stages_own_series():
    registry = CollectorRegistry()
    seconds = Histogram("t_stage_seconds", "", ["stage"], registry=registry)
    cpu = Counter("t_stage_cpu_seconds", "", ["stage"], registry=registry)
    observe, charge = by_stage(seconds, "observe"), by_stage(cpu, "inc")
    for stage, s in [("decode", 0.5), ("decode", 0.25), ("gcs_read", 2.0)]:
        observe(stage, s)
        charge(stage, s)
    value = registry.get_sample_value
    assert value("t_stage_seconds_count", {"stage": "decode"}) == 2
    assert value("t_stage_seconds_sum", {"stage": "decode"}) == 0.75
    assert value("t_stage_seconds_count", {"stage": "gcs_read"}) == 1
    assert value("t_stage_cpu_seconds_total", {"stage": "gcs_read"}) == 2.0
