"""Real services for the tests: the Pub/Sub emulator, a GCS emulator and PostgreSQL.

They start once per test session on free ports; each test gets its own topic,
subscription, dead-letter topic and tenant (gannet.dev.stack), so tests cannot see each
other's messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import server
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gannet import clients
from gannet.dev.local_services import LocalServices, free_port, port_in_use
from gannet.dev.stack import (
    SAMPLES,
    Stack,
    gannet,
    make_stack,
    prepared_services,
    settled,
)
from gannet.sink import Sink

__all__ = [
    "MANIFEST",
    "SAMPLES",
    "SCENES",
    "Started",
    "box_distance",
    "gannet",
    "local_pipeline",
    "make_stack",
    "prepared_services",
    "pubsub_as_pods_meet_it",
    "pubsub_at",
    "settled",
]

if TYPE_CHECKING:
    import google.cloud.storage

    from gannet.device_decode import DeviceDecoder
    from gannet.pipeline import Pipeline
    from gannet.settings import Settings

os.environ.setdefault("YOLO_OFFLINE", "1")
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
SCENES = [e for e in MANIFEST["images"] if e.get("kind", "scene") != "large"]


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    with prepared_services(tmp_path_factory.mktemp("services")) as running:
        yield running


@pytest.fixture
def db(services: LocalServices) -> Iterator[Sink]:
    """The daemon's store on the session's PostgreSQL, as the daemon's role."""
    store = Sink(services.database_url, pool_size=2)
    store.open()
    yield store
    store.close()


@pytest.fixture
def stack(services: LocalServices, tmp_path: Path) -> Iterator[Stack]:
    made = make_stack(services, tmp_path)
    yield made
    for daemon in made.daemons:
        if daemon.proc.poll() is None:
            daemon.stop(timeout_s=30)


