#!/usr/bin/env python3
"""What reading a photo over TLS costs a thread that shares the GIL, against plain HTTP.

The daemon reads images from the GCS emulator over plain HTTP, where one `recv_into`
returns whatever the socket holds; Cloud Storage is HTTPS. Python's ssl module decrypts
one TLS record (at most 16 KiB) per read call and lets go of the GIL around each, so a
4 MB photo is about 250 releases of the GIL, and with other threads wanting it, each
release can cost a wait and a context switch to get it back (docs/benchmark.md, "The
GIL convoy"). This serves bodies of two sizes over keep-alive HTTP and HTTPS (a local
server in a child process, a self-signed certificate made with `openssl`) and reads
them as gcs_http does (http.client, `response.read()`); and over Cloud Storage's gRPC
API (google.storage.v2 ReadObject, 2 MiB messages, TLS), whose client (the library's
`_storage_v2`) leaves TLS to gRPC's C core. Each alone and beside two Python threads
that keep wanting the GIL; per read: wall ms, the reading thread's CPU ms, its releases
of the GIL (a perf uprobe on PyEval_SaveThread: needs perf and root) and its context
switches. The servers are Python too, so wall times include their CPU on the same cores.

    .venv/bin/python scripts/measure_tls_reads.py
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from count_gil_releases import EVENT, add_probe

SIZES = (64_000, 4_000_000)  # a 640x480 JPEG, a 12 MP phone photo
READS = 40


def serve(port: int, size: int, cert_dir: str | None) -> None:
    body = os.urandom(size)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as GCS

        def setup(self) -> None:
            super().setup()
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if cert_dir:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(f"{cert_dir}/cert.pem", f"{cert_dir}/key.pem")
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


def serve_grpc(port: int, size: int, cert_dir: str) -> None:
    """Cloud Storage's gRPC API (google.storage.v2), ReadObject only, over TLS: the
    object in 2 MiB messages, as the service sends them."""
    from concurrent import futures

    import grpc
    from google.cloud import _storage_v2 as v2

    body = os.urandom(size)

    def read_object(request: object, context: object) -> object:
        for start in range(0, len(body), 2 * 1024 * 1024):
            chunk = body[start : start + 2 * 1024 * 1024]
            yield v2.ReadObjectResponse(checksummed_data=v2.ChecksummedData(content=chunk))

    handler = grpc.method_handlers_generic_handler(
        "google.storage.v2.Storage",
        {
            "ReadObject": grpc.unary_stream_rpc_method_handler(
                read_object,
                request_deserializer=v2.ReadObjectRequest.deserialize,
                response_serializer=v2.ReadObjectResponse.serialize,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    key, cert = Path(f"{cert_dir}/key.pem").read_bytes(), Path(f"{cert_dir}/cert.pem").read_bytes()
    server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    server.wait_for_termination()


def grpc_reader(port: int, cert_dir: str) -> tuple[Callable[[], None], Callable[[], None]]:
    import grpc
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import _storage_v2 as v2
    from google.cloud._storage_v2.services.storage.transports.grpc import StorageGrpcTransport

    root = Path(f"{cert_dir}/cert.pem").read_bytes()
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(root_certificates=root),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    transport = StorageGrpcTransport(channel=channel, credentials=AnonymousCredentials())
    client = v2.StorageClient(transport=transport)
    request = v2.ReadObjectRequest(bucket="projects/_/buckets/photos", object_="photo.jpg")

    def read() -> None:
        b"".join(r.checksummed_data.content for r in client.read_object(request=request))

    return read, channel.close


def thread_switches() -> int:
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)


def http_reader(port: int, cert_dir: str | None) -> tuple[Callable[[], None], Callable[[], None]]:
    """Reads as gcs_http does: http.client, a kept-alive connection, TCP_NODELAY."""
    if cert_dir:
        context = ssl.create_default_context(cafile=f"{cert_dir}/cert.pem")
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, context=context
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read() -> None:
        conn.request("GET", "/photo.jpg")
        conn.getresponse().read()

    return read, conn.close


def measure(read: Callable[[], None], busy: int) -> tuple[float, float, float, float]:
    """(wall ms, this thread's CPU ms, GIL releases, context switches) per read."""
    for _ in range(5):
        read()
    stop = threading.Event()

    def want_the_gil() -> None:  # about 100 us of Python, then a release, like a runner
        while not stop.is_set():
            sum(range(5000))
            time.sleep(0)

    others = [threading.Thread(target=want_the_gil) for _ in range(busy)]
    for other in others:
        other.start()
    me = threading.get_native_id()
    perf = subprocess.Popen(
        ["perf", "stat", "-x", ",", "--per-thread", "-e", EVENT, "-p", str(os.getpid())],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # perf attaches
    wall, cpu, switches = time.perf_counter(), time.thread_time(), thread_switches()
    for _ in range(READS):
        read()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    switches = thread_switches() - switches
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate()
    stop.set()
    for other in others:
        other.join()
    # --per-thread lines start with comm-TID
    mine = [x for x in err.splitlines() if EVENT in x and x.split(",")[0].endswith(f"-{me}")]
    releases = int(mine[0].split(",")[1]) if mine else 0
    return wall * 1000 / READS, cpu * 1000 / READS, releases / READS, switches / READS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "SIZE", "CERT_DIR"))
    parser.add_argument("--serve-grpc", nargs=3, metavar=("PORT", "SIZE", "CERT_DIR"))
    args = parser.parse_args()
    if args.serve_grpc:
        port, size, cert_dir = args.serve_grpc
        serve_grpc(int(port), int(size), cert_dir)
        return
    if args.serve:
        port, size, cert_dir = args.serve
        serve(int(port), int(size), cert_dir if cert_dir != "-" else None)
        return
    add_probe()
    with tempfile.TemporaryDirectory() as cert_dir:
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-keyout", f"{cert_dir}/key.pem", "-out", f"{cert_dir}/cert.pem"),
                *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            ],
            check=True,
            capture_output=True,
        )
        print(
            f"{'body':>8} {'transport':9} {'busy threads':>12} {'wall ms':>8} "
            f"{'CPU ms':>7} {'GIL releases':>12} {'switches':>8}"
        )
        for size in SIZES:
            for transport in ("HTTP", "HTTPS", "gRPC"):
                port = {"HTTP": 18080, "HTTPS": 18081, "gRPC": 18082}[transport]
                mode = "--serve-grpc" if transport == "gRPC" else "--serve"
                certs = "-" if transport == "HTTP" else cert_dir
                server = subprocess.Popen(
                    [sys.executable, __file__, mode, str(port), str(size), certs]
                )
                try:
                    time.sleep(2.0)  # the server listens
                    if transport == "gRPC":
                        read, close = grpc_reader(port, cert_dir)
                    else:
                        read, close = http_reader(port, None if certs == "-" else certs)
                    for busy in (0, 2):
                        wall, cpu, releases, switches = measure(read, busy)
                        print(
                            f"{size / 1e6:>6.2f}MB {transport:9} {busy:>12} {wall:>8.2f} "
                            f"{cpu:>7.2f} {releases:>12.0f} {switches:>8.0f}"
                        )
                    close()
                finally:
                    server.terminate()
                    server.wait()


if __name__ == "__main__":
    main()
