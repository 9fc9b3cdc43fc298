"""Result callbacks: the address filter with real DNS, real HTTP(S) receivers on 127.0.0.1,
and the hook in Processor with PostgreSQL, the GCS emulator and the real demo model.

Loopback is refused by default, so the tests that talk to a local receiver opt in with
`allow_private=True` (GANNET_CALLBACK_ALLOW_PRIVATE_ADDRESSES); the filter itself is
tested with the default policy.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import SAMPLES, SCENES, expected_counts, wait_until
from pydantic import ValidationError
from tcp_relay import Relay, answers, relay_to

from gannet import daemon
from gannet import sink as sink_module
from gannet.callback import (
    CallbackClient,
    CallbackPolicy,
    CallbackRefused,
    Callbacks,
    Target,
    blocked_reason,
    policy_from,
    resolve,
    summary,
)
from gannet.callback_outbox import SWEEP_LIMIT, Outbox
from gannet.dev.publish import make_task, upload_image
from gannet.dispatch import Dispatcher
from gannet.errors import TransientError
from gannet.metrics import Metrics
from gannet.outcome import Decision
from gannet.settings import REPO_ROOT, Settings
from gannet.task import Task


def _policy(**settings: Any) -> CallbackPolicy:
    """A policy for the local receivers: http on 127.0.0.1 let through."""
    return CallbackPolicy(allow_http=True, allow_private=True, **settings)


LOCAL = _policy(timeout_s=2.0, retries=2, backoff_s=0.01)


class Receiver:
    """A real HTTP(S) server on 127.0.0.1 that answers with scripted status codes."""

    def __init__(
        self, statuses: list[int], delay_s: float = 0.0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.statuses = list(statuses)
        self.requests: list[dict[str, Any]] = []
        self.received: list[tuple[dict[str, str], bytes]] = []  # headers, body as sent
        self.on_request: Callable[[], object] = lambda: None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.on_request()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                receiver.requests.append(
                    {"path": self.path, "body": json.loads(body), "host": self.headers["Host"]}
                )
                time.sleep(delay_s)
                status = (
                    receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        # serve_forever polls for shutdown() every poll_interval (0.5 s by default): each
        # test's teardown waited that long for it.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/hooks/gannet?x=1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(*args: Any, **kwargs: Any) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("100.100.100.200", "not globally routable"),
        ("0.0.0.0", "private"),  # 0.0.0.0/8 is in the private registry
        ("224.0.0.1", "multicast"),
        ("fd00:ec2::254", "private"),
        ("2002:a9fe:a9fe::1", "link-local (metadata server range), inside a 6to4 address"),
        ("2002:0a00:0001::1", "private, inside a 6to4 address"),
    ],
)
def test_internal_addresses_are_blocked(address, reason):
    assert reason in (blocked_reason(address) or "")


def test_public_addresses_pass():
    assert blocked_reason("8.8.8.8") is None
    assert blocked_reason("2001:4860:4860::8888") is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://localhost/hook", "resolves to"),  # real DNS: localhost -> loopback
        ("https://127.0.0.1/hook", "loopback"),
        ("https://[::1]:8443/hook", "loopback"),
        ("https://169.254.169.254/computeMetadata/v1/", "link-local"),
        ("https://metadata.google.internal/x", "metadata server"),
        ("https://10.0.0.8/hook", "private"),
        ("http://8.8.8.8/hook", "must be https"),
        ("ftp://8.8.8.8/hook", "must be https"),
        ("https://user:pw@8.8.8.8/hook", "credentials"),
        ("https://a..b/hook", "not a valid host name"),  # IDNA refuses it
        ("https://8.8.8.8/r\u00e9sultat", "must be ASCII"),  # http.client cannot send it
        # A space ends the request line: every attempt failed, retried as transient.
        ("https://8.8.8.8/a b", "spaces or control characters"),
        ("https://8.8.8.8/a\tb", "spaces or control characters"),
    ],
)
def test_the_default_policy_refuses_before_connecting(url, expected):
    with pytest.raises(CallbackRefused) as err:
        resolve(url, CallbackPolicy())
    assert expected in err.value.message


# Runs in a mount namespace whose /etc/hosts gives each name a public and a private
# address, in both orders; prints each name's refusal, or "called".
_TWO_FACED = """
import logging
import sys
from gannet.callback import CallbackPolicy, CallbackRefused, resolve
class Shown(logging.Handler):
    def emit(self, record):
        print("logged", record.fields["address"])
logging.getLogger("gannet.callback").addHandler(Shown())
for name in ("public-first.test", "private-first.test"):
    try:
        resolve(f"https://{name}/hook", CallbackPolicy())
        print(name, "called")
    except CallbackRefused as exc:
        print(name, exc.message)
