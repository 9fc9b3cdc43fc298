"""BacklogMonitor against a local gRPC server that speaks the Cloud Monitoring v3 API.

No mocks of our code or of the Google client: the real MetricServiceClient talks over a
real gRPC channel to a server on 127.0.0.1 that implements
google.monitoring.v3.MetricService/ListTimeSeries and answers with the bodies in
tests/fixtures/monitoring/. (google-cloud-monitoring ships no REST transport, so the
`transport="rest"` + api_endpoint route does not exist for this client; gRPC is what the
daemon uses in production anyway.) The fixtures are in the documented proto3 JSON form
of `projects.timeSeries.list` responses (int64 as strings, RFC 3339 intervals, Google
error envelope); no live project is reachable from here, so they are reconstructions of
real responses, not captures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.cloud import monitoring_v3
from google.cloud.monitoring_v3.services.metric_service.transports import (
    MetricServiceGrpcTransport,
)
from google.cloud.monitoring_v3.types import metric_service
from prometheus_client import CollectorRegistry

from gannet.backlog import BACKLOG_METRIC, OLDEST_AGE_METRIC, BacklogMonitor
from gannet.metrics import Metrics

FIXTURES = Path(__file__).parent / "fixtures" / "monitoring"


class FakeMonitoring:
    """Serves recorded bodies by metric type and remembers each request."""

    def __init__(self) -> None:
        self.requests: list[metric_service.ListTimeSeriesRequest] = []
        self.mode = "ok"  # ok | empty | denied | error500
        handler = grpc.method_handlers_generic_handler(
            "google.monitoring.v3.MetricService",
            {
                "ListTimeSeries": grpc.unary_unary_rpc_method_handler(
                    self._list_time_series,
                    request_deserializer=metric_service.ListTimeSeriesRequest.deserialize,
                    response_serializer=metric_service.ListTimeSeriesResponse.serialize,
                )
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _list_time_series(
        self, request: metric_service.ListTimeSeriesRequest, context: grpc.ServicerContext
    ) -> metric_service.ListTimeSeriesResponse:
        self.requests.append(request)
        if self.mode == "denied":
            error = json.loads((FIXTURES / "permission_denied.json").read_text())["error"]
            context.abort(grpc.StatusCode[error["status"]], error["message"])
        if self.mode == "error500":
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        if self.mode == "empty":
            return self._fixture("empty.json")
        if BACKLOG_METRIC in request.filter:
            return self._fixture("num_undelivered_messages.json")
        if OLDEST_AGE_METRIC in request.filter:
            return self._fixture("oldest_unacked_message_age.json")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected filter {request.filter}")
        raise AssertionError("unreachable")

    @staticmethod
    def _fixture(name: str) -> metric_service.ListTimeSeriesResponse:
        return metric_service.ListTimeSeriesResponse.from_json((FIXTURES / name).read_text())


@pytest.fixture
def fake() -> Iterator[FakeMonitoring]:
    server = FakeMonitoring()
    server.server.start()
    yield server
    server.server.stop(grace=None)


def make_monitor(
    fake: FakeMonitoring, interval_s: float = 30.0
) -> tuple[BacklogMonitor, CollectorRegistry]:
    channel = grpc.insecure_channel(f"127.0.0.1:{fake.port}")
    client = monitoring_v3.MetricServiceClient(
        transport=MetricServiceGrpcTransport(channel=channel)
    )
    m = Metrics()  # the daemon's own gauges, by lane
    monitor = BacklogMonitor(
        "gannet-test",
        "gannet-tasks-sub",
        m.backlog,
        m.oldest_unacked_age,
        interval_s,
        client=client,
        lane=LANE,
        last_success_gauge=m.backlog_last_success,
        error_counter=m.backlog_poll_errors,
    )
    return monitor, m.registry


LANE = "bulk"


def value(registry: CollectorRegistry, name: str) -> float | None:
    """The lane's series of a gauge, or the (unlabelled) error counter."""
    labels = {} if name == "gannet_backlog_poll_errors_total" else {"lane": LANE}
    return registry.get_sample_value(name, labels)


def test_poll_once_sets_gauges_from_newest_points(fake: FakeMonitoring) -> None:
    monitor, registry = make_monitor(fake)
    reading = monitor.poll_once()
    assert reading.error is None
    assert reading.backlog_messages == 137  # newest of 137/120/96
    assert reading.oldest_unacked_age_s == 58  # newest even when listed second
    assert value(registry, "gannet_subscription_backlog_messages") == 137
    assert value(registry, "gannet_subscription_oldest_unacked_age_seconds") == 58
    assert monitor.errors == 0


