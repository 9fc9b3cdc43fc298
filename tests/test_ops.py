"""`gannet ops status` / `gannet ops scale` against an HTTP server that plays the API server.

The real kubernetes client talks HTTP to a server on 127.0.0.1 that answers with the
JSON bodies in tests/fixtures/k8s/: a Deployment, an autoscaling/v2 HPA list with
status and conditions, GPU nodes, worker pods, the external metrics API (Pub/Sub
backlog through the Custom Metrics Stackdriver Adapter), the custom metrics API
(per-pod outstanding) and API Status errors. The bodies are written in the Kubernetes
API's JSON wire format, modelled on what a GKE cluster returns; no cluster is
reachable from here, so they are reconstructions, not captures. The server records
every request so that the tests can check what would be changed (PATCH bodies and
content types) and what would not.
"""

from __future__ import annotations

import argparse
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from gannet.cluster import cli as cluster_cli
from gannet.cluster import ops
from gannet.cluster.ops import OpsError, format_status, get_status, hpa_state, scale

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
NS = "/api/v1/namespaces/gannet"
DEPLOYMENT = "/apis/apps/v1/namespaces/gannet/deployments/gannet-worker"
HPAS = "/apis/autoscaling/v2/namespaces/gannet/horizontalpodautoscalers"
EXTERNAL = (
    "/apis/external.metrics.k8s.io/v1beta1/namespaces/gannet/"
    "pubsub.googleapis.com|subscription|num_undelivered_messages"
)
BULK = "resource.labels.subscription_id=gannet-tasks-sub-bulk"
CUSTOM = (
    "/apis/custom.metrics.k8s.io/v1beta2/namespaces/gannet/pods/*/"
    "prometheus.googleapis.com|gannet_messages_outstanding|gauge"
)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any
    authorization: str | None = None


@dataclass
class FakeApiServer:
    routes: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.routes.update(
            {
                ("GET", DEPLOYMENT): (200, "deployment.json"),
                ("GET", HPAS): (200, "hpa-list.json"),
                ("GET", "/api/v1/nodes"): (200, "nodes-gpu.json"),
                ("GET", f"{NS}/pods"): (200, "pods.json"),
                ("GET", EXTERNAL): (200, "external-backlog.json"),
                ("GET", f"{EXTERNAL}?{BULK}"): (200, "external-backlog-bulk.json"),
                ("GET", f"{NS}/configmaps/gannet-config-7g2k9m5c4t"): (200, "configmap.json"),
                ("GET", CUSTOM): (200, "custom-outstanding.json"),
                ("PATCH", f"{DEPLOYMENT}/scale"): (200, "scale.json"),
                ("PATCH", f"{HPAS}/gannet-worker"): (200, "<patched-hpa>"),
            }
        )
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                parsed = urllib.parse.urlparse(self.path)
                path = urllib.parse.unquote(parsed.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                owner.requests.append(
                    Request(
                        self.command,
                        path,
                        urllib.parse.parse_qs(parsed.query),
                        self.headers.get("Content-Type"),
                        body,
                        self.headers.get("Authorization"),
                    )
                )
                selector = urllib.parse.parse_qs(parsed.query).get("labelSelector", [""])[0]
                code, fixture = owner.routes.get(
                    (self.command, f"{path}?{selector}"),
                    owner.routes.get((self.command, path), (404, "not-found.json")),
                )
                if fixture == "<patched-hpa>":
                    hpa = json.loads((FIXTURES / "hpa-list.json").read_text())["items"][0]
                    hpa["spec"].update((body or {}).get("spec", {}))
                    data = json.dumps(hpa).encode()
                else:
                    data = (FIXTURES / fixture).read_bytes()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _handle
            do_PATCH = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def api(self) -> k8s.ApiClient:
        cfg = k8s.Configuration()
        cfg.host = self.url
        return k8s.ApiClient(cfg)

    def patches(self) -> list[Request]:
        return [r for r in self.requests if r.method == "PATCH"]


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gannet")
    cluster_cli.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "oncall", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "oncall"}}],
                "current-context": "fake",
            }
        )
    )
    return path


# ---- status -------------------------------------------------------------------------------


