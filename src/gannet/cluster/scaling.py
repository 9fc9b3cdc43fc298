"""`gannet scaling simulate`: the HPA's algorithm against a queue of GPU work.

Choosing HPA numbers for a GPU worker by trial on a cluster is slow and expensive: a T4
spot node takes minutes to appear, the Pub/Sub backlog metric reaches the HPA minutes
late, and each experiment burns GPU-hours. This module replays the controller's
arithmetic (kube-controller-manager's replica calculator, tolerance, stabilization
windows, scaling policies and KEDA's 0 <-> 1 activation) against an arrival profile, a
per-pod throughput, metric delays and node provisioning, so that the defaults in k8s/
are chosen from numbers (drain time, worst wait, GPU-hours) instead of guesses.

The queue is a fluid model: a pod with `runners` concurrent tasks finishes `throughput`
messages per second when it has enough work, and each message spends runners/throughput
seconds in service. Unacked messages (waiting *and* leased) are what Pub/Sub reports
as num_undelivered_messages, so at a steady arrival rate the metric settles at
rate x service time, which is why a per-pod target maps to a pod utilization.

With a bulk profile (`--bulk-profile`), the work arrives in two lanes (GANNET_LANES): the
pods share their capacity by weight, work-conserving, with the bulk lane under its cap
(a share of each pod's runners), and the HPA has one External metric per lane's
subscription and takes the largest proposal. The same arrivals on one subscription (one
FIFO queue, one metric) are simulated beside it, so the report shows what lanes buy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gannet.lanes import flow_control, parse_lanes

PolicyKind = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]


@dataclass(frozen=True)
class ScalingPolicy:
    """One entry of behavior.scaleUp/scaleDown.policies."""

    kind: PolicyKind
    value: int
    period_s: float


@dataclass(frozen=True)
class HpaConfig:
    """What k8s/ puts in the HorizontalPodAutoscaler (or KEDA ScaledObject)."""

    min_replicas: int = 1
    max_replicas: int = 12
    # External metric pubsub.googleapis.com|subscription|num_undelivered_messages,
    # target type AverageValue: desired = ceil(backlog / target).
    target_per_pod: float = 2.0
    # The bulk lane's subscription, its own External metric (with a bulk profile). At
    # most the bulk lane's cap: a pod holds no more of the lane in service, and above it
    # the HPA flaps under sustained bulk traffic (docs/autoscaling.md, Lanes).
    bulk_target_per_pod: float = 3.0
    # Pods metric gannet_messages_outstanding (via Managed Prometheus), AverageValue.
    # None disables the second signal.
    pods_metric_target: float | None = 6.0
    tolerance: float = 0.1
    sync_period_s: float = 15.0
    scale_up_window_s: float = 60.0
    scale_down_window_s: float = 300.0
    # behavior.scaleUp.policies: add at most max(pods, percent) per period (selectPolicy
    # Max); behavior.scaleDown.policies: remove at most percent per period.
    scale_up_pods: int = 4
    scale_up_percent: int = 100
    scale_down_percent: int = 50
    policy_period_s: float = 60.0
    scale_up_select: SelectPolicy = "Max"
    scale_down_select: SelectPolicy = "Max"
    # KEDA only (min_replicas == 0): how often it polls, how long inactive before 1 -> 0.
    keda_polling_s: float = 30.0
    keda_cooldown_s: float = 300.0

    @property
    def scale_up_policies(self) -> tuple[ScalingPolicy, ...]:
        return (
            ScalingPolicy("Pods", self.scale_up_pods, self.policy_period_s),
            ScalingPolicy("Percent", self.scale_up_percent, self.policy_period_s),
        )

    @property
    def scale_down_policies(self) -> tuple[ScalingPolicy, ...]:
        return (ScalingPolicy("Percent", self.scale_down_percent, self.policy_period_s),)


@dataclass(frozen=True)
class ClusterModel:
    """The world the HPA acts on: pods, GPU nodes and metric pipelines."""

    pod_throughput: float = 2.0  # messages/s one T4 pod sustains
    runners: int = 4  # GANNET_RUNNERS: tasks in service at once per pod
    max_messages: int = 8  # GANNET_MAX_MESSAGES: flow control, caps the pods metric
    pod_startup_s: float = 90.0  # image pull + weights from GCS + warm-up, on a ready node
    node_provision_s: float = 300.0  # cluster autoscaler -> spot T4 VM -> driver -> Ready
    node_scale_down_s: float = 600.0  # cluster autoscaler's scale-down-unneeded-time
    metric_lag_s: float = 120.0  # Pub/Sub metric: sample time -> visible to the adapter
    metric_sample_s: float = 60.0  # Pub/Sub metric sampling period
    pods_metric_lag_s: float = 45.0  # scrape interval + Managed Prometheus ingestion
    warm_nodes: int | None = None  # GPU nodes up at t=0 (default: min replicas, at least 0)
    # GANNET_LANES with a bulk profile: the lanes' weights and caps (runners).
    interactive_weight: int = 4
    bulk_weight: int = 1
    bulk_cap: int | None = 3
    interactive_cap: int | None = None


@dataclass(frozen=True)
class Param:
    """How one number (a field of HpaConfig or ClusterModel, or a flag) is read and checked.

    One table serves the flags, --sweep and simulate(), so that a value none of them
    can simulate (a zero target, a negative lag, inf) is refused by all three with the
    same reason instead of surfacing as a ZeroDivisionError or a silent no-op."""

    kind: type = float  # int, float or str
    low: float | None = None  # the least value allowed
    above: bool = False  # strictly above `low`
    choices: tuple[str, ...] = ()
    # Where the parameter has an effect: always, with a bulk lane, or under KEDA.
    mode: Literal["any", "lanes", "keda"] = "any"

    def rule(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        what = "a whole number" if self.kind is int else "a finite number"
        if self.low is None:
            return what
        return f"{what} {'>' if self.above else '>='} {self.low:g}"

    def problem(self, value: object) -> str | None:
        """Why `value` is not allowed, or None."""
        if self.choices:
            return None if value in self.choices else f"must be {self.rule()}, not {value!r}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {self.rule()}, not {value!r}"
        if self.kind is int and not float(value).is_integer():
            return f"must be {self.rule()}, not {value!r}"
        if not math.isfinite(value) or (
            self.low is not None and (value <= self.low if self.above else value < self.low)
        ):
            return f"must be {self.rule()}, not {value!r}"
        return None

    def parse(self, text: str) -> Any:
        """The value of `text`, or a ValueError saying what is allowed."""
        if self.choices:
            value: Any = text
        else:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"must be {self.rule()}, not {text!r}") from None
        if (problem := self.problem(value)) is not None:
            raise ValueError(problem.replace(repr(value), repr(text)))
        return int(value) if self.kind is int else value


_SELECT = ("Max", "Min", "Disabled")
# Every field of HpaConfig and ClusterModel, and what it may be. Periods the model steps
# through second by second (sync, KEDA polling) are whole seconds.
PARAMS: dict[str, Param] = {
    "min_replicas": Param(int, 0),
    "max_replicas": Param(int, 1),
    "target_per_pod": Param(float, 0, above=True),
    "bulk_target_per_pod": Param(float, 0, above=True, mode="lanes"),
    "pods_metric_target": Param(float, 0),  # 0 (None in HpaConfig): no pods metric
    "tolerance": Param(float, 0),
    "sync_period_s": Param(int, 1),
    "scale_up_window_s": Param(float, 0),
    "scale_down_window_s": Param(float, 0),
    "scale_up_pods": Param(int, 1),
    "scale_up_percent": Param(int, 1),
    "scale_down_percent": Param(int, 1),
    "policy_period_s": Param(float, 1),
    "scale_up_select": Param(str, choices=_SELECT),
    "scale_down_select": Param(str, choices=_SELECT),
    "keda_polling_s": Param(int, 1, mode="keda"),
    "keda_cooldown_s": Param(float, 0, mode="keda"),
    "pod_throughput": Param(float, 0, above=True),
    "runners": Param(int, 1),
    "max_messages": Param(int, 1),
    "pod_startup_s": Param(float, 0),
    "node_provision_s": Param(float, 0),
    "node_scale_down_s": Param(float, 0),
    "metric_lag_s": Param(float, 0),
    "metric_sample_s": Param(float, 1),
    "pods_metric_lag_s": Param(float, 0),
    "warm_nodes": Param(int, 0),
    "interactive_weight": Param(int, 1, mode="lanes"),
    "bulk_weight": Param(int, 1, mode="lanes"),
    "bulk_cap": Param(int, 1, mode="lanes"),
    "interactive_cap": Param(int, 1, mode="lanes"),
}
_OPTIONAL = {
    "pods_metric_target",
    "warm_nodes",
    "bulk_cap",
    "interactive_cap",
}  # None: off / the default


def check_config(hpa: HpaConfig, cluster: ClusterModel) -> None:
    """A ValueError naming the first field simulate() cannot use."""
    for config in (hpa, cluster):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            param = PARAMS[f.name]
            if f.name == "pods_metric_target":
                param = dataclasses.replace(param, above=True)  # None, not 0, turns it off
            if (problem := param.problem(value)) is not None:
                raise ValueError(f"{f.name} {problem}")
    if hpa.max_replicas < hpa.min_replicas:
        raise ValueError("need min_replicas <= max_replicas")


@dataclass(frozen=True)
class ArrivalProfile:
    """Messages published: an initial dump plus piecewise-constant rates."""

    name: str
    segments: tuple[tuple[float, float], ...]  # (duration_s, messages per second)
    initial_backlog: float = 0.0

    @property
    def duration_s(self) -> float:
        return sum(d for d, _ in self.segments)

    def rate_at(self, t: float) -> float:
        start = 0.0
        for duration, rate in self.segments:
            if start <= t < start + duration:
                return rate
            start += duration
        return 0.0

    def describe(self) -> str:
        parts = [f"{self.initial_backlog:g} queued at t=0"] if self.initial_backlog else []
        parts += [f"{rate:g} msg/s for {duration:g} s" for duration, rate in self.segments]
        return f"{self.name}: " + ", then ".join(parts)


PRESETS: dict[str, ArrivalProfile] = {
    # A backend submits a customer's batch at once, on top of a trickle of live traffic.
    "burst": ArrivalProfile("burst", ((3600.0, 0.5),), initial_backlog=5000.0),
    # Business hours: traffic climbs to well above one pod's capacity and falls back.
    "ramp": ArrivalProfile(
        "ramp",
        ((600.0, 0.5), (600.0, 4.0), (600.0, 10.0), (1200.0, 16.0), (600.0, 6.0), (1200.0, 0.5)),
    ),
    # Constant load that needs about four pods.
    "steady": ArrivalProfile("steady", ((3600.0, 7.0),)),
    # Half an hour of work, then a quiet night: where scale to zero (KEDA) pays.
    "quiet": ArrivalProfile("quiet", ((1800.0, 3.0), (5400.0, 0.0))),
    # A tenant's archive backfill, all published at once (a --bulk-profile).
    "backfill": ArrivalProfile("backfill", ((60.0, 0.0),), initial_backlog=20000.0),
    # Short spikes every 20 minutes: what makes a flappy HPA flap.
    "spiky": ArrivalProfile(
        "spiky", tuple(seg for _ in range(4) for seg in ((120.0, 20.0), (1080.0, 1.0)))
    ),
}


def _runnable(duration: float, rate: float) -> bool:
    """A profile segment the model can run: finite (inf overflows the cumulative counts),
    a duration above 0, a rate not below."""
    return math.isfinite(duration) and math.isfinite(rate) and duration > 0 and rate >= 0


def parse_profile(spec: str, initial_backlog: float | None = None) -> ArrivalProfile:
    """A preset name or 'DURATION_S:RATE,DURATION_S:RATE,...' (e.g. '600:0.5,1800:10')."""
    if spec in PRESETS:
        preset = PRESETS[spec]
        if initial_backlog is None:
            return preset
        return dataclasses.replace(preset, initial_backlog=initial_backlog)
    segments: list[tuple[float, float]] = []
    for part in spec.split(","):
        try:
            duration, rate = (float(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(
                f"bad profile segment {part!r}: use a preset ({', '.join(PRESETS)}) or "
                "DURATION_S:RATE_PER_S pairs separated by commas, e.g. 600:0.5,1800:10"
            ) from None
        if not _runnable(duration, rate):
            raise ValueError(
                f"profile segment {part!r}: duration must be finite and > 0, rate finite and >= 0"
            )
        segments.append((duration, rate))
    return ArrivalProfile("custom", tuple(segments), initial_backlog or 0.0)


def check_profile(profile: ArrivalProfile) -> None:
    """A ValueError for what the model cannot run (inf overflows the cumulative counts)."""
    backlog = profile.initial_backlog
    if not math.isfinite(backlog) or backlog < 0:
        raise ValueError(f"initial backlog must be a finite number >= 0, not {backlog!r}")
    for duration, rate in profile.segments:
        if not _runnable(duration, rate):
            raise ValueError(f"profile {profile.name}: bad segment {duration!r}:{rate!r}")


# ---------------------------------------------------------------------------------------
# The controller's arithmetic (pkg/controller/podautoscaler in kube-controller-manager).
# ---------------------------------------------------------------------------------------


def replicas_for_external(
    value: float, target_per_pod: float, current: int, tolerance: float
) -> int:
    """External metric with an AverageValue target (GetExternalPerPodMetricReplicas)."""
    if current > 0:
        ratio = value / (target_per_pod * current)
        if abs(1.0 - ratio) <= tolerance:
            return current
    return math.ceil(value / target_per_pod)


def replicas_for_pods(
    ready_values: Sequence[float],
    missing: int,
    target: float,
    current: int,
    tolerance: float,
) -> int | None:
    """Pods metric with an AverageValue target (calcPlainMetricReplicas).

    `missing` pods have no sample yet (starting): on a scale-up they count as 0, on a
    scale-down as exactly the target, which is the controller's conservative guess.
    Returns None when no pod has a sample (the controller then ignores the metric).
    """
    if not ready_values:
        return None
    ratio = sum(ready_values) / (target * len(ready_values))
    if missing == 0:
        if abs(1.0 - ratio) <= tolerance:
            return current
        return math.ceil(ratio * len(ready_values))
    fill = 0.0 if ratio >= 1.0 else target
    values = [*ready_values, *([fill] * missing)]
    new_ratio = sum(values) / (target * len(values))
    if (
        abs(1.0 - new_ratio) <= tolerance
        or (ratio > 1.0 and new_ratio < 1.0)
        or (ratio < 1.0 and new_ratio > 1.0)
    ):
        return current
    proposal = math.ceil(new_ratio * len(values))
    if (new_ratio < 1.0 and proposal > current) or (new_ratio > 1.0 and proposal < current):
        return current
    return proposal


def _change_in_period(events: Sequence[tuple[float, int]], now: float, period: float) -> int:
    return sum(change for t, change in events if t > now - period)


def _replicas_at_period_start(
    current: int,
    up_events: Sequence[tuple[float, int]],
    down_events: Sequence[tuple[float, int]],
    policy: ScalingPolicy,
    now: float,
) -> int:
    """The replicas before the policy's period: what its limit is counted from, as the
    HPA controller counts it in both directions."""
    return (
        current
        - _change_in_period(up_events, now, policy.period_s)
        + _change_in_period(down_events, now, policy.period_s)
    )


def scale_up_limit(
    current: int,
    up_events: Sequence[tuple[float, int]],
    down_events: Sequence[tuple[float, int]],
    policies: Sequence[ScalingPolicy],
    select: SelectPolicy,
    now: float,
) -> int:
    """calculateScaleUpLimitWithScalingRules: the most replicas the policies allow now."""
    if select == "Disabled":
        return current
    proposals = []
    for policy in policies:
        start = _replicas_at_period_start(current, up_events, down_events, policy, now)
        if policy.kind == "Pods":
            proposals.append(start + policy.value)
        else:
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
    return max(proposals) if select == "Max" else min(proposals)


def scale_down_limit(
    current: int,
    up_events: Sequence[tuple[float, int]],
    down_events: Sequence[tuple[float, int]],
    policies: Sequence[ScalingPolicy],
    select: SelectPolicy,
    now: float,
) -> int:
    """calculateScaleDownLimitWithBehaviors: the fewest replicas the policies allow now."""
    if select == "Disabled":
        return current
    proposals = []
    for policy in policies:
        start = _replicas_at_period_start(current, up_events, down_events, policy, now)
        if policy.kind == "Pods":
            proposals.append(start - policy.value)
        else:
            proposals.append(int(start * (1 - policy.value / 100)))
    # "Max" select means the biggest change, i.e. the lowest replica count.
    return min(proposals) if select == "Max" else max(proposals)


@dataclass
class HpaController:
    """The stateful part of one HPA: past recommendations and past scale events."""

    config: HpaConfig
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    up_events: list[tuple[float, int]] = field(default_factory=list)
    down_events: list[tuple[float, int]] = field(default_factory=list)

    def normalize(self, now: float, current: int, proposal: int) -> int:
        """Stabilization windows, then rate policies and min/max (normalizeDesiredReplicas...)."""
        cfg = self.config
        up_cutoff = now - cfg.scale_up_window_s
        down_cutoff = now - cfg.scale_down_window_s
        up_rec = proposal
        down_rec = proposal
        for t, rec in self.recommendations:
            if t > up_cutoff:
                up_rec = min(up_rec, rec)
            if t > down_cutoff:
                down_rec = max(down_rec, rec)
        # Scale up only as far as every recommendation in the up window agrees, scale
        # down only as far as every recommendation in the down window agrees.
        stabilized = min(max(current, up_rec), down_rec)
        keep = now - max(cfg.scale_up_window_s, cfg.scale_down_window_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > keep]
        self.recommendations.append((now, proposal))

        # Under KEDA (min 0) the HPA it creates still has minReplicas 1; KEDA does 1 <-> 0.
        floor = max(cfg.min_replicas, 1)
        if stabilized > current:
            limit = scale_up_limit(
                current,
                self.up_events,
                self.down_events,
                cfg.scale_up_policies,
                cfg.scale_up_select,
                now,
            )
            return min(stabilized, cfg.max_replicas, max(limit, current))
        if stabilized < current:
            limit = scale_down_limit(
                current,
                self.up_events,
                self.down_events,
                cfg.scale_down_policies,
                cfg.scale_down_select,
                now,
            )
            return max(stabilized, floor, min(limit, current))
        return stabilized

    def record_scale(self, now: float, old: int, new: int) -> None:
        horizon = now - 1800  # the longest period a policy may have
        if new > old:
            self.up_events.append((now, new - old))
        elif new < old:
            self.down_events.append((now, old - new))
        self.up_events = [e for e in self.up_events if e[0] > horizon]
        self.down_events = [e for e in self.down_events if e[0] > horizon]

    def desired_replicas(
        self,
        now: float,
        current: int,
        backlog_seen: float | None,
        pods_values: Sequence[float] | None,
        pods_missing: int,
        bulk_seen: float | None = None,
    ) -> int:
        """One sync of the HPA: the max over metrics (one External per lane), then
        normalize()."""
        cfg = self.config
        proposals = []
        if backlog_seen is not None:
            proposals.append(
                replicas_for_external(backlog_seen, cfg.target_per_pod, current, cfg.tolerance)
            )
        if bulk_seen is not None:
            proposals.append(
                replicas_for_external(bulk_seen, cfg.bulk_target_per_pod, current, cfg.tolerance)
            )
        if cfg.pods_metric_target is not None and pods_values:
            proposal = replicas_for_pods(
                pods_values, pods_missing, cfg.pods_metric_target, current, cfg.tolerance
            )
            if proposal is not None:
                proposals.append(proposal)
        if not proposals:
            return current
        return self.normalize(now, current, max(proposals))


# ---------------------------------------------------------------------------------------
# The world: queue, pods, nodes, metric pipelines.
# ---------------------------------------------------------------------------------------


@dataclass
class _Node:
    ready_at: float
    created_at: float
    has_pod: bool = False
    empty_since: float | None = None


@dataclass
class _Pod:
    ready_at: float
    node: _Node


@dataclass
class SimResult:
    """Time series (one sample per second) and the figures docs/autoscaling.md quotes."""

    profile: ArrivalProfile
    hpa: HpaConfig
    cluster: ClusterModel
    times: list[float]
    backlog: list[float]
    backlog_seen: list[float]
    replicas: list[int]
    ready: list[int]
    nodes: list[int]
    drain_time_s: float | None
    peak_backlog: float
    worst_wait_s: float
    gpu_hours: float
    ideal_gpu_hours: float
    max_replicas_reached: int
    first_scale_up_s: float | None
    processed: float
    # With a bulk lane: its backlog, worst wait and drain time.
    bulk_backlog: list[float] = field(default_factory=list)
    bulk_worst_wait_s: float | None = None
    bulk_drain_time_s: float | None = None
    one_queue: bool = False  # a bulk profile on the same subscription as the rest

    def summary(self) -> dict[str, float | int | None]:
        return {
            "drain_time_s": self.drain_time_s,
            "peak_backlog": round(self.peak_backlog, 1),
            "worst_wait_s": round(self.worst_wait_s, 1),
            "gpu_hours": round(self.gpu_hours, 3),
            "ideal_gpu_hours": round(self.ideal_gpu_hours, 3),
            "max_replicas_reached": self.max_replicas_reached,
            "first_scale_up_s": self.first_scale_up_s,
            "processed": round(self.processed, 1),
            **(
                {
                    "bulk_worst_wait_s": round(self.bulk_worst_wait_s, 1),
                    "bulk_drain_time_s": self.bulk_drain_time_s,
                }
                if self.bulk_worst_wait_s is not None
                else {}
            ),
        }


def lane_service(
    capacity: float, queue: float, bulk_queue: float, service_s: float, cluster: ClusterModel
) -> tuple[float, float]:
    """Messages each lane finishes this second: capacity shared by weight among the lanes
    with work, an idle lane's share to the other, each lane under its cap."""

    def cap_share(cap: int | None) -> float:
        return min(1.0, (cap or cluster.runners) / cluster.runners)

    want = min(queue / service_s, capacity * cap_share(cluster.interactive_cap))
    want_bulk = min(bulk_queue / service_s, capacity * cap_share(cluster.bulk_cap))
    weights = cluster.interactive_weight + cluster.bulk_weight
    give = min(want, capacity * cluster.interactive_weight / weights)
    give_bulk = min(want_bulk, capacity - give)
    give = min(want, capacity - give_bulk)
    return min(queue, give), min(bulk_queue, give_bulk)


