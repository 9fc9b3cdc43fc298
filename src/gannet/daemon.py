"""`gannet run`: builds the parts (`build`), then owns start-up and shutdown.

The path of one message is dispatch.py's; this module only wires and sequences. Shutdown
order matters (SIGTERM from kubectl scale, node drain or spot preemption): readiness goes
false at once, the stream stops pulling, queued-but-unstarted messages are nacked
(redelivered after the retry policy's backoff, not the lease's end), in-flight work gets
what is left of GANNET_SHUTDOWN_GRACE_S to finish and ack, whatever is still running
after it is nacked, then the process exits 0. Every wait after the first SIGTERM comes
out of that one budget. A second SIGTERM (or Ctrl-C) stops waiting: running work is
nacked at once and the process exits.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from gannet import clients, logs
from gannet.acks import Acks
from gannet.backlog import BacklogMonitor
from gannet.callback import Callbacks, build_callbacks
from gannet.callback_outbox import Outbox
from gannet.config_sources import Configs, ConfigWatch, open_configs
from gannet.device_decode import device_decoders
from gannet.dispatch import Dispatcher
from gannet.errors import CommandError, GannetError, TransientError
from gannet.health import Health, HealthServer
from gannet.lanes import Lane
from gannet.lease import LaneLease, LeaseSizer
from gannet.metrics import Metrics
from gannet.model_cache import Loader, ModelCache, ModelKey, yolo_loader
from gannet.model_resolver import ModelResolver, tenant_model_lister
from gannet.offload import Offload
from gannet.outcome import Settler, shutdown
from gannet.pipeline import Limits, Pipeline, here
from gannet.pool import resolve_devices
from gannet.pubsub_watch import PubSubWatch
from gannet.settings import Settings, unknown_variables
from gannet.signals import on_signals
from gannet.sink import SCHEMA_VERSION, Role, Sink, cannot_connect, connect_waiting
from gannet.storage import Storage, local_copy, local_version, read_local
from gannet.subscriber import Subscriber, policy_warnings
from gannet.tracing import Tracing

log = logging.getLogger(__name__)

# Of the grace period, what is kept for after the running work: the final acks and nacks
# reaching Pub/Sub, queued result callbacks, the model threads. The rest is the work's.
SETTLE_RESERVE_S = 5.0

# The start's questions whether the results bucket and the dead-letter topics exist:
# answered in milliseconds, and one not answered delays the start by no more than this
# (and is not taken for a missing bucket or topic).
START_CHECK_S = 10.0


class StartupError(RuntimeError):
    """The daemon cannot start; the text says what to fix."""


def model_version(storage: Storage | None) -> Callable[[str], str]:
    """`storage`: None where every model is a local file (`gannet config check`)."""

    def version_of(uri: str) -> str:
        if uri.startswith("gs://"):
            return _gcs(storage, uri).generation(uri)
        return local_version(uri)

    return version_of


def model_file(
    storage: Storage | None, cache_dir: Path, max_bytes: int | None = None
) -> Callable[[str, str], Path]:
    def local_path(uri: str, version: str) -> Path:
        if uri.startswith("gs://"):
            return _gcs(storage, uri).download_to(uri, version, cache_dir, max_bytes)
        return Path(uri)

    return local_path


def drop_download(cache_dir: Path) -> Callable[[ModelKey], None]:
    """Deletes a model's downloaded file once its load has ended (ModelCache's
    `discard`, for tenants' models): each tenant's model kept its file for the life of
    the pod (a failed one's too), hundreds of them in a 10 GiB emptyDir, past which the
    kubelet evicts the pod. A model asked for again after its eviction from the cache is
    downloaded again."""

    def drop(key: ModelKey) -> None:
        if key.uri.startswith("gs://"):  # never a local file: it is the only copy
            local_copy(key.uri, key.version, cache_dir).unlink(missing_ok=True)

    return drop


def _gcs(storage: Storage | None, uri: str) -> Storage:
    if storage is None:
        raise OSError(f"{uri}: no GCS client to read it with")
    return storage


def worker_id() -> str:
    """This process in task claims: the pod (hostname), the process, and a random part
    so that a restarted container never inherits its predecessor's claims."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def build_configs(settings: Settings, storage: Storage, metrics: Metrics) -> Configs:
    """The daemon's config source: one industry, or a deployment naming several, from a
    local path or gs:// (versioned by generation)."""
    configs: Configs | None = None

    def on_reload(result: str) -> None:
        metrics.config_reloads.labels(result).inc()
        if result == "loaded" and configs is not None:
            show_served(metrics, configs)

    configs = open_config(settings.config_location(), storage, settings.industry, on_reload)
    show_served(metrics, configs)
    metrics.configs_rejected.set_function(lambda: len(configs.rejected()))
    return configs


def open_config(
    uri: str,
    storage: Storage | None,
    industry: str | None,
    on_reload: Callable[[str], None] | None = None,
) -> Configs:
    """open_configs with the readers for `uri`: a gs:// config through `storage`,
    versioned by generation, a local one by mtime and size."""
    if uri.startswith("gs://"):
        gcs = _gcs(storage, uri)
        return open_configs(uri, gcs.read_url, gcs.generation, industry, on_reload)
    return open_configs(uri, read_local, local_version, industry, on_reload)


def show_served(metrics: Metrics, configs: Configs) -> None:
    """gannet_config_info: which version of each industry's config this process serves,
    so that a rejected push (the log's `new config rejected`) and a fleet half way
    through a reload can be seen without reading each pod's log."""
    metrics.config_info.clear()
    for loaded in configs.served():
        config = loaded.config
        metrics.config_info.labels(config.industry, str(config.version), loaded.version).set(1)


@dataclass
class Parts:
    """Everything `gannet run` wires together, built and connected but not started."""

    settings: Settings
    metrics: Metrics
    publisher: pubsub_v1.PublisherClient
    subscriber_client: pubsub_v1.SubscriberClient
    storage: Storage
    sink: Sink
    cache: ModelCache
    pipeline: Pipeline
    callbacks: Callbacks
    outbox: Outbox  # callbacks owed: this process's renewed, dead ones' taken over
    dispatcher: Dispatcher
    devices: list[str]
    acks: dict[str, Acks]
    offload: Offload | None = None
    tracing: Tracing | None = None
    # Set once start-up's models are loaded: later loads trace in a process of their own
    # (model_cache.yolo_loader).
    traces_apart: threading.Event = field(default_factory=threading.Event)

    def close(self, timeout_s: float = 0.0) -> None:
        """Stop the model threads and release the database pool (callbacks are closed
        by the shutdown, which knows how long they may take); send the last spans."""
        for acks in self.acks.values():  # any left: the streams are closed by now
            acks.close()
        self.cache.close(timeout_s)
        for decoder in set(self.pipeline.decoders.values()):
            decoder.close()
        if self.offload is not None:
            self.offload.close()
        self.sink.close()
        if self.tracing is not None:
            self.tracing.shutdown(timeout_s=min(5.0, timeout_s) or 1.0)


def check_bucket(storage: Storage, bucket: str, setting: str) -> None:
    """StartupError when a bucket the deployment names does not exist. The results
    bucket: every task writes there, and without it each was retried until
    dead-lettered, with no row, while the pod stood ready and its growing backlog scaled
    the pool up. The models bucket (GANNET_MODELS_BUCKET): a missing one lists no
    tenant's own model, and every tenant was served the industry's model instead, as
    successes, without a word. A GCS that cannot be asked now (a blip, a stall) is only
    warned about: its tasks are retried as before."""
    try:
        missing = storage.bucket_missing(bucket, deadline_s=START_CHECK_S)
    except TransientError as exc:
        log.warning(
            f"could not check at start that {setting}'s bucket exists; starting anyway",
            extra={"fields": {"bucket": bucket, "error": exc.message}},
        )
        return
    if missing:
        raise StartupError(f"bucket {bucket} does not exist: create it, or correct {setting}")


def check_role(role: Role) -> None:
    """StartupError for a role that row-level security does not bind (a superuser, or
    BYPASSRLS): every tenant's rows would be open to a bug in one query; and for one
    not granted what the daemon does (each task would fail on it). A warning for one
    that owns the tables: it is bound, but could turn the binding off."""
    if role.bypasses_rls:
        raise StartupError(
            f"GANNET_DATABASE_URL's role {role.name} is a superuser or has BYPASSRLS, so "
            "row-level security would not keep tenants apart: connect as a role without "
            "either (docs/operating.md, step 7)"
        )
    if role.missing:
        raise StartupError(
            f"GANNET_DATABASE_URL's role {role.name} may not do what the daemon does "
            f"({', '.join(role.missing)}): run `gannet db migrate` with "
            "GANNET_OWNER_DATABASE_URL, which grants it (docs/operating.md, step 7)"
        )
    if role.owns_tables:
        log.warning(
            "the daemon's database role owns gannet's tables and could turn row-level "
            "security off; give the daemon a role of its own and migrate with "
            "GANNET_OWNER_DATABASE_URL (docs/operating.md, step 7)",
            extra={"fields": {"role": role.name}},
        )


def check_dead_letter_topic(publisher: pubsub_v1.PublisherClient, path: str) -> None:
    """Says at start, in an ERROR line, that a lane's dead-letter topic is missing: the
    first poison message would find out (its quarantine fails, so it is nacked, again
    and again). Not a refusal to start: valid tasks are served meanwhile. A worker that
    may not read the topic (no pubsub.topics.get: terraform grants roles/pubsub.viewer)
    or a Pub/Sub that does not answer gets a warning."""
    try:
        # No retry: the client's default one retries UNAVAILABLE for up to 600 s.
        publisher.get_topic(request={"topic": path}, timeout=START_CHECK_S, retry=None)
    except gexc.NotFound:
        log.error(
            "dead-letter topic %s does not exist: poison messages will be nacked, not "
            "quarantined, until it does; create it (terraform does) or correct "
            "GANNET_DEAD_LETTER_TOPIC (to which an extra lane adds -LANE)",
            path,
        )
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        log.warning(
            "could not check at start that the dead-letter topic exists",
            extra={"fields": {"topic": path, "error": str(exc)}},
        )


def build(
    settings: Settings, metrics: Metrics, wrap_loader: Callable[[Loader], Loader] | None = None
) -> Parts:
    """Connects to Pub/Sub, GCS and PostgreSQL and builds the pipeline; loads no model.

    `gannet bench` builds its one-at-a-time worker with this too, so it measures the same
    parts the daemon runs; its plumbing mode passes `wrap_loader` to replay recorded model
    outputs instead of running the network. Raises StartupError with what to fix.
    """
    s = settings
    try:
        publisher, subscriber_client = clients.pubsub_clients(s)
        storage = Storage(clients.storage_client(s))
    except clients.NoCredentials as exc:
        raise StartupError(str(exc)) from exc
    sink = Sink(
        s.database_url,
        pool_size=s.db_connections(),
        timeout_s=s.db_timeout_s,
        answer_deadline_s=s.db_answer_deadline_s,
        callback_lease_s=s.callback_lease_s,
    )
    try:
        # One connection first: its error is libpq's reason (the pool's timeout says
        # none), and a refusal ends the wait at once.
        connect_waiting(s.database_url, s.db_connect_wait_s).close()
        sink.open(wait_s=s.db_connect_wait_s)
    except Exception as exc:
        raise StartupError(cannot_connect(exc)) from exc
    try:  # the checks after the pool opened: a refusal closes it
        try:
            check_role(sink.role())  # first: without its rights the version is unreadable
            current = sink.schema_version() >= SCHEMA_VERSION
        except TransientError as exc:
            raise StartupError(
                f"PostgreSQL stopped answering the start-up's checks: {exc.message}; "
                "start again once it answers (a pod is restarted)"
            ) from exc
        if not current:
            raise StartupError("database schema is not current: run `gannet db migrate` first")
        check_bucket(storage, s.results_bucket, "GANNET_RESULTS_BUCKET")
        if s.models_bucket:
            check_bucket(storage, s.models_bucket, "GANNET_MODELS_BUCKET")
        try:
            configs = build_configs(s, storage, metrics)
        except (ValueError, OSError, GannetError) as exc:
            why = exc.message if isinstance(exc, GannetError) else exc
            raise StartupError(f"cannot load GANNET_CONFIG_URI: {why}") from exc
        try:
            devices = resolve_devices(s.devices)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
    except StartupError:
        sink.close()
        raise
    traces_apart = threading.Event()
    loader = yolo_loader(
        model_file(storage, s.model_cache_dir, s.max_model_mb * 2**20),
        trace=s.torchscript,
        cuda_graphs=s.cuda_graphs,
        safe=s.safe_model_load,
        trace_apart=traces_apart,
    )
    cache = ModelCache(
        wrap_loader(loader) if wrap_loader else loader,
        metrics,
        max_batch=s.batch_size,
        window_s=s.batch_window_ms / 1000,
        budget_bytes=s.model_memory_budget_mb * 1024 * 1024 or None,
        idle_evict_s=s.model_idle_evict_s,
        cpu_threads=s.torch_threads,
        stage_cpu=s.stage_cpu,
        load_wait_s=s.model_load_wait_s,
        load_threads=s.runners,
        discard=drop_download(s.model_cache_dir),
    )
    lister = tenant_model_lister(storage, s.models_bucket) if s.models_bucket else None
    resolver = ModelResolver(
        model_version(storage), ttl_s=s.model_check_s, list_tenant_models=lister
    )
    limits = Limits(s.allowed_buckets, s.max_image_bytes, s.max_image_pixels)
    # nvJPEG on each GPU: its photos' pixels never pass through the CPU.
    decoders = device_decoders(s.gpu_decode, devices, s.batch_size, metrics)
    offload = None
    if s.decode_nice:
        decode_cpu = metrics.stage_cpu_seconds.labels("decode").inc if s.stage_cpu else None
        offload = Offload(s.runners, s.decode_nice, "gannet-decode", decode_cpu)
    pipeline = Pipeline(
        configs, storage, cache, resolver, limits, decoders, offload.run if offload else here
    )
    # A reloaded config is served only once its models load here (start-up warms the first).
    configs.check_models_with(partial(pipeline.load_models, devices=devices))
    holder = worker_id()
    outbox = Outbox(sink, holder, metrics)
    callbacks = build_callbacks(s, outbox, metrics)
    lanes = s.lane_list()
    # Each lane's acks, sent by the daemon (acks.py); handed to its Subscriber too.
    acks = {
        lane.name: Acks(
            subscriber_client,
            s.path("subscriptions", lane.subscription),
            lost=metrics.acks_failed.labels(lane.name).inc,
        )
        for lane in lanes
    }
    settlers = {
        lane.name: Settler(
            publisher,
            s.path("topics", lane.dead_letter_topic),
            lane.subscription,
            metrics,
            acks[lane.name],
            lane.name,
        )
        for lane in lanes
    }
    tracing = Tracing.from_settings(s, holder)
    dispatcher = Dispatcher(
        pipeline,
        sink,
        storage,
        settlers,
        metrics,
        s.results_bucket,
        s.max_body_bytes,
        devices,
        s.runners,
        callbacks,
        holder=holder,
        claim_ttl_s=s.claim_ttl_s,
        stage_cpu=s.stage_cpu,
        tracing=tracing,
        lanes={lane.name: (lane.weight, lane.cap) for lane in lanes},
    )
    return Parts(
        s,
        metrics,
        publisher,
        subscriber_client,
        storage,
        sink,
        cache,
        pipeline,
        callbacks,
        outbox,
        dispatcher,
        devices,
        acks,
        offload,
        tracing,
        traces_apart,
    )


class Budget:
    """The one shutdown grace period that every wait after SIGTERM draws from."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.reserve = min(SETTLE_RESERVE_S, seconds / 5)
        self._deadline = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = max(0.0, self._deadline - time.monotonic())
        return left if cap is None else min(left, cap)

    def for_work(self) -> float:
        """What running tasks may still take, keeping the reserve for settling."""
        return max(0.0, self.left() - self.reserve)


class Daemon:
    def __init__(
        self, settings: Settings, wrap_loader: Callable[[Loader], Loader] | None = None
    ) -> None:
        self.settings = settings
        self.wrap_loader = wrap_loader
        self.metrics = Metrics()
        self.health = Health()
        self.stop_requested = threading.Event()
        self.stop_now = threading.Event()  # a second SIGTERM: stop waiting
        # Set under its lock once the streams are about to open: before that nothing is
        # leased, and a stop signal ends the process at once (_request_stop).
        self.pulling = False
        self._pulling_lock = threading.Lock()

    def run(self) -> int:
        h = self.health
        try:
            server = HealthServer(
                h.live,
                h.ready,
                self.metrics.registry,
                self.settings.metrics_port,
                process=self.settings.process_index,
            )
        except CommandError as exc:  # the port is taken: a sentence, not a traceback
            log.critical(str(exc))
            return 2
        server.start()
        self._install_signal_handlers()
        try:
            parts = build(self.settings, self.metrics, self.wrap_loader)
            return self._serve(parts, server.port)
        except StartupError as exc:
            log.critical(str(exc))
            return 2
        finally:
            server.stop()

    def _serve(self, parts: Parts, metrics_port: int) -> int:
        s = self.settings
        lanes = s.lane_list()
        subscribers = [
            Subscriber(
                parts.subscriber_client,
                s.path("subscriptions", lane.subscription),
                s.lane_flow_control(lane),
                parts.dispatcher.on_message_of(lane.name),
                stream_ack_deadline_s=s.stream_ack_deadline_s,
                acks=parts.acks[lane.name],
                settled=partial(parts.dispatcher.wait_settled, lane.name),
                most_messages=s.lane_flow_control(lane) * s.lease_growth,
            )
            for lane in lanes
        ]
        for lane, subscriber in zip(lanes, subscribers, strict=True):
            try:
                subscription = subscriber.check_exists()
            except gexc.GoogleAPICallError as exc:
                parts.close()
                raise StartupError(
                    f"subscription {subscriber.subscription_path} is not usable "
                    f"({exc.message}); check GANNET_PROJECT, GANNET_SUBSCRIPTION and "
                    "GANNET_LANES (lane L's subscription is GANNET_SUBSCRIPTION-L)"
                ) from exc
            # The local emulator's subscriptions have no retry policy on purpose
            # (provision.py says why): said only of a real Pub/Sub's.
            dead_letters = s.path("topics", lane.dead_letter_topic)
            if not s.pubsub_emulator_host:
                for warning in policy_warnings(subscription, dead_letters):
                    log.warning(warning)
            check_dead_letter_topic(parts.publisher, dead_letters)
        # After the subscriptions' checks: a misspelt one failed only once the models
        # had loaded, tens of seconds each start of a crash loop.
        log.info(
            "warming models",
            extra={"fields": {"devices": parts.devices, "config": s.config_location()}},
        )
        try:
            parts.pipeline.warm(parts.devices)
        except Exception as exc:
            parts.close()
            raise StartupError(f"cannot load the models named in the config: {exc}") from exc
        parts.traces_apart.set()
        self.health.set(models_warm=True)
        if self._orphaned():
            log.error("the supervisor process is gone; exiting before pulling")
            parts.close()
            return 0
        self._lane_gauges(parts, lanes)
        backlogs = self._start_backlog_monitors(lanes)
        watch_pubsub = PubSubWatch(subscribers[0].ask, self.metrics.pubsub_last_reached)
        # What start-up built (torch, ultralytics, the models, the clients: some 300,000
        # objects) lives as long as the process. Frozen, it is out of the collector's
        # sight: a full collection, which stalls every thread, then walks only what the
        # message path made, instead of 120-160 ms here each time (docs/benchmark.md).
        gc.collect()
        gc.freeze()
        # Configs are checked for changes on a thread of their own, never a task's.
        watch = ConfigWatch(parts.pipeline.configs, s.config_every_s())
        watch.start()
        parts.outbox.start(parts.callbacks)
        parts.dispatcher.pool.start()
        with self._pulling_lock:  # a stop signal from now on drains (_request_stop)
            self.pulling = True
        streams = [subscriber.start() for subscriber in subscribers]
        watch_pubsub.start()
        sizer = self._lease_sizer(parts, lanes, subscribers)
        self.health.set(stream_open=True)
        log.info(
            "gannet is ready",
            extra={
                "fields": {
                    "subscriptions": [sub.subscription_path for sub in subscribers],
                    "lanes": s.lanes or "default",
                    "runners": s.runners,
                    "devices": parts.devices,
                    "metrics_port": metrics_port,
                }
            },
        )
        exit_code = 0
        while not self.stop_requested.wait(0.5):
            if self._orphaned():
                log.error("the supervisor process is gone; draining as on SIGTERM")
                self.health.set(shutting_down=True)
                break
            if stopped := [i for i, stream in enumerate(streams) if stream.done()]:
                self.health.set(stream_open=False, broken="streaming pull stopped")
                log.critical(
                    "streaming pull stopped unexpectedly",
                    extra={
                        "fields": {
                            "subscription": subscribers[stopped[0]].subscription_path,
                            "error": repr(streams[stopped[0]].exception()),
                        }
                    },
                )
                exit_code = 1
                break
            if (stuck := self._stuck(parts)) is not None:
                log.critical(stuck)
                self.health.set(broken=stuck)
                exit_code = 1
                break
            if (lost := parts.dispatcher.device_lost) is not None:
                # Logged where it was found (dispatch.py): drain, then exit for a restart
                # (the kubelet's, or the supervisor's), which gives a fresh CUDA context.
                self.health.set(broken=f"GPU lost: {lost}")
                exit_code = 1
                break
        sizer.stop()
        watch.stop()  # a check in flight is not waited for: ConfigWatch says why
        watch_pubsub.stop()
        for backlog in backlogs:
            # Not waited for: a poll in flight (up to its request's timeout when Cloud
            # Monitoring does not answer) only sets a gauge no one reads any more, and
            # waiting for it after the drain ran past a spot preemption's 15 s.
            backlog.stop(timeout_s=0.0)
        self._shutdown(parts, subscribers)
        return exit_code

    def _stuck(self, parts: Parts) -> str | None:
        """Why this process is stuck, if a task has run past GANNET_TASK_STALL_S. A GPU
        that hangs without an error, or a deadlock, leaves a runner waiting for good
        while the Pub/Sub client extends its message's lease for an hour: the pod stayed
        live and ready, its GPU idle. It exits for a restart instead (the kubelet's, or
        the supervisor's), the stuck task nacked at the end of the drain."""
        limit = self.settings.task_stall_s
        running_s = parts.dispatcher.pool.longest_running_s()
        if not limit or running_s <= limit:
            return None
        return (
            f"a task has run for {running_s:.0f} s, past GANNET_TASK_STALL_S ({limit:g} s): "
            "this process is stuck (a hung GPU or a deadlock); draining, then exiting "
            "for a restart"
        )

    def _orphaned(self) -> bool:
        """Whether this process's supervisor is gone. Its pid comes from the supervisor
        itself: a parent read here, once started, would already be the process that
        adopted an orphan whose supervisor died while it loaded torch and its models,
        and such a process would pull forever (kill -9 of a local run's supervisor)."""
        supervisor = self.settings.supervisor_pid
        return supervisor is not None and os.getppid() != supervisor

    def _lease_sizer(
        self, parts: Parts, lanes: list[Lane], subscribers: list[Subscriber]
    ) -> LeaseSizer:
        """Each lane's lease, from GANNET_MAX_MESSAGES up to GANNET_LEASE_GROWTH times it
        (started only when it may grow)."""
        s = self.settings
        leases = [
            LaneLease(lane.name, sub, sub.max_messages, sub.most_messages, lane.cap)
            for lane, sub in zip(lanes, subscribers, strict=True)
        ]
        sizer = LeaseSizer(leases, parts.dispatcher.pool, s.runners, self.metrics)
        if s.lease_growth > 1:
            sizer.start()
        return sizer

    def _lane_gauges(self, parts: Parts, lanes: list[Lane]) -> None:
        pool, m = parts.dispatcher.pool, self.metrics
        m.leased_waiting.set_function(pool.waiting)
        m.in_flight.set_function(pool.running)
        m.outstanding.set_function(lambda: pool.waiting() + pool.running())
        for lane in lanes:
            m.lane_waiting.labels(lane.name).set_function(partial(pool.waiting, lane.name))
            m.lane_in_flight.labels(lane.name).set_function(partial(pool.running, lane.name))

    def _start_backlog_monitors(self, lanes: list[Lane]) -> list[BacklogMonitor]:
        s = self.settings
        if not s.backlog_from_monitoring:
            return []
        monitors = [
            BacklogMonitor(
                s.project,
                lane.subscription,
                # By lane, each series made at the lane's first good poll: a 0 before
                # it would read as an empty subscription.
                self.metrics.backlog,
                self.metrics.oldest_unacked_age,
                s.backlog_poll_s,
                lane=lane.name,
                last_success_gauge=self.metrics.backlog_last_success,
                error_counter=self.metrics.backlog_poll_errors,
            )
            for lane in lanes
        ]
        for monitor in monitors:
            monitor.start()
        return monitors

    def _install_signal_handlers(self) -> None:
        on_signals(self._request_stop)  # not in the handler itself: signals.py says why

    def _request_stop(self, signum: int) -> None:
        """On the signals thread: the first SIGTERM or SIGINT drains, a second stops
        waiting for running work. Before the streams open, nothing is leased and there
        is nothing to drain: the process ends now. It used to wait for its models to
        load (tens of seconds, a second signal ignored too), past a pod's grace, where
        the kubelet's SIGKILL ended it without a word."""
        with self._pulling_lock:
            if not self.pulling:
                log.info("stop requested during start-up; exiting now (nothing is leased yet)")
                logging.shutdown()  # flush: os._exit runs no handlers
                os._exit(0)  # the main thread may be inside torch, which a signal cannot end
        if self.stop_requested.is_set():
            self.stop_now.set()
            return
        self.health.set(shutting_down=True)  # readiness false at once
        self.stop_requested.set()

    def _shutdown(self, parts: Parts, subscribers: list[Subscriber]) -> None:
        budget = Budget(self.settings.shutdown_grace_s)
        pool = parts.dispatcher.pool
        self.health.set(shutting_down=True)
        unstarted = pool.stop_accepting()
        for subscriber in subscribers:  # every lane's stream stops before any nack
            subscriber.stop_pulling_async()
        for subscriber in subscribers:
            if not subscriber.stream_closed.wait(budget.left(cap=10.0)):
                log.warning(
                    "stream did not confirm it stopped; nacking anyway",
                    extra={"fields": {"subscription": subscriber.subscription_path}},
                )
        for job in unstarted:
            job.finish(shutdown(job.item.task))
        log.info(
            "shutting down: stream stopped, queued messages nacked",
            extra={"fields": {"nacked": len(unstarted), "grace_s": budget.seconds}},
        )
        if not pool.join(budget.for_work(), abort=self.stop_now):
            abandoned = pool.abandon_running()
            reason = "second stop signal" if self.stop_now.is_set() else "grace period over"
            log.warning(
                f"{reason}; nacking tasks still running", extra={"fields": {"nacked": abandoned}}
            )
        # The nacks of abandoned work are sent even after a second signal: that is what
        # gives those messages to another pod now instead of after their lease.
        for subscriber in subscribers:
            subscriber.wait_closed(timeout=budget.left())
        forced = self.stop_now.is_set()
        # A sweep in flight queues what it took before the callbacks close and hand it
        # back; one cut off here leaves it to another pod after the lease.
        parts.outbox.stop(timeout_s=0.0 if forced else budget.left(cap=2.0))
        parts.callbacks.close(timeout_s=0.0 if forced else budget.left(), abort=self.stop_now)
        forced = self.stop_now.is_set()  # a second signal may have come meanwhile
        parts.outbox.finish(timeout_s=0.0 if forced else budget.left(cap=2.0))
        parts.close(timeout_s=0.0 if forced else budget.left())
        log.info("gannet stopped", extra={"fields": {"forced": forced}})


def batch_scheduling() -> None:
    """Every thread of this process under SCHED_BATCH; threads started later inherit it.

    Why: the daemon's threads hand work to each other all the time (the GIL around every
    torch, OpenCV, socket and database call; tasks to runners; inputs to the batcher),
    and each hand-off wakes a thread. Under the default policy the woken thread often
    preempts the one that woke it, which then waits to get the GIL back: two context
    switches where none was needed. SCHED_BATCH turns that wake-up preemption off and
    keeps fair sharing: in the plumbing bench, a quarter fewer context switches and about
    14 % less CPU per image (docs/benchmark.md). Any process may lower itself to it (no
    privilege), and the container runtimes' default seccomp profiles allow the call."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:  # not Linux
        log.warning("SCHED_BATCH is Linux only; threads keep the default policy")
        return
    tasks = Path("/proc/self/task")
    try:
        for tid in [int(entry.name) for entry in tasks.iterdir()]:
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except ProcessLookupError:  # that thread has ended meanwhile
                continue
    except OSError as exc:
        log.warning(
            "could not switch to SCHED_BATCH; threads keep the default policy",
            extra={"fields": {"error": str(exc)}},
        )
        return
    log.info("threads scheduled as SCHED_BATCH (GANNET_SCHED_BATCH)")


def run(settings: Settings, wrap_loader: Callable[[Loader], Loader] | None = None) -> int:
    """One daemon (under a supervisor, its log lines say which process it is)."""
    fields = {} if settings.process_index is None else {"process": settings.process_index}
    trace_project = settings.project if settings.traced else None
    logs.configure(settings.log_level, fields, trace_project=trace_project)
    for warning in unknown_variables():
        log.warning(warning)
    if settings.sched_batch:
        batch_scheduling()
    return Daemon(settings, wrap_loader).run()
