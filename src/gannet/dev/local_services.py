"""The local stand-ins for Google Cloud, started by `gannet demo`, the tests and the bench.

- Pub/Sub: the official emulator (`gcloud beta emulators pubsub start`), behind a TCP relay
  (gannet.dev.relay) so that a killed subscriber's messages come back after their ack
  deadline, as on real Pub/Sub. Clients use the relay's port; the emulator listens on a
  free port of its own. It is started in its own process group, because stopping only the
  gcloud wrapper leaves the emulator's java process running.
- Cloud Storage: gcp-storage-emulator from PyPI, in memory.
- PostgreSQL 15: a throwaway cluster (initdb) run as the `postgres` user when we are root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import psycopg

from gannet.errors import CommandError

log = logging.getLogger(__name__)


# How the local services run gcp-storage-emulator (argv[1]: milliseconds added to each
# request, see LocalServices.gcs_latency_ms; argv[2]: a PEM file with a certificate and
# its key to serve HTTPS with, or "" for HTTP, see LocalServices.gcs_tls), with three
# fixes to its costs:
# - It served one request at a time, HTTP/1.0, from a listen queue of 5 (Python's
#   default). Every request was a new TCP connection, which real GCS never asks of a
#   client that keeps its connections alive: the connect cost the daemon under test
#   CPU and GIL time that it does not spend in production. Eight runners at once also
#   overflowed the queue, the kernel dropped the SYN and the client retried a full
#   second later. Now a thread per connection keeps it alive (HTTP/1.1, with Nagle off:
#   the handler writes headers and body apart, and Nagle held the body back for the
#   client's delayed ACK, 40 ms a request), and one lock still runs the handlers one
#   at a time, as before: the emulator's storage is not thread-safe.
# - On every write it serialized its whole object index to JSON, which it reads back
#   only when it starts. In memory (--in-memory, always here) nothing ever reads it, yet
#   each write cost more than the last (3.4 ms of CPU per image on an empty emulator,
#   17 ms after two bench runs), CPU taken from the daemon under test.
_GCS_EMULATOR = """
import sys
import threading
import time
from http import server
from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.storage import Storage
server.ThreadingHTTPServer.request_queue_size = 128
server.HTTPServer = server.ThreadingHTTPServer
emulator.RequestHandler.protocol_version = "HTTP/1.1"
emulator.RequestHandler.disable_nagle_algorithm = True
_one_at_a_time = threading.Lock()
_handle = emulator.Router.handle
_latency_s = float(sys.argv.pop(1)) / 1000
def handle(self, method):
    if _latency_s:
        time.sleep(_latency_s)  # outside the lock: requests wait side by side
    with _one_at_a_time:
        _handle(self, method)
emulator.Router.handle = handle
_pem = sys.argv.pop(1)
if _pem:
    import socketserver
    import ssl
    _tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls.load_cert_chain(_pem)
    _accept = socketserver.TCPServer.get_request
    def get_request(self):
        sock, address = _accept(self)
        # The handshake runs in the connection's own thread, at its first read.
        return _tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address
    server.ThreadingHTTPServer.get_request = get_request