def lane_leases(cluster: ClusterModel) -> tuple[int, int]:
    """What the interactive and the bulk lane's streams lease per pod, by the daemon's rule
    (gannet.lanes.flow_control): the pods metric counts leased messages, so a capped bulk
    lane adds at most 2 x its cap to it, not GANNET_MAX_MESSAGES."""
    return (
        flow_control(cluster.max_messages, cluster.runners, cluster.interactive_cap),
        flow_control(cluster.max_messages, cluster.runners, cluster.bulk_cap),
    )


def simulate(
    profile: ArrivalProfile,
    hpa: HpaConfig | None = None,
    cluster: ClusterModel | None = None,
    *,
    duration_s: float | None = None,
    drained_at: float = 10.0,
    bulk: ArrivalProfile | None = None,
    one_queue: bool = False,
) -> SimResult:
    """Runs the model one second at a time; deterministic, ~0.1 s for two hours.

    `bulk`: a second lane's arrivals, in a lane of its own, or with `one_queue` on the
    same subscription as `profile`'s (one FIFO queue, one metric)."""
    hpa = hpa or HpaConfig()
    cluster = cluster or ClusterModel()
    check_config(hpa, cluster)
    for arrivals in (profile, bulk):
        if arrivals is not None:
            check_profile(arrivals)
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s >= 1):
        raise ValueError(f"duration must be a finite number >= 1 s, not {duration_s!r}")
    horizon = duration_s if duration_s is not None else profile.duration_s + 1800.0
    lanes = bulk is not None and not one_queue
    merged = bulk if bulk is not None and one_queue else None
    controller = HpaController(hpa)
    keda = hpa.min_replicas == 0

    warm = cluster.warm_nodes if cluster.warm_nodes is not None else hpa.min_replicas
    nodes = [_Node(ready_at=0.0, created_at=0.0) for _ in range(max(warm, 0))]
    pods: list[_Pod] = []
    for node in nodes[: hpa.min_replicas]:  # running at t=0
        node.has_pod = True
        pods.append(_Pod(ready_at=0.0, node=node))
    for node in nodes[hpa.min_replicas :]:
        node.empty_since = 0.0

    service_s = cluster.runners / cluster.pod_throughput
    queue = profile.initial_backlog + (merged.initial_backlog if merged else 0.0)
    arrived = [queue]  # cumulative, per second
    departed = [0.0]
    bulk_queue = bulk.initial_backlog if lanes and bulk else 0.0
    bulk_arrived, bulk_departed, res_qb = [bulk_queue], [0.0], []
    res_t: list[float] = []
    res_q: list[float] = []
    res_rate: list[float] = []  # msg/s arriving on the (first) queue, per second
    res_seen: list[float] = []
    res_rep: list[int] = []
    res_ready: list[int] = []
    res_nodes: list[int] = []
    pods_hist: list[float] = []  # per-pod outstanding of ready pods, per second
    gpu_node_s = 0.0
    first_up: float | None = None
    last_active = -math.inf
    steps = int(horizon)

    # Before t=0 the queue was empty (a profile's initial backlog is published at t=0),
    # and the HPA, running all along, saw that: the pre-history value of each metric.
    # Reading "no metric" instead made the first syncs record no recommendation, so the
    # scale-up window let the first burst sample through at once.
    prehistory = 0.0

    def seen_backlog(t: float, series: list[float]) -> float:
        # Cloud Monitoring keeps one sample per period; the HPA sees the newest one
        # whose sample time + ingestion lag has passed.
        newest = math.floor((t - cluster.metric_lag_s) / cluster.metric_sample_s)
        sample_t = newest * cluster.metric_sample_s
        if sample_t < 0:
            return prehistory
        return float(round(series[int(sample_t)]))  # Pub/Sub reports whole messages

    def set_replicas(now: float, want: int) -> None:
        nonlocal pods
        if want > len(pods):
            for _ in range(want - len(pods)):
                free = [n for n in nodes if not n.has_pod]
                if free:
                    node = min(free, key=lambda n: n.ready_at)
                else:
                    node = _Node(ready_at=now + cluster.node_provision_s, created_at=now)
                    nodes.append(node)
                node.has_pod = True
                node.empty_since = None
                pods.append(
                    _Pod(ready_at=max(now, node.ready_at) + cluster.pod_startup_s, node=node)
                )
        elif want < len(pods):
            # The ReplicaSet deletes pods that are not ready yet before ready ones.
            pods.sort(key=lambda p: p.ready_at)
            for pod in pods[want:]:
                pod.node.has_pod = False
                pod.node.empty_since = now
            pods = pods[:want]

    # The Deployment has its minimum replicas whether or not a node is warm for each: one
    # without waits for a node and its start-up, as a scale-up's pod does.
    set_replicas(0.0, hpa.min_replicas)

    for step in range(steps):
        t = float(step)
        ready = sum(1 for p in pods if p.ready_at <= t)
        # Work: each ready pod serves up to `runners` messages at once.
        capacity = ready * cluster.pod_throughput
        if lanes:
            done, done_bulk = lane_service(capacity, queue, bulk_queue, service_s, cluster)
        else:
            rate = min(capacity, queue / service_s) if ready else 0.0
            done, done_bulk = min(queue, rate), 0.0
        queue -= done
        if queue < 1e-3:  # the fluid model's tail; a real queue is whole messages
            queue = 0.0
        arriving = profile.rate_at(t) + (merged.rate_at(t) if merged else 0.0)
        queue += arriving
        res_rate.append(arriving)
        arrived.append(arrived[-1] + arriving)
        departed.append(departed[-1] + done)
        lease = lane_leases(cluster) if lanes else (cluster.max_messages, 0)
        outstanding = min(lease[0], queue / ready) if ready else 0.0
        bulk_seen: float | None = None
        if lanes and bulk is not None:
            bulk_queue -= done_bulk
            if bulk_queue < 1e-3:
                bulk_queue = 0.0
            bulk_queue += bulk.rate_at(t)
            bulk_arrived.append(bulk_arrived[-1] + bulk.rate_at(t))
            bulk_departed.append(bulk_departed[-1] + done_bulk)
            res_qb.append(bulk_queue)
            bulk_seen = seen_backlog(t, res_qb)
            if ready:  # each lane's stream leases up to its own flow-control limit
                outstanding += min(lease[1], bulk_queue / ready)
        pods_hist.append(outstanding)

        res_t.append(t)
        res_q.append(queue)
        seen = seen_backlog(t, res_q)
        res_seen.append(seen)
        res_rep.append(len(pods))
        res_ready.append(ready)
        res_nodes.append(len(nodes))
        gpu_node_s += len(nodes)

        # Controllers. KEDA's 0 <-> 1 is its own, not the HPA's: it is not in the HPA's
        # scale events, so the HPA's first step after activation counts its policies
        # from 1 replica. (KEDA activates on the backlog triggers, the overlay's only ones.)
        if keda and step % max(int(hpa.keda_polling_s), 1) == 0:
            if seen > 0 or (bulk_seen or 0) > 0:
                last_active = t
            if not pods and (seen > 0 or (bulk_seen or 0) > 0):
                set_replicas(t, 1)
                first_up = first_up if first_up is not None else t
            elif pods and t - last_active >= hpa.keda_cooldown_s:
                set_replicas(t, 0)
        if step % max(int(hpa.sync_period_s), 1) == 0 and pods:
            lag_index = int(t - cluster.pods_metric_lag_s)
            pods_values: list[float] | None = None
            missing = 0
            if ready:
                value = pods_hist[lag_index] if lag_index >= 0 else prehistory
                pods_values = [value] * ready
                missing = len(pods) - ready
            current = len(pods)
            want = controller.desired_replicas(t, current, seen, pods_values, missing, bulk_seen)
            if want != current:
                if want > current and first_up is None:
                    first_up = t
                controller.record_scale(t, current, want)
                set_replicas(t, want)

        # Cluster autoscaler: empty GPU nodes go after the unneeded time.
        nodes[:] = [
            n
            for n in nodes
            if n.has_pod or n.empty_since is None or t - n.empty_since < cluster.node_scale_down_s
        ]

    peak = max(res_q) if res_q else 0.0

    def backed_up(q: float, rate: float) -> bool:
        """More unacked messages than the pods hold in service at the queue's current
        arrival rate (Little's law: rate x service time) plus a few. The rate is all the
        queue's arrivals: both profiles on one subscription, the bulk lane's own."""
        return q > rate * service_s + drained_at

    def drain_time(backlog: Sequence[float], rate_at: Callable[[int], float]) -> float | None:
        """The longest backed-up episode (for a burst, from t=0 until the queue is worked
        off); None when still backed up at the end."""
        longest = 0.0
        start: int | None = None
        for i, q in enumerate(backlog):
            backed = backed_up(q, rate_at(i))
            if backed and start is None:
                start = i
            elif not backed and start is not None:
                longest = max(longest, float(i - start))
                start = None
        return None if start is not None else longest

    drain = drain_time(res_q, lambda i: res_rate[i])
    worst = _worst_wait(arrived, departed)
    processed = departed[-1] + bulk_departed[-1]
    bulk_drain = drain_time(res_qb, bulk.rate_at) if lanes and bulk is not None else None
    return SimResult(
        profile=profile,
        hpa=hpa,
        cluster=cluster,
        times=res_t,
        backlog=res_q,
        backlog_seen=res_seen,
        replicas=res_rep,
        ready=res_ready,
        nodes=res_nodes,
        drain_time_s=drain,
        peak_backlog=peak,
        worst_wait_s=worst,
        gpu_hours=gpu_node_s / 3600.0,
        ideal_gpu_hours=processed / cluster.pod_throughput / 3600.0,
        max_replicas_reached=max(res_rep) if res_rep else 0,
        first_scale_up_s=first_up,
        processed=processed,
        bulk_backlog=res_qb,
        bulk_worst_wait_s=_worst_wait(bulk_arrived, bulk_departed) if lanes else None,
        bulk_drain_time_s=bulk_drain,
        one_queue=merged is not None,
    )


