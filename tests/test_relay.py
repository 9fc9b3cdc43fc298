"""gannet.dev.relay, which sits in front of the Pub/Sub emulator: bytes pass both ways,
a client's reset reaches the server as an ordinary close, and a dead HTTP/2 client's
open streams are ended for it (the emulator keeps leasing messages to a streaming pull
it never saw end)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from conftest import Started

from gannet.dev.relay import _PREFACE, end_streams


@pytest.fixture
def relayed(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, int]]:
    """A listening server, and the port of a relay in front of it (given the relay's
    options by indirect parametrization)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    options = getattr(request, "param", [])
    try:
        relay = Started("gannet.dev.relay", str(server.getsockname()[1]), *options)
        try:
            server.accept()[0].close()  # the probe's connection
            yield server, relay.port
        finally:
            relay.stop()
    finally:
        server.close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_bytes_pass_both_ways(relayed):
    server, port = relayed
    with _connect(port) as client:
        upstream, _ = server.accept()
        with upstream:
            client.sendall(b"ping")
            assert upstream.recv(16) == b"ping"
            upstream.sendall(b"pong" * 100_000)
            got = b""
            while len(got) < 400_000:
                got += client.recv(65536)
            assert got == b"pong" * 100_000


@pytest.mark.parametrize("relayed", [["--latency-ms", "400"]], indirect=True)
def test_latency_is_added_to_each_round_trip_and_bytes_keep_their_order(relayed):
    """`--latency-ms` stands for the network to Pub/Sub itself: a request and its reply
    take that much longer in all, and a stream of writes arrives whole and in order."""
    server, port = relayed
    with _connect(port) as client:
        upstream, _ = server.accept()
        with upstream:
            started = time.monotonic()
            client.sendall(b"ping")
            assert upstream.recv(16) == b"ping"
            upstream.sendall(b"pong")
            assert client.recv(16) == b"pong"
            assert time.monotonic() - started >= 0.4
            sent = b"".join(i.to_bytes(4, "big") for i in range(50_000))
            for start in range(0, len(sent), 1000):
                client.sendall(sent[start : start + 1000])
            got = b""
            upstream.settimeout(10)
            while len(got) < len(sent):
                got += upstream.recv(65536)
            assert got == sent


def test_a_reset_client_reaches_the_server_as_a_normal_close(relayed):
    """SO_LINGER 0 makes close() send a reset, as the kernel does for a killed process.
    Straight to the server, its recv raises ConnectionResetError; through the relay it
    reads an end of stream, even with unread data of the server's still on the way."""
    server, port = relayed
    client = _connect(port)
    upstream, _ = server.accept()
    with upstream:
        client.sendall(b"hello")
        assert upstream.recv(16) == b"hello"
        upstream.sendall(b"unread" * 1000)
        time.sleep(0.2)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        upstream.settimeout(10)
        assert upstream.recv(16) == b""


def test_the_reset_would_reach_the_server_without_the_relay():
    """The check above can fail: without the relay the same close is a reset."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = _connect(server.getsockname()[1])
        upstream, _ = server.accept()
        with upstream:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            upstream.settimeout(10)
            with pytest.raises(ConnectionResetError):
                upstream.recv(16)


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_a_killed_http2_clients_open_streams_are_half_closed_for_it(relayed):
    """Stream 1 (a streaming pull) is open, stream 3 (a unary call) ended with its
    request, stream 5 was reset by the server. When the client dies, the server gets
    END_STREAM for stream 1 only, then the connection's end."""
    server, port = relayed
    client = _connect(port)
    upstream, _ = server.accept()
    with upstream:
        sent = (
            _PREFACE
            + _frame(0x4, 0, 0)  # SETTINGS
            + _frame(0x1, 0x4, 1, b"h" * 30)  # HEADERS, END_HEADERS: a stream opens
            + _frame(0x0, 0, 1, b"d" * 100)  # DATA: the pull's first request
            + _frame(0x1, 0x5, 3, b"h" * 20)  # HEADERS, END_STREAM: a unary call
            + _frame(0x1, 0x4, 5, b"h" * 20)
        )
        client.sendall(sent)
        upstream.settimeout(10)
        got = b""
        while len(got) < len(sent):
            got += upstream.recv(65536)
        upstream.sendall(_frame(0x3, 0, 5, b"\0\0\0\x08"))  # the server resets stream 5
        time.sleep(0.2)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert _read_until_closed(upstream) == end_streams({1}) == _frame(0x0, 0x1, 1)