"""


def test_a_name_with_one_private_address_among_public_ones_is_refused(tmp_path):
    """A receiver's name may resolve to several addresses, and the connection may go to
    any of them: one private (here 10.0.0.5) among public ones is refused, whichever
    comes first. The resolver is the real one (glibc's, reading a hosts file): the hosts
    file is this test's own, bind-mounted over /etc/hosts in a user and mount namespace
    (`unshare -rm`), so the machine's is untouched. The refusal, stored in the row,
    does not name the address (a map of the worker's private names, one task at a
    time); the worker's log does."""
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n"
        "93.184.216.34 public-first.test\n10.0.0.5 public-first.test\n"
        "10.0.0.5 private-first.test\n93.184.216.34 private-first.test\n"
    )
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) to give a name two addresses")
    script = f'mount --bind {hosts} /etc/hosts && exec {sys.executable} -c "$0"'
    ran = subprocess.run(
        [unshare, "-rm", "sh", "-c", script, _TWO_FACED],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    answers = dict(line.split(" ", 1) for line in ran.stdout.splitlines())
    for name in ("public-first.test", "private-first.test"):
        assert "resolves to an address that is private" in answers[name], answers
        assert "10.0.0.5" not in answers[name], "the row does not say which"
    assert answers["logged"] == "10.0.0.5", "the log does"


def test_the_connection_goes_to_the_checked_address_never_to_a_second_lookup(
    receiver_factory,
):
    """A name that resolves to a public address when checked and to an internal one
    when connecting (DNS rebinding) must not get its second answer: the connection goes
    to the address that was checked, the name only in the Host header (and TLS's SNI).
    Here the name cannot be resolved at all: connecting by name would fail."""
    receiver = receiver_factory([200])
    target = Target("http", "rebinding.invalid", receiver.port, "/hook", "127.0.0.1")
    assert CallbackClient(LOCAL)._post(target, b'{"n":1}') == 200
    assert receiver.requests[0]["host"] == f"rebinding.invalid:{receiver.port}"


def test_a_host_that_does_not_resolve_in_time_is_retried_not_waited_for(monkeypatch):
    """A DNS server that drops queries: the lookup is given up at the attempt's timeout
    and the attempt retried, instead of the callback's thread (and the pod's stop)
    waiting for the resolver's own timeouts. Mocked: the C resolver reads only
    /etc/resolv.conf, so a test cannot point it at a silent DNS server; getaddrinfo is
    replaced, for that one name, by one that does not answer."""
    release = threading.Event()
    real = socket.getaddrinfo

    def silent(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "silent.example":
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", silent)
    policy = _policy(timeout_s=0.5, retries=1, backoff_s=0.01)
    started = time.monotonic()
    try:
        status = deliver(policy, "http://silent.example/hook")
    finally:
        release.set()
    assert status == (
        "failed: resolving callback host 'silent.example' took over 0.5 s after 2 attempts"
    )
    assert time.monotonic() - started < 3


def test_a_redirect_is_neither_followed_nor_retried(receiver_factory):
    """A 3xx could point the worker at the metadata server or a private address the
    first check passed over: it is the receiver's final answer, recorded as failed."""
    elsewhere = receiver_factory([200])

    class Redirecting(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(302)
            self.send_header("Location", elsewhere.url())
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        status = deliver(LOCAL, url)
    finally:
        server.shutdown()
        server.server_close()
    assert status == "failed: HTTP 302"
    assert elsewhere.requests == []


def test_a_refused_url_is_never_contacted(receiver_factory):
    """Default policy + a live receiver on loopback: nothing reaches it, status refused."""
    receiver = receiver_factory([200])
    status = deliver(CallbackPolicy(allow_http=True), receiver.url())
    assert status.startswith("refused: ") and "loopback" in status
    assert receiver.requests == []


def test_delivered_with_the_summary_and_the_host_name(receiver_factory):
    receiver = receiver_factory([204])
    assert deliver(LOCAL, receiver.url(host="localhost")) == "delivered: HTTP 204"
    [request] = receiver.requests
    assert request["path"] == "/hooks/gannet?x=1"
    assert request["host"] == f"localhost:{receiver.port}"
    assert request["body"]["task_id"] == "t1" and request["body"]["status"] == "succeeded"


def readme_receiver_check() -> Any:
    """The receiver's check as the README shows it (its first Python block under Result
    callbacks), run as written: the documentation a backend team copies is tested."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Result callbacks", 1)[1].split("\n## ", 1)[0]
    code = textwrap.dedent(section.split("```python\n", 1)[1].split("```", 1)[0])
    scope: dict[str, Any] = {}
    exec(code, scope)
    return scope["gannet_signed"]


def test_a_signed_callback_is_checked_by_the_readmes_receiver_code(receiver_factory):
    """With GANNET_CALLBACK_SIGNING_KEY each attempt carries Gannet-Timestamp and
    Gannet-Signature (HMAC-SHA256 of the timestamp and the body): the README's check
    accepts what was sent, and refuses a changed body, another key, a stale timestamp;
    without the key nothing is signed (before, nothing ever was: a receiver could not
    tell a callback from anyone's POST)."""
    key = "k" * 40
    receiver = receiver_factory([503, 200])
    settings = Settings(
        callback_signing_key=key,
        allow_http_callbacks=True,
        callback_allow_private_addresses=True,
        callback_backoff_s=0.01,
    )
    assert deliver(policy_from(settings), receiver.url()) == "delivered: HTTP 200"
    assert len(receiver.received) == 2
    signed = readme_receiver_check()
    for headers, body in receiver.received:  # each attempt signed, as received
        assert headers["Gannet-Signature"].startswith("v1=")
        assert signed(key.encode(), headers, body)
        assert not signed(key.encode(), headers, body.replace(b'"t1"', b'"t2"'))
        assert not signed(b"another-key-of-forty-characters-or-more!", headers, body)
        stale = {**headers, "Gannet-Timestamp": str(int(time.time()) - 3600)}
        assert not signed(key.encode(), stale, body)
        # What anyone who can reach the URL may send: False, not an exception (a 500).
        for hostile in ({"Gannet-Timestamp": "\u00b2"}, {"Gannet-Signature": "v1=\u00e9"}, {}):
            assert not signed(key.encode(), {**headers, **hostile} if hostile else {}, body)

    unsigned = receiver_factory([200])
    deliver(LOCAL, unsigned.url())
    [(headers, _)] = unsigned.received
    assert "Gannet-Signature" not in headers and "Gannet-Timestamp" not in headers


def test_a_short_signing_key_is_refused():
    with pytest.raises(ValidationError, match="32 characters or more"):
        Settings(callback_signing_key="secret")


def test_5xx_and_429_are_retried_with_backoff_then_delivered(receiver_factory):
    receiver = receiver_factory([503, 429, 200])
    arrived: list[float] = []
    receiver.on_request = lambda: arrived.append(time.monotonic())
    policy = _policy(timeout_s=2.0, retries=2, backoff_s=0.2)
    assert deliver(policy, receiver.url()) == "delivered: HTTP 200"
    assert len(receiver.requests) == 3
    first, second = arrived[1] - arrived[0], arrived[2] - arrived[1]
    assert first >= 0.2 and second >= 0.4, f"backoff doubles per retry: {first:.2f}, {second:.2f} s"


def test_a_receiver_that_keeps_failing_gets_exactly_retries_plus_one_tries(receiver_factory):
    receiver = receiver_factory([500])
    assert deliver(LOCAL, receiver.url()) == "failed: HTTP 500 after 3 attempts"
    assert len(receiver.requests) == 3


def test_a_4xx_is_final(receiver_factory):
    receiver = receiver_factory([404])
    assert deliver(LOCAL, receiver.url()) == "failed: HTTP 404"
    assert len(receiver.requests) == 1


def test_a_slow_receiver_times_out(receiver_factory):
    receiver = receiver_factory([200], delay_s=1.5)
    policy = _policy(timeout_s=0.3, retries=1, backoff_s=0.0)
    started = time.monotonic()
    status = deliver(policy, receiver.url())
    assert status.startswith("failed: ") and "timed out" in status.lower()
    assert time.monotonic() - started < 1.5


class Trickler:
    """A receiver on a raw socket that answers "200 OK", then its headers a byte every
    50 ms: each read is quick, the answer as a whole takes `seconds`."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.headers = b"X-Slow: " + b"a" * int(seconds / 0.05) + b"\r\n\r\n"
        self.sent = 0
        self.connected = threading.Event()
        self.cut_off = threading.Event()  # the client closed before the end
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _serve(self) -> None:
        with self.listener:
            conn, _ = self.listener.accept()
        self.connected.set()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for byte in self.headers:
                    conn.sendall(bytes([byte]))
                    self.sent += 1
                    time.sleep(0.05)
            except OSError:
                self.cut_off.set()
                return


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout():
    """Each read gets a byte within the socket timeout, so only a deadline on the whole
    attempt ends it; without one a callback thread is held as long as the receiver likes
    (and a pod's shutdown waits for it)."""
    trickler = Trickler(seconds=10.0)
    policy = _policy(timeout_s=0.5, retries=0, backoff_s=0.0)
    status = deliver(policy, trickler.url())
    assert status.startswith("failed: ") and "timed out" in status, status
    wait_until(trickler.cut_off.is_set, "the receiver sees the connection closed")
    assert trickler.sent < len(trickler.headers) / 2


def test_a_callback_cut_short_by_a_stop_is_sent_by_another_pod(processor_parts, receiver_factory):
    """At shutdown, after the grace, a callback still waiting on its receiver is ended
    (the pod can exit) and handed back, owed, with its attempt counted: the next pod's
    sweep sends it, and only then does the row say what became of it."""
    settings, storage, processor, callbacks, metrics = processor_parts
    receiver = receiver_factory([200])
    reached, answer = threading.Event(), threading.Event()
    receiver.on_request = lambda: (reached.set(), answer.wait(30))  # hangs until set
    patient = _policy(timeout_s=60.0, retries=3, backoff_s=30.0)
    callbacks.client = CallbackClient(patient)
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    task, outcome = _run(settings, storage, processor, tenant, receiver.url())
    assert (outcome.decision, outcome.label) == (Decision.ACK, "succeeded")
    assert reached.wait(10), "the request is with the receiver, unanswered"
    started = time.monotonic()
    callbacks.close(timeout_s=0.2)
    assert time.monotonic() - started < 2
    answer.set()
    assert _callback_status(settings, tenant, task.task_id, timeout_s=0.5) is None
    assert _owed(settings, task.task_id) == (None, 1, True)  # no holder, 1 attempt, due
    assert metrics.registry.get_sample_value("gannet_callbacks_total", {"result": "unsent"}) == 1

    other = _other_pod(processor, "pod-b", metrics)
    assert other.sweep() == 1
    assert _callback_status(settings, tenant, task.task_id) == "delivered: HTTP 200"
    # The one cut short reached the receiver too: receivers dedupe on task_id.
    wait_until(lambda: len(receiver.requests) == 2, "both requests read")
    assert _owed(settings, task.task_id) is None
    other.close()


class Hanging:
    """A receiver that accepts connections and never answers: a dead host behind a load
    balancer that still completes the TCP handshake."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


class Kept:
    """Callbacks' `owed` (the daemon's is callback_outbox.Outbox, on PostgreSQL): the
    statuses as the row would get them, with when they came, and what a stop handed back
    unsent, as (task_id, attempts made)."""

    def __init__(self) -> None:
        self.statuses: dict[str, tuple[float, str]] = {}
        self.handed: list[tuple[str, int]] = []

    def record(self, task_id: str, tenant_id: str, status: str) -> None:
        self.statuses[task_id] = (time.monotonic(), status)

    def hand_back(self, unsent: list[tuple[str, int]]) -> None:
        self.handed.extend(unsent)


def _recorded() -> tuple[dict[str, tuple[float, str]], Kept]:
    kept = Kept()
    return kept.statuses, kept


def _submit(callbacks: Callbacks, tenant: str, task_id: str, url: str) -> None:
    task = make_task(tenant, f"gs://bkt/{tenant}/x.jpg", "DETECTION", task_id, callback_url=url)
    callbacks.submit(task, {}, "gs://bkt/r.json")


def deliver(policy: CallbackPolicy, url: str, task_id: str = "t1") -> str:
    """One callback through the daemon's own Callbacks (one thread), waited for: the
    status its row records, e.g. "delivered: HTTP 200"."""
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=1)
    try:
        _submit(callbacks, "tenant-a", task_id, url)
        wait_until(lambda: task_id in statuses, "the callback's outcome recorded", 30)
    finally:
        callbacks.close(timeout_s=0.0)
    return statuses[task_id][1]


@pytest.mark.parametrize("hung", [("tenant-a",), ("tenant-a", "tenant-b")])
def test_tenants_whose_receivers_hang_do_not_hold_up_another_tenants_callbacks(
    receiver_factory, hung
):
    """Twenty callbacks of one tenant, or of two, to a receiver that never answers (each
    attempt ends at its 1 s timeout), then one of another tenant to a healthy receiver:
    it is delivered at once. In one queue it waited for theirs ahead of it (20 x 1 s over
    4 threads: 5 s); with half the threads each, two such tenants took them all (16.5 s
    measured at the defaults). A tenant has a quarter, and one once an attempt failed."""
    hanging, healthy = Hanging(), receiver_factory([200])
    policy = _policy(timeout_s=1.0, retries=0)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=4)
    try:
        for i in range(20):
            _submit(callbacks, hung[i % len(hung)], f"h{i}", hanging.url())
        time.sleep(0.2)  # every thread started has taken one of theirs
        started = time.monotonic()
        _submit(callbacks, "tenant-c", "c0", healthy.url())
        wait_until(lambda: "c0" in statuses, "tenant C's callback recorded", 15)
        at, status = statuses["c0"]
        assert status == "delivered: HTTP 200"
        assert at - started < 0.5, f"tenant C's callback waited {at - started:.1f} s"
    finally:
        callbacks.close(timeout_s=0.0)
        hanging.close()
    assert callbacks.pending() == 0
    # Each one either failed (its one attempt timed out, or was cut short by the stop)
    # or, not tried yet, was handed back for another pod to send.
    assert len(statuses) + len(record.handed) == 21, (statuses, record.handed)
    assert all(statuses[t][1].startswith("failed: ") for t in statuses if t != "c0")
    assert all(attempts == 0 for _, attempts in record.handed)


def test_a_tenant_whose_receiver_fails_gets_one_thread():
    """With eight threads a tenant may have two; once an attempt of its failed, one, so
    that a receiver that hangs holds a single thread however many of its callbacks
    wait (a quarter of the threads for each of four such tenants was all of them)."""
    hanging = Hanging()
    policy = _policy(timeout_s=1.0, retries=0)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=8)
    try:
        for i in range(6):
            _submit(callbacks, "tenant-a", f"a{i}", hanging.url())
        wait_until(lambda: len(hanging.conns) == 2, "two of its callbacks in flight")
        wait_until(lambda: len(statuses) == 2, "those two failed", 5)
        time.sleep(0.3)
        assert len(hanging.conns) == 3, "one more at a time after a failure, not two"
    finally:
        callbacks.close(timeout_s=0.0)
        hanging.close()


def test_a_receiver_down_for_seconds_gets_its_callback_when_it_is_back():
    """A receiver restarting (a rolling deploy: connections refused for seconds) lost
    every callback sent meanwhile: three attempts 0.5 s and 1 s apart. Retries back off
    (here 0.2 s doubling, five of them: 6 s) and wait without a thread, so another
    tenant's callback is delivered meanwhile by the only one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens on it yet: connection refused
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    policy = _policy(timeout_s=1.0, retries=5, backoff_s=0.2)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=1)
    server: ThreadingHTTPServer | None = None
    try:
        _submit(callbacks, "tenant-a", "a0", f"http://127.0.0.1:{port}/a")
        time.sleep(0.3)  # a0 failed once and waits for its retry
        later = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=later.serve_forever, daemon=True).start()
        _submit(callbacks, "tenant-b", "b0", f"http://127.0.0.1:{later.server_port}/b")
        wait_until(lambda: "b0" in statuses, "tenant B's callback recorded", 2)
        assert "a0" not in statuses
        later.shutdown()
        later.server_close()
        time.sleep(1.5)  # the receiver is down about 2 s in all
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        wait_until(lambda: "a0" in statuses, "tenant A's callback recorded", 10)
        assert statuses["a0"][1] == "delivered: HTTP 200"
        assert received == ["/b", "/a"]
    finally:
        callbacks.close(timeout_s=0.0)
        if server is not None:
            server.shutdown()
            server.server_close()


def test_a_tenant_with_nothing_left_to_send_is_forgotten(receiver_factory):
    """Each tenant whose callback failed stayed marked as failing (one thread for it)
    for the life of the pod: a review's long run kept one entry per such tenant. Once a
    tenant has nothing queued, waiting or in flight, nothing of it is kept."""
    down = receiver_factory([503] * 50)
    policy = _policy(timeout_s=1.0, retries=1, backoff_s=0.01)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=2)
    try:
        for n in range(20):
            _submit(callbacks, f"tenant-{n}", f"t{n}", down.url())
        wait_until(lambda: len(statuses) == 20, "every outcome recorded", 30)
        assert {status for _, status in statuses.values()} == {"failed: HTTP 503 after 2 attempts"}
        wait_until(lambda: callbacks.pending() == 0, "nothing pending", 5)
        with callbacks._cond:
            kept = (callbacks._failing, callbacks._busy, callbacks._waiting, callbacks._queues)
            assert not any(kept), kept
        assert callbacks.held() == [], "none left to renew"
    finally:
        callbacks.close(timeout_s=0.0)


def test_a_shutdown_does_not_wait_for_a_callbacks_retry(receiver_factory):
    """A callback waiting for its retry (its receiver down) is handed back at once at
    shutdown, with its attempt counted, for another pod to retry: waiting for the
    retries due within the grace held every pod's shutdown for them (25 s in a review)
    and spent most of a callback's attempts on a receiver down for a minute."""
    down = receiver_factory([503])
    policy = _policy(timeout_s=1.0, retries=3, backoff_s=30.0)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=2)
    _submit(callbacks, "tenant-a", "a0", down.url())
    wait_until(lambda: len(down.requests) == 1, "the first attempt made")
    started = time.monotonic()
    callbacks.close(timeout_s=10.0)
    assert time.monotonic() - started < 1.0
    assert "a0" not in statuses, "no outcome: it is another pod's to send"
    assert record.handed == [("a0", 1)]
    assert callbacks.pending() == 0

    # One due within the shutdown's time is not waited for either.
    soon = _policy(timeout_s=1.0, retries=3, backoff_s=0.5)
    callbacks = Callbacks(CallbackClient(soon), record, Metrics(), workers=2)
    _submit(callbacks, "tenant-a", "a1", down.url())
    wait_until(lambda: len(down.requests) == 2, "the first attempt made")
    started = time.monotonic()
    callbacks.close(timeout_s=10.0)
    assert time.monotonic() - started < 0.4
    assert record.handed[1:] == [("a1", 1)]


