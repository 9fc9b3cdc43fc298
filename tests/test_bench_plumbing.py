"""`gannet bench --plumbing`: the replayed network, and the bench run small on services
of its own (it empties the GCS emulator before each image set).

No figure is checked against a target; what is checked is that replaying gives the
network's own answers without running it again, and that the report a user reads is
measured from the daemon (every stage's CPU counted, on each daemon it names).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from gannet.dev import bench_plumbing
from gannet.dev.local_services import LocalServices, Ports
from gannet.dev.replay import Replay
from gannet.settings import REPO_ROOT
from gannet.split_predictor import output_row


def test_gil_samples_are_counted_even_when_a_frame_name_was_read_half_written():
    """py-spy samples the running daemon without pausing it, and once read a frame name
    that held a line of the /metrics page: the sample's count is still on its last line,
    and the bench must neither crash on the stray lines nor count them."""
    raw = (
        "Thread.run (threading.py:982);RunnerPool._loop (gannet/pool.py:124) 3\n"
        "Thread.run (threading.py:982);Handler.do_GET\n"
        ' (gannet_stage_seconds_bucket{le="30.0",stage="gcs_write"} 6.0\n'
        "gannet_messages_total 12\n"
        ");PurePath._parse_args (pathlib.py:502) 1\n"
        "\n"
    )
    assert bench_plumbing.count_samples(raw) == 4


def test_gil_ticks_that_py_spy_could_not_read_count_as_held(tmp_path):
    """Without pausing the daemon, py-spy --gil fails now and then to read the stack of
    the thread holding the GIL and counts an error instead of a sample: those ticks
    count as held (paused, the same load gave as many held ticks as samples plus
    errors). A py-spy that prints no such summary is an error, not an undercount.
    py-spy's output is written here and its process stood in for: a real one prints
    errors only now and then, never on demand."""
    raw = tmp_path / "gil.txt"
    raw.write_text("Thread.run (threading.py:982);RunnerPool._loop (gannet/pool.py:124) 347\n")
    summary = bench_plumbing.summary_path(raw)
    summary.write_text(
        "\npy-spy> Stopped sampling because Control-C pressed\n"
        f"py-spy> Wrote raw flamegraph data to '{raw}'. Samples: 347 Errors: 96\n"
    )

    class Stopped:
        def send_signal(self, _sig: int) -> None: ...
        def wait(self, timeout: float) -> int:
            return 0

    assert bench_plumbing.stop_py_spy(Stopped(), raw) == 347 + 96  # type: ignore[arg-type]
    summary.write_text("Error: Failed to find python version from target process\n")
    with pytest.raises(RuntimeError, match="Samples: N Errors: M"):
        bench_plumbing.stop_py_spy(Stopped(), raw)  # type: ignore[arg-type]


def test_py_spy_samples_the_gil_in_the_real_time_class(tmp_path):
    """An ordinary py-spy waits for a core while the daemon's threads keep both busy,
    and gets one when a thread blocks, just after it let go of the GIL: the figure read
    about 15 % low. So py-spy runs SCHED_FIFO (this machine's tests run as root, which may
    start one), and counts the ticks of a process that holds the GIL throughout."""
    assert bench_plumbing.real_time_allowed()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    raw = tmp_path / "gil.txt"
    try:
        spy = bench_plumbing.start_py_spy(busy.pid, raw)
        assert os.sched_getscheduler(spy.pid) == os.SCHED_FIFO
        time.sleep(2.0)
        held = bench_plumbing.stop_py_spy(spy, raw)
    finally:
        busy.kill()
        busy.wait()
    # about 3 s of ticks, less py-spy's attach: held at every one of them
    assert held >= 1.5 * bench_plumbing.GIL_RATE


def test_replay_answers_a_known_input_without_the_network_and_batches_it_back():
    calls: list[int] = []

    def network(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        calls.append(len(x))
        return x.mean(dim=(2, 3)) * 3, [x[:, :1] + 1]

    replay = Replay(network)
    a, b = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    first = replay(torch.cat([a, b]))
    again = replay(torch.cat([b, a]))  # both known, in another order and batch
    assert calls == [2]
    expected = network(torch.cat([b, a]))
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1][0], expected[1][0])
    assert torch.equal(output_row(first, 0)[0], output_row(again, 1)[0])
    replay(torch.cat([a, torch.rand(1, 3, 64, 96)]))  # one new input: the network runs
    assert calls == [2, 2, 2] and replay.recorded == 4 and replay.replayed == 2


def test_daemons_sharing_an_answer_store_replay_what_another_recorded(tmp_path):
    calls: list[int] = []

    def network(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.mean(dim=(2, 3))

    x = torch.rand(2, 3, 64, 96)
    first, second = Replay(network, tmp_path), Replay(network, tmp_path)
    recorded = first(x)
    assert torch.equal(second(x.flip(0)), recorded.flip(0))  # from the store, rows swapped
    assert calls == [2] and second.replayed == 2


def test_a_wrong_image_set_or_baseline_is_refused_before_anything_starts():
    from gannet.errors import CommandError

    def args(**kw: object) -> argparse.Namespace:
        defaults = {
            "sizes": None,
            "baseline": None,
            "trace": True,
            "trace_only": False,
            "gil": True,
            "gil_only": False,
            "runners_sweep": None,
            "gcs_latency_ms": 0.0,
            "pubsub_latency_ms": 0.0,
            "pipeline": None,
        }
        return argparse.Namespace(**{**defaults, **kw})

    with pytest.raises(CommandError, match=r"choose from 640x480.*mix, phone"):
        bench_plumbing.check_args(args(sizes=["640x48"]))
    bench_plumbing.check_args(args(sizes=["phone"]))  # not in the default run, but known
    # 87be843 is this project's commit just before the plumbing mode existed.
    with pytest.raises(CommandError, match="plumbing-baseline"):
        bench_plumbing.check_args(args(baseline="87be843"))
    bench_plumbing.check_args(args(sizes=["mix"], baseline="HEAD"))
    bench_plumbing.check_args(args(baseline="plumbing-baseline"))
    with pytest.raises(CommandError, match="leave out --no-trace"):
        bench_plumbing.check_args(args(trace_only=True, trace=False))
    with pytest.raises(CommandError, match="pick one"):
        bench_plumbing.check_args(args(runners_sweep=[(4, None)], trace_only=True))
    bench_plumbing.check_args(args(gil_only=True, baseline="HEAD"))
    for clash in ({"gil": False}, {"trace_only": True}, {"runners_sweep": [(4, None)]}):
        with pytest.raises(CommandError, match="--gil-only runs the 2-core and py-spy runs"):
            bench_plumbing.check_args(args(gil_only=True, **clash))
    agro = REPO_ROOT / "configs" / "agro.yaml"
    bench_plumbing.check_args(args(pipeline=f"{agro}:FIELD_ANALYSIS"))
    with pytest.raises(CommandError, match="known: DETECTION, FIELD_ANALYSIS, FULL_PIPELINE"):
        bench_plumbing.check_args(args(pipeline=f"{agro}:SHELF_AUDIT"))
    with pytest.raises(CommandError, match="give a config file"):
        bench_plumbing.check_args(args(pipeline="configs/nothing.yaml:FULL_PIPELINE"))
    with pytest.raises(CommandError, match="at least 0"):
        bench_plumbing.check_args(args(gcs_latency_ms=-1.0))
    with pytest.raises(CommandError, match="at least 0"):
        bench_plumbing.check_args(args(pubsub_latency_ms=-1.0))


def test_each_daemon_runs_what_the_options_ask_for_in_a_round():
    def labels(runs: list[bench_plumbing.Run]) -> list[str]:
        return [run[0] for run in runs]

    def plan(traced: bool = True, **kw: object) -> tuple[list[str], list[str]]:
        options = {"gil": True, "gil_only": False, "trace_only": False, **kw}
        theirs, ours = bench_plumbing.plan_runs(argparse.Namespace(**options), traced=traced)
        return labels(theirs), labels(ours)

    gil, traced = bench_plumbing.GIL_RUN, bench_plumbing.TRACED_RUN
    split, per_core = "2 cores, stage CPU", bench_plumbing.PER_CORE_RUN
    # By default: the baseline's clean, one-core, stage and GIL runs; this tree's also
    # traced and one process per core.
    assert plan() == (
        ["2 cores", "1 core", split, gil],
        ["2 cores", traced, "1 core", split, gil, per_core],
    )
    assert plan(traced=False, gil=False) == (
        ["2 cores", "1 core", split],
        ["2 cores", "1 core", split, per_core],
    )
    assert plan(trace_only=True)[1] == ["2 cores", traced]
    # --gil-only: the same two runs for both daemons, nothing else.
    assert plan(gil_only=True) == (["2 cores", gil], ["2 cores", gil])
    # The daemons take turns going first, so that an effect of the order falls on both.
    baseline = bench_plumbing.Daemon("baseline HEAD", Path("a"))
    ours = bench_plumbing.Daemon(bench_plumbing.THIS_TREE, Path("b"))
    firsts = [bench_plumbing.in_turn([baseline, ours], n)[0] for n in range(1, 5)]
    assert firsts == [baseline, ours, baseline, ours]


def test_the_report_puts_each_round_of_the_two_daemons_side_by_side(capsys):
    def summary(speeds: list[float], gils: list[float]) -> dict[str, object]:
        rounds = [
            {"2 cores": {"images_per_s": v}, bench_plumbing.GIL_RUN: {"gil_ms_per_image": g}}
            for v, g in zip(speeds, gils, strict=True)
        ]
        return {"rounds": rounds}

    report = {
        "rounds": 3,
        "sizes": {
            "4032x3024": {
                "baseline HEAD": summary([50.0, 60.0, 40.0], [2.0, 2.5, 3.0]),
                "this tree": summary([55.0, 54.0, 44.0], [1.8, 2.6, 2.4]),
            }
        },
    }
    bench_plumbing.print_rounds(report)
    out = capsys.readouterr().out
    assert "4032x3024, baseline HEAD: images/s 50.0, 60.0, 40.0; GIL ms/img 2.00, 2.50, 3.00" in out
    assert (
        "4032x3024, this tree over the baseline: images/s 1.10, 0.90, 1.10; "
        "GIL 0.90, 1.04, 0.80 (median 0.90, lower in 2 of 3)"
    ) in out


def test_the_plumbing_baseline_is_built_from_its_commit_and_patch(tmp_path):
    """plumbing-baseline is a name, not a tag (a clone does not always carry tags): the
    daemon of 88ae9f0 with its stage CPU clock switched off unless asked for."""
    src = bench_plumbing.baseline_src(bench_plumbing.BASELINE, tmp_path)
    assert (src / "gannet" / "dev" / "replay.py").is_file()
    assert "stage CPU off: no clock syscall" in (src / "gannet" / "stages.py").read_text()
    assert 'GANNET_STAGE_CPU") != "1"' in (src / "gannet" / "dispatch.py").read_text()


def test_a_baseline_named_by_a_moving_ref_is_that_ref_s_commit_now(tmp_path):
    """--baseline HEAD measured yesterday's HEAD for as long as a tree extracted under
    the name stayed in the state dir: the trees are kept under the commit's hash."""
    stale = tmp_path / "baseline-HEAD" / "src" / "gannet"
    stale.mkdir(parents=True)
    (stale / "daemon.py").write_text("# an older HEAD\n")
    src = bench_plumbing.baseline_src("HEAD", tmp_path)
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "show", "HEAD:src/gannet/daemon.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert (src / "gannet" / "daemon.py").read_text() == head


