"""The HPA simulator: the controller arithmetic against known cases, and the model's shape.

The arithmetic cases follow kube-controller-manager's replica calculator and the worked
examples of the HPA documentation (tolerance, stabilization, Pods/Percent policies).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest

from gannet.cluster import scaling
from gannet.cluster.scaling import (
    PRESETS,
    ClusterModel,
    HpaConfig,
    HpaController,
    ScalingPolicy,
    parse_profile,
    replicas_for_external,
    replicas_for_pods,
    scale_down_limit,
    scale_up_limit,
    simulate,
)

UP = (ScalingPolicy("Pods", 4, 60), ScalingPolicy("Percent", 100, 60))


# ---- replica calculator ---------------------------------------------------------------


def test_external_average_value_is_ceil_of_backlog_over_target() -> None:
    assert replicas_for_external(37, 2, current=3, tolerance=0.1) == 19
    assert replicas_for_external(0, 2, current=5, tolerance=0.1) == 0  # min applied later


def test_external_within_tolerance_keeps_current() -> None:
    # ratio 8.5 / (2 * 4) = 1.0625: within 10 %, no change even though ceil(8.5/2) = 5.
    assert replicas_for_external(8.5, 2, current=4, tolerance=0.1) == 4
    assert replicas_for_external(8.9, 2, current=4, tolerance=0.1) == 5


def test_pods_metric_treats_missing_pods_conservatively() -> None:
    # 2 ready pods at 8 outstanding (target 6): ratio 1.33 -> ceil(1.33 * 2) = 3.
    assert replicas_for_pods([8, 8], missing=0, target=6, current=2, tolerance=0.1) == 3
    # With 2 more pods still starting (no samples), they count as 0 on a scale-up:
    # 16 / (6 * 4) = 0.67 < 1, the direction flips, so the controller holds at 4.
    assert replicas_for_pods([8, 8], missing=2, target=6, current=4, tolerance=0.1) == 4
    # Nobody ready: the metric gives no recommendation.
    assert replicas_for_pods([], missing=3, target=6, current=3, tolerance=0.1) is None


def test_scale_up_limit_takes_the_larger_policy_and_counts_recent_events() -> None:
    assert scale_up_limit(2, [], [], UP, "Max", now=0) == 6  # max(2+4, 2*2)
    assert scale_up_limit(10, [], [], UP, "Max", now=0) == 20  # max(14, 20)
    assert scale_up_limit(10, [], [], UP, "Min", now=0) == 14
    # 6 pods were added 30 s ago: the period started at 4 replicas -> max(8, 8).
    assert scale_up_limit(10, [(70.0, 6)], [], UP, "Max", now=100) == 8
    # ... but not once that event is older than periodSeconds.
    assert scale_up_limit(10, [(30.0, 6)], [], UP, "Max", now=100) == 20
    assert scale_up_limit(10, [], [], UP, "Disabled", now=0) == 10


def test_scale_down_limit_percent_rounds_down() -> None:
    down = (ScalingPolicy("Percent", 50, 60),)
    assert scale_down_limit(10, [], [], down, "Max", now=0) == 5
    assert scale_down_limit(5, [], [], down, "Max", now=0) == 2
    both = (*down, ScalingPolicy("Pods", 1, 60))
    assert scale_down_limit(10, [], [], both, "Max", now=0) == 5  # biggest change
    assert scale_down_limit(10, [], [], both, "Min", now=0) == 9  # smallest change


def test_scale_down_waits_for_the_stabilization_window() -> None:
    hpa = HpaController(HpaConfig(scale_down_window_s=300, max_replicas=20))
    assert hpa.normalize(0, current=10, proposal=10) == 10
    # The load dropped: the raw proposal is 2 but 10 was recommended within 300 s.
    assert hpa.normalize(100, current=10, proposal=2) == 10
    assert hpa.normalize(299, current=10, proposal=2) == 10
    # Once the window only holds low recommendations, at most 50 % go per minute.
    assert hpa.normalize(301, current=10, proposal=2) == 5


def test_scale_up_window_uses_the_lowest_recent_recommendation() -> None:
    hpa = HpaController(HpaConfig(scale_up_window_s=60, max_replicas=50))
    hpa.normalize(0, current=2, proposal=2)
    # A one-sample spike to 30 is ignored: 2 was recommended inside the window.
    assert hpa.normalize(15, current=2, proposal=30) == 2
    assert hpa.normalize(30, current=2, proposal=30) == 2
    # 61 s after the low sample the spike persisted: scale up, limited by the policies.
    assert hpa.normalize(61, current=2, proposal=30) == 6


def test_normalize_respects_min_and_max() -> None:
    hpa = HpaController(HpaConfig(min_replicas=2, max_replicas=5, scale_down_window_s=0))
    assert hpa.normalize(0, current=4, proposal=100) == 5
    assert hpa.normalize(1000, current=5, proposal=0) == 2
    # Under KEDA (min 0) the HPA itself never goes below 1.
    keda = HpaController(HpaConfig(min_replicas=0, scale_down_window_s=0))
    assert keda.normalize(0, current=1, proposal=0) == 1


# ---- the model --------------------------------------------------------------------------


def test_burst_drains_and_reports_consistent_figures() -> None:
    result = simulate(PRESETS["burst"])
    assert result.drain_time_s is not None
    assert 300 < result.drain_time_s < 3600
    assert result.peak_backlog == pytest.approx(5000, rel=0.01)
    assert result.processed == pytest.approx(5000 + 0.5 * 3600, rel=0.01)
    assert result.gpu_hours > result.ideal_gpu_hours > 0
    assert result.max_replicas_reached == HpaConfig().max_replicas
    # Nothing is lost: what arrived was processed or is still queued at the end.
    assert result.processed + result.backlog[-1] == pytest.approx(5000 + 0.5 * 3600, abs=1)
    # The first extra pod needs a new T4 node and then its own start-up before it serves.
    cl = ClusterModel()
    assert result.first_scale_up_s is not None
    ready_at = int(result.first_scale_up_s + cl.node_provision_s + cl.pod_startup_s)
    assert max(result.ready[:ready_at]) == 1 < result.ready[ready_at]


def test_more_replicas_drain_faster_and_cost_more() -> None:
    small = simulate(PRESETS["burst"], HpaConfig(max_replicas=4))
    large = simulate(PRESETS["burst"], HpaConfig(max_replicas=12))
    assert large.drain_time_s is not None and small.drain_time_s is not None
    assert large.drain_time_s < small.drain_time_s
    assert large.gpu_hours > small.gpu_hours


def test_without_a_warm_node_the_minimum_replicas_wait_for_one_then_scale() -> None:
    """`--warm-nodes 0`: no GPU node is up at t=0, but the Deployment still has its
    minimum replicas; the first waits for a node and its start-up, then the HPA scales
    as usual. (The model once started no pod at all without a warm node: an HPA with no
    pods never syncs, and the burst read as never drained.)"""
    cl = ClusterModel(warm_nodes=0)
    result = simulate(PRESETS["burst"], cluster=cl)
    first_ready = int(cl.node_provision_s + cl.pod_startup_s)
    assert max(result.ready[:first_ready]) == 0 < result.ready[first_ready]
    assert result.drain_time_s is not None
    assert result.max_replicas_reached == HpaConfig().max_replicas


def test_slow_node_provisioning_delays_the_drain() -> None:
    fast = simulate(PRESETS["burst"], cluster=ClusterModel(node_provision_s=60))
    slow = simulate(PRESETS["burst"], cluster=ClusterModel(node_provision_s=600))
    assert fast.drain_time_s is not None and slow.drain_time_s is not None
    assert slow.drain_time_s > fast.drain_time_s + 300


def test_metric_lag_delays_the_first_scale_up_without_the_pods_metric() -> None:
    hpa = HpaConfig(pods_metric_target=None)
    early = simulate(PRESETS["burst"], hpa, ClusterModel(metric_lag_s=60))
    late = simulate(PRESETS["burst"], hpa, ClusterModel(metric_lag_s=240))
    assert early.first_scale_up_s is not None and late.first_scale_up_s is not None
    assert late.first_scale_up_s - early.first_scale_up_s >= 150
    # The per-pod metric (scraped, ~45 s) reacts before the Pub/Sub metric arrives.
    with_pods = simulate(PRESETS["burst"], HpaConfig(), ClusterModel(metric_lag_s=240))
    assert with_pods.first_scale_up_s is not None
    assert with_pods.first_scale_up_s < late.first_scale_up_s


def test_scale_to_zero_saves_gpu_hours_on_a_quiet_night() -> None:
    keda = simulate(PRESETS["quiet"], HpaConfig(min_replicas=0))
    hpa = simulate(PRESETS["quiet"], HpaConfig(min_replicas=1))
    assert keda.gpu_hours < hpa.gpu_hours - 1.0
    assert keda.replicas[-1] == 0 and keda.nodes[-1] == 0
    assert hpa.replicas[-1] == 1


def test_target_above_runners_oscillates() -> None:
    """The backlog metric counts messages in service: a target per pod above
    GANNET_RUNNERS asks for more than 100 % utilization, so the HPA flaps."""
    stable = simulate(PRESETS["steady"], HpaConfig(target_per_pod=2, max_replicas=20))
    flappy = simulate(PRESETS["steady"], HpaConfig(target_per_pod=8, max_replicas=20))

    def changes(r: scaling.SimResult) -> int:
        return sum(1 for a, b in zip(r.replicas, r.replicas[1:], strict=False) if a != b)

    assert changes(flappy) > 2 * changes(stable)


def test_bulk_target_above_the_bulk_cap_oscillates() -> None:
    """A pod runs at most bulk_cap bulk tasks: a bulk target above it asks for more of the
    lane in service than pods hold, so under sustained bulk traffic the HPA flaps."""
    light, bulk = parse_profile("3600:1"), parse_profile("3600:6")
    at_cap = simulate(light, HpaConfig(bulk_target_per_pod=3), bulk=bulk)
    above = simulate(light, HpaConfig(bulk_target_per_pod=8), bulk=bulk)

    def changes(r: scaling.SimResult) -> int:
        return sum(1 for a, b in zip(r.replicas, r.replicas[1:], strict=False) if a != b)

    assert changes(above) > 2 * changes(at_cap)
    assert above.gpu_hours > at_cap.gpu_hours * 1.3
    assert HpaConfig().bulk_target_per_pod <= (ClusterModel().bulk_cap or 0)


def test_parse_profile() -> None:
    assert parse_profile("burst") is PRESETS["burst"]
    custom = parse_profile("60:1,120:2.5", initial_backlog=10)
    assert custom.segments == ((60.0, 1.0), (120.0, 2.5))
    assert custom.rate_at(59) == 1.0 and custom.rate_at(60) == 2.5 and custom.rate_at(500) == 0
    assert custom.initial_backlog == 10
    with pytest.raises(ValueError, match="DURATION_S:RATE"):
        parse_profile("fast")


def test_invalid_config_is_rejected_with_a_reason() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        simulate(PRESETS["burst"], HpaConfig(min_replicas=5, max_replicas=2))
    with pytest.raises(ValueError, match="target_per_pod"):
        simulate(PRESETS["burst"], HpaConfig(target_per_pod=0))


# ---- CLI ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gannet")
    scaling.add_commands(p.add_subparsers(dest="command"))
    return p


def test_cli_prints_figures_and_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "sim.png"
    args = parser().parse_args(
        ["scaling", "simulate", "--profile", "600:4", "--duration", "1800", "--png", str(png)]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "drain time" in out and "GPU-hours" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_lanes_keep_interactive_work_moving_while_a_backfill_drains() -> None:
    """A 20,000-message backfill beside light interactive traffic: with lanes the
    interactive lane waits seconds; on one subscription it waits behind the backfill.
    The bulk lane's own metric scales the pool, and the backfill drains as fast."""
    light = parse_profile("3600:1")
    free = ClusterModel(bulk_cap=None)  # without a cap, lanes are work-conserving
    lanes = simulate(light, cluster=free, bulk=PRESETS["backfill"])
    one = simulate(light, cluster=free, bulk=PRESETS["backfill"], one_queue=True)
    alone = simulate(light)
    assert lanes.worst_wait_s < 30 < 600 < one.worst_wait_s
    assert lanes.max_replicas_reached == HpaConfig().max_replicas > alone.max_replicas_reached
    assert lanes.bulk_drain_time_s is not None and one.drain_time_s is not None
    assert lanes.bulk_drain_time_s <= one.drain_time_s * 1.05
    assert lanes.processed == pytest.approx(one.processed, rel=0.01)
    assert lanes.processed == pytest.approx(20000 + 3600, rel=0.01)


