"""`gannet run`: wires the parts of DESIGN.md together and owns start-up and shutdown.

Shutdown order matters (SIGTERM from kubectl scale, node drain or spot preemption):
readiness goes false at once, the stream stops pulling, queued-but-unstarted messages are
nacked so another pod gets them now, in-flight work gets the grace period to finish and
ack, whatever is still running after it is nacked, then the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from google.api_core import exceptions as gexc

from gannet import clients, logs
from gannet.backlog import BacklogMonitor
from gannet.callback import Callbacks, build_callbacks
from gannet.errors import PermanentError
from gannet.health import Health, HealthServer
from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, ModelResolver, tenant_model_lister, yolo_loader
from gannet.outcome import Decision, Outcome, Processor, Settler, shutdown
from gannet.pipeline import Limits, Pipeline, build_configs
from gannet.pool import Job, RunnerPool, resolve_devices
from gannet.settings import Settings
from gannet.sink import SCHEMA_VERSION, Sink
from gannet.storage import Storage, local_version
from gannet.subscriber import Subscriber
from gannet.task import parse_task

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The daemon cannot start; the text says what to fix."""


def model_version(storage: Storage) -> Any:
    def version_of(uri: str) -> str:
        return storage.generation(uri) if uri.startswith("gs://") else local_version(uri)

    return version_of


