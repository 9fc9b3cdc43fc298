"""Optional HTTP callback with a task's result summary, sent after the result is committed.

A callback URL is attacker-controlled input that makes the worker open a connection from
inside the cluster, so it is checked the way an SSRF filter must be: https only (unless
configured), and every address the host resolves to must be public: no private,
loopback, link-local (the metadata server is 169.254.169.254), shared, multicast or
reserved ranges. The connection then goes to the address that was checked, never to a
second DNS answer, so a rebinding name cannot swap in an internal address. Redirects are
not followed.

A callback never decides what happens to the message: the result is already committed
and the message is acked whatever the receiver does. The outcome (delivered, failed
after retries, refused) is recorded on the task's row, and callbacks run on their own
small thread pool so a slow receiver holds neither a runner nor the ack. Until that
outcome the callback is owed in PostgreSQL, committed with the result: one its pod
did not send (the pod killed, or stopping) is sent by another (callback_outbox.py).
"""

from __future__ import annotations

import contextvars
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import itertools
import json
import logging
import math
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace

from gannet.errors import ErrorCode, GannetError, PermanentError, TransientError
from gannet.metrics import Metrics
from gannet.settings import Settings
from gannet.socket_deadlines import SocketDeadlines
from gannet.task import Task
from gannet.tracing import TRACER

log = logging.getLogger(__name__)

# Not covered by ipaddress' is_private & co. on every Python version, and never a
# legitimate receiver: carrier-grade NAT (also Alibaba's metadata), and AWS' IPv6 metadata.
_BLOCKED_NETWORKS = [
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("192.0.0.0/24"),
]
_METADATA_HOSTS = {"metadata", "metadata.google.internal", "metadata.goog"}


@dataclass(frozen=True)
class CallbackPolicy:
    timeout_s: float = 5.0
    retries: int = 2  # after the first attempt
    backoff_s: float = 0.5  # doubled per retry
    allow_http: bool = False
    allow_private: bool = False  # local runs and tests only: lets loopback through
    ca_file: str | None = None  # extra CA bundle for receivers with a private CA
    signing_key: bytes | None = None  # signs each attempt (signature_headers)


class CallbackRefused(PermanentError):
    """The URL may not be called (scheme or address); retrying cannot change that."""


def _refuse(message: str) -> CallbackRefused:
    return CallbackRefused(ErrorCode.SCHEMA_ERROR, message)