def test_a_bulk_cap_leaves_runners_idle_when_only_bulk_has_work() -> None:
    light = parse_profile("3600:1")
    free = simulate(light, cluster=ClusterModel(bulk_cap=None), bulk=PRESETS["backfill"])
    capped = simulate(light, cluster=ClusterModel(bulk_cap=2), bulk=PRESETS["backfill"])
    assert capped.bulk_drain_time_s is not None and free.bulk_drain_time_s is not None
    assert capped.bulk_drain_time_s > free.bulk_drain_time_s * 1.3


def test_cli_bulk_profile_prints_lanes_beside_one_subscription(
    capsys: pytest.CaptureFixture,
) -> None:
    args = parser().parse_args(
        ["scaling", "simulate", "--profile", "3600:1", "--bulk-profile", "backfill", "--no-png"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "== two lanes ==" in out and "== the same work on one subscription ==" in out
    assert "interactive worst wait:" in out and "bulk lane   drain time" in out


def test_cli_sweep_prints_a_row_per_value(capsys: pytest.CaptureFixture) -> None:
    args = parser().parse_args(
        ["scaling", "simulate", "--sweep", "max_replicas=2,6", "--no-png", "--json"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith(("2 |", "6 |"))]
    assert len(rows) == 2
    assert '"max_replicas": 6,' in out  # an int field is swept as ints


def test_cli_bad_input_exits_2_with_a_hint(capsys: pytest.CaptureFixture) -> None:
    args = parser().parse_args(["scaling", "simulate", "--sweep", "nope=1", "--no-png"])
    assert args.func(args) == 2
    assert "target_per_pod" in capsys.readouterr().err


def test_help_explains_every_option() -> None:
    sub = parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    simulate_parser = sub.choices["scaling"]._subparsers._group_actions[0].choices["simulate"]
    for action in simulate_parser._actions:
        assert action.help, f"option {action.option_strings} has no help"
    text = simulate_parser.format_help()
    assert "--target-per-pod" in text and "--node-provision" in text


def test_defaults_match_the_hpa_in_k8s() -> None:
    """The simulator's defaults are the numbers shipped in k8s/overlays/prod."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    hpa = yaml.safe_load((root / "k8s" / "base" / "hpa.yaml").read_text())
    prod = yaml.safe_load((root / "k8s" / "overlays" / "prod" / "hpa-patch.yaml").read_text())
    d = HpaConfig()
    spec = hpa["spec"]
    ext = next(m for m in spec["metrics"] if m["type"] == "External")["external"]
    pods = next(m for m in spec["metrics"] if m["type"] == "Pods")["pods"]
    assert float(ext["target"]["averageValue"]) == d.target_per_pod
    assert float(pods["target"]["averageValue"]) == d.pods_metric_target
    up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] == d.scale_up_window_s
    assert down["stabilizationWindowSeconds"] == d.scale_down_window_s
    assert {(p["type"], p["value"], p["periodSeconds"]) for p in up["policies"]} == {
        (p.kind, p.value, p.period_s) for p in d.scale_up_policies
    }
    assert {(p["type"], p["value"], p["periodSeconds"]) for p in down["policies"]} == {
        (p.kind, p.value, p.period_s) for p in d.scale_down_policies
    }
    assert prod["spec"]["maxReplicas"] == d.max_replicas
    assert prod["spec"]["minReplicas"] == d.min_replicas
    base = (root / "k8s" / "base" / "kustomization.yaml").read_text()
    config = dict(
        line.strip().removeprefix("- ").split("=", 1)
        for line in base.splitlines()
        if line.strip().startswith("- GANNET_")
    )
    c = ClusterModel()
    assert c.max_messages == int(config["GANNET_MAX_MESSAGES"])
    assert c.runners == int(config["GANNET_RUNNERS"])
    # The KEDA overlay: polling, cooldown, the most replicas and its triggers' targets.
    keda = yaml.safe_load((root / "k8s" / "overlays" / "keda" / "scaledobject.yaml").read_text())[
        "spec"
    ]
    assert keda["pollingInterval"] == d.keda_polling_s
    assert keda["cooldownPeriod"] == d.keda_cooldown_s
    assert keda["maxReplicaCount"] == d.max_replicas
    sizes = {
        t["metadata"]["subscriptionName"]: float(t["metadata"]["value"])
        for t in keda["triggers"]
        if t["metadata"]["mode"] == "SubscriptionSize"
    }
    assert sizes == {
        "gannet-tasks-sub": d.target_per_pod,
        "gannet-tasks-sub-bulk": d.bulk_target_per_pod,
    }
    # Prod's lanes: the bulk lane's metric target and GANNET_LANES' weights and cap.
    bulk = next(
        m["external"]
        for m in prod["spec"]["metrics"]
        if m["type"] == "External"
        and m["external"]["metric"]["selector"]["matchLabels"][
            "resource.labels.subscription_id"
        ].endswith("-bulk")
    )
    assert float(bulk["target"]["averageValue"]) == d.bulk_target_per_pod
    kustomization = (root / "k8s" / "overlays" / "prod" / "kustomization.yaml").read_text()
    lanes = next(
        line.split("=", 1)[1] for line in kustomization.splitlines() if "GANNET_LANES=" in line
    )
    assert scaling.lanes_from_spec(c, lanes) == c


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--bulk-target-per-pod", "0"),
        ("--bulk-target-per-pod", "-1"),
        ("--target-per-pod", "nan"),
        ("--pods-metric-lag", "-30"),
        ("--initial-backlog", "inf"),
        ("--initial-backlog", "-5"),
        ("--profile", "600:inf"),
        ("--bulk-profile", "600:-1"),
        ("--metric-lag", "-60"),
        ("--duration", "0"),
        ("--max-messages", "0"),
        ("--tolerance", "-1"),
        ("--pod-startup", "-100"),
        ("--max-replicas", "0"),
        ("--lanes", "interactive"),
    ],
)
def test_cli_rejects_an_invalid_flag_naming_it(
    flag: str, value: str, capsys: pytest.CaptureFixture
) -> None:
    """argparse-style: exit 2 and the flag's name, before anything is simulated."""
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["scaling", "simulate", "--no-png", f"{flag}={value}"])
    assert exc.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_simulate_rejects_invalid_fields_naming_them() -> None:
    for hpa, cluster, name in [
        (HpaConfig(bulk_target_per_pod=0), ClusterModel(), "bulk_target_per_pod"),
        (HpaConfig(), ClusterModel(pods_metric_lag_s=-30), "pods_metric_lag_s"),
        (HpaConfig(), ClusterModel(metric_sample_s=0), "metric_sample_s"),
        (HpaConfig(), ClusterModel(warm_nodes=-1), "warm_nodes"),
    ]:
        with pytest.raises(ValueError, match=name):
            simulate(PRESETS["burst"], hpa, cluster, duration_s=60)
    with pytest.raises(ValueError, match="duration"):
        simulate(PRESETS["burst"], duration_s=0)
    with pytest.raises(ValueError, match="initial"):
        simulate(dataclasses.replace(PRESETS["burst"], initial_backlog=math.inf))


def run_cli(argv: list[str]) -> int:
    args = parser().parse_args(["scaling", "simulate", "--no-png", "--duration", "900", *argv])
    code: int = args.func(args)
    return code


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--sweep", "metric_sample_s=0,60"], "metric_sample_s=0: must be a finite number >= 1"),
        (["--sweep", "max_replicas=2.5"], "max_replicas=2.5: must be a whole number"),
        (["--sweep", "scale_up_select=Most"], "must be one of Max, Min, Disabled"),
        (["--sweep", "bulk_cap=1,2"], "bulk_cap: no effect without --bulk-profile"),
        (["--sweep", "bulk_target_per_pod=3"], "no effect without --bulk-profile"),
        (["--sweep", "interactive_weight=2"], "no effect without --bulk-profile"),
        (["--sweep", "keda_cooldown_s=60"], "no effect unless --min-replicas 0"),
        (["--sweep", "max_replicas="], "NAME=V1,V2"),
    ],
)
def test_cli_sweep_refuses_values_and_parameters_it_cannot_simulate(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture
) -> None:
    assert run_cli(argv) == 2
    assert reason in capsys.readouterr().err


