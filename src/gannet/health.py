"""/healthz, /readyz and /metrics on one port, served from a background thread.

Readiness is what Kubernetes uses to stop routing and what an operator reads during a
rollout: ready only when the models are warm and the stream is open, and false from the
moment SIGTERM arrives. Liveness fails only when the daemon knows it is broken.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gannet.errors import CommandError

log = logging.getLogger(__name__)

# How often the server's thread looks for stop(): shutdown() waits for that look, and
# every exit of the daemon (and of the supervisor) waited for it, 0.25 s on average at
# http.server's default of 0.5 s. A look is a select() timeout on an idle thread.
POLL_S = 0.1


class Health:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.models_warm = False
        self.stream_open = False
        self.shutting_down = False
        self.broken: str | None = None

    def set(self, **flags: object) -> None:
        with self._lock:
            for name, value in flags.items():
                setattr(self, name, value)

    def ready(self) -> tuple[bool, dict[str, object]]:
        with self._lock:
            state: dict[str, object] = {
                "models_warm": self.models_warm,
                "stream_open": self.stream_open,
                "shutting_down": self.shutting_down,
                "broken": self.broken,
            }
            ok = self.models_warm and self.stream_open and not self.shutting_down
            return ok and self.broken is None, state

    def live(self) -> tuple[bool, dict[str, object]]:
        with self._lock:
            return self.broken is None, {"broken": self.broken}


Probe = Callable[[], tuple[bool, dict[str, object]]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A prober that gave up before the answer (a probe's timeout, a frozen
        daemon's queued probes answered once it thawed) made socketserver print a bare
        traceback to stderr, a dozen lines, each its own entry in Cloud Logging beside
        the JSON lines. Such a client is said at debug; other errors as before."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            log.debug("health http: client %s went away: %s", client_address, exc)
            return
        super().handle_error(request, client_address)


class HealthServer:
    def __init__(
        self,
        live: Probe,
        ready: Probe,
        registry: CollectorRegistry,
        port: int,
        host: str = "0.0.0.0",
        process: int | None = None,
    ) -> None:
        """`live` and `ready` answer /healthz and /readyz; /metrics is `registry`. A
        daemon passes its Health and Metrics; the supervisor its processes' (supervisor.py).
        `process`: a supervised daemon's index, whose port is the pod's plus 1 + index."""
        handler = self._handler(live, ready, registry)
        try:
            self.server = _Server((host, port), handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if process is not None:  # the setting names the pod's port, not this one
                raise CommandError(
                    f"port {port} (daemon process {process}'s own: GANNET_METRICS_PORT + "
                    f"{1 + process}) is already in use: another process listens on it; each "
                    "daemon process takes a port after the pod's, so free those or set "
                    "GANNET_METRICS_PORT where the next GANNET_PROCESSES ports are free too"
                ) from exc
            raise CommandError(
                f"port {port} (GANNET_METRICS_PORT, for /metrics, /healthz and /readyz) is "
                "already in use: another process listens on it (a second `gannet run` on "
                "this machine?); stop it or set GANNET_METRICS_PORT to a free port"
            ) from exc
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": POLL_S},
            name="health-http",
            daemon=True,
        )

    @staticmethod
    def _handler(
        live: Probe, ready: Probe, registry: CollectorRegistry
    ) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path in ("/healthz", "/readyz"):
                    ok, state = live() if self.path == "/healthz" else ready()
                    body = json.dumps({"ok": ok, **state}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(
                        404, b'{"error": "try /metrics, /healthz or /readyz"}', "application/json"
                    )

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("health http: " + format, *args)

        return Handler

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics listening", extra={"fields": {"port": self.port}})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