def test_a_retry_that_comes_due_while_the_stop_waits_is_not_made(receiver_factory):
    """The stop waits for a callback in flight (a receiver that hangs); another's retry
    comes due meanwhile: it is handed back, not made, however long the wait."""
    down = receiver_factory([503])
    hanging = Hanging()
    policy = _policy(timeout_s=1.0, retries=3, backoff_s=0.2)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=4)
    try:
        _submit(callbacks, "tenant-a", "a0", down.url())
        wait_until(lambda: len(down.requests) == 1, "a0's first attempt failed")
        _submit(callbacks, "tenant-b", "b0", hanging.url())
        wait_until(lambda: len(hanging.conns) == 1, "b0 in flight")
        callbacks.close(timeout_s=3.0)  # b0 times out after 1 s; a0 was due after 0.2 s
    finally:
        hanging.close()
    assert len(down.requests) == 1
    assert ("a0", 1) in record.handed and statuses == {}


def test_a_stop_does_not_wait_for_a_failing_receivers_queue(receiver_factory):
    """A tenant whose receiver hangs (its last attempt timed out) has one thread, each
    attempt to its timeout: its queue would hold the stop for its whole grace. The stop
    waits for the other tenants' callbacks only, and hands that tenant's back."""
    hanging = Hanging()
    healthy = receiver_factory([200])
    policy = _policy(timeout_s=0.5, retries=3, backoff_s=30.0)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=4)
    try:
        for i in range(4):
            _submit(callbacks, "tenant-a", f"a{i}", hanging.url())
        wait_until(lambda: len(hanging.conns) == 2, "a0 timed out, a1 in flight")
        _submit(callbacks, "tenant-b", "b0", healthy.url())
        started = time.monotonic()
        callbacks.close(timeout_s=10.0)
        assert time.monotonic() - started < 0.4
    finally:
        hanging.close()
    assert statuses["b0"][1] == "delivered: HTTP 200"
    assert sorted(record.handed) == [("a0", 1), ("a1", 1), ("a2", 0), ("a3", 0)]


