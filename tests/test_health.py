"""The health and metrics server itself."""

from __future__ import annotations

import socket
import struct
import time

from prometheus_client import CollectorRegistry, Counter

from gannet.health import HealthServer


def test_a_prober_that_gave_up_leaves_no_traceback_in_the_log(capfd):
    """A prober that gives up before its answer (its timeout, or probes queued while a
    daemon was frozen and answered once it thawed) made the server print a bare
    multi-line traceback to stderr: each line its own Cloud Logging entry, beside the
    JSON lines. Such clients are dropped quietly; the server goes on answering."""
    registry = CollectorRegistry()
    counter = Counter("padding", "makes /metrics long", ["n"], registry=registry)
    for n in range(2000):
        counter.labels(str(n)).inc()
    server = HealthServer(lambda: (True, {}), lambda: (True, {}), registry, port=0)
    server.start()
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                # Gone at once, with a reset: the answer's writes find no reader.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert client.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        server.stop()
    assert "Traceback" not in capfd.readouterr().err
