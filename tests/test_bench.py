"""`gannet bench` on real services of its own, small enough to be a test.

Services of its own, because the bench empties the GCS emulator before each
measurement; one set for the module: each bench run makes its own queues and tasks.

The figures are not checked against any target (speed lives in the benchmark, not in
assertions); what is checked is that every measurement ran on every image and that the
report a user reads adds up.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from gannet.dev import bench, bench_flood
from gannet.dev.local_services import LocalServices, Ports


@pytest.fixture(scope="module")
def bench_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    with LocalServices(tmp_path_factory.mktemp("bench-services"), Ports.free()) as running:
        yield running


@pytest.mark.slow
def test_bench_runs_every_measurement_and_reports_consistent_ratios(
    bench_services, tmp_path, capsys
):
    args = argparse.Namespace(images=6, runners=2, rounds=3, state_dir=tmp_path)
    report = bench.run(bench_services, args)

    assert len(report["rounds"]) == 3
    assert report["device"] == "cpu"  # the bare model ran where the daemon did
    for r in report["rounds"]:
        a = r["bare_model"]["images_per_s"]
        b = r["daemon"]["images_per_s"]
        c = r["one_at_a_time"]["images_per_s"]
        assert min(a, b, c, r["bare_model"]["batched_images_per_s"]) > 0
        assert r["ratios"]["daemon_vs_bare_model"] == pytest.approx(b / a)
        assert r["ratios"]["daemon_vs_one_at_a_time"] == pytest.approx(b / c)
        best = max(
            a,
            r["bare_model"]["batched_images_per_s"],
            r["bare_model"].get("traced_images_per_s", a),
        )
        assert r["ratios"]["daemon_vs_best_bare_model"] == pytest.approx(b / best)
        cpu = r["daemon"]["cpu_ms_per_image"]
        # Where the CPU went: the daemon and every emulator must be accounted for.
        assert {"daemon", "pubsub", "gcs", "postgres", "bench"} <= cpu.keys()
        assert cpu["daemon"] > 0
    ratios = [r["ratios"]["daemon_vs_bare_model"] for r in report["rounds"]]
    # The middle round's, not the mean (which one slow round would drag).
    assert report["median_ratios"]["daemon_vs_bare_model"] == sorted(ratios)[1]

    bench.print_report(report)
    out = capsys.readouterr().out
    assert "median b/a" in out and "CPU per image during (b)" in out
    assert "b/a(best bare" in out


@pytest.mark.slow
def test_bench_flood_runs_every_measurement_and_reports_its_ratios(
    bench_services, tmp_path, capsys
):
    """`gannet bench --flood`, small: every run committed every task of A and B, and the
    ratios a user reads are the runs' own figures."""
    args = argparse.Namespace(
        bulk=24,
        interactive=3,
        spacing=0.05,
        lanes="interactive:4,bulk:1",
        runners=2,
        rounds=1,
        state_dir=tmp_path,
    )
    report = bench_flood.run(bench_services, args)

    runs = report["rounds"][0]["runs"]
    assert runs["b_alone"]["b_tasks"] == 3 and runs["b_alone"]["a_tasks"] == 0
    assert runs["a_alone"]["a_tasks"] == 24 and runs["a_alone"]["b_tasks"] == 0
    for name in ("one_subscription", "lanes"):
        assert (runs[name]["a_tasks"], runs[name]["b_tasks"]) == (24, 3), name
    assert runs["lanes"]["lanes"] == "interactive:4,bulk:1"
    assert runs["one_subscription"]["lanes"] == "(one subscription)"
    ratios = report["median_ratios"]
    alone = runs["b_alone"]["b_latency_s"]["p95"]
    assert ratios["lanes_b_p95_vs_alone"] == pytest.approx(
        runs["lanes"]["b_latency_s"]["p95"] / alone
    )
    assert ratios["lanes_a_throughput_vs_alone"] == pytest.approx(
        runs["lanes"]["a_images_per_s"] / runs["a_alone"]["a_images_per_s"]
    )
    bench_flood.print_report(report)
    assert "median B p95 with lanes / alone" in capsys.readouterr().out