def test_a_second_stop_signal_ends_the_wait_for_queued_callbacks():
    """Callbacks queued behind a receiver that hangs are waited for within the grace,
    but not once the operator asks again (the daemon's second SIGTERM): they are handed
    back at once."""
    hanging = Hanging()
    policy = _policy(timeout_s=5.0, retries=0)
    record = _recorded()[1]
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=1)
    abort = threading.Event()
    try:
        for i in range(3):
            _submit(callbacks, "tenant-a", f"a{i}", hanging.url())
        wait_until(lambda: len(hanging.conns) == 1, "the first callback in flight")
        threading.Timer(0.3, abort.set).start()
        started = time.monotonic()
        callbacks.close(timeout_s=20.0, abort=abort)
        assert time.monotonic() - started < 1.5
    finally:
        hanging.close()
    assert sorted(record.handed) == [("a1", 0), ("a2", 0)]


def test_a_tenants_callbacks_past_its_queue_bound_are_recorded_failed_at_once():
    """A tenant's queue is bounded: a dead receiver cannot make the pod hold an ever
    longer backlog of callbacks in memory, nor (left owed instead) callback_outbox."""
    hanging = Hanging()
    policy = _policy(timeout_s=5.0, retries=0)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=2, queue_per_tenant=3)
    try:
        for i in range(5):  # 1 in flight (half of 2 threads), 3 queued, the fifth refused
            _submit(callbacks, "tenant-a", f"a{i}", hanging.url())
            if i == 0:
                wait_until(lambda: len(hanging.conns) == 1, "the first callback in flight")
        assert set(statuses) == {"a4"}
        assert statuses["a4"][1] == (
            "failed: not sent: 3 callbacks of this tenant already waiting "
            "(its receiver is slow or down)"
        )
        assert sorted(callbacks.held()) == [("a0", 0), ("a1", 0), ("a2", 0), ("a3", 0)]
    finally:
        callbacks.close(timeout_s=0.0)
        hanging.close()
    assert ("a3", 0) in record.handed, "queued, not tried: handed back"


def test_a_full_queues_refusals_are_said_once_not_once_per_task(caplog):
    """A tenant whose receiver is down, with tasks flowing: every callback its full
    queue refuses is on its row, but the log says so once (with the count), not a
    warning per task, which at a pod's task rate buries its other lines."""
    hanging = Hanging()
    policy = _policy(timeout_s=5.0, retries=0)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(policy), record, Metrics(), workers=2, queue_per_tenant=1)
    try:
        with caplog.at_level(logging.WARNING, logger="gannet.callback"):
            for i in range(12):  # 1 in flight, 1 queued, 10 refused
                _submit(callbacks, "tenant-a", f"a{i}", hanging.url())
                if i == 0:
                    wait_until(lambda: len(hanging.conns) == 1, "the first callback in flight")
        assert sorted(statuses) == sorted(f"a{i}" for i in range(2, 12))
        assert all(status.startswith("failed: not sent") for _, status in statuses.values())
        said = [r for r in caplog.records if r.name == "gannet.callback"]
        assert [r.getMessage() for r in said] == [
            "callbacks not sent: this tenant's queue is full (its receiver is slow or down)"
        ]
    finally:
        callbacks.close(timeout_s=0.0)
        hanging.close()


def test_a_callback_thread_outlives_a_bug_in_recording_an_outcome(receiver_factory):
    """Recording that raises what it should not (injected: no input is known to make
    it) is logged and the thread goes on to the next callback, instead of dying with
    the tenants' queues still full and nobody to send them."""
    receiver = receiver_factory([200])
    statuses, kept = _recorded()

    class Flaky(Kept):
        def record(self, task_id: str, tenant_id: str, status: str) -> None:
            if task_id == "a0":
                raise RuntimeError("injected")
            kept.record(task_id, tenant_id, status)

    callbacks = Callbacks(CallbackClient(LOCAL), Flaky(), Metrics(), workers=1)
    try:
        for i in range(2):
            _submit(callbacks, "tenant-a", f"a{i}", receiver.url())
        wait_until(lambda: "a1" in statuses, "the second callback recorded", 10)
        assert statuses["a1"][1] == "delivered: HTTP 200"
    finally:
        callbacks.close(timeout_s=0.0)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_verifies_the_certificate_for_the_host_name(receiver_factory, tmp_path):
    cert, key = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = receiver_factory([200], tls=tls)
    https_only = CallbackPolicy(timeout_s=2.0, retries=0, allow_private=True)

    untrusted = deliver(https_only, receiver.url("https", "localhost"))
    assert untrusted.startswith("failed: ") and "CERTIFICATE_VERIFY_FAILED" in untrusted

    trusted = CallbackPolicy(timeout_s=2.0, retries=0, allow_private=True, ca_file=str(cert))
    assert deliver(trusted, receiver.url("https", "localhost")) == "delivered: HTTP 200"
    # The certificate names localhost, not the IP the connection is pinned to: the name
    # is what TLS checks, so connecting to 127.0.0.1 by address must fail verification.
    assert deliver(trusted, receiver.url("https", "127.0.0.1")).startswith("failed: ")
    assert len(receiver.requests) == 1


# ------------------------------------------------------------- the hook in the Processor


@pytest.fixture
def processor_parts(services, tmp_path):
    """The daemon's own parts (daemon.build): the demo config and model, the GCS emulator,
    PostgreSQL. It is the daemon's code path without Pub/Sub around it."""
    from gannet.dev import demo

    # A short lease: the tests wait one out, as a pod that died is waited for.
    settings = demo.local_settings(services, callback_lease_s=4.0)
    metrics = Metrics()
    parts = daemon.build(settings, metrics)
    callbacks = Callbacks(CallbackClient(LOCAL), parts.outbox, metrics, workers=2)
    parts.dispatcher.callbacks = callbacks
    yield settings, parts.storage, parts.dispatcher, callbacks, metrics
    callbacks.close()
    parts.callbacks.close()
    parts.close(timeout_s=30)
    # What a test left owed (handed back by the closes) is not the next test's to send.
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("DELETE FROM callback_outbox WHERE tenant_id LIKE 'cb-%'")


class _OtherPod:
    """Another pod's callbacks and sweep, on the same database: `sweep()` takes over
    what is due and waits for its outcomes."""

    def __init__(self, sink: Any, holder: str, metrics: Metrics) -> None:
        self.outbox = Outbox(sink, holder, metrics)
        self.callbacks = Callbacks(CallbackClient(LOCAL), self.outbox, metrics, workers=2)

    def sweep(self) -> int:
        taken = self.outbox.sweep(self.callbacks)
        wait_until(lambda: self.callbacks.pending() == 0, "the callbacks taken over sent")
        return taken

    def close(self) -> None:
        self.callbacks.close(timeout_s=0.0)