def blocked_reason(address: str) -> str | None:
    """Why an IP address must not be called, or None when it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    elif isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
        # 2002:a9fe:a9fe::1 is global to Python, and a 6to4 relay takes it to the IPv4
        # address inside: 169.254.169.254 there.
        inner = blocked_reason(str(ip.sixtofour))
        if inner is not None:
            return f"{inner}, inside a 6to4 address"
    checks = [
        ("loopback", ip.is_loopback),
        ("link-local (metadata server range)", ip.is_link_local),
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
        ("not globally routable", any(ip in net for net in _BLOCKED_NETWORKS)),
        ("not globally routable", not ip.is_global),
    ]
    for reason, hit in checks:
        if hit:
            return reason
    return None


# Lookups given up on keep their threads until the resolver answers: at most this many
# at once (a DNS outage made a thread per attempt, hundreds in seconds in a review).
LOOKUPS_AT_ONCE = 32
_LOOKUPS = threading.BoundedSemaphore(LOOKUPS_AT_ONCE)


def _lookup(host: str, port: int, timeout_s: float) -> list[tuple[Any, ...]]:
    """getaddrinfo, given up after `timeout_s` (TransientError: the attempt is retried).
    The C resolver takes no deadline: where the DNS server drops queries, its own
    timeouts and retries, times each search domain a pod's resolv.conf makes it try
    (ndots:5 in Kubernetes), held the callback's thread, and the pod's shutdown, for as
    long. The lookup runs on a thread of its own (a daemon thread: one still waiting does
    not hold the process's exit), left to end on its own once given up."""
    if not _LOOKUPS.acquire(blocking=False):
        raise TransientError(
            ErrorCode.DEPENDENCY_UNAVAILABLE,
            f"{LOOKUPS_AT_ONCE} lookups of callback hosts still wait for the resolver",
        )
    answer: list[tuple[Any, ...]] = []
    failure: list[OSError | UnicodeError] = []
    done = threading.Event()

    def look() -> None:
        try:
            answer.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:  # raised on the caller's thread below
            failure.append(exc)
        finally:
            _LOOKUPS.release()
            done.set()

    threading.Thread(target=look, name="callback-dns", daemon=True).start()
    if not done.wait(timeout_s):
        raise TransientError(
            ErrorCode.DEPENDENCY_UNAVAILABLE,
            f"resolving callback host {host!r} took over {timeout_s:g} s",
        )
    if failure:
        raise failure[0]
    return answer


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the checked IP the connection goes to


def resolve(url: str, policy: CallbackPolicy) -> Target:
    """The URL's host resolved and checked; CallbackRefused when any answer is internal.

    Every answer is checked, not only the first: a name that resolves to one public and
    one private address is refused, since the client might pick either.
    """
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        # http.client refuses to send it: every attempt failed, retried as transient.
        raise _refuse("callback URL has spaces or control characters: percent-encode them")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and policy.allow_http):
        raise _refuse(f"callback must be https (got {scheme or 'no scheme'}://)")
    if parts.username or parts.password:
        raise _refuse("callback URL must not carry credentials")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise _refuse("callback URL has no host")
    if host in _METADATA_HOSTS and not policy.allow_private:
        raise _refuse(f"callback host {host!r} is the metadata server")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise _refuse(f"callback URL has a bad port: {exc}") from exc
    try:
        answers = _lookup(host, port, policy.timeout_s)
    except UnicodeError as exc:  # the name cannot be IDNA-encoded: it will never resolve
        raise _refuse(f"callback host {host!r} is not a valid host name ({exc})") from exc
    except socket.gaierror as exc:
        raise TransientError(
            ErrorCode.DEPENDENCY_UNAVAILABLE, f"cannot resolve callback host {host!r}: {exc}"
        ) from exc
    addresses = list(dict.fromkeys(str(a[4][0]) for a in answers))
    if not addresses:
        raise TransientError(ErrorCode.DEPENDENCY_UNAVAILABLE, f"{host!r} has no address")
    if not policy.allow_private:
        for address in addresses:
            reason = blocked_reason(address)
            if reason:
                # The address goes to the log, not to the row: whoever sets a task's
                # callback_url reads its callback_status, and could map the names the
                # worker's network resolves (its VPC's private zones) one task at a time.
                log.warning(
                    "callback refused: its host resolves to an internal address",
                    extra={"fields": {"host": host, "address": address, "reason": reason}},
                )
                raise _refuse(
                    f"callback host {host!r} resolves to an address that is {reason} "
                    "(the worker's log has it)"
                )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not path.isascii():  # http.client sends the request line as ASCII
        raise _refuse("callback URL's path and query must be ASCII: percent-encode the rest")
    return Target(scheme, host, port, path, addresses[0])


class _Pinned:
    """Connects to the checked address (the Host header and TLS keep the name), the
    socket watched until the request's deadline."""

    port: int
    timeout: float | None

    def _pin(self, target: Target, timeout: float, watchdog: SocketDeadlines) -> None:
        self._address = target.address
        self._watchdog = watchdog
        self._deadline = time.monotonic() + timeout

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self._watchdog.watch(self, self._deadline, sock)
        return sock


class _PinnedHTTPConnection(_Pinned, http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float, watchdog: SocketDeadlines) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._pin(target, timeout, watchdog)

    def connect(self) -> None:
        self.sock = self._open()