def model_file(storage: Storage, cache_dir: Path) -> Any:
    def local_path(uri: str, version: str) -> Path:
        if uri.startswith("gs://"):
            return storage.download_to(uri, version, cache_dir)
        return Path(uri)

    return local_path


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health()
        self.stop_requested = threading.Event()

    def run(self) -> int:
        s = self.settings
        server = HealthServer(self.health, self.metrics, s.metrics_port)
        server.start()
        try:
            return self._run(server)
        except StartupError as exc:
            log.critical(str(exc))
            return 2
        finally:
            server.stop()

    def _run(self, server: HealthServer) -> int:
        s = self.settings
        self._install_signal_handlers()
        try:
            publisher, subscriber_client = clients.pubsub_clients(s)
            storage = Storage(clients.storage_client(s))
        except clients.NoCredentials as exc:
            raise StartupError(str(exc)) from exc
        sink = Sink(s.database_url, pool_size=s.db_pool_size, timeout_s=s.db_timeout_s)
        try:
            sink.open(wait_s=15)
        except Exception as exc:
            raise StartupError(
                f"cannot connect to PostgreSQL at GANNET_DATABASE_URL ({exc}); is it running?"
            ) from exc
        if sink.schema_version() < SCHEMA_VERSION:
            raise StartupError("database schema is not current: run `gannet db migrate` first")
        try:
            configs = build_configs(s, storage, self.metrics)
        except (ValueError, OSError) as exc:
            raise StartupError(f"cannot load GANNET_CONFIG_URI: {exc}") from exc
        devices = resolve_devices(s.devices)
        cache = ModelCache(
            yolo_loader(model_file(storage, s.model_cache_dir), trace=s.torchscript),
            self.metrics,
            max_batch=s.batch_size,
            window_s=s.batch_window_ms / 1000,
            budget_bytes=s.model_memory_budget_mb * 1024 * 1024 or None,
            cpu_threads=s.torch_threads,
        )
        pipeline = Pipeline(
            configs,
            storage,
            cache,
            ModelResolver(
                model_version(storage),
                ttl_s=s.model_check_s,
                list_tenant_models=(
                    tenant_model_lister(storage.client, s.models_bucket)
                    if s.models_bucket
                    else None
                ),
            ),
            Limits(s.allowed_buckets, s.max_image_bytes, s.max_image_pixels),
        )
        log.info("warming models", extra={"fields": {"devices": devices, "config": configs.uri}})
        try:
            pipeline.warm(devices)
        except Exception as exc:
            raise StartupError(f"cannot load the models named in the config: {exc}") from exc
        self.health.set(models_warm=True)
        if self.stop_requested.is_set():
            log.info("stop requested during start-up; exiting before pulling")
            cache.close()
            sink.close()
            return 0

        callbacks = build_callbacks(s, sink.set_callback_status, self.metrics)
        processor = Processor(pipeline, sink, storage, s.results_bucket, self.metrics, callbacks)
        settler = Settler(publisher, s.dead_letter_topic_path(), s.subscription, self.metrics)
        pool = RunnerPool(
            devices,
            s.runners,
            handle=lambda job, device: processor.process(*job.payload, device),
            on_abandon=lambda job: shutdown(job.payload[0]),
        )
        self.metrics.leased_waiting.set_function(pool.waiting)
        self.metrics.in_flight.set_function(pool.running)
        self.metrics.outstanding.set_function(lambda: pool.waiting() + pool.running())

        def on_message(message: Any) -> None:
            started = time.perf_counter()
            attempt = message.delivery_attempt
            try:
                task = parse_task(message.data, s.max_body_bytes)
            except PermanentError as err:
                outcome = processor.reject_body(message.data, err, attempt)
                settler.settle(message, outcome, time.perf_counter() - started)
                return
            try:
                loaded = pipeline.check(task)  # cheap checks: poison never takes a runner
            except PermanentError as err:
                outcome = processor.reject(task, err, attempt)
            else:
                job = Job(payload=(task, loaded, attempt))
                if pool.submit(job):
                    job.done.wait()
                    outcome = job.outcome or Outcome(Decision.NACK, "error", task=task)
                else:
                    outcome = shutdown(task)
            settler.settle(message, outcome, time.perf_counter() - started)

        subscriber = Subscriber(
            subscriber_client,
            s.subscription_path(),
            s.flow_control_messages,
            on_message,
            stream_ack_deadline_s=s.stream_ack_deadline_s,
        )
        try:
            subscriber.check_exists()
        except gexc.GoogleAPICallError as exc:
            raise StartupError(
                f"subscription {s.subscription_path()} is not usable ({exc.message}); "
                "check GANNET_PROJECT / GANNET_SUBSCRIPTION"
            ) from exc
        backlog = None
        if s.backlog_from_monitoring:
            backlog = BacklogMonitor(
                s.project,
                s.subscription,
                self.metrics.backlog,
                self.metrics.oldest_unacked_age,
                s.backlog_poll_s,
                error_counter=self.metrics.backlog_poll_errors,
            )
            backlog.start()
        pool.start()
        stream = subscriber.start()
        self.health.set(stream_open=True)
        log.info(
            "gannet is ready",
            extra={
                "fields": {
                    "subscription": s.subscription_path(),
                    "runners": s.runners,
                    "devices": devices,
                    "metrics_port": server.port,
                }
            },
        )

        exit_code = 0
        while not self.stop_requested.wait(0.5):
            if stream.done():
                self.health.set(stream_open=False, broken="streaming pull stopped")
                log.critical(
                    "streaming pull stopped unexpectedly",
                    extra={"fields": {"error": repr(stream.exception())}},
                )
                exit_code = 1
                break
        self._shutdown(subscriber, pool, cache, sink, callbacks)
        if backlog is not None:
            backlog.stop()
        return exit_code

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            self.health.set(shutting_down=True)  # readiness false at once
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _shutdown(
        self,
        subscriber: Subscriber,
        pool: RunnerPool,
        cache: ModelCache,
        sink: Sink,
        callbacks: Callbacks,
    ) -> None:
        grace = self.settings.shutdown_grace_s
        deadline = time.monotonic() + grace
        self.health.set(shutting_down=True)
        unstarted = pool.stop_accepting()
        if not subscriber.stop_pulling():
            log.warning("stream did not confirm it stopped; nacking anyway")
        for job in unstarted:
            job.finish(shutdown(job.payload[0]))
        log.info(
            "shutting down: stream stopped, queued messages nacked",
            extra={"fields": {"nacked": len(unstarted), "grace_s": grace}},
        )
        if not pool.join(max(0.0, deadline - time.monotonic())):
            abandoned = pool.abandon_running()
            log.warning(
                "grace period over; nacking tasks still running",
                extra={"fields": {"nacked": abandoned}},
            )
        subscriber.wait_closed(timeout=10)
        callbacks.close(timeout_s=max(1.0, deadline - time.monotonic()))
        cache.close()
        sink.close()
        log.info("gannet stopped")


def run(settings: Settings) -> int:
    logs.configure(settings.log_level)
    return Daemon(settings).run()