def _other_pod(processor: Dispatcher, holder: str, metrics: Metrics) -> _OtherPod:
    return _OtherPod(processor.sink, holder, metrics)


def _owed(settings: Settings, task_id: str) -> tuple[str | None, int, bool] | None:
    """The task's row in callback_outbox: (holder, attempts, due now), or None."""
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT holder, attempts, due_at <= now() FROM callback_outbox WHERE task_id = %s",
            (task_id,),
        ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _process(dispatcher, task, attempt: int):
    """One task through the runner's part of the path, on this thread."""
    return dispatcher.outcome_here(task.model_dump_json().encode(), attempt, "cpu")


def _run(settings, storage, dispatcher, tenant: str, callback_url: str | None):
    url = upload_image(
        storage, settings.allowed_buckets[0], tenant, SAMPLES / SCENES[0]["file"], "cb"
    )
    task = make_task(
        tenant, url, "DETECTION", f"{tenant}-{uuid.uuid4().hex[:8]}", callback_url=callback_url
    )
    return task, _process(dispatcher, task, 1)


def _callback_status(settings, tenant: str, task_id: str, timeout_s: float = 20) -> str | None:
    from gannet.dev import demo

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        row = demo.fetch_rows(settings.database_url, tenant, [task_id])[task_id]
        status = row["callback_status"]
        if status:
            return status
        time.sleep(0.1)
    return status


def test_callback_after_commit_records_delivery_on_the_row(processor_parts, receiver_factory):
    settings, storage, processor, _, _ = processor_parts
    receiver = receiver_factory([200])
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    task, outcome = _run(settings, storage, processor, tenant, receiver.url())
    assert outcome.decision is Decision.ACK and outcome.label == "succeeded"
    assert _callback_status(settings, tenant, task.task_id) == "delivered: HTTP 200"
    (request,) = receiver.requests
    body = request["body"]
    assert body["task_id"] == task.task_id and body["status"] == "succeeded"
    assert body["counts"]["detection"] == expected_counts(SCENES[0])
    assert body["max_detections_reached"] is False
    assert body["result_uri"] == f"gs://{settings.results_bucket}/{tenant}/{task.task_id}.json"


def test_the_summary_says_when_a_steps_counts_may_be_short():
    """A backend acting on the callback's counts is told, as the full result tells, when
    a step's model kept all the boxes it may (its counts may then be short)."""
    task = make_task("t-a", "gs://gannet-images/t-a/x.jpg", "FULL_PIPELINE", "t1")
    result = {
        "segmentation": {"counts": {"patch": 1}, "max_detections_reached": False},
        "detection": {"counts": {"circle": 300}, "max_detections_reached": True},
        "estimation": {"counts": {"circle": 300}},
    }
    assert summary(task, result, "gs://r/t-a/t1.json")["max_detections_reached"] is True
    result["detection"]["max_detections_reached"] = False
    assert summary(task, result, "gs://r/t-a/t1.json")["max_detections_reached"] is False


def test_a_failing_callback_is_recorded_and_the_task_stays_acked(processor_parts, receiver_factory):
    """No redelivery loop, no lost result: ack, the row is a success, the callback's
    failure is on the row, and a redelivery is a duplicate that does not call again."""
    settings, storage, processor, callbacks, metrics = processor_parts
    receiver = receiver_factory([500])
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    task, outcome = _run(settings, storage, processor, tenant, receiver.url())
    assert outcome.decision is Decision.ACK
    assert _callback_status(settings, tenant, task.task_id) == "failed: HTTP 500 after 3 attempts"
    assert len(receiver.requests) == 3
    again = _process(processor, task, 2)
    assert again.decision is Decision.ACK and again.label == "duplicate"
    wait_until(lambda: callbacks.pending() == 0, "callbacks sent")
    assert len(receiver.requests) == 3
    assert metrics.registry.get_sample_value("gannet_callbacks_total", {"result": "failed"}) == 1


def test_a_callback_lost_with_its_pod_is_sent_by_another_pod(processor_parts, receiver_factory):
    """A pod that dies after the commit and before the callback (killed, its node lost):
    the callback was owed in the commit. A redelivery of the task is a duplicate that
    neither infers nor calls; once the dead pod's lease on the callback ends, another
    pod's sweep sends it, once, with the committed result."""
    settings, storage, processor, callbacks, metrics = processor_parts
    receiver = receiver_factory([200])
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    processor.callbacks = None  # the pod that died: nothing in memory sends it
    task, first = _run(settings, storage, processor, tenant, receiver.url())
    processor.callbacks = callbacks
    assert first.label == "succeeded"
    again = _process(processor, task, 2)
    assert again.decision is Decision.ACK and again.label == "duplicate"
    other = _other_pod(processor, "pod-b", metrics)
    assert other.sweep() == 0, "the dead pod's lease has not ended yet"
    time.sleep(settings.callback_lease_s)
    assert other.sweep() == 1
    assert _callback_status(settings, tenant, task.task_id) == "delivered: HTTP 200"
    (request,) = receiver.requests
    assert request["body"]["counts"]["detection"] == expected_counts(SCENES[0])
    assert other.sweep() == 0
    _process(processor, task, 3)
    wait_until(lambda: callbacks.pending() == 0, "callbacks sent")
    assert len(receiver.requests) == 1, "a callback with an outcome is not sent again"
    other.close()


def _failed_once(processor_parts, receiver_factory, **policy: Any) -> tuple[Task, Receiver]:
    """A task run whose callback's first attempt failed (its receiver answers 503) and
    now waits for its retry, under `policy`."""
    settings, storage, processor, callbacks, _ = processor_parts
    down = receiver_factory([503])
    callbacks.client = CallbackClient(_policy(timeout_s=2.0, **policy))
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    task, _ = _run(settings, storage, processor, tenant, down.url())
    wait_until(lambda: len(down.requests) == 1, "the first attempt failed")
    return task, down


def test_a_pod_keeps_the_callbacks_it_still_sends(processor_parts, receiver_factory):
    """A callback waiting for its retry past the lease (its receiver down) stays its
    pod's while that pod renews it: another pod's sweep does not send it as well."""
    settings, _, processor, callbacks, metrics = processor_parts
    task, down = _failed_once(processor_parts, receiver_factory, retries=3, backoff_s=30.0)
    mine = Outbox(processor.sink, processor.holder, metrics)
    other = _other_pod(processor, "pod-b", metrics)
    for _ in range(3):  # 1.5 leases in all
        time.sleep(settings.callback_lease_s / 2)
        assert mine.sweep(callbacks) == 0
        assert other.sweep() == 0
    assert len(down.requests) == 1
    assert _owed(settings, task.task_id) == (processor.holder, 1, False), "its attempt counted"
    other.close()


def test_a_pod_killed_mid_retries_passes_on_the_attempts_it_made(processor_parts, receiver_factory):
    """Pod A's callback failed once and waits for its retry; A's sweep renews it with
    that attempt counted, then A dies (no renewal, no stop). Pod B takes it over and
    makes only the attempts left: three in all, not a fresh three after A's one."""
    settings, _, processor, callbacks, metrics = processor_parts
    task, down = _failed_once(processor_parts, receiver_factory, retries=2, backoff_s=60.0)
    Outbox(processor.sink, processor.holder, metrics).sweep(callbacks)
    time.sleep(settings.callback_lease_s)  # A dead: its lease runs out
    other = _other_pod(processor, "pod-b", metrics)
    assert other.sweep() == 1
    status = _callback_status(settings, task.tenant_id, task.task_id)
    assert status == "failed: HTTP 503 after 3 attempts"
    assert len(down.requests) == 3
    other.close()