def _worst_wait(arrived: Sequence[float], departed: Sequence[float]) -> float:
    """Longest time a message stayed unacked, from FIFO cumulative curves, whole messages.

    arrived[i] and departed[i] count messages by the start of second i. Message k (k = 0,
    1, ...) is the fluid between k and k + 1; it counts as arrived, and as done, in the
    first second by which its middle (k + 0.5) has. The fluid queue serves a fraction of
    what is left each second, so the last message's last thousandths trickle out for
    seconds after the message was in effect done; timing the message by its last drop
    reported that tail as the worst wait (11 s at 1 msg/s, where a message waits ~2 s).
    """
    worst = 0.0
    j = 0
    for i in range(1, len(departed)):
        # The oldest message whose middle had not left by second i - 1.
        k = math.floor(departed[i - 1] - 0.5 + 1e-9) + 1
        if k + 0.5 > departed[i] + 1e-9:
            continue  # no message's middle left in this second
        while j < len(arrived) - 1 and arrived[j] < k + 0.5 - 1e-9:
            j += 1
        worst = max(worst, float(i - j))
    return worst


def write_png(result: SimResult, path: Path) -> Path:
    """Backlog (real and as the HPA sees it) and replicas/nodes over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # matplotlib is an optional extra of the package
        raise RuntimeError(
            "writing the PNG needs matplotlib: pip install matplotlib, or pass --no-png"
        ) from exc
    minutes = [t / 60 for t in result.times]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    first = "interactive lane backlog" if result.bulk_backlog else "unacked backlog"
    ax1.plot(minutes, result.backlog, label=first, color="tab:blue")
    if result.bulk_backlog:
        ax1.plot(minutes, result.bulk_backlog, label="bulk lane backlog", color="tab:purple")
    ax1.plot(
        minutes,
        result.backlog_seen,
        label="backlog as the HPA sees it",
        color="tab:orange",
        linestyle="--",
    )
    ax1.set_ylabel("messages")
    ax1.legend(loc="upper right")
    ax1.set_title(f"{result.profile.describe()}", fontsize=9)
    ax2.step(minutes, result.replicas, where="post", label="replicas (desired)", color="tab:red")
    ax2.step(minutes, result.ready, where="post", label="ready pods", color="tab:green")
    ax2.step(minutes, result.nodes, where="post", label="T4 nodes", color="tab:gray", alpha=0.7)
    ax2.set_ylabel("count")
    ax2.set_xlabel("minutes")
    ax2.legend(loc="upper right")
    drain = f"{result.drain_time_s:.0f} s" if result.drain_time_s is not None else "not drained"
    ax2.set_title(
        f"drain {drain}, worst wait {result.worst_wait_s:.0f} s, "
        f"GPU-hours {result.gpu_hours:.2f} (ideal {result.ideal_gpu_hours:.2f})",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_report(result: SimResult) -> str:
    hpa, cl = result.hpa, result.cluster
    pods_metric = (
        f"pods metric gannet_messages_outstanding target {hpa.pods_metric_target:g}"
        if hpa.pods_metric_target is not None
        else "no pods metric"
    )
    drain = f"{result.drain_time_s:.0f} s" if result.drain_time_s is not None else "not drained"
    efficiency = result.ideal_gpu_hours / result.gpu_hours if result.gpu_hours else 0.0
    lines = [
        f"profile     {result.profile.describe()}",
        f"hpa         external backlog target {hpa.target_per_pod:g}/pod, {pods_metric}, "
        f"replicas {hpa.min_replicas}..{hpa.max_replicas}, tolerance {hpa.tolerance:g}, "
        f"windows up {hpa.scale_up_window_s:g} s / down {hpa.scale_down_window_s:g} s",
        f"cluster     {cl.pod_throughput:g} msg/s per pod, {cl.runners} runners, "
        f"pod start {cl.pod_startup_s:g} s, T4 node provisioning {cl.node_provision_s:g} s, "
        f"metric lag {cl.metric_lag_s:g} s",
        f"drain time  {drain}",
        f"peak        {result.peak_backlog:.0f} messages; worst wait {result.worst_wait_s:.0f} s",
        f"replicas    max {result.max_replicas_reached}; first scale-up at "
        + (f"{result.first_scale_up_s:.0f} s" if result.first_scale_up_s is not None else "never"),
        f"GPU-hours   {result.gpu_hours:.2f} (ideal {result.ideal_gpu_hours:.2f}, "
        f"efficiency {efficiency:.0%})",
    ]
    if result.bulk_worst_wait_s is not None:
        bulk_drain = (
            f"{result.bulk_drain_time_s:.0f} s"
            if result.bulk_drain_time_s is not None
            else "not drained"
        )
        lines[1:1] = [
            f"lanes       interactive weight {cl.interactive_weight}"
            + (f" cap {cl.interactive_cap}" if cl.interactive_cap else "")
            + f", bulk weight {cl.bulk_weight}, "
            + (f"bulk cap {cl.bulk_cap} of {cl.runners} runners" if cl.bulk_cap else "no cap")
            + f"; bulk backlog target {hpa.bulk_target_per_pod:g}/pod (HPA: the largest "
            "proposal)"
        ]
        lines.append(
            f"bulk lane   drain time {bulk_drain}; worst wait "
            f"{result.bulk_worst_wait_s:.0f} s (the lines above: the interactive lane)"
        )
    if hpa.min_replicas == 0:
        lines.insert(
            2,
            f"keda        0 <-> 1 on the backlog triggers, polling {hpa.keda_polling_s:g} s, "
            f"cooldown {hpa.keda_cooldown_s:g} s",
        )
    if result.one_queue:
        lines[0] += " (everything on one subscription)"
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

_HPA_FIELDS = {f.name for f in dataclasses.fields(HpaConfig)}


def configs_from_args(args: argparse.Namespace) -> tuple[HpaConfig, ClusterModel]:
    hpa = HpaConfig(
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_per_pod=args.target_per_pod,
        bulk_target_per_pod=args.bulk_target_per_pod,
        pods_metric_target=args.pods_metric_target or None,
        tolerance=args.tolerance,
        scale_up_window_s=args.scale_up_window,
        scale_down_window_s=args.scale_down_window,
        scale_up_pods=args.scale_up_pods,
        scale_up_percent=args.scale_up_percent,
        scale_down_percent=args.scale_down_percent,
        policy_period_s=args.policy_period,
    )
    cluster = ClusterModel(
        pod_throughput=args.pod_throughput,
        runners=args.runners,
        max_messages=args.max_messages,
        pod_startup_s=args.pod_startup,
        node_provision_s=args.node_provision,
        node_scale_down_s=args.node_scale_down,
        metric_lag_s=args.metric_lag,
        pods_metric_lag_s=args.pods_metric_lag,
        warm_nodes=args.warm_nodes,
    )
    return hpa, cluster


SweepValue = int | float | str


def parse_sweep(spec: str, *, lanes: bool, keda: bool) -> tuple[str, list[SweepValue]]:
    """'NAME=V1,V2,...' -> the field and its values, each parsed by the field's type.

    Refuses a value the field cannot take (2.5 replicas would be simulated as 2 under a
    2.5 label) and a field that changes nothing in this run (a bulk lane's setting
    without --bulk-profile, KEDA's without --min-replicas 0), whose rows would all be
    the same and read as 'makes no difference'."""
    name, _, raw = spec.partition("=")
    param = PARAMS.get(name)
    if param is None:
        raise ValueError(f"--sweep: unknown parameter {name!r}; one of: " + ", ".join(PARAMS))
    if param.mode == "lanes" and not lanes:
        raise ValueError(f"--sweep {name}: no effect without --bulk-profile (a bulk lane's)")
    if param.mode == "keda" and not keda:
        raise ValueError(f"--sweep {name}: no effect unless --min-replicas 0 (KEDA's)")
    values: list[SweepValue] = []
    for text in (v.strip() for v in raw.split(",")):
        if text:
            try:
                values.append(param.parse(text))
            except ValueError as exc:
                raise ValueError(f"--sweep {name}={text}: {exc}") from None
    if not values:
        raise ValueError("--sweep needs NAME=V1,V2,..., e.g. target_per_pod=1,2,5")
    return name, values


def _with_field(
    hpa: HpaConfig, cluster: ClusterModel, name: str, value: SweepValue
) -> tuple[HpaConfig, ClusterModel]:
    # pods_metric_target 0 on the command line is None in HpaConfig: no pods metric.
    changed: dict[str, Any] = {name: value or None if name == "pods_metric_target" else value}
    if name in _HPA_FIELDS:
        return dataclasses.replace(hpa, **changed), cluster
    return hpa, dataclasses.replace(cluster, **changed)


def sweep(
    profile: ArrivalProfile,
    hpa: HpaConfig,
    cluster: ClusterModel,
    name: str,
    values: Sequence[SweepValue],
    *,
    duration_s: float | None = None,
    bulk: ArrivalProfile | None = None,
) -> list[tuple[SweepValue, SimResult]]:
    rows: list[tuple[SweepValue, SimResult]] = []
    for value in values:
        h, c = _with_field(hpa, cluster, name, value)
        rows.append((value, simulate(profile, h, c, duration_s=duration_s, bulk=bulk)))
    return rows


def format_sweep(name: str, rows: Sequence[tuple[SweepValue, SimResult]]) -> str:
    """One row per value; with a bulk lane, its drain and worst wait too."""
    lanes = any(r.bulk_worst_wait_s is not None for _, r in rows)
    head = f"{name:>22} | drain s | worst wait s | max replicas | GPU-hours | ideal GPU-h"
    out = [head + (" | bulk drain s | bulk worst wait s" if lanes else "")]
    out.append("-" * len(out[0]))
    for value, r in rows:
        label = value if isinstance(value, str) else f"{value:g}"
        drain = f"{r.drain_time_s:.0f}" if r.drain_time_s is not None else "never"
        line = (
            f"{label:>22} | {drain:>7} | {r.worst_wait_s:>12.0f} | "
            f"{r.max_replicas_reached:>12} | {r.gpu_hours:>9.2f} | {r.ideal_gpu_hours:>11.2f}"
        )
        if lanes:
            bulk = f"{r.bulk_drain_time_s:.0f}" if r.bulk_drain_time_s is not None else "never"
            line += f" | {bulk:>12} | {r.bulk_worst_wait_s or 0:>17.0f}"
        out.append(line)
    return "\n".join(out)


def lanes_from_spec(cluster: ClusterModel, spec: str) -> ClusterModel:
    """GANNET_LANES' weights and the second lane's cap, as the simulator's model."""
    lanes = parse_lanes(spec, "-", "-", "-")
    if len(lanes) != 2:
        raise ValueError(f"--lanes: want two lanes (interactive, then bulk), got {spec!r}")
    first, second = lanes
    return dataclasses.replace(
        cluster,
        interactive_weight=first.weight,
        bulk_weight=second.weight,
        bulk_cap=second.cap,
        interactive_cap=first.cap,
    )


def run_lanes(
    profile: ArrivalProfile, bulk: ArrivalProfile, hpa: HpaConfig, cluster: ClusterModel, args: Any
) -> int:
    """The two lanes, and the same arrivals on one subscription, side by side."""
    lanes = simulate(profile, hpa, cluster, duration_s=args.duration, bulk=bulk)
    one = simulate(profile, hpa, cluster, duration_s=args.duration, bulk=bulk, one_queue=True)
    print(f"bulk        {bulk.describe()}")
    print("\n== two lanes ==")
    print(format_report(lanes))
    print("\n== the same work on one subscription ==")
    print(format_report(one))
    print(
        f"\ninteractive worst wait: {lanes.worst_wait_s:.0f} s with lanes, "
        f"{one.worst_wait_s:.0f} s on one subscription"
    )
    if args.json:
        print(json.dumps({"lanes": lanes.summary(), "one_subscription": one.summary()}, indent=2))
    return _png(lanes, args)


def _png(result: SimResult, args: Any) -> int:
    """Writes the PNG unless --no-png; 1 when matplotlib is missing."""
    if not args.no_png:
        try:
            path = write_png(result, Path(args.png))
        except RuntimeError as exc:
            print(f"gannet scaling simulate: {exc}", file=sys.stderr)
            return 1
        print(f"png         {path}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    try:
        profile = parse_profile(args.profile, args.initial_backlog)
        hpa, cluster = configs_from_args(args)
        bulk = parse_profile(args.bulk_profile) if args.bulk_profile else None
        if bulk is not None:
            cluster = lanes_from_spec(cluster, args.lanes)
        if args.sweep:
            keda = hpa.min_replicas == 0
            name, values = parse_sweep(args.sweep, lanes=bulk is not None, keda=keda)
            rows = sweep(profile, hpa, cluster, name, values, duration_s=args.duration, bulk=bulk)
            if bulk is not None:
                print(f"bulk        {bulk.describe()} (two lanes)")
            print(profile.describe())
            print(format_sweep(name, rows))
            if args.json:
                print(json.dumps([{name: v, **r.summary()} for v, r in rows], indent=2))
            return 0
        if bulk is not None:
            return run_lanes(profile, bulk, hpa, cluster, args)
        result = simulate(profile, hpa, cluster, duration_s=args.duration)
    except ValueError as exc:
        print(f"gannet scaling simulate: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    return _png(result, args)


def _flag(param: Param) -> Callable[[str], Any]:
    """An argparse type: a value `param` refuses is argparse's error naming the flag."""

    def parse(text: str) -> Any:
        try:
            return param.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _profile_flag(spec: str) -> str:
    """--profile/--bulk-profile: refused by argparse, naming the flag, when unparseable."""
    try:
        check_profile(parse_profile(spec))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def _lanes_flag(spec: str) -> str:
    try:
        lanes_from_spec(ClusterModel(), spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, but not "(default: None)" after a help that
    says what an unset flag means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers `gannet scaling simulate`."""
    scaling = subparsers.add_parser(
        "scaling",
        help="Autoscaling tools (HPA simulation).",
        description="Autoscaling tools for the GKE deployment.",
    )
    verbs = scaling.add_subparsers(dest="scaling_command", required=True, metavar="VERB")
    p = verbs.add_parser(
        "simulate",
        help="Replay the HPA algorithm against an arrival profile.",
        description=(
            "Simulate the Kubernetes HPA (tolerance, stabilization windows, scaling "
            "policies; KEDA activation when --min-replicas 0) scaling GPU pods on the "
            "Pub/Sub backlog, with metric lag and T4 node provisioning. Prints drain time "
            "and GPU-hours and writes a PNG of backlog and replicas over time."
        ),
        formatter_class=_DefaultsHelp,
    )
    d_hpa, d_cl = HpaConfig(), ClusterModel()
    p.add_argument(
        "--profile",
        default="burst",
        type=_profile_flag,
        help=f"arrival profile: a preset ({', '.join(PRESETS)}) or DURATION_S:RATE,... "
        "segments of messages per second, e.g. 600:0.5,1800:10",
    )
    p.add_argument(
        "--initial-backlog",
        type=_flag(Param(float, 0)),
        default=None,
        help="messages already queued at t=0 (overrides the preset's)",
    )
    p.add_argument(
        "--duration",
        type=_flag(Param(float, 1)),
        default=None,
        help="seconds to simulate (default: the profile's length + 1800)",
    )
    p.add_argument(
        "--bulk-profile",
        default=None,
        type=_profile_flag,
        help="a second lane's arrivals (a preset, e.g. backfill, or segments): simulates "
        "two lanes and, beside it, the same work on one subscription",
    )
    p.add_argument(
        "--lanes",
        default="interactive:4,bulk:1:3",
        type=_lanes_flag,
        help="with --bulk-profile: GANNET_LANES (weights, and the bulk lane's cap if any)",
    )
    g = p.add_argument_group("HPA (what k8s/ configures)")
    g.add_argument(
        "--min-replicas",
        type=_flag(PARAMS["min_replicas"]),
        default=d_hpa.min_replicas,
        help="minReplicas; 0 simulates KEDA's scale to zero",
    )
    g.add_argument(
        "--max-replicas",
        type=_flag(PARAMS["max_replicas"]),
        default=d_hpa.max_replicas,
        help="maxReplicas (and the most T4 nodes the pool may add)",
    )
    g.add_argument(
        "--target-per-pod",
        type=_flag(PARAMS["target_per_pod"]),
        default=d_hpa.target_per_pod,
        help="AverageValue target of num_undelivered_messages per pod",
    )
    g.add_argument(
        "--bulk-target-per-pod",
        type=_flag(PARAMS["bulk_target_per_pod"]),
        default=d_hpa.bulk_target_per_pod,
        help="with --bulk-profile: AverageValue target of the bulk lane's backlog per pod",
    )
    g.add_argument(
        "--pods-metric-target",
        type=_flag(PARAMS["pods_metric_target"]),
        default=d_hpa.pods_metric_target,
        help="AverageValue target of gannet_messages_outstanding; 0 disables it",
    )
    g.add_argument(
        "--tolerance",
        type=_flag(PARAMS["tolerance"]),
        default=d_hpa.tolerance,
        help="controller tolerance: no change while |ratio - 1| <= this",
    )
    g.add_argument(
        "--scale-up-window",
        type=_flag(PARAMS["scale_up_window_s"]),
        default=d_hpa.scale_up_window_s,
        help="behavior.scaleUp.stabilizationWindowSeconds",
    )
    g.add_argument(
        "--scale-down-window",
        type=_flag(PARAMS["scale_down_window_s"]),
        default=d_hpa.scale_down_window_s,
        help="behavior.scaleDown.stabilizationWindowSeconds",
    )
    g.add_argument(
        "--scale-up-pods",
        type=_flag(PARAMS["scale_up_pods"]),
        default=d_hpa.scale_up_pods,
        help="scaleUp policy: at most this many pods added per period",
    )
    g.add_argument(
        "--scale-up-percent",
        type=_flag(PARAMS["scale_up_percent"]),
        default=d_hpa.scale_up_percent,
        help="scaleUp policy: at most this percent added per period (max of both)",
    )
    g.add_argument(
        "--scale-down-percent",
        type=_flag(PARAMS["scale_down_percent"]),
        default=d_hpa.scale_down_percent,
        help="scaleDown policy: at most this percent removed per period",
    )
    g.add_argument(
        "--policy-period",
        type=_flag(PARAMS["policy_period_s"]),
        default=d_hpa.policy_period_s,
        help="periodSeconds of the scaling policies",
    )
    c = p.add_argument_group("cluster and workload model")
    c.add_argument(
        "--pod-throughput",
        type=_flag(PARAMS["pod_throughput"]),
        default=d_cl.pod_throughput,
        help="messages per second one T4 pod sustains (measure with gannet bench)",
    )
    c.add_argument(
        "--runners",
        type=_flag(PARAMS["runners"]),
        default=d_cl.runners,
        help="GANNET_RUNNERS: tasks in service at once per pod",
    )
    c.add_argument(
        "--max-messages",
        type=_flag(PARAMS["max_messages"]),
        default=d_cl.max_messages,
        help="GANNET_MAX_MESSAGES: flow control, caps the per-pod metric",
    )
    c.add_argument(
        "--pod-startup",
        type=_flag(PARAMS["pod_startup_s"]),
        default=d_cl.pod_startup_s,
        help="seconds from scheduling on a ready node to Ready (pull, weights)",
    )
    c.add_argument(
        "--node-provision",
        type=_flag(PARAMS["node_provision_s"]),
        default=d_cl.node_provision_s,
        help="seconds for a new spot T4 node to become Ready (VM, driver)",
    )
    c.add_argument(
        "--node-scale-down",
        type=_flag(PARAMS["node_scale_down_s"]),
        default=d_cl.node_scale_down_s,
        help="seconds an empty GPU node lives before the cluster autoscaler removes it",
    )
    c.add_argument(
        "--metric-lag",
        type=_flag(PARAMS["metric_lag_s"]),
        default=d_cl.metric_lag_s,
        help="seconds before a Pub/Sub backlog sample reaches the HPA",
    )
    c.add_argument(
        "--warm-nodes",
        type=_flag(PARAMS["warm_nodes"]),
        default=None,
        help="GPU nodes already up at t=0 (default: one per --min-replicas pod)",
    )
    c.add_argument(
        "--pods-metric-lag",
        type=_flag(PARAMS["pods_metric_lag_s"]),
        default=d_cl.pods_metric_lag_s,
        help="seconds before a scraped per-pod sample reaches the HPA",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--sweep",
        default=None,
        metavar="NAME=V1,V2,...",
        help="run once per value of one parameter (a field name such as "
        "target_per_pod, max_replicas, scale_down_window_s, node_provision_s, "
        "scale_up_select; with --bulk-profile also bulk_target_per_pod, bulk_cap, "
        "bulk_weight, interactive_weight: two lanes only) and print a table instead of "
        "one report",
    )
    o.add_argument(
        "--png",
        default="gannet-scaling.png",
        help="where to write the PNG of backlog and replicas over time",
    )
    o.add_argument("--no-png", action="store_true", help="do not write the PNG")
    o.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=run_simulate)
