"""`gannet ops status` and `gannet ops scale N`: the operator's view of the worker on GKE.

`status` answers the on-call questions in one screen, from the same sources the
autoscaler uses: how many workers are ready of how many wanted, what the HPA sees
against its targets (and why it is not scaling, from its conditions), how many T4
nodes exist, and the backlog as the external metrics API reports it. `scale` sets the
replica count, but refuses by default when an HPA owns the deployment, because the
HPA would undo a manual scale within one sync period (15 s); it can instead set the
HPA's floor, which is what "pre-warm for a batch" actually needs.

Everything goes through the official kubernetes client with raw JSON responses, so
the logic is plain functions over dicts that the tests drive against recorded API
responses.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Literal, cast

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity
from urllib3.exceptions import HTTPError

from gannet.lanes import parse_lanes

DEFAULT_SUBSCRIPTION = "gannet-tasks-sub"
BACKLOG_METRIC = "pubsub.googleapis.com|subscription|num_undelivered_messages"
OUTSTANDING_METRIC = "prometheus.googleapis.com|gannet_messages_outstanding|gauge"
GPU_LABEL = "cloud.google.com/gke-accelerator"
SPOT_LABEL = "cloud.google.com/gke-spot"
TIMEOUT_S = 10


class OpsError(Exception):
    """A failure the operator can act on; the message says what to do next."""


@dataclass
class DeploymentState:
    name: str
    desired: int
    current: int
    ready: int
    updated: int
    available: int
    rolled_out: bool


@dataclass
class MetricState:
    kind: str
    name: str
    target: str
    current: str | None


@dataclass
class HpaState:
    name: str
    min_replicas: int
    max_replicas: int
    current_replicas: int
    desired_replicas: int
    metrics: list[MetricState]
    conditions: list[dict[str, str]]
    last_scale_time: str | None


@dataclass
class NodeState:
    name: str
    ready: bool
    spot: bool
    zone: str | None
    gpus: int


@dataclass
class PodState:
    name: str
    phase: str
    ready: bool
    node: str | None
    restarts: int
    reason: str | None
    outstanding: float | None = None


@dataclass
class ClusterStatus:
    namespace: str
    deployment: DeploymentState
    hpa: HpaState | None
    gpu_nodes: list[NodeState]
    pods: list[PodState]
    backlog: float | None  # every lane's together
    problems: list[str] = field(default_factory=list)
    lanes: dict[str, float | None] = field(default_factory=dict)  # lane -> its backlog

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Talking to the API
# ---------------------------------------------------------------------------------------


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> k8s.ApiClient:
    """The kubeconfig (default: $KUBECONFIG or ~/.kube/config), else in-cluster config."""
    try:
        return k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
    except k8s_config.ConfigException as kube_exc:
        if kubeconfig or context:
            raise OpsError(f"cannot load kubeconfig: {kube_exc}") from kube_exc
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException as exc:
            raise OpsError(
                "no Kubernetes credentials: run `gcloud container clusters get-credentials "
                "CLUSTER --region REGION` (see terraform output cluster_name) or pass "
                "--kubeconfig"
            ) from exc
        return k8s.ApiClient()


def _body(response: Any) -> Any:
    body: Any = json.loads(response.data)
    return body


def _get_raw(api: k8s.ApiClient, path: str, path_params: dict[str, str], query: list) -> Any:
    """GET on a path the generated client has no method for (custom metrics API)."""
    request = api.param_serialize(
        method="GET",
        resource_path=path,
        path_params=path_params,
        query_params=query,
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*request, _request_timeout=TIMEOUT_S)
    response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=response.reason)
    return json.loads(cast(bytes, response.data))  # the client's stubs say None


def _describe_api_error(exc: ApiException | HTTPError, what: str) -> str:
    if isinstance(exc, ApiException):
        if exc.status == 404:
            return f"{what} not found"
        if exc.status in (401, 403):
            return (
                f"{what}: access denied ({exc.status}); refresh credentials with "
                "`gcloud container clusters get-credentials` or ask for the gannet "
                "operator role"
            )
        return f"{what}: API error {exc.status} {exc.reason}"
    return f"{what}: cannot reach the API server ({exc})"


# ---------------------------------------------------------------------------------------
# Reading state (plain functions of the JSON the API returns)
# ---------------------------------------------------------------------------------------


def deployment_state(obj: dict[str, Any]) -> DeploymentState:
    spec, status = obj.get("spec", {}), obj.get("status", {})
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas", 0))
    rolled_out = (
        status.get("observedGeneration", 0) >= obj["metadata"].get("generation", 0)
        and updated == desired
    )
    return DeploymentState(
        name=obj["metadata"]["name"],
        desired=desired,
        current=int(status.get("replicas", 0)),
        ready=int(status.get("readyReplicas", 0)),
        updated=updated,
        available=int(status.get("availableReplicas", 0)),
        rolled_out=rolled_out,
    )


def _quantity(value: str | int | float | None) -> str | None:
    if value is None:
        return None
    number = parse_quantity(str(value))
    return f"{number.normalize():f}" if isinstance(number, Decimal) else str(number)


def _target_text(target: dict[str, Any]) -> str:
    kind = target.get("type", "")
    if kind == "Utilization":
        return f"{target.get('averageUtilization')}% utilization"
    if kind == "AverageValue":
        return f"{_quantity(target.get('averageValue'))} per pod"
    return f"{_quantity(target.get('value'))} total"


def _metric_key(kind: str, source: dict[str, Any]) -> str:
    """The metric's name, and its selector's labels (status names them too): prod's HPA
    has one External metric per lane, the same name on another subscription."""
    if kind == "Resource":
        return source.get("name", "")
    metric = source.get("metric", {})
    labels = sorted(((metric.get("selector") or {}).get("matchLabels") or {}).items())
    selector = "{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else ""
    return metric.get("name", "") + selector


def hpa_state(obj: dict[str, Any]) -> HpaState:
    spec, status = obj["spec"], obj.get("status", {})
    current_by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for metric in status.get("currentMetrics") or []:
        kind = metric["type"]
        source = metric.get(kind[0].lower() + kind[1:], {})
        current_by_key[(kind, _metric_key(kind, source))] = source.get("current", {})
    metrics = []
    for metric in spec.get("metrics") or []:
        kind = metric["type"]
        source = metric.get(kind[0].lower() + kind[1:], {})
        key = _metric_key(kind, source)
        target = source.get("target", {})
        current = current_by_key.get((kind, key))
        current_text = None
        if current is not None:
            if target.get("type") == "Utilization":
                current_text = f"{current.get('averageUtilization')}% utilization"
            elif "averageValue" in current and target.get("type") == "AverageValue":
                current_text = f"{_quantity(current['averageValue'])} per pod"
            else:
                current_text = f"{_quantity(current.get('value'))} total"
        metrics.append(MetricState(kind, key, _target_text(target), current_text))
    conditions = [
        {k: c.get(k, "") for k in ("type", "status", "reason", "message")}
        for c in status.get("conditions") or []
    ]
    return HpaState(
        name=obj["metadata"]["name"],
        min_replicas=int(spec.get("minReplicas", 1)),
        max_replicas=int(spec["maxReplicas"]),
        current_replicas=int(status.get("currentReplicas", 0)),
        desired_replicas=int(status.get("desiredReplicas", 0)),
        metrics=metrics,
        conditions=conditions,
        last_scale_time=status.get("lastScaleTime"),
    )


def hpa_for(hpas: dict[str, Any], deployment: str) -> dict[str, Any] | None:
    """The HPA whose scaleTargetRef is the deployment (ours, or KEDA's keda-hpa-*)."""
    for item in hpas.get("items", []):
        ref = item["spec"]["scaleTargetRef"]
        if ref.get("kind") == "Deployment" and ref.get("name") == deployment:
            return item
    return None


def node_states(nodes: dict[str, Any]) -> list[NodeState]:
    out = []
    for node in nodes.get("items", []):
        labels = node["metadata"].get("labels", {})
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in node.get("status", {}).get("conditions", [])
        )
        gpus = node.get("status", {}).get("allocatable", {}).get("nvidia.com/gpu", "0")
        out.append(
            NodeState(
                name=node["metadata"]["name"],
                ready=ready,
                spot=labels.get(SPOT_LABEL) == "true",
                zone=labels.get("topology.kubernetes.io/zone"),
                gpus=int(gpus),
            )
        )
    return out