def test_two_pods_sweeping_at_once_take_each_callback_once(processor_parts, receiver_factory):
    """Every pod sweeps; a row one is taking is skipped by the other (SKIP LOCKED), so
    that twelve callbacks of pods that died go out twelve times, not more."""
    settings, storage, processor, _, metrics = processor_parts
    receiver = receiver_factory([200])
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    processor.callbacks = None
    tasks = [_run(settings, storage, processor, tenant, receiver.url())[0] for _ in range(12)]
    time.sleep(settings.callback_lease_s)
    pods = [_other_pod(processor, f"pod-{i}", metrics) for i in range(2)]
    barrier = threading.Barrier(2)
    taken: list[int] = []

    def sweep(pod: Any) -> None:
        barrier.wait()
        taken.append(pod.sweep())

    threads = [threading.Thread(target=sweep, args=(pod,)) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(taken) == 12, taken
    for task in tasks:
        assert _callback_status(settings, tenant, task.task_id) == "delivered: HTTP 200"
    assert sorted(r["body"]["task_id"] for r in receiver.requests) == sorted(
        t.task_id for t in tasks
    )
    for pod in pods:
        pod.close()


def test_a_pod_busy_with_its_own_callbacks_still_takes_over_a_dead_pods(
    processor_parts, receiver_factory
):
    """Pod B has a hundred callbacks of its own waiting for a retry (one tenant's
    receiver down): it renews those, and only those, and still takes over a dead pod's
    callback once that pod's lease ends. Renewing every row, or taking nothing while
    busy, left the dead pod's callback waiting as long as the receiver was down."""
    settings, storage, processor, _, metrics = processor_parts
    receiver, down = receiver_factory([200]), receiver_factory([503])
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    processor.callbacks = None  # the pod that died
    task, _ = _run(settings, storage, processor, tenant, receiver.url())
    other = _other_pod(processor, "pod-b", metrics)
    other.callbacks.client = CallbackClient(_policy(timeout_s=2.0, retries=3, backoff_s=60.0))
    for i in range(SWEEP_LIMIT):
        _submit(other.callbacks, "cb-down", f"cb-down-{i}", down.url())
    wait_until(lambda: len(down.requests) == SWEEP_LIMIT, "each failed once", 30)
    time.sleep(settings.callback_lease_s)
    assert other.outbox.sweep(other.callbacks) == 1
    assert _callback_status(settings, tenant, task.task_id) == "delivered: HTTP 200"
    other.close()


def test_a_take_skips_the_rows_another_pod_is_taking(processor_parts):
    """While pod A's take is not yet committed, pod B's take passes its rows by, at
    once, instead of waiting for A and taking them as well (each then sent twice). B's
    sweep says that they are due and how long the oldest has waited (what an alert
    reads), until A's take commits."""
    settings, storage, processor, _, metrics = processor_parts
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    processor.callbacks = None
    for _ in range(3):
        _run(settings, storage, processor, tenant, "http://127.0.0.1:9/never")
    time.sleep(settings.callback_lease_s)
    with psycopg.connect(settings.database_url) as conn:  # one of them due for 100 s
        conn.execute(
            "UPDATE callback_outbox SET due_at = now() - interval '100 s' WHERE task_id = "
            "(SELECT task_id FROM callback_outbox WHERE tenant_id = %s LIMIT 1)",
            (tenant,),
        )
    with psycopg.connect(settings.database_url) as pod_a:
        taken_by_a = pod_a.execute(sink_module._TAKE, (100, "pod-a", 60.0)).fetchall()
        assert len(taken_by_a) == 3
        taken_by_b: list[Any] = []
        b = threading.Thread(
            target=lambda: taken_by_b.extend(processor.sink.take_callbacks("pod-b", 100))
        )
        b.start()
        b.join(5)
        assert not b.is_alive(), "pod B waited for pod A's take"
        b_sweeps = _OtherPod(processor.sink, "pod-b", metrics)
        assert b_sweeps.sweep() == 0
        assert metrics.registry.get_sample_value("gannet_callbacks_due") == 3
        oldest_s = metrics.registry.get_sample_value("gannet_callbacks_due_oldest_seconds")
        assert oldest_s is not None and 100 <= oldest_s < 160
        pod_a.commit()
    assert taken_by_b == []
    assert b_sweeps.sweep() == 0
    assert metrics.registry.get_sample_value("gannet_callbacks_due") == 0
    assert metrics.registry.get_sample_value("gannet_callbacks_due_oldest_seconds") == 0
    swept = metrics.registry.get_sample_value("gannet_callbacks_last_sweep_timestamp_seconds")
    assert swept is not None and abs(swept - time.time()) < 5
    b_sweeps.close()


def test_a_callback_recorded_elsewhere_is_not_taken_over(processor_parts, receiver_factory):
    """An owed row whose callback already has its outcome on the task's row (recorded
    by a daemon before schema 8, or the row's delete lost): taken over by no one and
    deleted, not sent again."""
    settings, storage, processor, _, metrics = processor_parts
    receiver = receiver_factory([200])
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    processor.callbacks = None
    task, _ = _run(settings, storage, processor, tenant, receiver.url())
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))
        conn.execute(
            "UPDATE task_results SET callback_status = 'delivered: HTTP 200' WHERE task_id = %s",
            (task.task_id,),
        )
    time.sleep(settings.callback_lease_s)
    other = _other_pod(processor, "pod-b", metrics)
    assert other.sweep() == 0
    assert _owed(settings, task.task_id) is None
    assert receiver.requests == []
    other.close()


def test_a_pod_hands_back_only_what_it_holds(processor_parts):
    """A stopping pod whose lease on a callback ended, and which another pod took over,
    does not make it due again under the pod now sending it."""
    settings, storage, processor, _, _ = processor_parts
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    processor.callbacks = None
    task, _ = _run(settings, storage, processor, tenant, "http://127.0.0.1:9/never")
    time.sleep(settings.callback_lease_s)
    assert len(processor.sink.take_callbacks("pod-b", 100)) == 1
    processor.sink.hand_back_callbacks(processor.holder, [(task.task_id, 3)])
    assert _owed(settings, task.task_id) == ("pod-b", 0, False)


def test_no_attempt_starts_once_the_lease_may_have_run_out(receiver_factory):
    """A worker whose last renewal is older than its lease allows (it was frozen, or
    could not reach PostgreSQL) starts no attempt until it renews: then it sends what
    is still its own and drops what another worker took over meanwhile."""
    receiver = receiver_factory([200])
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(LOCAL), record, Metrics(), workers=2)
    try:
        callbacks.renewed((), time.monotonic() - 1.0)  # the lease may have run out
        for i in range(3):
            _submit(callbacks, f"tenant-{i}", f"a{i}", receiver.url())
        time.sleep(0.5)
        assert receiver.requests == [] and statuses == {}
        callbacks.renewed({"a1"}, time.monotonic() + 60.0)  # a1 was taken over
        wait_until(lambda: callbacks.pending() == 0, "the others sent")
        assert sorted(statuses) == ["a0", "a2"]
        assert sorted(r["body"]["task_id"] for r in receiver.requests) == ["a0", "a2"]
        assert callbacks.held() == []
        with callbacks._cond:
            assert not callbacks._waiting, "nothing of a1's tenant kept"
    finally:
        callbacks.close(timeout_s=0.0)


def test_a_callback_in_flight_when_taken_over_is_neither_retried_nor_recorded(
    receiver_factory,
):
    """Its attempt was under way when the renewal said another worker holds it now:
    that worker retries it and records its outcome; this one's late answer (a 503
    here) must not retry it, nor overwrite the other's outcome."""
    receiver = receiver_factory([503])
    reached, answer = threading.Event(), threading.Event()
    receiver.on_request = lambda: (reached.set(), answer.wait(10))
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(LOCAL), record, Metrics(), workers=1)
    try:
        _submit(callbacks, "tenant-a", "a0", receiver.url())
        assert reached.wait(10)
        callbacks.renewed({"a0"}, time.monotonic() + 60.0)
        answer.set()
        wait_until(lambda: callbacks.pending() == 0, "its attempt over")
    finally:
        callbacks.close(timeout_s=0.0)
    assert statuses == {} and record.handed == []
    assert len(receiver.requests) == 1


def test_a_stop_while_the_lease_may_have_run_out_hands_everything_back_at_once(
    receiver_factory,
):
    """Nothing can be sent until a renewal, so the stop does not wait for its grace:
    it hands every callback back at once."""
    receiver = receiver_factory([200])
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(LOCAL), record, Metrics(), workers=2)
    callbacks.renewed((), time.monotonic() - 1.0)
    for i in range(3):
        _submit(callbacks, "tenant-a", f"a{i}", receiver.url())
    started = time.monotonic()
    callbacks.close(timeout_s=10.0)
    assert time.monotonic() - started < 1.0
    assert statuses == {} and sorted(record.handed) == [("a0", 0), ("a1", 0), ("a2", 0)]
    assert receiver.requests == []


