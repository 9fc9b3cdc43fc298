"""Several daemon processes in one pod, so that one interpreter's GIL does not cap it.

Why: a daemon holds the GIL for most of its own work per image (parsing, the Pub/Sub
client, urllib3, psycopg, pre- and post-processing), and one process's threads fighting
for it on several cores spend more CPU per image than they do on one core
(docs/benchmark.md). With `GANNET_PROCESSES=N` the pod's entry point becomes this
supervisor: it starts N ordinary daemons (`GANNET_PROCESSES=1`), each with its own
streaming pull, runners, database pool and copy of the models, pins each to its own
share of the pod's CPUs, and shares nothing else with them. Every guarantee stays what it
is per process: a message belongs to the one process that leased it, and is acked only
after that process committed its row.

What the supervisor does itself:
- serves the pod's port: /healthz (live while no process reports itself broken or keeps dying),
  /readyz (ready when every process is), /metrics (the processes' metrics summed, so the
  HPA and dashboards read the same series as from a one-process pod);
- passes SIGTERM on (a second one too: each process's own drain decides what it acks
  or nacks), and exits when all have exited, with the first non-zero exit code among
  them (0 when all exited 0). The processes run in process groups of their own, so that
  a terminal's Ctrl-C reaches them once, through the supervisor, not a second time from
  the terminal;
- starts a process again when it dies while the pod is not stopping (its leased messages
  come back from Pub/Sub after their lease, as after a pod's kill -9), backing off when
  one keeps dying, and counts it (gannet_daemon_process_restarts_total); once one has
  died CRASH_LOOP times in a row (each within RAN_A_WHILE_S of its start), it stops the
  others and exits with that process's code, so that the pod's container restarts and
  goes into CrashLoopBackOff, as a one-process pod's does (failing /healthz was not
  enough: the kubelet probes liveness only once the startup probe passed, and a pod
  crash-looping from its start never passed it, for 5 minutes); kills one that
  stopped answering for GANNET_PROCESS_HUNG_S (a one-process pod's liveness probe
  would restart it),
  so that it is started again, and at shutdown one that outlives its drain;
- keeps the pod's counters from going down: a process that misses a scrape counts with
  its last one, and the counters of one that died are carried over to its successor
  (Prometheus reads any decrease as a reset, and rates and alerts would spike).

A process notices its supervisor is gone (its parent is no longer the pid it was given:
GANNET_SUPERVISOR_PID) and drains itself, or exits before pulling if that happened while
it started (daemon.py), so no daemon outlives the pod's entry point; a supervisor that fails passes
SIGTERM on and waits for its processes before it exits (in a pod it is PID 1, whose exit
kills the others with SIGKILL).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from gannet import logs
from gannet.health import HealthServer
from gannet.settings import Settings
from gannet.signals import on_signals

log = logging.getLogger(__name__)

# A figure about the whole subscription (from Cloud Monitoring), the same in every
# process: the pod reports it once, not once per process. The times of the last good
# backlog poll and of Pub/Sub's last answer go with them (a timestamp must never be
# summed; the newest is the pod's). And the configs served: 1 per version, not per process.
SHARED_GAUGE_PREFIXES = (
    "gannet_subscription_",
    "gannet_backlog_last_success_",
    "gannet_pubsub_last_reached_",
    "gannet_config_info",
    "gannet_configs_rejected",
)
SCRAPE_TIMEOUT_S = 2.0
WATCH_S = 10.0  # how often the processes' /healthz is asked
STARTUP_S = 300.0  # a process this long after its start without any answer is killed
BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # before each restart of a process dying in a row
RAN_A_WHILE_S = 300.0  # a process that ran this long before dying starts a new count
# Deaths in a row (each within RAN_A_WHILE_S of its start) that end the supervisor: the
# back-off is spent, and the pod's container should restart, as a one-process pod's
# that keeps exiting does (CrashLoopBackOff). (A last step of 30 s was never waited.)
CRASH_LOOP = len(BACKOFF_S) + 1
STOP_MARGIN_S = 5.0  # past a process's own shutdown grace, before it is killed


def cpu_shares(cpus: Iterable[int], n: int) -> list[list[int]]:
    """The pod's CPUs in n contiguous groups, as even as they go; with fewer CPUs than
    processes, every process may use all of them (nothing to pin to)."""
    ordered = sorted(cpus)
    if len(ordered) < n:
        return [ordered] * n
    size, extra = divmod(len(ordered), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        groups.append(ordered[start:end])
        start = end
    return groups


def merge_metrics(texts: Iterable[str], retired: Iterable[str] = ()) -> list[Metric]:
    """The processes' metrics as one pod's: every sample summed over the processes that
    have it, except the subscription-wide gauges (the largest); `_created` samples are
    dropped (a sum of creation times means nothing). `retired`: the last metrics of
    processes that died, of which only the counters, histograms and summaries count."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    every = [(text, False) for text in texts] + [(text, True) for text in retired]
    for text, dead in every:
        for family in text_string_to_metric_families(text):
            if dead and family.type in ("gauge", "info", "stateset", "unknown"):
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            shared = family.type == "gauge" and family.name.startswith(SHARED_GAUGE_PREFIXES)
            into = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in into:
                    into[key] = max(into[key], sample.value) if shared else into[key] + sample.value
                else:
                    into[key] = sample.value
    for name, metric in families.items():
        metric.samples = [Sample(s, dict(labels), v) for (s, labels), v in values[name].items()]
    return list(families.values())


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def exposition(metrics: list[Metric]) -> str:
    """Metrics in Prometheus' text format (what a process's /metrics answers)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    return generate_latest(registry).decode()


@dataclass
class Child:
    """One daemon process and what the supervisor knows of it."""

    index: int
    cpus: list[int]
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0  # in a row, for the back-off
    restarts_total: int = 0
    exit_codes: list[int] = field(default_factory=list)
    answered_at: float | None = None  # its last answer on /healthz, this process
    scraped: str = ""  # its last good /metrics, this process
    scraped_ask: int = 0  # which ask that answer was for (they overlap: the newest wins)
    retired: str = ""  # the counters of its earlier processes, summed

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# Never through a proxy: urllib's default opener sends even 127.0.0.1 to HTTP_PROXY
# unless NO_PROXY names it, and a pod whose egress goes through a proxy may not; its
# processes then never answered and were killed as hung, again and again.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int, bytes]:
    """Status and body of a child's endpoint; (0, b"") when it does not answer."""
    try:
        with _LOCAL.open(url, timeout=SCRAPE_TIMEOUT_S) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, urllib.error.URLError, http.client.HTTPException):
        # HTTPException: an answer cut short (IncompleteRead) by a process killed while
        # it answered, or no HTTP at all; it is no answer, as a refused connection is.
        return 0, b""


