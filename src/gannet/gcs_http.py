"""The two Cloud Storage requests every task makes (its image, its result), over
kept-alive HTTP connections.

Why not urllib3, which the client library's transport and google-auth's AuthorizedHttp
use: its pool manager, URL parsing, retry and response objects cost 0.2-0.3 ms of CPU
per request more than http.client in one thread, and 0.4-0.5 ms more with another
thread wanting the GIL (docs/benchmark.md, "GCS over http.client"), twice per task.
http.client sends the same request and reads the same response.

A kept-alive connection that the server has since closed fails on send or on the
status line; the request then goes once more on a new connection. Both requests are
safe to repeat: a read, and an upload of the same bytes to the same name. A connection
idle longer than MAX_IDLE_S is closed rather than used: a network path (a NAT's or a
firewall's idle timeout) may have forgotten it without telling either end, and a request
sent on it would wait out the read timeout instead of failing at once. A 401 (an
access token that expired in flight) refreshes the credentials and repeats once, as
google-auth's own transports do. Configs, models and listings stay on the client
library (storage.Storage.client).

Each request (both its attempts) ends at a deadline, by default the connect and read
timeouts together (70 s): a socket's timeout bounds each read, so a server or a
middlebox that drips its answer a byte every few seconds would otherwise hold the
runner for as long as it liked. One thread (`gannet-gcs-deadline`, socket_deadlines.py)
shuts the socket of a request still running at its deadline; a request only registers
with it and leaves (a lock and a dict, no system call: the socket's timeout is never
changed per read).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass
from typing import Any

import urllib3
from google.auth.credentials import Credentials
from google.auth.transport.urllib3 import Request as AuthRequest

from gannet.socket_deadlines import SocketDeadlines

HTTPError = (OSError, http.client.HTTPException)  # what a failed request raises
_MAX_LINE = 65536  # http.client's limit on a header line
# Not http.client's 100 headers: GCS sends an object's custom metadata with its bytes,
# one x-goog-meta-* header per entry, and an object may carry 8 KiB of it (at least a
# byte an entry), besides its own headers. With 100, an image with some 90 entries
# could never be read (nor by the client library, whose urllib3 keeps that limit): its
# task was retried until Pub/Sub dead-lettered it. The server is GCS (or the emulator).
_MAX_HEADERS = 8192 + 100
# Go's net/http default (which Google's Go storage client uses): well under the idle
# timeouts of middleboxes on the way (Cloud NAT's for an established TCP connection: 20
# minutes by default), so a connection is dropped here before one forgets it. Costs a
# new connection per runner after a quiet spell.
MAX_IDLE_S = 90.0


@dataclass(frozen=True)
class Reply:
    status: int
    data: bytes
    encoding: str | None = None  # the answer's Content-Encoding, if any


class Endpoint:
    def __init__(
        self,
        base_url: str,
        credentials: Credentials,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        max_idle_s: float = MAX_IDLE_S,
        deadline_s: float | None = None,
    ) -> None:
        """`base_url`: the JSON API's endpoint (https://storage.googleapis.com, or an
        emulator's http:// address). `deadline_s`: how long a request may take in all,
        both attempts together; by default connect_timeout_s + read_timeout_s, what a
        server that never answers already costs (a connection, then a wait for the
        answer), so that one dripping its answer costs no more."""
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {base_url!r}")
        self._base = base_url.rstrip("/")
        self._prefix = parts.path.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._credentials = credentials
        self._auth = AuthRequest(urllib3.PoolManager())  # type: ignore[no-untyped-call]
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_idle_s = max_idle_s
        self._deadline_s = connect_timeout_s + read_timeout_s if deadline_s is None else deadline_s
        # Idle kept-alive connections and when each was put back, in that order: a
        # request takes the last one (or opens one) and puts it back, so there are as
        # many as requests ever ran at once (one per runner).
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._lock = threading.Lock()
        # Runs before the garbage collector finalizes the sockets, which would warn.
        self._closer = weakref.finalize(self, _close_all, self._idle)
        self.connections_opened = 0  # over the endpoint's life

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        max_body: int | None = None,
        deadline_s: float | None = None,
    ) -> Reply:
        """`path` under the endpoint, with its query. Raises one of HTTPError when the
        request failed twice (the second time on a new connection), or timed out: a
        socket's timeout, or TimeoutError at the request's deadline (`deadline_s`, by
        default the endpoint's).

        `max_body`: the reply's data is at most max_body + 1 bytes, so a longer body
        shows as one; the rest of it is never read (its connection is closed instead).
        Why: a server may answer a Range with the whole object (GCS does for an object
        stored gzip-compressed, decompressed on the way, chunked), and a small gzip of a
        huge image would otherwise be read whole into memory before being refused."""
        url = self._base + path
        deadline_s = self._deadline_s if deadline_s is None else deadline_s
        deadline = time.monotonic() + deadline_s
        fresh = False  # after a failed connection: a new one, the idle ones may be dead too
        for attempt in (1, 2):
            if attempt == 2 and time.monotonic() >= deadline:
                raise _timed_out(deadline_s)
            sent = dict(headers or {})
            self._credentials.before_request(self._auth, method, url, sent)  # type: ignore[no-untyped-call]
            conn = self._take(fresh)
            _DEADLINES.watch(conn, deadline)
            expired = False
            try:
                try:
                    if conn.sock is None:
                        self._connect(conn, deadline, deadline_s)
                    conn.request(method, self._prefix + path, body=body, headers=sent)
                    response = conn.getresponse()
                    reuse = not response.will_close
                    # The usual reply (a ranged read's 206, a write's 200) has a length
                    # within the limit: read whole, as without one.
                    if max_body is None or (
                        response.length is not None and response.length <= max_body
                    ):
                        data = response.read()
                    else:
                        data = _read_at_most(response, max_body + 1)
                        reuse = reuse and response.isclosed()  # else the rest is unread
                finally:
                    expired = _DEADLINES.forget(conn)
            except HTTPError as exc:
                conn.close()
                if expired:  # what the shut socket made of the answer: a timeout
                    raise _timed_out(deadline_s) from exc
                # Most likely a kept-alive connection the server closed: once more on a
                # new one. Not after a timeout: not worth a second wait.
                if attempt == 2 or isinstance(exc, TimeoutError):
                    raise
                fresh = True
                continue
            except BaseException:
                conn.close()
                raise
            if expired:
                # Shut at the deadline as the answer ended: a body that ends where the
                # connection does would pass for a whole one.
                conn.close()
                raise _timed_out(deadline_s)
            if not reuse:
                conn.close()
            else:
                idle_since = time.monotonic()
                with self._lock:
                    self._idle.append((conn, idle_since))
            if response.status == 401 and attempt == 1:
                self._credentials.refresh(self._auth)  # type: ignore[no-untyped-call]
                continue
            return Reply(response.status, data, response.headers.get("content-encoding"))
        raise AssertionError("unreachable: the second attempt returns or raises")

    def close(self) -> None:
        """Close the idle connections (also done when the endpoint is collected)."""
        self._closer()

    def _take(self, fresh: bool) -> http.client.HTTPConnection:
        """An idle connection, the most recently used first, or a new one, not yet
        connected (`fresh`: always; the idle ones may all have been closed by the
        server). When the most recently used has idled too long, so have all the
        others: all are closed."""
        stale: list[tuple[http.client.HTTPConnection, float]] = []
        if not fresh:
            now = time.monotonic()
            with self._lock:
                if self._idle and now - self._idle[-1][1] < self._max_idle_s:
                    return self._idle.pop()[0]
                stale, self._idle[:] = self._idle[:], []
            _close_all(stale)
        conn: http.client.HTTPConnection
        if self._tls is not None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._connect_timeout_s, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(
                self._host, self._port, timeout=self._connect_timeout_s
            )
        conn.response_class = Response
        return conn

    def _connect(
        self, conn: http.client.HTTPConnection, deadline: float, deadline_s: float
    ) -> None:
        """Connects a new connection, under the request's deadline: TLS's handshake on
        the socket the deadline thread can shut (`conn.sock`), not in a wrapping of it
        that keeps the plain one."""
        http.client.HTTPConnection.connect(conn)  # TCP alone, within the connect timeout
        assert conn.sock is not None
        if self._tls is not None:
            conn.sock = self._tls.wrap_socket(
                conn.sock, server_hostname=self._host, do_handshake_on_connect=False
            )
            conn.sock.do_handshake()
        if time.monotonic() >= deadline:  # connected past it, maybe unseen by the thread
            raise _timed_out(deadline_s)
        conn.sock.settimeout(self._read_timeout_s)
        # http.client sends a request's headers and body in two writes: with Nagle
        # on, the body waits for the server's delayed ACK of the headers (40 ms).
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.connections_opened += 1


_DEADLINES = SocketDeadlines("gannet-gcs-deadline")


def _timed_out(deadline_s: float) -> TimeoutError:
    return TimeoutError(f"no complete answer within the request's {deadline_s:g} s deadline")


def _read_at_most(response: http.client.HTTPResponse, amount: int) -> bytes:
    """Up to `amount` bytes of the body. Unlike read(), http.client's read(amt) takes a
    body cut short by a close for its end where the length is known: raised here, as
    read() raises it, so that a cut body never passes for a whole smaller one."""
    expected = None if response.length is None else min(response.length, amount)
    data = response.read(amount)
    if expected is not None and len(data) < expected:
        raise http.client.IncompleteRead(data, expected - len(data))
    return data


def _close_all(idle: list[tuple[http.client.HTTPConnection, float]]) -> None:
    while idle:
        idle.pop()[0].close()


class Headers(dict[str, str]):
    """A response's headers by lower-case name (repeated ones joined by ", "), with the
    lookups http.client makes on them."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)

    def get_all(self, name: str, failobj: list[str] | None = None) -> list[str] | None:
        value = self.get(name)
        return failobj if value is None else [value]


class Response(http.client.HTTPResponse):
    """http.client's response, its headers read into a dict instead of an email message.

    Why: http.client parses a response's headers with the email package, about 17 µs of
    Python under the GIL per response against 2 µs here, twice per task (docs/
    benchmark.md, "The GIL-held figure"). The rest is http.client's own begin(): status
    line, 100-continue, chunked bodies, Content-Length and whether the connection
    closes; reading the body stays http.client's."""

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_headers(self.fp)  # a 100 response's headers: skipped
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = _read_headers(self.fp)
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding) and encoding.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            if self.length is not None and self.length < 0:
                self.length = None
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # no length and no chunks: the body ends at the close


def _read_headers(fp: Any) -> Headers:
    headers = Headers()
    last = ""
    for _ in range(_MAX_HEADERS + 1):
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return headers
        text = line.decode("iso-8859-1")
        if text[0] in " \t" and last:  # an obsolete folded continuation line
            headers[last] += " " + text.strip()
            continue
        name, _, value = text.partition(":")
        last, value = name.strip().lower(), value.strip()
        headers[last] = f"{headers[last]}, {value}" if last in headers else value
    raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