def pod_states(pods: dict[str, Any]) -> list[PodState]:
    out = []
    for pod in pods.get("items", []):
        status = pod.get("status", {})
        if pod["metadata"].get("deletionTimestamp"):
            phase = "Terminating"
        else:
            phase = status.get("phase", "Unknown")
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
        )
        containers = status.get("containerStatuses") or []
        restarts = sum(int(c.get("restartCount", 0)) for c in containers)
        reason = None
        for c in containers:
            waiting = (c.get("state") or {}).get("waiting")
            if waiting:
                reason = waiting.get("reason")
        for c in status.get("conditions", []):
            if c["type"] == "PodScheduled" and c["status"] == "False":
                reason = c.get("reason", "Unschedulable")
        out.append(
            PodState(
                name=pod["metadata"]["name"],
                phase=phase,
                ready=ready,
                node=pod.get("spec", {}).get("nodeName"),
                restarts=restarts,
                reason=reason,
            )
        )
    return sorted(out, key=lambda p: p.name)


def get_status(
    api: k8s.ApiClient,
    namespace: str = "gannet",
    deployment: str = "gannet-worker",
    subscription: str | None = None,
) -> ClusterStatus:
    """Reads everything `ops status` prints; only a missing deployment is fatal. The
    backlog is every lane's (from the worker's ConfigMap) unless `subscription` names one."""
    apps, core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)
    autoscaling, custom = k8s.AutoscalingV2Api(api), k8s.CustomObjectsApi(api)
    problems: list[str] = []
    try:
        dep_obj = _body(
            apps.read_namespaced_deployment(
                deployment, namespace, _preload_content=False, _request_timeout=TIMEOUT_S
            )
        )
    except (ApiException, HTTPError) as exc:
        raise OpsError(
            _describe_api_error(exc, f"deployment {namespace}/{deployment}")
            + "; check --namespace/--deployment and `kubectl config current-context`"
        ) from exc
    dep = deployment_state(dep_obj)
    selector = ",".join(
        f"{k}={v}" for k, v in dep_obj["spec"]["selector"].get("matchLabels", {}).items()
    )

    hpa: HpaState | None = None
    try:
        hpas = _body(
            autoscaling.list_namespaced_horizontal_pod_autoscaler(
                namespace, _preload_content=False, _request_timeout=TIMEOUT_S
            )
        )
        found = hpa_for(hpas, deployment)
        hpa = hpa_state(found) if found else None
    except (ApiException, HTTPError) as exc:
        problems.append(_describe_api_error(exc, "horizontal pod autoscalers"))

    nodes: list[NodeState] = []
    try:
        nodes = node_states(
            _body(
                core.list_node(
                    label_selector=GPU_LABEL, _preload_content=False, _request_timeout=TIMEOUT_S
                )
            )
        )
    except (ApiException, HTTPError) as exc:
        problems.append(_describe_api_error(exc, "GPU nodes"))

    pods: list[PodState] = []
    try:
        pods = pod_states(
            _body(
                core.list_namespaced_pod(
                    namespace,
                    label_selector=selector,
                    _preload_content=False,
                    _request_timeout=TIMEOUT_S,
                )
            )
        )
    except (ApiException, HTTPError) as exc:
        problems.append(_describe_api_error(exc, "worker pods"))

    subscriptions = (
        {"default": subscription}
        if subscription
        else lane_subscriptions(core, namespace, dep_obj, problems)
    )
    # KEDA's metrics server takes the external metrics API, under its triggers' names:
    # the adapter's metric is not there, and "install the adapter" would mislead.
    adapter = (
        f" (the KEDA overlay's metrics server serves this API, not the adapter's metric: "
        f"`kubectl -n {namespace} get hpa {hpa.name}` shows the backlog KEDA reads)"
        if hpa is not None and hpa.name.startswith("keda-hpa-")
        else " (is the Custom Metrics Stackdriver Adapter installed?)"
    )
    lanes = {
        lane: lane_backlog(custom, namespace, sub, problems, adapter)
        for lane, sub in subscriptions.items()
    }
    known = [v for v in lanes.values() if v is not None]
    backlog = sum(known) if known else None

    try:
        per_pod = _get_raw(
            api,
            "/apis/custom.metrics.k8s.io/v1beta2/namespaces/{namespace}/pods/*/{metric}",
            {"namespace": namespace, "metric": OUTSTANDING_METRIC},
            [("labelSelector", selector)],
        )
        by_name = {
            i["describedObject"]["name"]: float(parse_quantity(i["value"]))
            for i in per_pod.get("items", [])
        }
        for pod in pods:
            pod.outstanding = by_name.get(pod.name)
    except (ApiException, HTTPError) as exc:
        problems.append(_describe_api_error(exc, "per-pod outstanding messages"))

    return ClusterStatus(namespace, dep, hpa, nodes, pods, backlog, problems, lanes)