def test_each_lanes_backlog_is_shown_against_its_own_target() -> None:
    """Prod's HPA has one External metric per lane: the same name, another subscription
    in the selector. Each current value is matched by name and selector, not by name
    alone (the bulk lane's 250 was shown against the interactive target)."""

    def external(subscription: str, **value: str) -> dict[str, Any]:
        selector = {"matchLabels": {"resource.labels.subscription_id": subscription}}
        metric = {"name": "pubsub.googleapis.com|subscription|num_undelivered_messages"}
        return {
            "type": "External",
            "external": {"metric": {**metric, "selector": selector}, **value},
        }

    hpa = {
        "metadata": {"name": "gannet-worker"},
        "spec": {
            "maxReplicas": 12,
            "metrics": [
                external("gannet-tasks-sub", target={"type": "AverageValue", "averageValue": "2"}),
                external(
                    "gannet-tasks-sub-bulk", target={"type": "AverageValue", "averageValue": "8"}
                ),
            ],
        },
        "status": {
            "currentMetrics": [
                external("gannet-tasks-sub", current={"averageValue": "500m"}),
                external("gannet-tasks-sub-bulk", current={"averageValue": "250"}),
            ]
        },
    }
    interactive, bulk = hpa_state(hpa).metrics
    assert interactive.name.endswith("{resource.labels.subscription_id=gannet-tasks-sub}")
    assert (interactive.current, interactive.target) == ("0.5 per pod", "2 per pod")
    assert (bulk.current, bulk.target) == ("250 per pod", "8 per pod")


def test_status_reads_replicas_hpa_nodes_backlog_and_pods(server: FakeApiServer) -> None:
    status = get_status(server.api())
    d = status.deployment
    assert (d.ready, d.desired, d.current, d.available) == (3, 4, 4, 3)
    assert d.rolled_out

    assert status.hpa is not None
    h = status.hpa
    assert (h.current_replicas, h.desired_replicas, h.min_replicas, h.max_replicas) == (4, 8, 1, 12)
    external, pods_metric = h.metrics
    assert external.kind == "External"
    assert external.name == (
        "pubsub.googleapis.com|subscription|num_undelivered_messages"
        "{resource.labels.subscription_id=gannet-tasks-sub}"
    )
    assert (external.current, external.target) == ("7.5 per pod", "2 per pod")
    assert (pods_metric.current, pods_metric.target) == ("8 per pod", "6 per pod")
    limited = next(c for c in h.conditions if c["type"] == "ScalingLimited")
    assert limited["reason"] == "ScaleUpLimit"

    # Every lane of the worker's ConfigMap (GANNET_LANES), summed and each.
    assert status.lanes == {"interactive": 30, "bulk": 1200}
    assert status.backlog == 1230
    assert [n.ready for n in status.gpu_nodes] == [True, True, False]
    assert all(n.spot for n in status.gpu_nodes)
    by_name = {p.name: p for p in status.pods}
    assert by_name["gannet-worker-7d9c6b5f8d-4kx9p"].outstanding == 8
    assert by_name["gannet-worker-7d9c6b5f8d-b7m2s"].outstanding == 7.5
    assert by_name["gannet-worker-7d9c6b5f8d-b7m2s"].restarts == 1
    assert by_name["gannet-worker-7d9c6b5f8d-c3r8v"].reason == "ContainerCreating"
    assert by_name["gannet-worker-7d9c6b5f8d-zz41n"].reason == "Unschedulable"
    assert status.problems == []


def test_status_asks_the_api_the_right_questions(server: FakeApiServer) -> None:
    get_status(server.api(), subscription="gannet-tasks-sub")
    by_path = {r.path: r for r in server.requests}
    assert by_path["/api/v1/nodes"].query["labelSelector"] == ["cloud.google.com/gke-accelerator"]
    selector = "app.kubernetes.io/component=worker,app.kubernetes.io/name=gannet"
    assert by_path[f"{NS}/pods"].query["labelSelector"] == [selector]
    asked = [r.query["labelSelector"] for r in server.requests if r.path == EXTERNAL]
    assert asked == [["resource.labels.subscription_id=gannet-tasks-sub"]]
    assert by_path[CUSTOM].query["labelSelector"] == [selector]
    assert not server.patches(), "status must not change anything"


