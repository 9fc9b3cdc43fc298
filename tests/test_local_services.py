"""The local services themselves, where the repo changes how one of them runs."""

from __future__ import annotations

import contextlib
import socket
import urllib.request

from gannet.dev.local_services import LocalServices


def test_the_gcs_emulator_queues_many_connections_at_once(services: LocalServices):
    """gcp-storage-emulator serves one connection at a time. With Python's default listen
    queue of 5, the kernel drops further connection attempts and clients retry a second
    later, which stalled runners; local_services runs it with a queue of 128.

    The first connection sends nothing, so the emulator waits on it and every other
    connection can only be queued by the kernel: each must still connect at once."""
    port = services.ports.gcs
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(20):
            conn = stack.enter_context(socket.socket())
            conn.settimeout(0.5)  # a dropped SYN is retried after 1 s
            conn.connect(("127.0.0.1", port))
            sockets.append(conn)
        assert len(sockets) == 20
    with urllib.request.urlopen(f"{services.gcs_endpoint}/storage/v1/b", timeout=10) as resp:
        assert resp.status == 200, "the emulator serves again once the idle connections close"