def lane_subscriptions(
    core: k8s.CoreV1Api, namespace: str, dep_obj: dict[str, Any], problems: list[str]
) -> dict[str, str]:
    """lane -> subscription, from the ConfigMap the worker reads its settings from
    (GANNET_SUBSCRIPTION, GANNET_LANES), named as the daemon names them."""
    refs = [
        ref["configMapRef"]["name"]
        for container in dep_obj["spec"]["template"]["spec"].get("containers", [])
        for ref in container.get("envFrom", [])
        if "configMapRef" in ref
    ]
    data: dict[str, str] = {}
    if refs:
        try:
            data = _body(
                core.read_namespaced_config_map(
                    refs[0], namespace, _preload_content=False, _request_timeout=TIMEOUT_S
                )
            ).get("data", {})
        except (ApiException, HTTPError) as exc:
            problems.append(_describe_api_error(exc, f"configmap {refs[0]} (the lanes)"))
    first = data.get("GANNET_SUBSCRIPTION", DEFAULT_SUBSCRIPTION)
    try:
        declared = parse_lanes(data.get("GANNET_LANES", ""), "-", first, "-")
    except ValueError as exc:
        problems.append(f"GANNET_LANES in configmap {refs[0]}: {exc}")
        declared = parse_lanes("", "-", first, "-")
    return {lane.name: lane.subscription for lane in declared}