class _PinnedHTTPSConnection(_Pinned, http.client.HTTPSConnection):
    """TLS with SNI and certificate checks for the host name."""

    def __init__(
        self, target: Target, timeout: float, watchdog: SocketDeadlines, context: ssl.SSLContext
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._pin(target, timeout, watchdog)
        self._ctx = context

    def connect(self) -> None:
        self.sock = self._ctx.wrap_socket(self._open(), server_hostname=self.host)


RETRY = "retry"  # an attempt's outcome that a later attempt may change; never recorded
DROPPED = "dropped"  # another worker took the callback over: its outcome, not ours


@dataclass(frozen=True)
class Delivery:
    status: str  # delivered | failed | refused (| RETRY, between attempts)
    detail: str
    attempts: int
    # Not sent because this worker is stopping: no outcome, another pod sends it.
    unsent: bool = False

    def row_text(self) -> str:
        return f"{self.status}: {self.detail}"[:1000]


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


def signature_headers(key: bytes, body: bytes, now: float) -> dict[str, str]:
    """Gannet-Timestamp (Unix seconds) and Gannet-Signature (`v1=` and the hex HMAC-SHA256,
    under the deployment's key, of the timestamp, a dot and the body as sent). A receiver
    recomputes it over the bytes it received to know the callback came from a holder of
    the key, unchanged; the timestamp, signed with the body, lets it refuse a replay of
    an old one (the README's Result callbacks has a receiver's check)."""
    timestamp = str(int(now))
    mac = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"Gannet-Timestamp": timestamp, "Gannet-Signature": f"v1={mac}"}


def summary(task: Task, result: dict[str, Any], result_uri: str) -> dict[str, Any]:
    """What the receiver gets: enough to act on, the full result stays at result_uri."""
    counts: dict[str, Any] = {}
    reached = False  # any step's model kept all the boxes it may: its counts may be short
    for key in ("segmentation", "detection", "classification", "estimation"):
        section = result.get(key)
        if isinstance(section, dict) and isinstance(section.get("counts"), dict):
            counts[key] = section["counts"]
            reached = reached or section.get("max_detections_reached") is True
    return {
        "task_id": task.task_id,
        "tenant_id": task.tenant_id,
        "pipeline": task.pipeline,
        "status": "succeeded",
        "session_id": task.session_id,
        "image_id": task.image_id,
        "result_uri": result_uri,
        "counts": counts,
        "max_detections_reached": reached,
        "duration_ms": result.get("duration_ms"),
        "processed_at": result.get("processed_at"),
    }


class CallbackClient:
    """POSTs JSON, one attempt at a time (Callbacks schedules the retries: network
    errors, 429 and 5xx); each attempt (connecting, sending, the answer's status and
    headers) ends at the policy's timeout."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self.policy = policy
        self._stopped = threading.Event()
        self._context = ssl.create_default_context(cafile=policy.ca_file)
        self._watchdog = SocketDeadlines("callback-watchdog")

    def stop(self) -> None:
        """Ends the attempts in flight and makes no more: for a pod that must exit."""
        self._stopped.set()
        self._watchdog.expire_all()

    def backoff_s(self, number: int) -> float:
        """The wait after attempt `number` failed: backoff_s, doubled per attempt."""
        return self.policy.backoff_s * 2.0 ** (number - 1)

    def attempt(self, url: str, body: bytes, number: int) -> Delivery:
        """Attempt `number` (from 1); RETRY when another may succeed (the network, a
        name that did not resolve, 429, 5xx)."""
        if self._stopped.is_set():
            return _unsent(number - 1)
        try:
            target = resolve(url, self.policy)  # again per attempt: answers may change
        except CallbackRefused as exc:
            return Delivery("refused", exc.message, number - 1)
        except TransientError as exc:
            return Delivery(RETRY, exc.message, number)
        if self._stopped.is_set():  # stopped while the name resolved: nothing was sent
            return _unsent(number - 1)
        try:
            status = self._post(target, body)
        except (OSError, http.client.HTTPException) as exc:
            return Delivery(RETRY, f"{exc.__class__.__name__}: {exc}", number)
        if 200 <= status < 300:
            return Delivery("delivered", f"HTTP {status}", number)
        if status != 429 and status < 500:
            return Delivery("failed", f"HTTP {status}", number)  # the receiver said no
        return Delivery(RETRY, f"HTTP {status}", number)

    def _post(self, target: Target, body: bytes) -> int:
        timeout = self.policy.timeout_s
        conn: _PinnedHTTPConnection | _PinnedHTTPSConnection
        if target.scheme == "https":
            conn = _PinnedHTTPSConnection(target, timeout, self._watchdog, self._context)
        else:
            conn = _PinnedHTTPConnection(target, timeout, self._watchdog)
        headers = {"Content-Type": "application/json", "User-Agent": "gannet-callback"}
        if self.policy.signing_key is not None:  # per attempt: its own timestamp
            headers.update(signature_headers(self.policy.signing_key, body, time.time()))
        failure: Exception | None = None
        try:
            conn.request("POST", target.path, body=body, headers=headers)
            # The status is all that is needed: the body is left unread (the connection
            # closes), so a receiver that trickles one cannot hold the thread.
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            failure = exc
        finally:
            # A socket shut at the deadline reads as the receiver's end (headers cut
            # short parse as complete): whatever the read made of it, it is a timeout.
            expired = self._watchdog.forget(conn)
            conn.close()
        if expired:
            if self._stopped.is_set():
                raise TimeoutError("cut short by the shutdown") from failure
            raise TimeoutError(f"timed out: no complete answer within {timeout:g} s") from failure
        if failure is not None:
            raise failure
        return status


def _unsent(attempts: int) -> Delivery:
    return Delivery("failed", "worker shut down", attempts, unsent=True)


class Owed(Protocol):
    """Where callbacks are owed until their outcome (callback_outbox.Outbox)."""

    def record(self, task_id: str, tenant_id: str, status: str) -> None:
        """The final outcome, on the task's row: the callback is owed no more. One that
        cannot be written now is kept and written later; GannetError: it never will."""

    def hand_back(self, unsent: list[tuple[str, int]]) -> None:
        """(task_id, attempts made) of callbacks this worker stops without sending:
        another pod's to send."""


