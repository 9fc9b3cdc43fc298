"""The subscription's backlog as the autoscaler sees it, mirrored into our own gauges.

The HPA reads `num_undelivered_messages` from Cloud Monitoring through the custom
metrics adapter, not from us. The daemon polls the same two Pub/Sub metrics so that the
numbers the HPA acts on show up next to the per-pod gauges on one dashboard and in
`/metrics`, which makes "why did it (not) scale?" answerable from one place.

Cloud Monitoring samples Pub/Sub metrics once a minute and publishes them with a delay
of one to a few minutes, so polling faster than every 30 s buys nothing; the values are
what the HPA saw, not what the subscription holds this second.

A failed poll is logged and counted and the gauges keep their last value: the backlog
is an observability aid, and losing it must never stop the daemon from working. The
gauges are by lane, and a lane's series exist only once a poll of it succeeded: before
that (or while every poll fails, for example without roles/monitoring.viewer) they are
absent, never a 0 that reads as an empty subscription. Each good poll sets
gannet_backlog_last_success_timestamp_seconds{lane}, so values kept through failures
show their age.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import monitoring_v3

log = logging.getLogger(__name__)

BACKLOG_METRIC = "pubsub.googleapis.com/subscription/num_undelivered_messages"
OLDEST_AGE_METRIC = "pubsub.googleapis.com/subscription/oldest_unacked_message_age"

# Pub/Sub writes a point every 60 s and it can take up to ~4 min to become visible;
# a 10 min look-back always contains the newest point without scanning history.
LOOKBACK_S = 600


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class _Family(Protocol):
    """A gauge with a `lane` label (prometheus_client's Gauge)."""

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _Gauge: ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


@dataclass(frozen=True)
class BacklogReading:
    """One poll. A value is None when Cloud Monitoring had no point for it (yet)."""

    backlog_messages: float | None
    oldest_unacked_age_s: float | None
    error: str | None = None


class BacklogMonitor:
    """Polls Cloud Monitoring for the subscription backlog on a daemon thread."""

    def __init__(
        self,
        project: str,
        subscription: str,
        backlog_gauge: _Family,
        oldest_age_gauge: _Family,
        interval_s: float,
        client: monitoring_v3.MetricServiceClient | None = None,
        *,
        lane: str = "default",
        last_success_gauge: _Family | None = None,
        error_counter: _Counter | None = None,
        request_timeout_s: float = 10.0,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}; 30 s is a good value")
        self.project = project
        self.subscription = subscription
        # Families, not their lane's series: a series is made only when a poll gives it
        # a value (labels() creates it, at 0).
        self.backlog_gauge = backlog_gauge
        self.oldest_age_gauge = oldest_age_gauge
        self.lane = lane
        self.last_success_gauge = last_success_gauge
        self.interval_s = interval_s
        self.error_counter = error_counter
        self.request_timeout_s = request_timeout_s
        self.errors = 0
        self.polls = 0
        self._client = client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # The client is built on first use so that constructing the monitor never needs
    # credentials (tests, local runs with the feature off, a metadata server that is slow).
    def _get_client(self) -> monitoring_v3.MetricServiceClient:
        if self._client is None:
            self._client = monitoring_v3.MetricServiceClient()
        return self._client

    def _filter(self, metric_type: str) -> str:
        return (
            f'metric.type = "{metric_type}" AND resource.type = "pubsub_subscription" '
            f'AND resource.labels.subscription_id = "{self.subscription}"'
        )

    def _latest(self, metric_type: str, now: float) -> float | None:
        interval = monitoring_v3.TimeInterval(
            {
                "end_time": {"seconds": int(now)},
                "start_time": {"seconds": int(now) - LOOKBACK_S},
            }
        )
        pager = self._get_client().list_time_series(
            request={
                "name": f"projects/{self.project}",
                "filter": self._filter(metric_type),
                "interval": interval,
                "view": monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.FULL,
            },
            # The client's default retries UNAVAILABLE for 90 s; the next poll is the
            # retry here, so one bounded attempt keeps a poll shorter than the interval.
            retry=None,
            timeout=self.request_timeout_s,
        )
        newest_end: float | None = None
        newest_value: float | None = None
        for series in pager:
            for point in series.points:
                end = point.interval.end_time.timestamp()
                if newest_end is None or end > newest_end:
                    newest_end = end
                    newest_value = _point_value(point.value)
        return newest_value

    def poll_once(self) -> BacklogReading:
        """Reads both metrics, sets the lane's gauges (those with a point) and the time of
        this success, and never raises on API trouble."""
        self.polls += 1
        now = time.time()
        try:
            backlog = self._latest(BACKLOG_METRIC, now)
            oldest = self._latest(OLDEST_AGE_METRIC, now)
        except (
            api_exceptions.GoogleAPIError,
            auth_exceptions.GoogleAuthError,
            requests.RequestException,
            OSError,
        ) as exc:
            self._record_error(exc)
            return BacklogReading(None, None, error=f"{type(exc).__name__}: {exc}")
        if self.last_success_gauge is not None:
            self.last_success_gauge.labels(self.lane).set(now)
        if backlog is not None:
            self.backlog_gauge.labels(self.lane).set(backlog)
        if oldest is not None:
            self.oldest_age_gauge.labels(self.lane).set(oldest)
        if backlog is None and oldest is None:
            log.info(
                "no backlog points in Cloud Monitoring yet; a new or idle subscription "
                "reports within a few minutes",
                extra={"fields": {"subscription": self.subscription}},
            )
        return BacklogReading(backlog, oldest)

    def _record_error(self, exc: BaseException) -> None:
        self.errors += 1
        if self.error_counter is not None:
            self.error_counter.inc()
        hint = _hint(exc)
        log.warning(
            "backlog poll failed (%s: %s); keeping the last values. %s",
            type(exc).__name__,
            exc,
            hint,
            extra={
                "fields": {
                    "subscription": self.subscription,
                    "project": self.project,
                    "errors": self.errors,
                }
            },
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # the thread must survive anything; the daemon keeps working
                self.errors += 1
                if self.error_counter is not None:
                    self.error_counter.inc()
                log.exception("unexpected error in the backlog poller; it keeps polling")
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gannet-backlog", daemon=True)
        self._thread.start()
        log.info(
            "backlog poller started",
            extra={"fields": {"subscription": self.subscription, "interval_s": self.interval_s}},
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the poller; a poll in progress may finish in the background (daemon thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


def _point_value(value: Any) -> float | None:
    """A TypedValue as a float: Pub/Sub uses int64 for both metrics, double is accepted too."""
    kind = monitoring_v3.TypedValue.pb(value).WhichOneof("value")
    if kind == "int64_value":
        return float(value.int64_value)
    if kind == "double_value":
        return float(value.double_value)
    return None


def _hint(exc: BaseException) -> str:
    if isinstance(exc, api_exceptions.PermissionDenied):
        return (
            "Grant roles/monitoring.viewer to the pod's Google service account "
            "(terraform/ does this for the worker SA) or set GANNET_BACKLOG_FROM_MONITORING=false."
        )
    if isinstance(exc, auth_exceptions.DefaultCredentialsError):
        return (
            "No Google credentials: on GKE check the Workload Identity annotation on the "
            "Kubernetes ServiceAccount; locally run `gcloud auth application-default login`."
        )
    if isinstance(exc, api_exceptions.NotFound):
        return "Check GANNET_PROJECT: Cloud Monitoring does not know that project."
    return "It is retried at the next interval."