def bench_args(tmp_path: Path, **kw: object) -> argparse.Namespace:
    """What `gannet bench --plumbing` parses, small: one round of a few 640x480 tasks,
    against the daemon of HEAD as the baseline."""
    defaults = {
        "images": 8,
        "runners": 2,
        "rounds": 1,
        "sizes": ["640x480"],
        "baseline": "HEAD",
        "gil": False,
        "trace": False,
        "trace_only": False,
        "gil_only": False,
        "runners_sweep": None,
        "gcs_latency_ms": 0.0,
        "pubsub_latency_ms": 0.0,
        "pubsub_flow_control": False,
        "gcs_tls": False,
        "pipeline": None,
        "state_dir": tmp_path,
    }
    return argparse.Namespace(**{**defaults, **kw})


@pytest.mark.slow
def test_plumbing_bench_measures_the_daemon_by_stage_on_one_and_two_cores(tmp_path, capsys):
    """This tree's daemon alone: a baseline's tree beside it is the sweep test's (below),
    and which runs a baseline gets, test_each_daemon_runs_what_the_options_ask_for_in_a_round."""
    # 64 tasks, not 8: at about 1.6 ms of GIL per image, 8 tasks give py-spy (100 Hz)
    # one or two held ticks to find, and a run with none read 0 GIL (seen once).
    args = bench_args(tmp_path, gil=True, trace=True, images=64, baseline=None)
    with LocalServices(tmp_path / "services", Ports.free()) as services:
        report = bench_plumbing.run(services, args)

    by_daemon = report["sizes"]["640x480"]
    assert list(by_daemon) == ["this tree"]
    summary = by_daemon["this tree"]
    assert summary["images_per_s"] > 0 and summary["images_per_s_1_core"] > 0
    stages = summary["stages_cpu_ms_per_image"]
    # Every stage of a message's path ran on every image and was charged its CPU.
    for stage in ("receive", "lookup", "fetch", "decode", "preprocess", "postprocess"):
        assert stages[stage] > 0, stage
    for stage in ("result_json", "gcs_write", "sink", "settle", "forward"):
        assert stages[stage] > 0, stage
    # No stage is charged twice: together they stay within the process's own CPU
    # (the rest is the other threads': the Pub/Sub client's, the acks').
    assert sum(stages.values()) <= summary["split_run_cpu_ms_per_image"]
    assert summary["other_threads_cpu_ms_per_image"] >= 0
    # One thread at a time holds the GIL: never more than the run's wall time per
    # image (plus the second py-spy records before the tasks go out, spread over them).
    gil_run = summary["rounds"][0][bench_plumbing.GIL_RUN]
    wall_ms = 1000 / gil_run["images_per_s"] + 1000 / args.images
    assert 0 < summary["gil_ms_per_image"] <= wall_ms, (summary["gil_ms_per_image"], wall_ms)
    assert summary["mean_batch_size"] >= 1
    # The emulators, PostgreSQL and the bench worked for these tasks on the same cores.
    assert summary["services_cpu_ms_per_image"] > 0
    by_name = summary["services_cpu_ms_per_image_by_name"]
    assert {"pubsub", "gcs", "postgres", "bench"} <= set(by_name)
    assert all(by_name[name] > 0 for name in ("pubsub", "gcs", "postgres")), by_name
    # Each image passed between threads (callback, runner, batcher): they waited.
    assert summary["switches_per_image"] >= 2
    # Pinned to one core, the threads that wake each other per image (callback,
    # runner, batcher) waited for it; nothing idles more cores than the machine has.
    assert summary["rounds"][0]["1 core"]["cpu_wait_ms_per_image"] > 0
    assert 0 <= summary["idle_cores"] <= (os.cpu_count() or 1)
    # GANNET_PROCESSES=2, a core each.
    per_core = summary["per_core"]
    assert per_core["images_per_s"] > 0 and per_core["cpu_ms_per_image"] > 0
    # The traced run traced every task (one task span each) and is reported beside the
    # untraced one.
    traced = summary["traced"]
    assert traced["tasks_traced"] == 1.0
    assert traced["over_untraced"] > 0 and traced["cpu_ms_per_image"] > 0

    bench_plumbing.print_report(report)
    out = capsys.readouterr().out
    assert "daemon CPU ms per image by stage" in out and "GCS read" in out
    assert "2 processes, a core each" in out and "busiest's tasks" in out
    assert "traced/off" in out
    assert "CPU cap img/s" in out and "switches/img" in out
    assert "by process" in out and "postgres" in out