def test_status_shows_every_lane_of_the_workers_configmap(server: FakeApiServer) -> None:
    """The lanes come from the ConfigMap the worker's container reads (GANNET_LANES), so
    an operator need not know them; the backlog of each lane's subscription is asked."""
    get_status(server.api())
    asked = {r.query["labelSelector"][0] for r in server.requests if r.path == EXTERNAL}
    assert asked == {"resource.labels.subscription_id=gannet-tasks-sub", BULK}
    assert any(r.path.endswith("/configmaps/gannet-config-7g2k9m5c4t") for r in server.requests)


def test_status_without_the_configmap_says_so_and_shows_the_first_lane(
    server: FakeApiServer,
) -> None:
    server.routes[("GET", f"{NS}/configmaps/gannet-config-7g2k9m5c4t")] = (403, "forbidden.json")
    status = get_status(server.api())
    assert status.lanes == {"default": 30}
    assert any("configmap gannet-config-7g2k9m5c4t" in p for p in status.problems)


def test_status_text_shows_what_an_operator_needs(server: FakeApiServer) -> None:
    text = format_status(get_status(server.api()))
    assert "deployment gannet/gannet-worker: 3/4 ready" in text
    assert "hpa gannet-worker: 4 replicas, desired 8 (min 1, max 12)" in text
    assert "current 7.5 per pod / target 2 per pod" in text
    assert "ScalingLimited=True (ScaleUpLimit)" in text and "<--" in text
    assert "backlog: 1230 undelivered messages (interactive 30, bulk 1200)" in text
    assert "gpu nodes: 3 (ready 2, spot 3), GPUs allocatable 2" in text
    assert "(Unschedulable)" in text


def test_status_without_metrics_adapter_still_reports(server: FakeApiServer) -> None:
    server.routes[("GET", EXTERNAL)] = (404, "external-metrics-unavailable.json")
    server.routes[("GET", f"{EXTERNAL}?{BULK}")] = (404, "external-metrics-unavailable.json")
    server.routes[("GET", CUSTOM)] = (404, "external-metrics-unavailable.json")
    status = get_status(server.api())
    assert status.backlog is None
    assert status.lanes == {"interactive": None, "bulk": None}
    assert any("Custom Metrics Stackdriver Adapter" in p for p in status.problems)
    assert "backlog: ?" in format_status(status)


def test_status_under_keda_does_not_ask_for_the_metrics_adapter(server: FakeApiServer) -> None:
    """The KEDA overlay's metrics server serves the external metrics API under its own
    names (the adapter cannot be installed beside it): status said to install the
    adapter. It says where the backlog KEDA reads is shown instead."""
    server.routes[("GET", HPAS)] = (200, "hpa-list-keda.json")  # hpa-list.json, renamed
    server.routes[("GET", EXTERNAL)] = (404, "external-metrics-unavailable.json")
    server.routes[("GET", f"{EXTERNAL}?{BULK}")] = (404, "external-metrics-unavailable.json")
    status = get_status(server.api())
    assert status.hpa is not None and status.hpa.name == "keda-hpa-gannet-worker"
    assert not any("Stackdriver Adapter" in p for p in status.problems)
    assert any("get hpa keda-hpa-gannet-worker" in p for p in status.problems)


def test_status_without_hpa_says_replicas_are_manual(server: FakeApiServer) -> None:
    server.routes[("GET", HPAS)] = (200, "hpa-list-empty.json")
    status = get_status(server.api())
    assert status.hpa is None
    assert "none targets this deployment" in format_status(status)


def test_missing_deployment_is_an_error_with_a_next_step(server: FakeApiServer) -> None:
    server.routes[("GET", DEPLOYMENT)] = (404, "not-found.json")
    with pytest.raises(OpsError, match=r"not found.*--namespace"):
        get_status(server.api())