def test_a_pod_whose_lease_ran_out_does_not_send_what_another_took_over(
    processor_parts, receiver_factory
):
    """Pod A's callback waits for its retry; A stops renewing (frozen) past its lease,
    and pod B takes the callback over and delivers it. When A renews again it learns
    the callback is not its own any more and drops it, instead of retrying it too (a
    review's 25 s freeze sent 157 of 160 callbacks twice)."""
    settings, storage, processor, callbacks, metrics = processor_parts
    receiver = receiver_factory([503, 200])
    callbacks.client = CallbackClient(_policy(timeout_s=2.0, retries=3, backoff_s=30.0))
    mine = Outbox(processor.sink, processor.holder, metrics)
    mine.sweep(callbacks)
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    task, _ = _run(settings, storage, processor, tenant, receiver.url())
    wait_until(lambda: len(receiver.requests) == 1, "A's first attempt failed")
    time.sleep(settings.callback_lease_s)  # A frozen: no renewal
    other = _other_pod(processor, "pod-b", metrics)
    assert other.sweep() == 1
    assert _callback_status(settings, tenant, task.task_id) == "delivered: HTTP 200"
    assert callbacks.pending() == 1  # A still waits to retry it
    mine.sweep(callbacks)
    assert callbacks.pending() == 0 and callbacks.held() == []
    assert len(receiver.requests) == 2
    other.close()


def test_the_outbox_thread_outlives_a_bug_in_a_sweep(processor_parts):
    """A sweep that raises what it should not (injected: no input is known to make it)
    is logged and the next one runs: with the thread dead, the pod would renew nothing
    and its callbacks would be taken over and sent twice."""
    _, _, processor, _, metrics = processor_parts
    asked: list[float] = []

    class Buggy(Callbacks):
        def held(self) -> list[tuple[str, int]]:
            asked.append(time.monotonic())
            if len(asked) == 1:
                raise RuntimeError("injected")
            return super().held()

    outbox = Outbox(processor.sink, "pod-buggy", metrics)  # a sweep every second (lease 4 s)
    buggy = Buggy(CallbackClient(LOCAL), outbox, metrics, workers=1)
    outbox.start(buggy)
    try:
        wait_until(lambda: len(asked) >= 3, "sweeps after the one that raised", 10)
    finally:
        outbox.stop(timeout_s=5.0)
        buggy.close(timeout_s=0.0)


def test_only_the_holder_records_a_callbacks_outcome(processor_parts):
    """Pod A's lease ran out and pod B took the callback over: A's late outcome (its
    attempt was in flight) is not recorded, and B's owed row stays B's."""
    settings, storage, processor, _, _ = processor_parts
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    processor.callbacks = None
    task, _ = _run(settings, storage, processor, tenant, "http://127.0.0.1:9/never")
    time.sleep(settings.callback_lease_s)
    assert len(processor.sink.take_callbacks("pod-b", 100)) == 1
    late = "failed: HTTP 503 after 1 attempts"
    Outbox(processor.sink, processor.holder, Metrics()).record(task.task_id, tenant, late)
    assert _callback_status(settings, tenant, task.task_id, timeout_s=0.5) is None
    assert _owed(settings, task.task_id) == ("pod-b", 0, False)


@pytest.fixture
def cut_off(processor_parts) -> Iterator[tuple[Callbacks, Outbox, Relay, sink_module.Sink]]:
    """The processor's callbacks with their outcomes written through a relay to
    PostgreSQL that the test cuts (a failover, a restart): this pod's outbox, under its
    holder."""
    settings, _, processor, _, metrics = processor_parts
    relay, through = relay_to(settings.database_url)
    sink = sink_module.Sink(
        through, pool_size=1, timeout_s=1.0, callback_lease_s=settings.callback_lease_s
    )
    sink.open()
    outbox = Outbox(sink, processor.holder, metrics)
    callbacks = Callbacks(CallbackClient(LOCAL), outbox, metrics, workers=1)
    processor.callbacks = callbacks
    yield callbacks, outbox, relay, sink
    callbacks.close(timeout_s=0.0)
    relay.close()
    sink.close()


def _delivered_while_cut_off(processor_parts, cut_off, receiver) -> Task:
    """A task run, and its callback delivered, while its pod cannot write the outcome."""
    settings, storage, processor, _, _ = processor_parts
    callbacks, _, relay, _ = cut_off
    relay.cut()
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    task, first = _run(settings, storage, processor, tenant, receiver.url())
    assert first.label == "succeeded"
    wait_until(lambda: callbacks.pending() == 0, "the callback delivered")
    assert len(receiver.requests) == 1
    assert _owed(settings, task.task_id) == (processor.holder, 0, False), "not written"
    return task


def test_an_outcome_postgresql_did_not_take_is_written_by_the_next_sweep(
    processor_parts, cut_off, receiver_factory, caplog
):
    """A callback delivered while its pod could not reach PostgreSQL: the outcome is
    kept, and the pod's next sweep once PostgreSQL answers writes it. Written before the
    sweep takes over rows come due, it is not taken over and sent again by that sweep,
    even when the outage outlasted its row's lease, as here; another pod sweeping after
    finds nothing to send (before, the row came due at the lease's end and a pod sent
    it again). Written once: the next sweep has nothing left to write."""
    settings, _, processor, _, metrics = processor_parts
    callbacks, outbox, relay, _ = cut_off
    receiver = receiver_factory([200])
    task = _delivered_while_cut_off(processor_parts, cut_off, receiver)
    with pytest.raises(TransientError):
        outbox.sweep(callbacks)  # still cut off: kept
    time.sleep(settings.callback_lease_s)  # its row is due now
    relay.restore()
    caplog.set_level(logging.INFO, logger="gannet")
    wait_until(lambda: _swept(outbox, callbacks), "a sweep once PostgreSQL answers")
    assert _callback_status(settings, task.tenant_id, task.task_id) == "delivered: HTTP 200"
    assert _owed(settings, task.task_id) is None
    other = _other_pod(processor, "pod-b", metrics)
    assert other.sweep() == 0
    wait_until(lambda: callbacks.pending() == 0, "nothing queued here either")
    assert len(receiver.requests) == 1
    outbox.sweep(callbacks)
    assert not [r for r in caplog.records if "another worker" in r.getMessage()]
    other.close()


def test_an_outcome_kept_at_a_stop_is_written_by_the_stop(stack, receiver_factory):
    """A daemon delivers a callback while it cannot reach PostgreSQL (the receiver cuts
    it off as the request arrives), so the outcome is kept; PostgreSQL is back, and the
    daemon is stopped before its next sweep (a lease of 240 s: one every 60 s). The stop
    writes the outcome, on its last try (`Outbox.finish`). Left unwritten, the row came
    due at its lease's end and another pod sent the callback again."""
    relay, through = relay_to(stack.settings.database_url)
    receiver = receiver_factory([200])
    receiver.on_request = relay.cut
    try:
        daemon = stack.start_daemon(
            GANNET_DATABASE_URL=through,
            GANNET_DB_TIMEOUT_S="2",
            GANNET_ALLOW_HTTP_CALLBACKS="true",
            GANNET_CALLBACK_ALLOW_PRIVATE_ADDRESSES="true",
            GANNET_CALLBACK_LEASE_S="240",
        )
        task = stack.task(stack.upload(SCENES[0]["file"]), callback_url=receiver.url())
        stack.publish([task])
        wait_until(
            lambda: any(
                e["message"].startswith("callback outcome not written yet")
                for e in daemon.log_entries()
            ),
            "the outcome kept",
            60,
        )
        relay.restore()
        assert daemon.stop() == 0
    finally:
        relay.close()
    assert len(receiver.requests) == 1
    status = _callback_status(stack.settings, task.tenant_id, task.task_id, timeout_s=0.1)
    assert status == "delivered: HTTP 200"
    assert _owed(stack.settings, task.task_id) is None
    assert "not written before stopping" not in daemon.log_path.read_text()


def _swept(outbox: Outbox, callbacks: Callbacks) -> bool:
    try:
        outbox.sweep(callbacks)
    except TransientError:  # the pool's new connection not made yet
        return False
    return True