class Started:
    """A gannet.dev helper process (a relay, the Pub/Sub gate) listening on a free port of
    its own, given as its first argument. Listening is checked by one connection, which
    the helper passes on to its target."""

    def __init__(self, module: str, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", module, str(self.port), *args])
        deadline = time.monotonic() + 30
        while not port_in_use(self.port):
            assert self.proc.poll() is None, f"{module} exited at start"
            assert time.monotonic() < deadline, f"{module} did not listen within 30 s"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def pubsub_at(stack: Stack, port: int) -> Settings:
    """The stack's settings with Pub/Sub at 127.0.0.1:`port` (a relay, the gate)."""
    return stack.settings.model_copy(update={"pubsub_emulator_host": f"127.0.0.1:{port}"})


@contextmanager
def pubsub_as_pods_meet_it(stack: Stack, latency_ms: int = 0) -> Iterator[Settings]:
    """The session's Pub/Sub as a pod meets Pub/Sub itself: a stream is sent a message
    only when an ack has freed one of its slots (gannet.dev.pubsub_gate; the emulator
    alone sends all it has), and with `latency_ms` every round trip takes that long
    (gannet.dev.relay). Yields the stack's settings with that Pub/Sub's host:port as
    `pubsub_emulator_host`."""
    helpers = [Started("gannet.dev.pubsub_gate", str(stack.services.ports.pubsub))]
    try:
        if latency_ms:
            helpers.append(
                Started("gannet.dev.relay", str(helpers[0].port), f"--latency-ms={latency_ms}")
            )
        yield pubsub_at(stack, helpers[-1].port)
    finally:
        for helper in reversed(helpers):
            helper.stop()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    """Polls `predicate` every 20 ms; fails the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.02)


def scraped(port: int, sample: str, **labels: str) -> float:
    """One sample from a daemon's /metrics, as Prometheus would read it (0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    return 0.0


def expected_counts(entry: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in entry["counts"].items() if v}


def box_distance(a: list[float], b: list[float]) -> float:
    """How far apart two [x0, y0, x1, y1] boxes are: their largest corner difference."""
    return max(abs(p - q) for p, q in zip(a, b, strict=True))


def local_pipeline(
    config: str,
    max_batch: int = 4,
    decoders: dict[str, DeviceDecoder] | None = None,
) -> Pipeline:
    """A Pipeline on a local config and its local model files, without GCS: the test
    hands it image bytes or decoded frames. Close `pipeline.cache` after."""
    from gannet.config_sources import open_configs
    from gannet.metrics import Metrics
    from gannet.model_cache import ModelCache, yolo_loader
    from gannet.model_resolver import ModelResolver
    from gannet.pipeline import Limits, Pipeline
    from gannet.storage import local_version, read_local

    cache = ModelCache(yolo_loader(lambda uri, v: Path(uri)), Metrics(), max_batch=max_batch)
    return Pipeline(
        open_configs(config, read_local, local_version),
        None,  # type: ignore[arg-type] # no GCS: the tests hand the bytes over
        cache,
        ModelResolver(local_version),
        Limits(["gannet-images"], 10**8, 10**8),
        decoders,
    )


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def _bits(bits: str) -> bytes:
    """Entropy-coded bytes: the bits padded with ones, each 0xFF byte stuffed."""
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for i in range(0, len(bits), 8):
        byte = int(bits[i : i + 8], 2)
        out += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
    return bytes(out)


def progressive_jpeg(width: int, height: int, coefficients: int) -> bytes:
    """A valid progressive greyscale JPEG of one flat grey, its AC coefficients 1 to
    `coefficients` each sent in 11 scans (a first at Al=10, then ten refinements): 1 + 11 *
    coefficients scans, each a run of empty blocks in a few bits."""
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    assert blocks < 32768  # one end-of-band run codes them all
    run = blocks.bit_length() - 1  # EOBn: 2**n blocks plus n more bits
    out = b"\xff\xd8" + _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
    out += _jpeg_segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    # DC: every difference 0 (category 0), one symbol of a one-bit code.
    out += _jpeg_segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")
    out += _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + _bits("0" * blocks)
    # AC: one symbol, EOBn, one-bit code, then n bits of the run's length past 2**n.
    table = _jpeg_segment(0xC4, b"\x10" + b"\x01" + b"\x00" * 15 + bytes([run << 4]))
    extra = format(blocks - (1 << run), f"0{run}b") if run else ""
    for k in range(1, coefficients + 1):
        for ah, al in [(0, 10)] + [(a + 1, a) for a in range(9, -1, -1)]:
            sos = bytes([1, 1, 0x00, k, k, (ah << 4) | al])
            out += table + _jpeg_segment(0xDA, sos) + _bits("0" + extra)
    return out + b"\xff\xd9"


class Gate:
    """A TCP relay in front of the GCS emulator (or PostgreSQL) that can stop answering,
    as a GCS (or the way to it) that hangs: connections are still taken and what they
    send read, but nothing goes on and nothing comes back; or `refuse`, as a server
    gone: each connection closed as it comes. Each switch ends the connections open
    (a kept-alive one must not outlive it either way).

    `slow_media` hangs or drips object downloads alone (`alt=media` in a connection's
    first request), so that the metadata requests before a download are answered and
    the download itself is what stalls; `drip` drips every answer."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.answering = True
        self._refusing = False
        self._slow_media = False
        self._slow_all = False  # drip's: every request, not only downloads
        self._drip_every_s: float | None = None  # slow_media's; None: nothing at all
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self.answering = False
        self._end_all()

    def answer(self) -> None:
        self.answering = True
        self._refusing = self._slow_media = self._slow_all = False
        self._end_all()

    def refuse(self) -> None:
        self._refusing = True
        self._end_all()

    def slow_media(self, drip_every_s: float | None) -> None:
        """From now on a connection whose first request downloads an object's bytes gets
        its answer a byte every `drip_every_s`, or with None nothing at all; any other
        is relayed as before."""
        self._drip_every_s = drip_every_s
        self._slow_media = True
        self._end_all()

    def drip(self, drip_every_s: float) -> None:
        """From now on every answer comes a byte every `drip_every_s`."""
        self._slow_all = True
        self.slow_media(drip_every_s)

    def close(self) -> None:
        """Stops taking connections and ends those open, a connection taken as it
        closes too (it would be left to the garbage collector: a ResourceWarning in
        whichever test then runs)."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._listener.close()
        self._end_all()

    def _keep(self, sock: socket.socket) -> bool:
        """Whether the socket is kept for _end_all; closed at once after close()."""
        with self._lock:
            if not self._closed:
                self._open.append(sock)
                return True
        sock.close()
        return False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            if not self._keep(client):
                return
            if not self.answering:
                threading.Thread(target=self._pump, args=(client, None), daemon=True).start()
                continue
            if self._slow_media:
                relay = threading.Thread(
                    target=self._relay_media, args=(client, self._drip_every_s), daemon=True
                )
                relay.start()
                continue
            upstream = socket.create_connection(self._target)
            if not self._keep(upstream):
                return
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _relay_media(self, client: socket.socket, drip_every_s: float | None) -> None:
        """One connection under slow_media, relayed until it asks for an object's bytes
        (a request line with `alt=media`; under drip, from the start): from then on the
        answers are dripped, or with None held back. Each request is looked at, not only
        the first: a kept-alive connection asks for the metadata, then the bytes."""
        try:
            upstream = socket.create_connection(self._target)
        except OSError:
            client.close()
            return
        if not self._keep(upstream):
            return
        slowed = threading.Event()
        if self._slow_all:
            slowed.set()

        def requests() -> None:
            try:
                while data := client.recv(65536):
                    if b"alt=media" in data.split(b"\r\n", 1)[0]:
                        slowed.set()  # before the request goes on, so before its answer
                    upstream.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=requests, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if not slowed.is_set():
                    client.sendall(data)
                elif drip_every_s is not None:
                    for i in range(len(data)):
                        client.sendall(data[i : i + 1])
                        time.sleep(drip_every_s)
        except OSError:
            pass  # ended by a switch, close(), or the client giving up

    def _pump(self, src: socket.socket, dst: socket.socket | None) -> None:
        try:
            while data := src.recv(65536):
                if dst is not None:
                    dst.sendall(data)
        except OSError:
            pass
        if dst is not None:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _end_all(self) -> None:
        with self._lock:
            ending, self._open = self._open, []
        for sock in ending:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextmanager
def gated_storage(
    services: LocalServices, settings: Settings
) -> Iterator[tuple[Gate, google.cloud.storage.Client]]:
    """A storage client that reaches the GCS emulator through a Gate, for tests of a GCS
    that hangs or drips; both closed after, the client first (its connections to the
    gate, not left to the garbage collector: a ResourceWarning in whichever test runs
    next)."""
    gate = Gate(services.ports.gcs)
    gated = settings.model_copy(update={"storage_emulator_host": f"http://127.0.0.1:{gate.port}"})
    client = clients.storage_client(gated)
    try:
        yield gate, client
    finally:
        client.close()
        gate.close()


class StubServer(server.ThreadingHTTPServer):
    """A small real HTTP server on 127.0.0.1 that a test scripts: the emulators cannot
    be made to answer 503, drop a kept-alive connection or drip a body."""

    daemon_threads = True
    connections = 0
    seen_tokens: list[str | None]


class StubHandler(server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StubServer

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


@pytest.fixture
def serve() -> Iterator[Callable[[type[server.BaseHTTPRequestHandler]], tuple[str, StubServer]]]:
    """Starts StubServers with the given handler; each is shut down after the test."""
    started: list[StubServer] = []

    def start(handler: type[server.BaseHTTPRequestHandler]) -> tuple[str, StubServer]:
        httpd = StubServer(("127.0.0.1", 0), handler)
        httpd.seen_tokens = []
        # shutdown() waits for serve_forever's next poll (every 0.5 s by default).
        threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}", httpd

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def segmenter_of_80_classes(weights: Path) -> Path:
    """An 80-class segmenter with random weights (the demo's has one class), built from
    ultralytics' YAML (nothing downloaded): its class scores and normalisation spread so
    that anchors differ in their best class, and several classes compete for a cap."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    built = YOLO("yolo11n-seg.yaml", task="segment")
    with torch.no_grad():
        for branch in built.model.model[-1].cv3:  # the class scores' last convolutions
            branch[-1].weight.normal_(0, 0.05)
        for module in built.model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.fill_(0.1)
    built.save(weights)
    return weights