def test_status_cli_uses_the_kubeconfig(
    server: FakeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = kubeconfig(tmp_path, server.url)
    args = cli(["ops", "status", "--kubeconfig", str(config), "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["deployment"]["ready"] == 3 and data["backlog"] == 1230
    assert data["lanes"] == {"interactive": 30, "bulk": 1200}
    # The credentials from the kubeconfig reached the API server.
    assert {r.authorization for r in server.requests} == {"Bearer test-token"}
    assert all(r.method == "GET" for r in server.requests)

    args = cli(["ops", "status", "--kubeconfig", str(config), "-n", "other"])
    assert args.func(args) == 1
    assert "deployment other/gannet-worker not found" in capsys.readouterr().err


def test_bad_kubeconfig_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope"
    args = cli(["ops", "status", "--kubeconfig", str(missing)])
    assert args.func(args) == 1
    assert "kubeconfig" in capsys.readouterr().err


# ---- scale --------------------------------------------------------------------------------


def test_scale_refuses_when_an_hpa_owns_the_deployment(server: FakeApiServer) -> None:
    with pytest.raises(OpsError, match="--hpa-min 6"):
        scale(server.api(), 6)
    assert not server.patches()


def test_scale_to_zero_says_how_and_what_it_does_to_the_hpa(server: FakeApiServer) -> None:
    """The runbook's maintenance stop: to 0 under an HPA needs --force (--hpa-min cannot
    go below 1), and then the HPA is off until the Deployment is scaled up again."""
    with pytest.raises(OpsError, match="--force 0") as refused:
        scale(server.api(), 0)
    assert "--hpa-min" not in str(refused.value)
    result = scale(server.api(), 0, mode="force")
    assert "scale to 1 or more to resume" in ops.format_scale(result, "gannet", "gannet-worker")


def test_scale_force_patches_the_scale_subresource(server: FakeApiServer) -> None:
    result = scale(server.api(), 6, mode="force")
    (patch,) = server.patches()
    assert patch.path == f"{DEPLOYMENT}/scale"
    assert patch.body == {"spec": {"replicas": 6}}
    assert patch.content_type == "application/merge-patch+json"
    assert (result.before, result.after, result.hpa) == (4, 6, "gannet-worker")
    text = ops.format_scale(result, "gannet", "gannet-worker")
    assert "4 -> 6" in text and "will adjust it" in text


def test_scale_without_hpa_patches_directly(server: FakeApiServer) -> None:
    server.routes[("GET", HPAS)] = (200, "hpa-list-empty.json")
    result = scale(server.api(), 2)
    assert [p.body for p in server.patches()] == [{"spec": {"replicas": 2}}]
    assert result.hpa is None


def test_scale_hpa_min_sets_the_floor(server: FakeApiServer) -> None:
    result = scale(server.api(), 5, mode="hpa-min")
    (patch,) = server.patches()
    assert patch.path == f"{HPAS}/gannet-worker"
    assert patch.body == {"spec": {"minReplicas": 5}}
    assert (result.before, result.after) == (1, 5)
    assert "restore it with `gannet ops scale 1 --hpa-min`" in ops.format_scale(
        result, "gannet", "gannet-worker"
    )


def test_scale_hpa_min_above_max_is_refused(server: FakeApiServer) -> None:
    with pytest.raises(OpsError, match=r"maxReplicas \(12\)"):
        scale(server.api(), 20, mode="hpa-min")
    assert not server.patches()


def test_scale_dry_run_changes_nothing(
    server: FakeApiServer, capsys: pytest.CaptureFixture
) -> None:
    result = scale(server.api(), 3, mode="force", dry_run=True)
    assert result.dry_run and not server.patches()
    assert ops.format_scale(result, "gannet", "gannet-worker").startswith("would set")


def test_scale_forbidden_says_what_to_do(server: FakeApiServer) -> None:
    server.routes[("PATCH", f"{HPAS}/gannet-worker")] = (403, "forbidden.json")
    with pytest.raises(OpsError, match=r"access denied.*get-credentials"):
        scale(server.api(), 3, mode="hpa-min")


def test_scale_cli(server: FakeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = str(kubeconfig(tmp_path, server.url))
    args = cli(["ops", "scale", "6", "--kubeconfig", config])
    assert args.func(args) == 1
    assert "managed by HPA gannet-worker" in capsys.readouterr().err
    args = cli(["ops", "scale", "6", "--kubeconfig", config, "--force"])
    assert args.func(args) == 0
    assert "replicas: 4 -> 6" in capsys.readouterr().out
    args = cli(["ops", "scale", "6", "--kubeconfig", config, "--force", "--hpa-min"])
    assert args.func(args) == 2
    args = cli(["ops", "scale", "-1", "--kubeconfig", config, "--force"])
    assert args.func(args) == 1


def test_help_explains_every_option() -> None:
    parser = argparse.ArgumentParser(prog="gannet")
    sub = parser.add_subparsers(dest="command")
    cluster_cli.add_commands(sub)
    verbs = sub.choices["ops"]._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("status", "scale"):
        for action in verbs[name]._actions:
            assert action.help, f"ops {name} {action.option_strings or action.dest} has no help"