def test_a_stopping_pod_writes_the_outcomes_it_kept(processor_parts, cut_off, receiver_factory):
    """The stop (daemon: after the callbacks' close) tries the outcomes kept once more,
    for a bounded time: a PostgreSQL that has stopped answering does not hold it (its
    answer deadline is a minute). PostgreSQL back by then, the outcome is written and
    no pod sends the callback again."""
    settings, _, _, _, _ = processor_parts
    _, outbox, relay, sink = cut_off
    receiver = receiver_factory([200])
    task = _delivered_while_cut_off(processor_parts, cut_off, receiver)
    outbox.finish(timeout_s=5.0)  # still cut off: said, and left for the lease's end
    assert _owed(settings, task.task_id) is not None
    relay.restore()
    wait_until(lambda: answers(sink.callbacks_due), "a connection to PostgreSQL again")
    relay.freeze()  # the connection open, nothing answered
    started = time.monotonic()
    outbox.finish(timeout_s=1.0)
    assert time.monotonic() - started < 2.0
    assert _owed(settings, task.task_id) is not None
    relay.thaw()
    wait_until(
        lambda: (outbox.finish(timeout_s=5.0), _owed(settings, task.task_id) is None)[1],
        "written once PostgreSQL answers",
    )
    assert _callback_status(settings, task.tenant_id, task.task_id) == "delivered: HTTP 200"


def test_a_callback_pending_here_is_not_queued_twice(receiver_factory):
    """A sweep that takes over a callback this process still has pending (its renewal
    came late) does not send it a second time from here."""
    receiver = receiver_factory([200])
    receiver.on_request = lambda: time.sleep(0.3)
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(LOCAL), record, Metrics(), workers=2)
    try:
        _submit(callbacks, "tenant-a", "a0", receiver.url())
        _submit(callbacks, "tenant-a", "a0", receiver.url())
        wait_until(lambda: callbacks.pending() == 0, "nothing pending")
        assert "a0" in statuses
    finally:
        # Time to send whatever is still queued: a second job of a0 would be sent here,
        # not handed back unsent.
        callbacks.close(timeout_s=5.0)
    assert len(receiver.requests) == 1
    assert record.handed == []


def test_a_callback_submitted_after_the_close_is_handed_back_at_once():
    """A commit of a runner abandoned at shutdown, or a sweep cut off, that comes after
    the callbacks closed: handed back at once, not recorded as failed, nor kept in a
    list that no one hands back."""
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(LOCAL), record, Metrics(), workers=1)
    callbacks.close(timeout_s=0.0)
    _submit(callbacks, "tenant-a", "a0", "http://127.0.0.1:9/never")
    assert statuses == {}
    assert record.handed == [("a0", 0)]


def test_a_callback_taken_over_counts_the_attempts_made_before(receiver_factory):
    """A callback handed back after two attempts gets the rest of its retries from the
    pod that takes it over, not a fresh set each time a pod stops."""
    failing = receiver_factory([500])
    statuses, record = _recorded()
    callbacks = Callbacks(CallbackClient(LOCAL), record, Metrics(), workers=1)
    try:
        task = make_task(
            "tenant-a", "gs://bkt/tenant-a/x.jpg", "DETECTION", "a0", callback_url=failing.url()
        )
        callbacks.submit(task, {}, "gs://bkt/r.json", attempts=2)
        wait_until(lambda: "a0" in statuses, "the outcome recorded")
    finally:
        callbacks.close(timeout_s=0.0)
    assert statuses["a0"][1] == "failed: HTTP 500 after 3 attempts"
    assert len(failing.requests) == 1


def test_a_refused_callback_is_recorded(processor_parts):
    settings, storage, processor, callbacks, _ = processor_parts
    callbacks.client = CallbackClient(CallbackPolicy())  # the production default
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    task, outcome = _run(settings, storage, processor, tenant, "https://169.254.169.254/x")
    assert outcome.decision is Decision.ACK
    status = _callback_status(settings, tenant, task.task_id)
    assert status is not None and status.startswith("refused:") and "link-local" in status


def test_a_callback_whose_sending_raises_is_recorded_as_failed(processor_parts):
    """A bug in sending (the client raising something it should have answered, injected:
    no input is known to make it) still leaves a status on the row and a count, instead
    of vanishing in a future nobody reads; the task stays a success."""
    settings, storage, processor, callbacks, metrics = processor_parts

    class Raising(CallbackClient):
        def attempt(self, url: str, body: bytes, number: int) -> Any:
            raise RuntimeError("injected")

    callbacks.client = Raising(LOCAL)
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    task, outcome = _run(settings, storage, processor, tenant, "https://example.com/hook")
    assert (outcome.decision, outcome.label) == (Decision.ACK, "succeeded")
    assert _callback_status(settings, tenant, task.task_id) == "failed: RuntimeError: injected"
    assert metrics.registry.get_sample_value("gannet_callbacks_total", {"result": "failed"}) == 1


class _Paused:
    """A pipeline paused after the model ran and before the result is written, as a task
    that runs longer than its claim's TTL. The model and steps are real."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.ran = threading.Event()
        self.go_on = threading.Event()

    def check(self, task: Any) -> Any:
        return self.pipeline.check(task)

    def run(self, *args: Any) -> Any:
        result = self.pipeline.run(*args)
        self.ran.set()
        assert self.go_on.wait(60)
        return result


def _pod(processor: Dispatcher, holder: str, claim_ttl_s: float = 60.0) -> Dispatcher:
    """Another worker on the same parts, named `holder` in task claims, with callbacks
    of its own (held by `holder`: only it may record their outcomes)."""
    outbox = Outbox(processor.sink, holder, processor.metrics)
    own = Callbacks(CallbackClient(LOCAL), outbox, processor.metrics, 2)
    return Dispatcher(
        processor.pipeline,
        processor.sink,
        processor.storage,
        processor.settlers,
        processor.metrics,
        processor.results_bucket,
        processor.max_body_bytes,
        ["cpu"],
        1,
        own,
        holder=holder,
        claim_ttl_s=claim_ttl_s,
    )


def test_only_the_attempt_that_committed_calls_back(processor_parts, receiver_factory):
    """Pod A runs past its 1 s claim; pod B takes the task over, commits and calls back.
    A then commits nothing and is acked as a duplicate: it must not call back as well,
    with a result (its own processed_at) that is not the committed one."""
    settings, storage, processor, _, _ = processor_parts
    receiver = receiver_factory([200])
    tenant = f"cb-{uuid.uuid4().hex[:6]}"
    url = upload_image(
        storage, settings.allowed_buckets[0], tenant, SAMPLES / SCENES[0]["file"], "cb"
    )
    task_id = f"{tenant}-{uuid.uuid4().hex[:8]}"
    task = make_task(tenant, url, "DETECTION", task_id, callback_url=receiver.url())
    body = task.model_dump_json().encode()
    pod_a = _pod(processor, "pod-slow", claim_ttl_s=1.0)
    pod_b = _pod(processor, "pod-fast")
    pod_a.pipeline = paused = _Paused(processor.pipeline)  # type: ignore[assignment]
    outcomes: list[Any] = []
    slow = threading.Thread(target=lambda: outcomes.append(pod_a.outcome_here(body, 1, "cpu")))
    slow.start()
    try:
        assert paused.ran.wait(60)
        time.sleep(1.2)  # A's claim has run out
        assert pod_b.outcome_here(body, 2, "cpu").label == "succeeded"
    finally:
        paused.go_on.set()
        slow.join(60)
    [late] = outcomes
    assert (late.decision, late.label) == (Decision.ACK, "duplicate")
    assert _callback_status(settings, tenant, task_id) == "delivered: HTTP 200"
    for pod in (pod_a, pod_b):
        assert pod.callbacks is not None
        wait_until(lambda pod=pod: pod.callbacks.pending() == 0, "callbacks sent")
        pod.callbacks.close(timeout_s=0.0)
    from gannet.dev import demo

    row = demo.fetch_rows(settings.database_url, tenant, [task_id])[task_id]
    (request,) = receiver.requests
    assert request["body"]["processed_at"] == row["result"]["processed_at"]