def test_cli_sweep_parses_each_parameter_by_its_type(capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["--sweep", "warm_nodes=0,2", "--json"]) == 0
    assert '"warm_nodes": 2,' in capsys.readouterr().out
    assert run_cli(["--sweep", "scale_up_select=Max,Disabled", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"scale_up_select": "Disabled"' in out
    assert any(line.strip().startswith("Disabled |") for line in out.splitlines())
    assert run_cli(["--min-replicas", "0", "--sweep", "keda_cooldown_s=60,300"]) == 0
    assert run_cli(["--warm-nodes", "3"]) == 0


def test_cli_sweeps_a_bulk_setting_with_a_bulk_profile(capsys: pytest.CaptureFixture) -> None:
    argv = ["--profile", "900:1", "--bulk-profile", "900:4", "--json"]
    assert run_cli([*argv, "--sweep", "bulk_target_per_pod=3,8"]) == 0
    out = capsys.readouterr().out
    assert "bulk drain s" in out and '"bulk_target_per_pod": 3.0' in out
    assert '"bulk_drain_time_s"' in out


def test_lane_leases_follow_the_daemons_rule() -> None:
    """The pods metric counts what each lane's stream leases: the daemon's
    Settings.lane_flow_control, not GANNET_MAX_MESSAGES for every lane."""
    from gannet.settings import Settings

    for spec in ("interactive:4,bulk:1:3", "interactive:4:2,bulk:1", "interactive:1,bulk:1:8"):
        cluster = scaling.lanes_from_spec(ClusterModel(), spec)
        daemon = Settings(lanes=spec, runners=cluster.runners, max_messages=cluster.max_messages)
        assert scaling.lane_leases(cluster) == tuple(
            daemon.lane_flow_control(lane) for lane in daemon.lane_list()
        )


def test_an_interactive_cap_is_modelled() -> None:
    cluster = scaling.lanes_from_spec(ClusterModel(), "interactive:4:1,bulk:1")
    assert (cluster.interactive_cap, cluster.bulk_cap) == (1, None)
    heavy = parse_profile("1200:6")
    capped = simulate(heavy, cluster=cluster, bulk=PRESETS["backfill"])
    free = simulate(heavy, cluster=ClusterModel(bulk_cap=None), bulk=PRESETS["backfill"])
    assert capped.worst_wait_s > free.worst_wait_s + 60


def test_worst_wait_ignores_the_fluid_queues_sub_message_tail() -> None:
    """The fluid queue works off its last message exponentially (half of what is left
    per second here); the message is done when most of it is, not its last thousandth."""
    arrived = [0.0, 1.0] + [1.0] * 12
    departed = [0.0, 0.0] + [1 - 0.5**k for k in range(1, 13)]
    assert scaling._worst_wait(arrived, departed) == 1.0
    # 1 msg/s on one pod (service 2 s): a message waits about its service time.
    assert simulate(parse_profile("3600:1")).worst_wait_s <= 3


def test_before_the_first_lagged_sample_the_hpa_sees_the_backlog_before_t0() -> None:
    """A real HPA has been reading the metrics all along: until the burst's first sample
    arrives, it sees the value before the burst (0 here) and recommends the current
    replicas, which the scale-up window then remembers."""
    result = simulate(PRESETS["burst"])
    lag = ClusterModel().metric_lag_s
    assert result.backlog_seen[0] == 0 and all(v == 0 for v in result.backlog_seen[: int(lag)])
    assert result.first_scale_up_s is not None
    # The pods metric shows the burst after 45 s, but a recommendation of 1 made at 0 s
    # holds the scale-up until the 60 s window has passed it.
    assert result.first_scale_up_s >= HpaConfig().scale_up_window_s


def test_drain_times_hold_the_messages_a_steady_rate_keeps_in_service() -> None:
    """Backed up means more than Little's law's rate x service time (plus a few) of the
    arrivals on that queue: on one subscription that is both profiles' rate, and the
    bulk lane's own rate for the bulk lane."""
    light, bulk = parse_profile("3600:1"), parse_profile("3600:10")
    one = simulate(light, bulk=bulk, one_queue=True)
    same = simulate(parse_profile("3600:11"))
    assert one.drain_time_s == same.drain_time_s is not None
    assert same.drain_time_s < 1800
    lanes = simulate(light, bulk=bulk)
    # The bulk lane holds ~20 in service at 10 msg/s: not a backlog once pods are up.
    assert lanes.bulk_drain_time_s is not None and lanes.bulk_drain_time_s < 1800


def test_keda_activation_is_not_an_hpa_scale_event(capsys: pytest.CaptureFixture) -> None:
    """KEDA's 0 -> 1 is not in the HPA's scale-event history: the HPA's first step counts
    its policy from 1 replica, max(1 + 4, 2 x 1) = 5, not from 0 (4)."""
    result = simulate(PRESETS["burst"], HpaConfig(min_replicas=0))
    # (KEDA activates and the HPA syncs in the same second here.)
    assert next(r for r in result.replicas if r > 0) == 5
    assert run_cli(["--min-replicas", "0"]) == 0
    assert "keda        0 <-> 1 on the backlog triggers" in capsys.readouterr().out
