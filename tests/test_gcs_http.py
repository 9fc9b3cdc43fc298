"""gcs_http against small real HTTP servers that misbehave the way real ones do."""

from __future__ import annotations

import functools
import gzip
import io
import re
import ssl
import threading
import time
import tracemalloc
from typing import Any

import pytest
from conftest import SAMPLES, StubHandler
from google.auth.credentials import AnonymousCredentials, Credentials

from gannet.errors import ErrorCode, PermanentError, TransientError
from gannet.gcs_http import Endpoint, Reply, Response
from gannet.settings import REPO_ROOT
from gannet.storage import Storage, make_client
from gannet.task import GsUrl


def test_a_kept_alive_connection_the_server_dropped_is_replaced_without_an_error(serve):
    """Servers close idle kept-alive connections whenever they like, without saying so
    in the response before: the next request on such a connection fails to be read, and
    must go again on a new connection instead of failing the task."""

    class DropsAfterEachResponse(StubHandler):
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
    class KeepsAlive(StubHandler):
        def do_GET(self) -> None:
            self.reply(200, b"ok")

    url, httpd = serve(KeepsAlive)
    endpoint = Endpoint(url, AnonymousCredentials())
    for _ in range(20):
        assert endpoint.request("GET", "/o/x").status == 200
    assert endpoint.connections_opened == httpd.connections == 1
    endpoint.close()


def test_a_connection_idle_too_long_is_not_used_again(serve):
    """A network path may forget an idle connection without telling either end (a NAT's
    or firewall's idle timeout: Cloud NAT's is 20 minutes): a request sent on it is never
    answered, and would wait out the read timeout (a minute in the daemon) and fail its
    task. Here the server goes silent on a connection that has idled, as such a path
    does; a connection idle past the limit must not be used again."""

    class SilentAfterIdle(StubHandler):
        def do_GET(self) -> None:
            if getattr(self, "answered", False):
                threading.Event().wait(30)  # the path forgot this connection
                return
            self.answered = True
            self.reply(200, b"ok")

    url, httpd = serve(SilentAfterIdle)
    endpoint = Endpoint(url, AnonymousCredentials(), read_timeout_s=5.0, max_idle_s=0.2)
    assert endpoint.request("GET", "/o/x").status == 200
    threading.Event().wait(0.3)
    assert endpoint.request("GET", "/o/x").status == 200  # not TimeoutError
    assert endpoint.connections_opened == httpd.connections == 2
    endpoint.close()


def test_an_access_token_refused_as_expired_is_refreshed_and_the_request_repeated(serve):
    """Credentials here are a stand-in for Google's token service, which cannot run
    here: refresh() hands out a new token as google-auth's would. The server is real
    and answers 401 to any token but the new one."""

    class WantsFreshToken(StubHandler):
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

    class PlainHttp(StubHandler):
        def do_GET(self) -> None:
            self.reply(200, b"plain")

    url, httpd = serve(PlainHttp)
    endpoint = Endpoint(url.replace("http://", "https://"), AnonymousCredentials())
    with pytest.raises(ssl.SSLError):
        endpoint.request("GET", "/o/x")
    # Tried twice, the second time on a new connection; neither got past the handshake.
    assert endpoint.connections_opened == 0 and httpd.connections == 2