@pytest.mark.slow
def test_a_runners_sweep_measures_each_count_against_a_slower_bucket(tmp_path, capsys):
    """`--gcs-latency-ms` makes every GCS request at least that much slower, as a real
    bucket's round trip is, and `--pubsub-latency-ms` every round trip through the
    Pub/Sub relay, behind which `--pubsub-flow-control` keeps each stream within its
    lease, as Pub/Sub does; `--runners-sweep` runs each daemon once per runner count.
    The tasks run a shipped pipeline (`--pipeline`), segmentation included."""
    args = bench_args(
        tmp_path,
        images=6,
        runners_sweep=[(1, None), (2, 6)],
        gcs_latency_ms=150.0,
        pubsub_latency_ms=40.0,
        pubsub_flow_control=True,
        pipeline=f"{REPO_ROOT / 'configs' / 'agro.yaml'}:FULL_PIPELINE",
    )
    services = LocalServices(
        tmp_path / "services",
        Ports.free(),
        gcs_latency_ms=150.0,
        pubsub_latency_ms=40.0,
        pubsub_flow_control=True,
    )
    with services:
        assert "pubsub-gate" in services.pids()  # its CPU is counted with the services
        relay_log = (tmp_path / "services" / "pubsub-relay.log").read_text()
        assert "40 ms added to each round trip" in relay_log
        url = f"{services.gcs_endpoint}/storage/v1/b?project={services.project}"
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
        assert time.monotonic() - started >= 0.15
        report = bench_plumbing.run(services, args)

    assert report["pipeline"].endswith("agro.yaml:FULL_PIPELINE")  # a failed task raises
    by_daemon = report["sizes"]["640x480"]
    assert list(by_daemon) == ["baseline HEAD", "this tree"]
    for summary in by_daemon.values():
        assert list(summary["sweep"]) == ["1:2", "2:6"]
        for by_count in summary["sweep"].values():
            assert by_count["images_per_s"] > 0 and by_count["cpu_ms_per_image"] > 0
            # A task reads its image and writes its result: two requests of 150 ms.
            assert by_count["task_wall_ms"]["total"] >= 300
            assert by_count["task_wall_ms"]["fetch"] >= 150
            assert len(by_count["rounds"]) == 1
    bench_plumbing.print_report(report)
    out = capsys.readouterr().out
    assert "runners" in out and "leased" in out and "every GCS request 150 ms slower" in out
    assert "every round trip to Pub/Sub 40 ms slower" in out
    assert "each stream sent at most its lease's unacked messages" in out
    assert "write+commit" in out
