"""A TCP relay to a real server that tests cut and restore: what a database restart or
a failover looks like to a client (open connections reset, new ones refused), or a hung
server (frozen). Nothing is mocked: the bytes pass through to the real server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from gannet.errors import TransientError


class Relay:
    """A TCP relay to a real server that can be cut and restored."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._freeze_on: bytes | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones."""
        self._cut.set()
        with self._lock:
            for sock in self._open:
                _close(sock)
            self._open.clear()

    def restore(self) -> None:
        self._cut.clear()

    def freeze(self) -> None:
        """Keep every connection open but pass nothing on: what a pooler or proxy whose
        server went away, or a hung server, looks like. The relay's kernel acknowledges
        what it is sent, so the client's own TCP timeouts see nothing wrong."""
        self._flowing.clear()

    def freeze_on(self, marker: bytes) -> None:
        """Freeze (as `freeze`) once a client sends `marker`, before it passes: a server
        that stops answering at one statement (its text is the marker)."""
        self._freeze_on = marker

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self._cut.is_set():
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)  # connected: an idle connection stays open
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open.update((client, server))
            for src, dst, from_client in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pipe, args=(src, dst, from_client), daemon=True
                ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if from_client and self._freeze_on is not None and self._freeze_on in chunk:
                    self._flowing.clear()
                self._flowing.wait()
                dst.sendall(chunk)
        except OSError:
            pass  # the other side closed, or cut() did
        finally:
            _close(src)
            _close(dst)


def relay_to(database_url: str) -> tuple[Relay, str]:
    """A relay to the database of `database_url`, and the URL that goes through it."""
    url = urlsplit(database_url)
    relay = Relay(url.hostname or "127.0.0.1", url.port or 5432)
    through = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{relay.port}")
    return relay, urlunsplit(through)


def answers(statement: Callable[[], object]) -> bool:
    """Whether `statement` (through a relay just restored or thawed) is answered now:
    the pool may not have made its new connection yet."""
    try:
        statement()
    except TransientError:
        return False
    return True


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected, or already shut
    sock.close()
