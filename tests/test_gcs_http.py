"""gcs_http against small real HTTP servers that misbehave the way real ones do."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from http import server
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials, Credentials

from gannet.gcs_http import Endpoint


class _Server(server.ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    seen_tokens: list[str | None]


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[_Server] = []

    def start(handler: type[server.BaseHTTPRequestHandler]) -> tuple[str, _Server]:
        httpd = _Server(("127.0.0.1", 0), handler)
        httpd.seen_tokens = []
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}", httpd

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


class _Handler(server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_kept_alive_connection_the_server_dropped_is_replaced_without_an_error(serve):
    """Servers close idle kept-alive connections whenever they like, without saying so
    in the response before: the next request on such a connection fails to be read, and
    must go again on a new connection instead of failing the task."""

    class DropsAfterEachResponse(_Handler):
        def do_GET(self) -> None:
            self.reply(200, self.path.encode())
            self.close_connection = True  # closed after the response, unannounced

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.reply(200, body)
            self.close_connection = True

    url, httpd = serve(DropsAfterEachResponse)
    endpoint = Endpoint(url, AnonymousCredentials())
    for i in range(3):
        assert endpoint.request("GET", f"/o/{i}?alt=media").data == f"/o/{i}?alt=media".encode()
        assert endpoint.request("POST", "/upload", body=b"x" * i).data == b"x" * i
    # Every request after the first found its connection closed and opened another.
    assert endpoint.connections_opened == httpd.connections == 6


def test_connections_are_kept_alive_and_reused(serve):
    class KeepsAlive(_Handler):
        def do_GET(self) -> None:
            self.reply(200, b"ok")

    url, httpd = serve(KeepsAlive)
    endpoint = Endpoint(url, AnonymousCredentials())
    for _ in range(20):
        assert endpoint.request("GET", "/o/x").status == 200
    assert endpoint.connections_opened == httpd.connections == 1
    endpoint.close()


def test_an_access_token_refused_as_expired_is_refreshed_and_the_request_repeated(serve):
    """Credentials here are a stand-in for Google's token service, which cannot run
    here: refresh() hands out a new token as google-auth's would. The server is real
    and answers 401 to any token but the new one."""

    class WantsFreshToken(_Handler):
        def do_GET(self) -> None:
            token = self.headers.get("Authorization")
            self.server.seen_tokens.append(token)
            self.reply(200 if token == "Bearer fresh" else 401, b"")

    class Rotating(Credentials):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.token = "stale"  # still valid by its expiry, refused by the server

        def refresh(self, request: Any) -> None:
            self.token = "fresh"

    url, httpd = serve(WantsFreshToken)
    endpoint = Endpoint(url, Rotating())
    assert endpoint.request("GET", "/o/x").status == 200
    assert httpd.seen_tokens == ["Bearer stale", "Bearer fresh"]
    # The 401 came over a kept-alive connection: the repeat goes over the same one.
    assert endpoint.connections_opened == httpd.connections == 1


def test_a_server_that_is_not_there_fails_the_request():
    endpoint = Endpoint("http://127.0.0.1:9", AnonymousCredentials(), connect_timeout_s=2)
    with pytest.raises(ConnectionRefusedError):
        endpoint.request("GET", "/o/x")


def test_an_https_endpoint_speaks_tls_and_never_falls_back_to_plain_http(serve):
    """GCS is https: a server that answers in plain HTTP fails the TLS handshake, and
    the request fails rather than going out unencrypted (tokens ride in its headers)."""

    class PlainHttp(_Handler):
        def do_GET(self) -> None:
            self.reply(200, b"plain")

    url, httpd = serve(PlainHttp)
    endpoint = Endpoint(url.replace("http://", "https://"), AnonymousCredentials())
    with pytest.raises(ssl.SSLError):
        endpoint.request("GET", "/o/x")
    # Tried twice, the second time on a new connection; neither got past the handshake.
    assert endpoint.connections_opened == 0 and httpd.connections == 2