class Supervisor:
    def __init__(self, settings: Settings, command: list[str]) -> None:
        """`command` starts one daemon (`python -m gannet run`, or the bench's replay)."""
        self.settings = settings
        self.command = command
        shares = cpu_shares(os.sched_getaffinity(0), settings.processes)
        base = settings.metrics_port
        self.children = [
            Child(index=i, cpus=share, metrics_port=_child_port(base, i))
            for i, share in enumerate(shares)
        ]
        self.stopping = threading.Event()
        # A probe asks every process at once, and the kubelet's two probes and a scrape
        # may come together: with one thread a process, a hung one (2 s a question)
        # queued the others' questions past the liveness probe's 5 s timeout.
        self._asking = ThreadPoolExecutor(3 * len(self.children) + 1, thread_name_prefix="ask")
        self._metrics_lock = threading.Lock()  # scraped and retired: scrapes vs _reap
        self._asks = 0  # scrapes begun, numbered

    # --------------------------------------------------------------- processes

    def _start(self, child: Child) -> None:
        env = {
            **os.environ,
            "GANNET_PROCESSES": "1",
            "GANNET_PROCESS_INDEX": str(child.index),
            "GANNET_SUPERVISOR_PID": str(os.getpid()),
            "GANNET_METRICS_PORT": str(child.metrics_port),
            # Only the first process polls Cloud Monitoring for the backlog gauges.
            "GANNET_BACKLOG_FROM_MONITORING": str(
                self.settings.backlog_from_monitoring and child.index == 0
            ).lower(),
        }
        # A process group of its own: a terminal's Ctrl-C signals the foreground group,
        # and a daemon in ours would get that SIGINT besides the SIGTERM passed on here,
        # which it would take for a second signal (stop waiting for running work).
        child.proc = subprocess.Popen(
            self.command, env=env, stdin=subprocess.DEVNULL, process_group=0
        )
        child.started_at = time.monotonic()
        child.answered_at = None
        if self.stopping.is_set():  # a stop signal came while it was being started
            child.proc.send_signal(signal.SIGTERM)
        try:
            # Before its first thread starts: threads take their CPUs from the main one.
            os.sched_setaffinity(child.proc.pid, child.cpus)
        except OSError as exc:  # it died at once; the loop restarts it
            log.warning("cannot pin a daemon process", extra={"fields": {"error": str(exc)}})
        log.info(
            "daemon process started",
            extra={
                "fields": {
                    "child": child.index,
                    "pid": child.proc.pid,
                    "cpus": child.cpus,
                    "metrics_port": child.metrics_port,
                }
            },
        )

    def _reap(self, now: float) -> None:
        """Start again any process that died while the pod is not stopping."""
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            child.exit_codes.append(code)
            child.proc = None
            with self._metrics_lock:  # its counters go on in its successor's
                child.retired = exposition(merge_metrics([], [child.retired, child.scraped]))
                child.scraped = ""
            if self.stopping.is_set():
                continue
            # One that ran a while has its count reset already (_start_due): a fresh failure.
            wait = BACKOFF_S[min(child.restarts, len(BACKOFF_S) - 1)]
            child.restarts += 1
            child.restarts_total += 1
            if child.restarts >= CRASH_LOOP:
                log.critical(
                    f"daemon process {child.index} died {child.restarts} times in a row (exit "
                    f"code {code}): stopping the others and exiting with its code, so that "
                    "the pod's container restarts (CrashLoopBackOff, as a one-process pod's)",
                    extra={"fields": {"child": child.index, "exit_code": code}},
                )
                self._on_signal(signal.SIGTERM)
                return
            log.error(
                "daemon process exited; starting it again",
                extra={
                    "fields": {
                        "child": child.index,
                        "exit_code": code,
                        "restart_in_s": wait,
                        "restarts": child.restarts,
                    }
                },
            )
            child.started_at = now + wait  # _loop starts it once this time has come

    def _loop(self) -> None:
        watched = time.monotonic()
        while not self.stopping.wait(0.5):
            now = time.monotonic()
            if now - watched >= WATCH_S:
                self._watch(now)
                watched = now
            # First: a process that has run a while starts a fresh count, whether it
            # still runs or died since the last look; a dead one is started again at a
            # later look (its back-off is a second at least).
            self._start_due(now)
            self._reap(now)

    def _watch(self, now: float) -> None:
        """Every WATCH_S: a hung process killed, and every process's metrics scraped,
        not only when Prometheus asks (every 15-30 s): what a process counted since its
        last scrape dies with it."""
        self._kill_hung(now)
        self._scrape()

    def _start_due(self, now: float) -> None:
        """Start again each process whose back-off is over; one that has run
        RAN_A_WHILE_S since is no longer counted as crash-looping."""
        for child in self.children:
            if child.proc is None and child.exit_codes and now >= child.started_at:
                self._start(child)
            elif child.restarts and now - child.started_at > RAN_A_WHILE_S:
                child.restarts = 0

    def _kill_hung(self, now: float) -> None:
        """Kill a process that stopped answering /healthz (deadlocked, or its health
        thread gone): _reap then starts it again. A one-process pod's liveness probe
        would restart it; here the pod's /healthz counts it as starting forever."""
        for child, (code, _) in zip(self.children, self._ask("/healthz"), strict=True):
            if code or not child.alive():  # an answer: _ask noted it in answered_at
                continue
            silent_since = child.answered_at
            hung_s = self.settings.process_hung_s  # since its last answer
            limit = hung_s if silent_since is not None else STARTUP_S
            if now - (silent_since if silent_since is not None else child.started_at) > limit:
                assert child.proc is not None
                log.error(
                    "daemon process stopped answering; killing it to start it again",
                    extra={"fields": {"child": child.index, "silent_s": round(limit)}},
                )
                child.proc.kill()

    # --------------------------------------------------------------- probes

    def _ask(self, path: str) -> list[tuple[int, bytes]]:
        """Every process's answer on `path`, asked at once (a slow one must not make the
        pod's probe time out); (0, b"") for a process not running or not answering."""
        alive = [c.alive() for c in self.children]
        futures = [
            self._asking.submit(_get, c.url(path)) if up else None
            for c, up in zip(self.children, alive, strict=True)
        ]
        answers = [f.result() if f is not None else (0, b"") for f in futures]
        now = time.monotonic()
        for child, (code, _) in zip(self.children, answers, strict=True):
            if code:  # any answer: the hung-process watch counts from the last one
                child.answered_at = now
        return answers

    def live(self) -> tuple[bool, dict[str, object]]:
        states: dict[str, object] = {}
        broken = None
        for child, (code, body) in zip(self.children, self._ask("/healthz"), strict=True):
            states[str(child.index)] = code or self._silent_state(child)
            if code == 503:
                broken = f"process {child.index}: {json.loads(body or b'{}').get('broken')}"
        return broken is None, {"broken": broken, "processes": states}

    def _silent_state(self, child: Child) -> str:
        """What a process that did not answer is doing, as far as the supervisor knows."""
        if self.stopping.is_set():
            return "stopping" if child.alive() else "stopped"
        if not child.alive():
            return "restarting"
        return "not answering" if child.answered_at is not None else "starting"

    def ready(self) -> tuple[bool, dict[str, object]]:
        answers = zip(self.children, self._ask("/readyz"), strict=True)
        states = {str(c.index): code == 200 for c, (code, _) in answers}
        ok = all(states.values()) and not self.stopping.is_set()
        return ok, {"processes": states, "shutting_down": self.stopping.is_set()}

    def _scrape(self) -> None:
        """Each process's /metrics, kept: a process that misses a scrape counts with its
        last one, and a killed one's last is carried over to its successor."""
        with self._metrics_lock:
            self._asks += 1
            ask = self._asks
        asked = [child.proc for child in self.children]
        answers = self._ask("/metrics")
        with self._metrics_lock:
            for child, proc, (code, body) in zip(self.children, asked, answers, strict=True):
                # Not one reaped meanwhile, nor older than the answer kept: the watch's
                # scrape and Prometheus' overlap, and an older one kept last would make
                # the pod's counters go down (a reset, to Prometheus).
                if code == 200 and child.proc is proc and ask > child.scraped_ask:
                    child.scraped, child.scraped_ask = body.decode(), ask

    def collect(self) -> list[Metric]:
        self._scrape()
        with self._metrics_lock:
            texts = [child.scraped for child in self.children]
            retired = [child.retired for child in self.children]
        restarts = Metric(
            "gannet_daemon_process_restarts",
            "Daemon processes the supervisor started again after they died.",
            "counter",
        )
        restarts.add_sample(
            "gannet_daemon_process_restarts_total", {}, sum(c.restarts_total for c in self.children)
        )
        return [*merge_metrics(texts, retired), restarts]

    # --------------------------------------------------------------- run

    def _on_signal(self, signum: int) -> None:
        """On the signals thread (signals.py: not in the handler, which could deadlock
        on the lock Popen.wait holds in the main thread)."""
        self.stopping.set()
        for child in self.children:
            if child.alive():
                assert child.proc is not None
                child.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        registry = CollectorRegistry()
        registry.register(_Merged(self))
        server = HealthServer(self.live, self.ready, registry, self.settings.metrics_port)
        on_signals(self._on_signal)
        log.info(
            "starting daemon processes",
            extra={
                "fields": {
                    "processes": len(self.children),
                    "runners_each": self.settings.runners,
                    "metrics_port": server.port,
                }
            },
        )
        failed = False
        try:
            for child in self.children:
                self._start(child)
            server.start()
            self._loop()
        except Exception:
            # In a pod the supervisor is PID 1: when it exits, the kernel kills every
            # other process of the pod with SIGKILL, and their running tasks wait out
            # their lease. So whatever ended the loop, the daemons drain first.
            log.exception("the supervisor failed; stopping the daemon processes")
            failed = True
            self._on_signal(signal.SIGTERM)
        try:
            self._wait_for_children()
        finally:
            server.stop()
            self._asking.shutdown(wait=False)
        last = [c.exit_codes[-1] for c in self.children if c.exit_codes]
        worst = next((code for code in last if code != 0), 1 if failed else 0)
        if worst < 0:  # killed by a signal: report it as a shell would
            worst = 128 - worst
        log.info("daemon processes stopped", extra={"fields": {"exit_codes": last}})
        return worst

    def _wait_for_children(self) -> None:
        """Each process's exit, within its own drain's grace and STOP_MARGIN_S; one
        still running then (wedged: stopped, or stuck where its drain cannot end it) is
        killed, and said, instead of holding the pod until the kubelet's SIGKILL, which
        says nothing of which process or why."""
        allowed_s = self.settings.shutdown_grace_s + STOP_MARGIN_S
        deadline = time.monotonic() + allowed_s
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    f"daemon process {child.index} did not exit within {allowed_s:g} s of "
                    "SIGTERM; killing it",
                    extra={"fields": {"child": child.index, "pid": child.proc.pid}},
                )
                child.proc.kill()
                child.proc.wait()
            child.exit_codes.append(child.proc.returncode)


def supervise(settings: Settings, command: list[str]) -> int:
    """The pod's entry point when settings.supervises. Imports nothing of the daemon's
    (no torch): the supervisor stays a small process."""
    logs.configure(settings.log_level)
    return Supervisor(settings, command).run()


class _Merged(Collector):
    """/metrics of the pod: its processes' metrics, scraped and merged on each request."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        return self._supervisor.collect()


def _child_port(base: int, index: int) -> int:
    """Each process's own health/metrics port, next to the pod's; 0 (tests): any free one."""
    if base != 0:
        return base + 1 + index
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