Storage._write_config_to_file = lambda self: None
from gcp_storage_emulator.__main__ import main
sys.exit(main())
"""


class ServiceError(CommandError):
    """A local service did not start; the text says which and where its log is."""


PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


_GIVEN: set[int] = set()  # free_port's answers so far


def free_port() -> int:
    """A port free now, below the kernel's range for connections' local ports.

    Why: bind(0) picks from that range, and between our check and a service's own bind
    (the Pub/Sub emulator's JVM takes seconds to start) any outgoing connection of the
    test run may take the same port as its local end: once a whole reliability fixture
    failed on "Address already in use". A port below the range can only be taken by
    another listener."""
    try:
        low = int(PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    start = max(1024, low - 12000)
    if low - start >= 1000:
        for _ in range(200):
            port = random.randrange(start, low)
            # Never one given before in this process: the ports of one set of services
            # are free at once but bound one after another (the JVM's seconds later), so
            # two draws of one port gave two services one port; a fresh clone's test
            # run saw the Pub/Sub client answered by something that was not Pub/Sub.
            if port not in _GIVEN and _bindable(port):
                _GIVEN.add(port)
                return port
    with socket.socket() as sock:  # a tight range: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are all free now: a supervisor's port,
    then one per daemon process (GANNET_METRICS_PORT + 1 + i). Free_port alone checks
    only the first, and the next may be a kept-alive connection's local port."""
    for _ in range(100):
        base = free_port()
        if base + count <= 65536 and all(_bindable(base + i) for i in range(1, count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Ports:
    pubsub: int = 8085
    gcs: int = 9023
    postgres: int = 54329

    def __post_init__(self) -> None:
        """Two services given one port: the second waited 30 s and said it was not ready."""
        ports = (self.pubsub, self.gcs, self.postgres)
        if len(set(ports)) < len(ports):
            raise ServiceError(
                f"--pubsub-port, --gcs-port and --postgres-port must differ (got {ports})"
            )

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


def _find_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise ServiceError(f"{name} not found: install PostgreSQL 15 (apt-get install postgresql-15)")


@dataclass
class LocalServices:
    state_dir: Path
    ports: Ports = field(default_factory=Ports)
    project: str = "gannet-local"
    # Added to every GCS request, as a real bucket's round trip would be (the emulator
    # answers in well under a millisecond): `gannet bench --plumbing --gcs-latency-ms`.
    gcs_latency_ms: float = 0.0
    # Added to every round trip through the Pub/Sub relay, as the network to Pub/Sub
    # itself would be: `gannet bench --plumbing --pubsub-latency-ms`.
    pubsub_latency_ms: float = 0.0
    # Streaming pulls kept within their flow control, as Pub/Sub itself keeps them (the
    # emulator ignores it): gannet.dev.pubsub_gate between the relay and the emulator,
    # `gannet bench --plumbing --pubsub-flow-control`.
    pubsub_flow_control: bool = False
    # HTTPS, as Cloud Storage speaks it, with a self-signed certificate that env() tells
    # gannet's processes to trust: `gannet bench --plumbing --gcs-tls`.
    gcs_tls: bool = False
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _cleanup: list[Path] = field(default_factory=list)
    _postgres_cmd: list[str] = field(default_factory=list)
    _recorded: bool = False  # whether services.json is this run's

    @property
    def database_url(self) -> str:
        """The daemon's: a role that reads and writes rows, as in the cloud."""
        return f"postgresql://gannet_worker:gannet@127.0.0.1:{self.ports.postgres}/gannet"

    @property
    def owner_url(self) -> str:
        """The role that owns gannet's tables: migrations, the purge."""
        return f"postgresql://gannet:gannet@127.0.0.1:{self.ports.postgres}/gannet"

    def database_env(self, database: str) -> dict[str, str]:
        """The daemon's and the owner's URLs of another database on this server."""
        return {
            "GANNET_DATABASE_URL": self.database_url.rsplit("/", 1)[0] + f"/{database}",
            "GANNET_OWNER_DATABASE_URL": self.owner_url.rsplit("/", 1)[0] + f"/{database}",
        }

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres:postgres@127.0.0.1:{self.ports.postgres}/postgres"

    @property
    def pubsub_host(self) -> str:
        return f"127.0.0.1:{self.ports.pubsub}"

    @property
    def gcs_endpoint(self) -> str:
        scheme = "https" if self.gcs_tls else "http"
        return f"{scheme}://127.0.0.1:{self.ports.gcs}"

    @property
    def gcs_ca_file(self) -> Path:
        """The GCS emulator's certificate, when it serves HTTPS (gcs_tls)."""
        return self.state_dir / "gcs-tls.crt"

    def env(self) -> dict[str, str]:
        """What a `gannet` process needs to talk to these services."""
        env = {
            "GANNET_PROJECT": self.project,
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "GANNET_PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "GANNET_STORAGE_EMULATOR_HOST": self.gcs_endpoint,
            "GANNET_DATABASE_URL": self.database_url,
            "GANNET_OWNER_DATABASE_URL": self.owner_url,
        }
        return {**env, **self.tls_env()}

    def tls_env(self) -> dict[str, str]:
        """With gcs_tls: where OpenSSL (gcs_http, urllib) and requests (the client
        library) find the emulator's certificate. They read these variables themselves,
        so gannet's code runs unchanged, as against Cloud Storage."""
        if not self.gcs_tls:
            return {}
        return {"SSL_CERT_FILE": str(self.gcs_ca_file), "REQUESTS_CA_BUNDLE": str(self.gcs_ca_file)}

    def pids(self) -> dict[str, int]:
        """The process started for each service (its children are the service too)."""
        return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

    def empty_storage(self) -> None:
        """Delete every object in the GCS emulator, keeping the buckets.

        gcp-storage-emulator rewrites its whole object index as JSON on every write, so
        the CPU each write costs grows with the objects it holds. The bench empties it
        before each measurement so that cost does not depend on what ran before.
        """
        url = f"{self.gcs_endpoint}/wipe?keep-buckets=true"
        with urllib.request.urlopen(url, timeout=30, context=self._gcs_tls_context()):
            pass

    @property
    def _gcs_pem(self) -> Path:
        """The emulator's certificate and key, when it serves HTTPS."""
        return self.state_dir / "gcs-tls.pem"

    def _gcs_tls_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.gcs_ca_file) if self.gcs_tls else None

    def __enter__(self) -> LocalServices:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def record(self) -> Path:
        """Which processes serve this state dir, and whose they are: a run killed before
        it could stop them (kill -9, out of memory) left them holding the ports, and the
        next run failed on them until someone found and killed them by hand."""
        return self.state_dir / "services.json"

    def _write_record(self) -> None:
        procs = {name: proc.pid for name, proc in self._procs.items()}
        owner = os.getpid()
        entry = {
            "owner": [owner, _start_time(owner)],
            "groups": {name: [pid, _start_time(pid)] for name, pid in procs.items()},
            "cleanup": [str(path) for path in self._cleanup],
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        part = self.record.with_suffix(".part")
        part.write_text(json.dumps(entry))
        part.replace(self.record)  # whole or not at all: a kill mid-write keeps the last
        self._recorded = True

    def _stop_leftovers(self) -> None:
        """Stop what killed runs left running: this state dir's, and those beside it
        (`gannet demo`, `services` and the benches each keep theirs in a folder of
        --state-dir, and share the default ports). A run still alive keeps its services:
        on this state dir it is a ServiceError, beside it it is left alone."""
        own = self.record
        beside = sorted(p for p in self.state_dir.parent.glob("*/services.json") if p != own)
        for record in (own, *beside):
            _stop_left(record, mine=record == own)

    def start(self) -> None:
        self._stop_leftovers()
        for name, port in vars(self.ports).items():
            if port_in_use(port):
                raise ServiceError(
                    f"port {port} for {name} is already in use; `ss -ltnp 'sport = :{port}'` "
                    "shows what listens there. What a killed `gannet services`, demo or "
                    "bench left running is stopped by the next run with its --state-dir; "
                    "one of another state dir, or another program: stop it (`kill -- -PGID`, "
                    "the process group ps -o pgid= -p PID shows), or choose other ports "
                    "(--pubsub-port, --gcs-port, --postgres-port)"
                )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            self._start_pubsub()  # slowest (JVM); the others start while it boots
            if self.pubsub_flow_control:
                self._start_gate()
            self._start_relay()
            self._start_gcs()
            self._start_postgres()
            self._wait("pubsub", self._pubsub_ready, 90)
            if self.pubsub_flow_control:
                self._wait("pubsub-gate", lambda: port_in_use(self._gate_port), 30)
            self._wait("gcs", self._gcs_ready, 30)
        except BaseException:
            self.stop()
            raise
        log.info(
            "local services ready",
            extra={"fields": {"seconds": round(time.monotonic() - started, 1), **vars(self.ports)}},
        )

    def stop(self) -> None:
        """Every service told to stop first, then each waited for: the slowest's time,
        not the sum (under load a JVM's or PostgreSQL's stop takes seconds each).
        PostgreSQL gets a fast shutdown: its cluster is thrown away, and SIGTERM's smart
        one waits for every client to leave. A second Ctrl-C meanwhile is held until
        the end (it broke into the waits and left the cluster's 46 MB in /tmp, and the
        services it had not reached running)."""
        with _signals_held():
            self._stop()

    def _stop(self) -> None:
        procs = list(reversed(self._procs.items()))
        sigs = {name: signal.SIGINT if name == "postgres" else signal.SIGTERM for name, _ in procs}
        for name, proc in procs:
            _signal_group(proc, sigs[name])
        for name, proc in procs:
            _reap_group(name, proc, sigs[name])
        self._procs.clear()
        for path in self._cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self._cleanup.clear()
        if self._recorded:  # not another run's, found here alive
            self.record.unlink(missing_ok=True)
            self._recorded = False

    # -- each service -------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log_path = self.state_dir / f"{name}.log"
        with log_path.open("wb") as out:
            self._procs[name] = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        self._write_record()

    def restart_postgres(self) -> float:
        """Stop PostgreSQL (fast shutdown: open connections are cut, as in a failover) and
        start it again on the same data and port; returns the seconds it was down."""
        started = time.monotonic()
        _stop_group("postgres", self._procs.pop("postgres"), signal.SIGINT)
        self._spawn("postgres", self._postgres_cmd)
        self._wait("postgres", self._postgres_ready, 30)
        return time.monotonic() - started

    def _start_pubsub(self) -> None:
        gcloud = shutil.which("gcloud")
        if not gcloud:
            raise ServiceError(
                "gcloud not found: install the Google Cloud CLI and its "
                "Pub/Sub emulator (gcloud components install pubsub-emulator)"
            )
        data_dir = self.state_dir / "pubsub"
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        self._spawn(
            "pubsub",
            [
                gcloud,
                "beta",
                "emulators",
                "pubsub",
                "start",
                "--quiet",
                f"--host-port=127.0.0.1:{self._emulator_port}",
                f"--data-dir={data_dir}",
                f"--project={self.project}",
            ],
        )

    @cached_property
    def _emulator_port(self) -> int:
        return free_port()

    @cached_property
    def _gate_port(self) -> int:
        return free_port()

    def _start_relay(self) -> None:
        """Clients -> relay -> (the gate, with pubsub_flow_control) -> the emulator."""
        target = self._gate_port if self.pubsub_flow_control else self._emulator_port
        latency = f"--latency-ms={self.pubsub_latency_ms:g}"
        self._spawn_module("pubsub-relay", "gannet.dev.relay", self.ports.pubsub, target, latency)

    def _start_gate(self) -> None:
        self._spawn_module(
            "pubsub-gate", "gannet.dev.pubsub_gate", self._gate_port, self._emulator_port
        )

    def _spawn_module(self, name: str, module: str, *args: object) -> None:
        self._spawn(name, [sys.executable, "-m", module, *map(str, args)])

    def _pubsub_ready(self) -> bool:
        # The gate speaks only gRPC: ask the emulator itself, then wait for the gate's port.
        port = self._emulator_port if self.pubsub_flow_control else self.ports.pubsub
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
            return resp.status == 200

    def _start_gcs(self) -> None:
        if self.gcs_tls:
            self._make_certificate()
        self._spawn(
            "gcs",
            [
                sys.executable,
                "-c",
                _GCS_EMULATOR,
                str(self.gcs_latency_ms),
                str(self._gcs_pem) if self.gcs_tls else "",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports.gcs),
                "--in-memory",
                "--quiet",
            ],
        )

    def _gcs_ready(self) -> bool:
        url = f"{self.gcs_endpoint}/storage/v1/b?project={self.project}"
        with urllib.request.urlopen(url, timeout=2, context=self._gcs_tls_context()) as resp:
            return resp.status == 200

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1, which the clients trust (tls_env),
        and the emulator's PEM file of it and its key."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise ServiceError("--gcs-tls needs the openssl command (apt-get install openssl)")
        key, cert = self.state_dir / "gcs-tls.key", self.gcs_ca_file
        made = subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(key), "-out", str(cert),
            ],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if made.returncode != 0:
            raise ServiceError(
                f"openssl could not make the GCS emulator's certificate: {made.stderr}"
            )
        self._gcs_pem.write_bytes(cert.read_bytes() + key.read_bytes())

    def _start_postgres(self) -> None:
        prefix: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root. The postgres user may not be able to
            # enter our state dir (pytest's are 0700), so its data lives in /tmp.
            data = Path(tempfile.mkdtemp(prefix="gannet-pg-"))
            shutil.chown(data, "postgres", "postgres")
            prefix = ["runuser", "-u", "postgres", "--"]
        else:
            data = self.state_dir / "postgres"
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
        self._cleanup.append(data)
        self._write_record()  # a kill during initdb leaves the data dir: next run's to remove
        # Passwords checked over TCP, as Cloud SQL checks them (SCRAM): a role's password
        # the migration set wrong fails here too. The superuser's, from a file initdb
        # reads as the postgres user.
        with tempfile.NamedTemporaryFile("w", prefix="gannet-pg-pw-") as pwfile:
            pwfile.write("postgres\n")
            pwfile.flush()
            if prefix:
                shutil.chown(pwfile.name, "postgres", "postgres")
            init = subprocess.run(
                [
                    *prefix,
                    _find_binary("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    f"--pwfile={pwfile.name}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        if init.returncode != 0:
            raise ServiceError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
        self._postgres_cmd = [
            *prefix,
            _find_binary("postgres"),
            "-D",
            str(data),
            "-p",
            str(self.ports.postgres),
            "-k",
            str(data),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ]
        self._spawn("postgres", self._postgres_cmd)
        self._wait("postgres", self._postgres_ready, 30)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            # CREATEROLE as Cloud SQL's users have it: `gannet db migrate` makes the
            # daemon's role, gannet_worker.
            conn.execute(
                "CREATE ROLE gannet LOGIN PASSWORD 'gannet' NOSUPERUSER NOBYPASSRLS CREATEROLE"
            )
            conn.execute("CREATE DATABASE gannet OWNER gannet")

    def _postgres_ready(self) -> bool:
        with psycopg.connect(self.admin_url, connect_timeout=2):
            return True

    def _wait(self, name: str, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        proc = self._procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(self._failure(name, f"exited with code {proc.returncode}"))
            try:
                if ready():
                    return
            except (OSError, psycopg.OperationalError):
                pass
            time.sleep(0.05)
        raise ServiceError(self._failure(name, f"not ready after {timeout_s:.0f}s"))

    def _failure(self, name: str, what: str) -> str:
        log_path = self.state_dir / f"{name}.log"
        tail = ""
        if log_path.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        return f"{name} {what}; its log is {log_path}:\n{tail}"


def _stop_group(name: str, proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Stop a service's process group with `sig`, then SIGKILL whatever is left (the
    emulator's java child outlives the gcloud wrapper)."""
    _signal_group(proc, sig)
    _reap_group(name, proc, sig)


def _stop_left(record: Path, mine: bool) -> None:
    """Stop the services `record` names if the run that wrote it is gone (only the
    processes whose start time is the one recorded: a pid reused since is someone
    else's), remove its scratch dirs and the record. Its run alive (this process
    included): a ServiceError if `mine` (the same state dir), else nothing."""
    try:
        entry = json.loads(record.read_text())
        owner, owner_start = entry["owner"]
        groups, cleanup = dict(entry["groups"]), list(entry["cleanup"])
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError):  # not ours to trust
        record.unlink(missing_ok=True)
        return
    if owner == os.getpid() or _start_time(owner) == owner_start:
        if mine:
            raise ServiceError(
                f"the local services in {record.parent} belong to a running process "
                f"(pid {owner}): stop it first, or give this run another --state-dir"
            )
        return
    left = {name: pid for name, (pid, start) in groups.items() if _start_time(pid) == start}
    for pid in left.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # throwaway services: their data goes too
    deadline = time.monotonic() + 10
    while any(_start_time(pid) is not None for pid in left.values()):
        if time.monotonic() > deadline:
            raise ServiceError(f"could not stop the services a killed run left: {left}")
        time.sleep(0.1)
    for path in cleanup:
        shutil.rmtree(path, ignore_errors=True)
    record.unlink(missing_ok=True)
    if left:
        log.warning(
            "stopped the local services a killed run left running",
            extra={"fields": {"state_dir": str(record.parent), "owner": owner, **left}},
        )


def _start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot), None if none runs as `pid` (or
    only its zombie): with its pid, it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()  # from field 3, after the command's name
    return None if fields[0] == "Z" else int(fields[19])


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP noted, not acted on, inside the block; one that came
    is a KeyboardInterrupt after it (the stop it asked for is done by then). Only the
    main thread may set handlers: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.signal(sig, lambda signum, frame: came.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    if came:
        raise KeyboardInterrupt


def _reap_group(name: str, proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """After _signal_group: wait for the service, then SIGKILL what is left of its
    group (the service itself too, if it did not stop in time)."""
    stopped = True
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop on %s; killing it", name, sig.name)
        stopped = False
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if not stopped:
        proc.wait(timeout=10)