def lane_backlog(
    custom: k8s.CustomObjectsApi,
    namespace: str,
    subscription: str,
    problems: list[str],
    adapter: str = "",
) -> float | None:
    """A subscription's undelivered messages as the HPA sees them (None: unknown)."""
    try:
        values = _body(
            custom.list_namespaced_custom_object(
                "external.metrics.k8s.io",
                "v1beta1",
                namespace,
                BACKLOG_METRIC,
                label_selector=f"resource.labels.subscription_id={subscription}",
                _preload_content=False,
                _request_timeout=TIMEOUT_S,
            )
        )
    except (ApiException, HTTPError) as exc:
        problems.append(
            _describe_api_error(exc, f"backlog of {subscription} from the external metrics API")
            + adapter
        )
        return None
    items = values.get("items", [])
    return float(sum(parse_quantity(i["value"]) for i in items)) if items else None


def format_status(status: ClusterStatus) -> str:
    d = status.deployment
    lines = [
        f"deployment {status.namespace}/{d.name}: {d.ready}/{d.desired} ready "
        f"(pods {d.current}, updated {d.updated}, available {d.available})"
        + ("" if d.rolled_out else "  ROLLOUT IN PROGRESS"),
    ]
    if status.hpa is None:
        lines.append("autoscaler: none targets this deployment (replicas are manual)")
    else:
        h = status.hpa
        lines.append(
            f"hpa {h.name}: {h.current_replicas} replicas, desired {h.desired_replicas} "
            f"(min {h.min_replicas}, max {h.max_replicas})"
            + (f", last scaled {h.last_scale_time}" if h.last_scale_time else "")
        )
        for m in h.metrics:
            current = m.current if m.current is not None else "<unknown>"
            lines.append(f"  {m.kind:<8} {m.name}: current {current} / target {m.target}")
        for c in h.conditions:
            # AbleToScale/ScalingActive False or ScalingLimited True explain a stuck HPA.
            wrong = (c["type"] == "ScalingLimited") == (c["status"] == "True")
            flag = "  <--" if wrong else ""
            lines.append(f"  {c['type']}={c['status']} ({c['reason']}): {c['message']}{flag}")
    backlog = f"{status.backlog:g} undelivered messages" if status.backlog is not None else "?"
    if len(status.lanes) > 1:
        backlog += (
            " ("
            + ", ".join(
                f"{lane} {'?' if v is None else f'{v:g}'}" for lane, v in status.lanes.items()
            )
            + ")"
        )
    lines.append(f"backlog: {backlog} (as the HPA sees it; Cloud Monitoring lags 1-3 min)")
    ready = sum(1 for n in status.gpu_nodes if n.ready)
    spot = sum(1 for n in status.gpu_nodes if n.spot)
    gpus = sum(n.gpus for n in status.gpu_nodes if n.ready)
    lines.append(
        f"gpu nodes: {len(status.gpu_nodes)} (ready {ready}, spot {spot}), GPUs allocatable {gpus}"
    )
    for n in status.gpu_nodes:
        lines.append(
            f"  {n.name}  {'Ready' if n.ready else 'NotReady'}  {n.zone or '-'}"
            f"  {'spot' if n.spot else 'on-demand'}  gpus {n.gpus}"
        )
    lines.append(f"pods: {len(status.pods)}")
    for p in status.pods:
        extra = f"  outstanding {p.outstanding:g}" if p.outstanding is not None else ""
        why = f"  ({p.reason})" if p.reason else ""
        lines.append(
            f"  {p.name}  {p.phase}  {'ready' if p.ready else 'not-ready'}  "
            f"node {p.node or '-'}  restarts {p.restarts}{extra}{why}"
        )
    for problem in status.problems:
        lines.append(f"warning: {problem}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Scaling
# ---------------------------------------------------------------------------------------

ScaleMode = Literal["refuse-if-hpa", "force", "hpa-min"]


@dataclass
class ScaleResult:
    action: str
    before: int
    after: int
    hpa: str | None = None
    dry_run: bool = False


def scale(
    api: k8s.ApiClient,
    replicas: int,
    namespace: str = "gannet",
    deployment: str = "gannet-worker",
    mode: ScaleMode = "refuse-if-hpa",
    dry_run: bool = False,
) -> ScaleResult:
    """Sets the worker count, or the HPA's floor, with the HPA's behaviour in mind."""
    if replicas < 0:
        raise OpsError("replicas must be >= 0")
    apps, autoscaling = k8s.AppsV1Api(api), k8s.AutoscalingV2Api(api)
    try:
        dep = _body(
            apps.read_namespaced_deployment(
                deployment, namespace, _preload_content=False, _request_timeout=TIMEOUT_S
            )
        )
        hpas = _body(
            autoscaling.list_namespaced_horizontal_pod_autoscaler(
                namespace, _preload_content=False, _request_timeout=TIMEOUT_S
            )
        )
    except (ApiException, HTTPError) as exc:
        raise OpsError(_describe_api_error(exc, f"deployment {namespace}/{deployment}")) from exc
    before = int(dep["spec"].get("replicas", 1))
    hpa = hpa_for(hpas, deployment)

    if mode == "hpa-min":
        if hpa is None:
            raise OpsError(
                f"no HPA targets {namespace}/{deployment}; scale it directly (without --hpa-min)"
            )
        name = hpa["metadata"]["name"]
        hpa_max = int(hpa["spec"]["maxReplicas"])
        if replicas < 1 or replicas > hpa_max:
            raise OpsError(
                f"--hpa-min must be between 1 and the HPA's maxReplicas ({hpa_max}); "
                "raise maxReplicas in k8s/overlays/prod/hpa-patch.yaml for more"
            )
        old_min = int(hpa["spec"].get("minReplicas", 1))
        if name.startswith("keda-hpa-"):
            raise OpsError(
                f"{name} is managed by KEDA and would be reset; set minReplicaCount on the "
                "ScaledObject instead (kubectl -n gannet edit scaledobject gannet-worker)"
            )
        if not dry_run:
            try:
                autoscaling.patch_namespaced_horizontal_pod_autoscaler(
                    name,
                    namespace,
                    {"spec": {"minReplicas": replicas}},
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                    _request_timeout=TIMEOUT_S,
                )
            except (ApiException, HTTPError) as exc:
                raise OpsError(_describe_api_error(exc, f"hpa {namespace}/{name}")) from exc
        return ScaleResult("hpa-min", old_min, replicas, hpa=name, dry_run=dry_run)

    # An HPA does not act on a Deployment at 0 replicas: scaling up from 0 hands the
    # Deployment back to it, so that needs no --force.
    if hpa is not None and mode == "refuse-if-hpa" and before > 0:
        name = hpa["metadata"]["name"]
        lo, hi = int(hpa["spec"].get("minReplicas", 1)), int(hpa["spec"]["maxReplicas"])
        if replicas == 0 and name.startswith("keda-hpa-"):
            advice = (
                "KEDA scales from 0 on any backlog; pause it instead (kubectl -n gannet "
                "annotate scaledobject gannet-worker autoscaling.keda.sh/paused-replicas=0)"
            )
        elif replicas == 0:
            advice = (
                "use --force 0 to stop every worker: the HPA then stays off until you scale "
                "to 1 or more"
            )
        elif name.startswith("keda-hpa-"):
            advice = (
                "set minReplicaCount on the ScaledObject (kubectl -n gannet edit "
                "scaledobject gannet-worker), or --force to scale anyway"
            )
        else:
            advice = (
                f"use --hpa-min {replicas} to keep at least {replicas} workers, or --force "
                "to scale anyway"
            )
        raise OpsError(
            f"{namespace}/{deployment} is managed by HPA {name} (min {lo}, max {hi}); it "
            f"would undo a manual scale within ~15 s. To {replicas}: {advice}."
        )
    if not dry_run:
        try:
            apps.patch_namespaced_deployment_scale(
                deployment,
                namespace,
                {"spec": {"replicas": replicas}},
                _content_type="application/merge-patch+json",
                _preload_content=False,
                _request_timeout=TIMEOUT_S,
            )
        except (ApiException, HTTPError) as exc:
            raise OpsError(_describe_api_error(exc, f"scale of {namespace}/{deployment}")) from exc
    return ScaleResult(
        "deployment",
        before,
        replicas,
        hpa=hpa["metadata"]["name"] if hpa else None,
        dry_run=dry_run,
    )


def format_scale(result: ScaleResult, namespace: str, deployment: str) -> str:
    prefix = "would set" if result.dry_run else "set"
    if result.action == "hpa-min":
        return (
            f"{prefix} minReplicas of hpa {namespace}/{result.hpa}: {result.before} -> "
            f"{result.after}; restore it with `gannet ops scale {result.before} --hpa-min` "
            "(or re-apply k8s/overlays/prod) after the batch"
        )
    text = f"{prefix} {namespace}/{deployment} replicas: {result.before} -> {result.after}"
    if result.hpa and result.hpa.startswith("keda-hpa-") and result.after == 0:
        text += " (KEDA scales it up again on any backlog: pause the ScaledObject to hold 0)"
    elif result.hpa and result.after == 0:
        text += f" (hpa {result.hpa} is off while it is at 0: scale to 1 or more to resume)"
    elif result.hpa and result.before == 0:
        text += f" (hpa {result.hpa} takes it from here)"
    elif result.hpa:
        text += f" (forced: hpa {result.hpa} will adjust it at its next sync)"
    if result.after > result.before:
        text += "; new T4 nodes can take ~5 minutes (watch: gannet ops status)"
    return text


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _client_from_args(args: argparse.Namespace) -> k8s.ApiClient:
    return load_api_client(args.kubeconfig, args.context)


def run_status(args: argparse.Namespace) -> int:
    try:
        api = _client_from_args(args)
        status = get_status(api, args.namespace, args.deployment, args.subscription)
    except OpsError as exc:
        print(f"gannet ops status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        print(format_status(status))
    return 0


def run_scale(args: argparse.Namespace) -> int:
    mode: ScaleMode = "force" if args.force else "hpa-min" if args.hpa_min else "refuse-if-hpa"
    if args.force and args.hpa_min:
        print("gannet ops scale: use either --force or --hpa-min", file=sys.stderr)
        return 2
    try:
        api = _client_from_args(args)
        result = scale(api, args.replicas, args.namespace, args.deployment, mode, args.dry_run)
    except OpsError as exc:
        print(f"gannet ops scale: {exc}", file=sys.stderr)
        return 1
    print(format_scale(result, args.namespace, args.deployment))
    return 0