def test_responses_are_read_whatever_framing_the_server_chooses(serve):
    """The response's headers are read without http.client's email parser (gcs_http.
    Response), so the framing it decides from them is checked here on a real socket:
    a chunked body, a 100 Continue before the answer, folded and repeated headers, a
    body that ends where the server closes, and "Connection: close", after which the
    next request opens a new connection instead of failing."""

    class Framings(StubHandler):
        def do_GET(self) -> None:
            raw = self.wfile.write
            if self.path == "/chunked":
                raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                raw(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            elif self.path == "/continue":
                raw(b"HTTP/1.1 100 Continue\r\nX-Skipped: 1\r\n\r\n")
                raw(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
            elif self.path == "/folded":
                raw(b"HTTP/1.1 200 OK\r\nX-Goog-Hash: crc32c=a\r\nX-Goog-Hash: md5=b\r\n")
                raw(b"X-Long: one\r\n two\r\nContent-Length: 3\r\n\r\nabc")
            elif self.path == "/until-close":
                raw(b"HTTP/1.0 200 OK\r\n\r\nto the end")
                self.close_connection = True
            else:
                raw(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 4\r\n\r\ngone")
                self.close_connection = True

    url, httpd = serve(Framings)
    endpoint = Endpoint(url, AnonymousCredentials())
    assert endpoint.request("GET", "/chunked").data == b"hello world"
    assert endpoint.request("GET", "/continue") == Reply(201, b"ok")
    assert endpoint.request("GET", "/folded").data == b"abc"
    assert endpoint.connections_opened == 1  # all three on one kept-alive connection
    assert endpoint.request("GET", "/until-close").data == b"to the end"
    assert endpoint.request("GET", "/missing") == Reply(404, b"gone")
    assert endpoint.request("GET", "/chunked").data == b"hello world"
    assert endpoint.connections_opened == httpd.connections == 3


def test_response_headers_are_found_by_any_case_and_joined_when_repeated():
    """The header lookups http.client makes, on a response's bytes read through a
    stand-in socket: Endpoint.request answers only the status and the body, so the test
    above, on a real socket, sees the framing these headers decide but not their values."""

    class Sock:
        def makefile(self, mode: str) -> io.BytesIO:
            return io.BytesIO(
                b"HTTP/1.1 200 OK\r\nX-Goog-Hash: crc32c=a\r\nx-goog-hash: md5=b\r\n"
                b"X-Long: one\r\n\ttwo\r\nContent-Length: 0\r\n\r\n"
            )

    response = Response(Sock(), method="GET")  # type: ignore[arg-type]
    response.begin()
    assert response.getheader("X-GOOG-HASH") == "crc32c=a, md5=b"
    assert response.getheader("x-long") == "one two"
    assert response.getheader("missing", "none") == "none"
    assert dict(response.getheaders())["content-length"] == "0"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_an_image_larger_than_the_limit_is_refused_without_reading_it_all(serve, framing):
    """A ranged read asks for one byte more than the limit, but GCS ignores the Range
    of an object stored with Content-Encoding: gzip (it decompresses it on the way: a
    200 with the whole image, chunked, no Content-Length), as a server may any Range.
    The body is read no further than the limit: a small gzip of a huge image must not
    take a runner's memory (the whole of it was read, then refused). The connection,
    with the rest of the body unread, is closed, and the next read opens another."""
    total = 256 << 20  # what the server would send, in 1 MiB chunks
    sent: list[int] = []
    done = threading.Event()

    class WholeObjectAlways(StubHandler):
        def do_GET(self) -> None:
            if "small" in self.path:
                self.reply(206, b"fits")
                return
            chunk, written = b"\0" * (1 << 20), 0
            try:
                if framing == "chunked":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    while written < total:
                        self.wfile.write(b"100000\r\n" + chunk + b"\r\n")
                        written += len(chunk)
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
                    while written < total:
                        self.wfile.write(chunk)
                        written += len(chunk)
            except OSError:
                self.close_connection = True  # the client hung up: what it should do
            finally:
                sent.append(written)
                done.set()

    url, httpd = serve(WholeObjectAlways)
    storage = Storage(make_client("gannet-test", url))
    with pytest.raises(PermanentError) as err:
        storage.read(GsUrl.parse("gs://images/t/bomb.jpg"), 1 << 20)
    assert err.value.code == ErrorCode.IMAGE_TOO_LARGE
    assert done.wait(10)
    assert sent[0] < 32 << 20, f"the server sent {sent[0] >> 20} MiB of a 1 MiB limit"
    # The abandoned connection is not reused: the next read goes on a new one.
    assert storage.read(GsUrl.parse("gs://images/t/small.jpg"), 1 << 20) == b"fits"
    assert storage.endpoint.connections_opened == httpd.connections == 2


def test_a_body_cut_short_is_never_taken_for_a_smaller_image(serve):
    """A body over the limit is read only up to it: one cut short by the server (its
    Content-Length over the limit, fewer bytes than the limit sent) fails the read, to
    be retried, rather than passing for a whole image of fewer bytes."""

    class CutShort(StubHandler):
        def do_GET(self) -> None:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n" + b"x" * 500)
            self.close_connection = True

    url, _ = serve(CutShort)
    storage = Storage(make_client("gannet-test", url))
    with pytest.raises(TransientError, match="IncompleteRead"):
        storage.read(GsUrl.parse("gs://images/t/cut.jpg"), 1000)


def test_an_object_with_many_custom_metadata_entries_is_read(serve):
    """GCS sends an object's custom metadata with its bytes, one x-goog-meta-* header
    per entry (so does the emulator), and allows 8 KiB of it: a few hundred entries are
    a valid image. http.client's limit of 100 headers made each read of such an image
    fail, the task retried until its dead letter."""

    class ManyMetadataHeaders(StubHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            for i in range(2000):
                self.send_header(f"x-goog-meta-k{i}", "v")
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"img")

    url, _ = serve(ManyMetadataHeaders)
    endpoint = Endpoint(url, AnonymousCredentials())
    assert endpoint.request("GET", "/o/x?alt=media") == Reply(200, b"img")


def test_credentials_that_cannot_be_refreshed_fail_the_read_as_transient(serve):
    """The metadata server (Workload Identity's token source) cannot run here: the
    credentials stand in for it failing as it does in a blip, with google-auth's own
    TransportError. The server is real and refuses the stale token. The task must be
    retried as a dependency that is unavailable (nacked, `dependency_unavailable`),
    not end as an unexpected error with a traceback."""
    from google.auth.exceptions import TransportError

    class Refuses(StubHandler):
        def do_GET(self) -> None:
            self.reply(401, b"")

    class MetadataServerDown(Credentials):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.token = "stale"

        def refresh(self, request: Any) -> None:
            raise TransportError("Failed to retrieve http://metadata.google.internal/...")

    url, _ = serve(Refuses)
    storage = Storage(make_client("gannet-test", url))
    storage.endpoint = Endpoint(url, MetadataServerDown())
    with pytest.raises(TransientError) as caught:
        storage.read(GsUrl.parse("gs://bkt/t/x.jpg"), 1 << 20)
    assert caught.value.code is ErrorCode.DEPENDENCY_UNAVAILABLE
    assert "credentials" in caught.value.message and "metadata.google.internal" in str(
        caught.value.message
    )


@pytest.mark.parametrize("drips", ["body", "headers"])
def test_a_server_that_drips_its_answer_is_cut_off_at_the_requests_deadline(serve, drips):
    """A server (or a broken middlebox) that sends its answer a byte every 0.2 s never
    lets a read wait out the socket's timeout, which bounds each read, not the request:
    the request ran for as long as the server liked (here 30 bytes: 6 s), its runner lost
    to every other task. Each request has a deadline, by default the connect and read
    timeouts together (here 0.5 + 0.5 s), and fails at it with TimeoutError, which a
    task's read takes for a transient failure (nacked, not quarantined)."""

    class Drips(StubHandler):
        def do_GET(self) -> None:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n"
            try:
                if drips == "headers":  # the status line at once, then a byte at a time
                    self.wfile.write(head[:17])
                    dripped = head[17:] + b"x" * 30
                else:  # status line and headers at once, then the body a byte at a time
                    self.wfile.write(head)
                    dripped = b"x" * 30
                for i in range(len(dripped)):
                    time.sleep(0.2)
                    self.wfile.write(dripped[i : i + 1])
            except OSError:
                pass  # the client gave up: what it should do
            self.close_connection = True

    url, _ = serve(Drips)
    endpoint = Endpoint(url, AnonymousCredentials(), connect_timeout_s=0.5, read_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        endpoint.request("GET", "/o/x?alt=media", max_body=1 << 20)
    took = time.monotonic() - started
    assert 0.9 < took < 1.6, f"the request ran {took:.2f} s, its deadline is 1 s"

    storage = Storage(make_client("gannet-test", url))
    storage.endpoint = endpoint
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        storage.read(GsUrl.parse("gs://images/t/x.jpg"), 1 << 20)
    assert caught.value.code is ErrorCode.DEPENDENCY_UNAVAILABLE
    assert "TimeoutError" in caught.value.message
    assert time.monotonic() - started < 1.6


@functools.cache
def _bomb() -> bytes:
    return gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in 64 KiB


@pytest.mark.parametrize("ranges", ["applied to the gzip bytes", "ignored"])
def test_an_image_stored_gzip_compressed_and_served_so_is_read_decompressed_within_the_limit(
    serve, ranges
):
    """An object uploaded with Content-Encoding: gzip and Cache-Control: no-transform is
    served as stored, its gzip bytes with Content-Encoding: gzip, whatever the request's
    Accept-Encoding (cloud.google.com/storage/docs/transcoding). Its read took those
    bytes for the image: a fine photo quarantined as undecodable. It is decompressed,
    under the same limit on its decompressed size: a small gzip of a huge body is refused
    as too large without being inflated whole. The server here answers as GCS does;
    whether GCS applies the Range to the gzip bytes (RFC 9110: a range is of the encoded
    representation) or sends all of them, as it does when it decompresses, both are
    served. The GCS emulator the suite runs (gcp-storage-emulator) never answers with
    Content-Encoding, so it cannot serve such an object end to end."""
    photo = (SAMPLES / "scene_01.jpg").read_bytes()
    objects = {
        "photo.jpg": gzip.compress(photo),
        "two-members.jpg": gzip.compress(photo[:1000]) + gzip.compress(photo[1000:]),
        "bomb.jpg": _bomb(),
        "corrupt.jpg": gzip.compress(photo)[:-8] + b"\xff" * 8,  # its CRC and length
        "cut.jpg": gzip.compress(photo)[:-100],
    }

    class NoTransform(StubHandler):
        def do_GET(self) -> None:
            stored = objects[self.path.split("%2F")[-1].removesuffix("?alt=media")]
            status, body = 200, stored
            wanted = re.fullmatch(r"bytes=0-(\d+)", self.headers.get("Range", ""))
            if wanted and ranges != "ignored":
                status, body = 206, stored[: int(wanted[1]) + 1]
            self.send_response(status)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Cache-Control", "no-transform")
            self.send_header("X-Goog-Stored-Content-Encoding", "gzip")
            self.send_header("X-Goog-Stored-Content-Length", str(len(stored)))
            if status == 206:
                self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(stored)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    url, _ = serve(NoTransform)
    storage = Storage(make_client("gannet-test", url))

    def read(name: str, limit: int) -> bytes:
        return storage.read(GsUrl.parse(f"gs://images/t/{name}"), limit)

    assert read("photo.jpg", len(photo)) == photo
    assert read("two-members.jpg", len(photo)) == photo
    with pytest.raises(PermanentError, match=r"larger than the \d+-byte limit") as err:
        read("photo.jpg", len(photo) - 1)  # over the limit by one byte once decompressed
    assert err.value.code == ErrorCode.IMAGE_TOO_LARGE

    tracemalloc.start()
    try:
        with pytest.raises(PermanentError) as err:
            read("bomb.jpg", 1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.code == ErrorCode.IMAGE_TOO_LARGE
    assert "gs://images/t/bomb.jpg" in err.value.message and "1048576-byte" in err.value.message
    assert peak < 16 << 20, f"{peak >> 20} MiB taken to refuse it: inflated whole"

    for broken in ("corrupt.jpg", "cut.jpg"):
        with pytest.raises(PermanentError, match="gzip") as err:
            read(broken, len(photo))
        assert err.value.code == ErrorCode.IMAGE_UNDECODABLE


def test_a_config_stored_gzip_compressed_and_served_so_is_read_decompressed(serve):
    """A config uploaded as `gsutil cp -Z` does (Content-Encoding: gzip), with
    Cache-Control: no-transform, is served as stored: its gzip bytes. The daemon read
    them as the YAML and refused the config as not valid (a crash-looping pod at
    start). It is decompressed; gzip data that is corrupt, or inflates past the
    config's limit, is a ConfigError naming the object, as any unreadable config is.
    (The GCS emulator never answers with Content-Encoding: a server answering as GCS
    does stands in for it.)"""
    from gannet import storage as storage_module
    from gannet.config_sources import ConfigError, _read_text

    text = (REPO_ROOT / "configs" / "demo.yaml").read_bytes()
    objects = {
        "demo.yaml": gzip.compress(text),
        "corrupt.yaml": gzip.compress(text)[:-8] + b"\xff" * 8,
        "bomb.yaml": _bomb(),
    }

    class NoTransform(StubHandler):
        def do_GET(self) -> None:
            name = self.path.split("%2F")[-1].split("?")[0]
            if "alt=media" not in self.path:
                self.reply(200, b'{"generation": "3", "contentEncoding": "gzip"}')
                return
            body = objects[name]
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Cache-Control", "no-transform")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    url, _ = serve(NoTransform)
    storage = Storage(make_client("gannet-test", url))
    assert storage.read_url("gs://cfg/configs/demo.yaml") == (text, "3")
    assert storage_module.CONFIG_MAX_BYTES < 64 << 20
    for name, said in (("corrupt.yaml", "corrupt"), ("bomb.yaml", "larger than")):
        with pytest.raises(ConfigError, match=said) as err:
            _read_text(storage.read_url, f"gs://cfg/configs/{name}")
        assert f"gs://cfg/configs/{name}" in str(err.value)