def test_request_names_project_metric_and_subscription(fake: FakeMonitoring) -> None:
    monitor, _ = make_monitor(fake)
    monitor.poll_once()
    assert len(fake.requests) == 2
    assert {r.name for r in fake.requests} == {"projects/gannet-test"}
    filters = [r.filter for r in fake.requests]
    assert any(BACKLOG_METRIC in f for f in filters)
    assert any(OLDEST_AGE_METRIC in f for f in filters)
    assert all('resource.labels.subscription_id = "gannet-tasks-sub"' in f for f in filters)
    assert all('resource.type = "pubsub_subscription"' in f for f in filters)
    interval = fake.requests[0].interval
    span = interval.end_time.timestamp() - interval.start_time.timestamp()
    assert 120 <= span <= 3600, "the look-back must cover Pub/Sub's reporting delay"


def test_permission_denied_is_counted_logged_and_keeps_last_value(
    fake: FakeMonitoring, caplog: pytest.LogCaptureFixture
) -> None:
    monitor, registry = make_monitor(fake)
    monitor.poll_once()
    fake.mode = "denied"
    with caplog.at_level("WARNING", logger="gannet.backlog"):
        reading = monitor.poll_once()
    assert reading.backlog_messages is None
    assert reading.error is not None and "PermissionDenied" in reading.error
    assert monitor.errors == 1
    assert value(registry, "gannet_backlog_poll_errors_total") == 1
    # The HPA-facing value is not zeroed by an outage of the monitoring API.
    assert value(registry, "gannet_subscription_backlog_messages") == 137
    assert "roles/monitoring.viewer" in caplog.text


def test_a_lane_has_no_backlog_series_until_a_poll_succeeds(fake: FakeMonitoring) -> None:
    """Before its first good poll, or while every poll fails (no roles/monitoring.viewer),
    a lane exports no backlog series at all: a 0 would read as an empty subscription.
    After a success the last-success time says how old the values are."""
    monitor, registry = make_monitor(fake)
    names = (
        "gannet_subscription_backlog_messages",
        "gannet_subscription_oldest_unacked_age_seconds",
        "gannet_backlog_last_success_timestamp_seconds",
    )
    assert [value(registry, n) for n in names] == [None, None, None]
    fake.mode = "denied"
    monitor.poll_once()
    assert [value(registry, n) for n in names] == [None, None, None]
    assert value(registry, "gannet_backlog_poll_errors_total") == 1

    fake.mode = "ok"
    before = time.time()
    monitor.poll_once()
    succeeded_at = value(registry, "gannet_backlog_last_success_timestamp_seconds")
    assert succeeded_at is not None and before - 1 <= succeeded_at <= time.time()
    assert value(registry, "gannet_subscription_backlog_messages") == 137

    # A later failure keeps the values and their time: staleness shows as its age.
    fake.mode = "denied"
    monitor.poll_once()
    assert value(registry, "gannet_backlog_last_success_timestamp_seconds") == succeeded_at
    assert value(registry, "gannet_subscription_backlog_messages") == 137


def test_a_poll_without_points_is_a_success_that_sets_no_value(fake: FakeMonitoring) -> None:
    """A new or idle subscription: the API answered, so the poll counts as a success,
    but there is no value to export yet."""
    monitor, registry = make_monitor(fake)
    fake.mode = "empty"
    monitor.poll_once()
    assert value(registry, "gannet_backlog_last_success_timestamp_seconds") is not None
    assert value(registry, "gannet_subscription_backlog_messages") is None


def test_server_error_and_unreachable_endpoint_do_not_raise(fake: FakeMonitoring) -> None:
    monitor, _ = make_monitor(fake)
    fake.mode = "error500"
    assert monitor.poll_once().error is not None
    fake.server.stop(grace=None).wait()
    reading = monitor.poll_once()
    assert reading.error is not None
    assert monitor.errors == 2


def test_no_points_leaves_gauges_untouched(fake: FakeMonitoring) -> None:
    """A reading with no points (an idle subscription Cloud Monitoring has no recent
    sample of) keeps the values the HPA last saw instead of zeroing them."""
    monitor, registry = make_monitor(fake)
    monitor.poll_once()
    fake.mode = "empty"
    reading = monitor.poll_once()
    assert reading == reading.__class__(None, None, None)
    assert monitor.errors == 0
    assert value(registry, "gannet_subscription_backlog_messages") == 137
    assert value(registry, "gannet_subscription_oldest_unacked_age_seconds") == 58


def test_thread_polls_until_stopped_and_survives_errors(fake: FakeMonitoring) -> None:
    monitor, registry = make_monitor(fake, interval_s=0.05)
    fake.mode = "denied"
    monitor.start()
    try:
        deadline = time.monotonic() + 20
        while monitor.errors < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert monitor.errors >= 2, "the poller stopped after an error"
        fake.mode = "ok"
        while (
            value(registry, "gannet_subscription_backlog_messages") != 137
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert value(registry, "gannet_subscription_backlog_messages") == 137
    finally:
        monitor.stop()
    polls = monitor.polls
    time.sleep(0.2)
    assert monitor.polls == polls, "the poller kept running after stop()"


def test_rejects_non_positive_interval() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="interval_s"):
        BacklogMonitor("p", "s", m.backlog, m.oldest_unacked_age, 0)