# Callbacks one tenant may have waiting; past that its next ones are recorded as failed.
QUEUE_PER_TENANT = 1000
NOT_SENT_SAID_EVERY_S = 60.0  # a full queue's refusals: one warning a minute


@dataclass
class _Job:
    task: Task
    body: bytes
    context: contextvars.Context  # the task's: with tracing on, each attempt's span joins it
    number: int = 1  # the next attempt's


class Callbacks:
    """Sends callbacks off the runner threads and records each outcome on the row.

    Queued per tenant and taken in turn, at most a quarter of the threads on one
    tenant's at a time, and one while its receiver fails. Why: a receiver that hangs
    holds a thread for each attempt (its timeout); in one queue, one tenant's dead
    receiver held every thread and every tenant's callbacks waited behind its, and with
    half the threads each, two tenants' did. A retry waits for its time without a thread
    (a receiver restarting for a minute is still reached), and a tenant's callbacks
    waiting, queued or for a retry, are bounded (QUEUE_PER_TENANT): past that one is
    recorded as failed at once, instead of memory growing with the backlog (left owed
    instead, they grew callback_outbox without bound and, due first, took the sweeps'
    places from the callbacks of pods that died).

    One a stop leaves unsent (queued, in flight, or waiting for a retry) has no outcome:
    it is handed back, owed, for another pod to send (`Owed.hand_back`). No attempt
    starts once this worker's lease on its callbacks may have run out (`renewed`): a
    worker frozen, or cut off from PostgreSQL, past the lease, would otherwise send again
    all that another worker has taken over meanwhile.
    """

    def __init__(
        self,
        client: CallbackClient,
        owed: Owed,
        metrics: Metrics,
        workers: int = 16,
        queue_per_tenant: int = QUEUE_PER_TENANT,
    ) -> None:
        self.client = client
        self._owed = owed
        self._metrics = metrics
        self._workers = workers
        self._per_tenant = max(1, workers // 4)
        self._queue_limit = queue_per_tenant
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {}  # in turn order: next turn first
        self._retries: list[tuple[float, int, _Job]] = []  # a heap: when due, then order
        self._order = itertools.count()
        self._waiting: Counter[str] = Counter()  # queued or waiting for a retry, per tenant
        self._busy: Counter[str] = Counter()  # callbacks in flight, per tenant
        self._failing: set[str] = set()  # tenants whose last attempt failed: one thread
        self._threads: list[threading.Thread] = []
        self._not_sent: Counter[str] = Counter()  # refused by a full queue, not yet said
        self._not_sent_said: dict[str, float] = {}  # when last said, per tenant
        self._held: dict[str, _Job] = {}  # by task_id: queued, waiting to retry, in flight
        self._unsent: list[tuple[str, int]] = []  # left by the stop: (task_id, attempts)
        self._closing = False  # waiting callbacks are left unsent, none is tried
        self._closed = False  # what is left unsent now is handed back at once
        self._sendable_until = math.inf  # monotonic: the lease's end, as last renewed
        self._lost: set[str] = set()  # in flight, but another worker's now: not recorded
        self._draining = False  # close() waits: retries stay where they are

    def submit(
        self, task: Task, result: dict[str, Any], result_uri: str, attempts: int = 0
    ) -> None:
        """Called after the commit (or on taking over one owed, with the `attempts` made
        before); returns at once. One this worker already has pending is not sent twice."""
        if not task.callback_url:
            return
        payload = summary(task, result, result_uri)
        job = _Job(task, encode(payload), contextvars.copy_context(), attempts + 1)
        with self._cond:
            if task.task_id in self._held:
                return
            full = self._waiting[task.tenant_id] >= self._queue_limit
            if not (self._closing or full):
                self._queues.setdefault(task.tenant_id, deque()).append(job)
                self._waiting[task.tenant_id] += 1
                self._held[task.task_id] = job
                if len(self._threads) < min(self._workers, len(self._held)):
                    self._start_thread()
                self._cond.notify()
                return
        if self._closing:
            self._save(task, _unsent(attempts))
            return
        reason = (
            f"not sent: {self._queue_limit} callbacks of this tenant already waiting "
            "(its receiver is slow or down)"
        )
        self._save(task, Delivery("failed", reason, 0), log_it=False)
        self._say_not_sent(task.tenant_id)

    def _say_not_sent(self, tenant: str) -> None:
        """One warning a minute per tenant for the callbacks its full queue refused, with
        their count (each is on its row and in gannet_callbacks_total): a tenant whose
        receiver is down, with tasks flowing, would otherwise write one per task."""
        now = time.monotonic()
        with self._cond:
            self._not_sent[tenant] += 1
            if now - self._not_sent_said.get(tenant, -math.inf) < NOT_SENT_SAID_EVERY_S:
                return
            self._not_sent_said[tenant] = now
            count = self._not_sent.pop(tenant)
        log.warning(
            "callbacks not sent: this tenant's queue is full (its receiver is slow or down)",
            extra={"tenant_id": tenant, "fields": {"not_sent": count, "queued": self._queue_limit}},
        )

    def pending(self) -> int:
        with self._cond:
            return len(self._held)

    def held(self) -> list[tuple[str, int]]:
        """(task_id, attempts made) of the callbacks pending here: owed, and this
        worker's to send. The attempt in flight is not counted yet."""
        with self._cond:
            return [(task_id, job.number - 1) for task_id, job in self._held.items()]

    def renewed(self, lost: Collection[str], until: float) -> None:
        """After this worker renewed its lease on its callbacks: attempts may start until
        `until` (monotonic) without another renewal; those in `lost` (not its own any
        more: another worker took them over once its lease ran out) are dropped, unless
        already in flight."""
        with self._cond:
            self._sendable_until = until
            dropped: list[_Job] = []
            if lost:
                for tenant, queue in list(self._queues.items()):
                    dropped += [job for job in queue if job.task.task_id in lost]
                    kept = deque(job for job in queue if job.task.task_id not in lost)
                    if kept:
                        self._queues[tenant] = kept
                    else:
                        del self._queues[tenant]
                dropped += [job for _, _, job in self._retries if job.task.task_id in lost]
                self._retries = [r for r in self._retries if r[2].task.task_id not in lost]
                heapq.heapify(self._retries)
                # Left of them here: in flight. Their outcome is the new holder's to
                # record, and they are not retried.
                gone = {job.task.task_id for job in dropped}
                self._lost.update(t for t in lost if t in self._held and t not in gone)
            for job in dropped:
                del self._held[job.task.task_id]
                self._waiting[job.task.tenant_id] -= 1
                self._tidy(job.task.tenant_id)
            self._cond.notify_all()
        if dropped:
            log.warning(
                "callbacks another worker took over dropped here: this worker's lease on "
                "them ran out (it was frozen, or could not reach PostgreSQL)",
                extra={"fields": {"dropped": len(dropped)}},
            )

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"callback-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _next(self) -> _Job | None:
        """The first tenant in turn with a thread to spare; it goes to the back. Retries
        whose time has come (all of them once closing) go first in their tenant's queue.
        None while this worker's lease may have run out, until it is renewed (or, once
        closing, every job is handed out, to be handed back)."""
        now = time.monotonic()
        if not self._closing and now >= self._sendable_until:
            return None
        while self._retries and (
            self._closing or (not self._draining and self._retries[0][0] <= now)
        ):
            job = heapq.heappop(self._retries)[2]
            self._queues.setdefault(job.task.tenant_id, deque()).appendleft(job)
        for tenant, queue in self._queues.items():
            if self._busy[tenant] < (1 if tenant in self._failing else self._per_tenant):
                job = queue.popleft()
                del self._queues[tenant]
                if queue:
                    self._queues[tenant] = queue  # re-inserted: last in turn
                self._busy[tenant] += 1
                self._waiting[tenant] -= 1
                return job
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next()
                while job is None:
                    if self._closing and not self._queues and not self._retries:
                        return
                    now = time.monotonic()
                    stale = not self._closing and now >= self._sendable_until
                    due = self._retries[0][0] - now if self._retries and not stale else None
                    self._cond.wait(None if due is None else max(due, 0.0))  # stale: renewed()
                    job = self._next()
            final: Delivery | None = None
            try:
                final = self._after(job, job.context.run(self._attempt, job))
                if final is not None:
                    self._save(job.task, final)
            except Exception:  # a bug in recording: this thread must serve the next one
                log.exception("callback outcome not recorded", extra={"task_id": job.task.task_id})
                final = final or Delivery("failed", "not recorded", job.number)
            finally:
                with self._cond:
                    tenant = job.task.tenant_id
                    self._busy[tenant] -= 1
                    if not self._busy[tenant]:
                        del self._busy[tenant]
                    if final is not None:
                        self._held.pop(job.task.task_id, None)
                        self._lost.discard(job.task.task_id)
                    self._tidy(tenant)
                    self._cond.notify_all()

    def _tidy(self, tenant: str) -> None:
        """Under the lock, after one of a tenant's callbacks left the queues or its
        thread: its count goes once nothing of it waits, and once nothing is in flight
        either, what was kept about it goes (a review: every tenant with a failed
        callback stayed in `_failing` for the life of the pod). Its next callback starts
        as a new tenant's; a count of refusals not yet said in a warning is kept until
        it is."""
        if self._waiting[tenant]:
            return
        del self._waiting[tenant]
        if tenant in self._busy:
            return
        self._failing.discard(tenant)
        if tenant not in self._not_sent:
            self._not_sent_said.pop(tenant, None)

    def _after(self, job: _Job, delivery: Delivery) -> Delivery | None:
        """The final outcome, or None with the job waiting for its next attempt."""
        tenant = job.task.tenant_id
        with self._cond:
            if job.task.task_id in self._lost:
                return Delivery(DROPPED, "another worker took it over", job.number)
            if delivery.status == "delivered":
                self._failing.discard(tenant)
            elif delivery.status != "refused":  # a refused URL says nothing of the receiver
                self._failing.add(tenant)
            if delivery.status != RETRY:
                return delivery
            if job.number > self.client.policy.retries:
                detail = f"{delivery.detail} after {job.number} attempts"
                return Delivery("failed", detail, job.number)
            if self._closing:
                return _unsent(job.number)
            due = time.monotonic() + self.client.backoff_s(job.number)
            job.number += 1
            heapq.heappush(self._retries, (due, next(self._order), job))
            self._waiting[tenant] += 1
            self._cond.notify_all()
            return None

    def _attempt(self, job: _Job) -> Delivery:
        """The attempt's outcome, whatever happens: an exception here would end in a
        future nobody reads, and the row's status would stay empty."""
        assert job.task.callback_url is not None
        if self._closing:
            return _unsent(job.number - 1)
        try:
            # A no-op span unless tracing is on (tracing.py).
            with trace.get_tracer(TRACER).start_as_current_span("callback") as span:
                delivery = self.client.attempt(job.task.callback_url, job.body, job.number)
                span.set_attribute("gannet.callback_status", delivery.status)
                return delivery
        except Exception as exc:  # a bug in sending: logged, and recorded as failed
            log.exception("callback failed unexpectedly", extra={"task_id": job.task.task_id})
            return Delivery("failed", f"{exc.__class__.__name__}: {exc}", job.number)

    def _save(self, task: Task, delivery: Delivery, log_it: bool = True) -> None:
        if delivery.status == DROPPED:
            return
        if delivery.unsent:  # no outcome: handed back once the threads are done (close)
            self._metrics.callbacks.labels("unsent").inc()
            with self._cond:
                closed = self._closed
                if not closed:
                    self._unsent.append((task.task_id, delivery.attempts))
            if closed:  # a commit or a sweep that came after the close
                self._hand_back([(task.task_id, delivery.attempts)])
            return
        self._metrics.callbacks.labels(delivery.status).inc()
        if log_it:
            level = logging.INFO if delivery.status == "delivered" else logging.WARNING
            log.log(
                level,
                f"callback {delivery.status}",
                extra={
                    "task_id": task.task_id,
                    "tenant_id": task.tenant_id,
                    "fields": {"detail": delivery.detail, "attempts": delivery.attempts},
                },
            )
        try:
            self._owed.record(task.task_id, task.tenant_id, delivery.row_text())
        except GannetError as exc:
            log.error(
                "could not record the callback status on the row",
                extra={"task_id": task.task_id, "fields": {"error": str(exc)}},
            )

    def close(self, timeout_s: float = 10.0, abort: threading.Event | None = None) -> None:
        """Let queued callbacks finish for up to timeout_s (or until `abort` is set), but
        not those of a tenant whose receiver fails; then the ones in flight are cut short
        and the ones still queued are not sent. Retries are not waited for: a receiver
        down held every shutdown for the retries due within its grace (25 s in a
        review), and spent six of a callback's seven attempts on a receiver down for a
        minute. Whatever is left unsent is handed back, owed, with the attempts made,
        for another pod to send (an attempt cut short that was its last is recorded as
        failed). Only a host name still resolving can hold it longer, up to the
        attempt's timeout (`_lookup`)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._draining = True
            # Nothing to wait for while the lease may have run out: nothing is sent.
            while (
                self._draining_worth_it()
                and not (abort and abort.is_set())
                and time.monotonic() < self._sendable_until
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2) if abort else left)
            self._closing = True
            self._cond.notify_all()
        self.client.stop()
        for thread in list(self._threads):
            thread.join()
        with self._cond:
            unsent, self._unsent, self._closed = self._unsent, [], True
        if unsent:
            self._hand_back(unsent)

    def _draining_worth_it(self) -> bool:
        """Under the lock: whether a tenant whose receiver answers has callbacks queued
        or in flight. A failing tenant's (one thread, each attempt to its timeout) are
        not waited for: a receiver that hangs held every stop for its whole grace (27 s
        of a 25 s grace in a review) for callbacks another pod sends anyway."""
        return any(t not in self._failing for t in self._queues) or any(
            t not in self._failing for t in self._busy
        )

    def _hand_back(self, unsent: list[tuple[str, int]]) -> None:
        try:
            self._owed.hand_back(unsent)
        except GannetError as exc:
            log.warning(
                "could not hand back the callbacks this worker did not send; another pod "
                "sends them once this one's lease on them ends",
                extra={"fields": {"unsent": len(unsent), "error": str(exc)}},
            )
            return
        log.info(
            "callbacks not sent before stopping handed back for another pod to send",
            extra={"fields": {"unsent": len(unsent)}},
        )


def policy_from(settings: Settings) -> CallbackPolicy:
    return CallbackPolicy(
        timeout_s=settings.callback_timeout_s,
        retries=settings.callback_retries,
        backoff_s=settings.callback_backoff_s,
        allow_http=settings.allow_http_callbacks,
        allow_private=settings.callback_allow_private_addresses,
        ca_file=settings.callback_ca_file,
        signing_key=(
            settings.callback_signing_key.get_secret_value().encode()
            if settings.callback_signing_key is not None
            else None
        ),
    )


def build_callbacks(settings: Settings, owed: Owed, metrics: Metrics) -> Callbacks:
    return Callbacks(
        CallbackClient(policy_from(settings)), owed, metrics, settings.callback_workers
    )
