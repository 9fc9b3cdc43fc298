"""A TCP relay in front of the Pub/Sub emulator that ends a dead client's streams cleanly.

Why it exists: when a subscriber is killed with -9, its connection just dies. The gcloud
528 emulator often never notices that the streaming pull on it ended, and the killed
daemon's messages never reach the next one; real Pub/Sub redelivers them after their
ack deadline. Measured with the kill -9 test (16 tasks, a 10 s ack deadline, the next
daemon given 60 s): straight to the emulator 3 of 10 runs lost tasks (2, 13 and 14 of
16); through this relay 10 of 10 passed (and 20 of 20 before the local subscriptions
dropped their retry policy, see provision.py). A relay that only turned the client's
reset into a FIN was not enough (5 of 10 runs lost tasks, retry policy still on).

What the emulator does handle is a client that half-closes its stream (gannet's own
subscriber does that on a clean stop). So the relay reads the HTTP/2 frame headers the
client sends (nothing else: no HPACK, no payloads) to know which streams the client
opened and has not ended. When the client's side of the connection ends without those
streams ending (a kill, a reset), the relay ends each one for it with an empty DATA
frame flagged END_STREAM, as the client's half-close would, then closes the connection
with a FIN. It keeps reading what the emulator still sends until it closes too, so the
relay's own close never turns into a reset. Bytes are otherwise forwarded unchanged.
Run as `python -m gannet.dev.relay LISTEN TARGET`.

`--latency-ms MS` holds every byte MS/2 on its way in each direction, in order: the
round trip to Pub/Sub itself, which the emulator next door does not have. The client
counts a message against its flow control until its ack's request has returned, so that
round trip decides how many leased messages a fast model needs (`gannet bench --plumbing
--pubsub-latency-ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from contextlib import suppress

log = logging.getLogger("gannet.dev.relay")

_CHUNK = 256 * 1024
_LINGER_S = 30.0  # after one side ended, how long the other may take to end too
_SETTLE_S = 1.0  # between ending a dead client's streams and closing the connection

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM = 0x0, 0x1, 0x3
_END_STREAM = 0x1


class Http2Streams:
    """Follows the frame headers of one direction of an HTTP/2 connection and keeps the
    ids of the streams the client opened and neither side has ended."""

    def __init__(self, open_streams: set[int], from_client: bool) -> None:
        self.open = open_streams  # shared by both directions of one connection
        self.from_client = from_client
        self._skip = len(_PREFACE) if from_client else 0
        self._buffer = b""
        self._payload_left = 0

    @property
    def at_frame_boundary(self) -> bool:
        return self._skip == 0 and self._payload_left == 0 and not self._buffer

    def _not_http2(self) -> None:
        self.open.clear()
        self._skip = -1  # never a frame boundary again: nothing is ever injected

    def feed(self, data: bytes) -> None:
        if self._skip < 0:
            return
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                seen = len(_PREFACE) - self._skip
                if bytes(view[:n]) != _PREFACE[seen : seen + n]:
                    self._not_http2()  # e.g. the readiness check's plain HTTP GET
                    return
                self._skip -= n
                view = view[n:]
            elif self._payload_left:
                n = min(self._payload_left, len(view))
                self._payload_left -= n
                view = view[n:]
            else:
                need = 9 - len(self._buffer)
                self._buffer += bytes(view[:need])
                view = view[need:]
                if len(self._buffer) == 9:
                    self._frame(self._buffer)
                    self._buffer = b""

    def _frame(self, header: bytes) -> None:
        self._payload_left = int.from_bytes(header[0:3], "big")
        kind, flags = header[3], header[4]
        stream = int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF
        if kind == _RST_STREAM or (kind in (_DATA, _HEADERS) and flags & _END_STREAM):
            # On the server's side END_STREAM ends the whole stream (its trailers); on
            # the client's, its half. Either way the client has nothing left to end.
            self.open.discard(stream)
        elif kind == _HEADERS and self.from_client:
            self.open.add(stream)


def end_streams(streams: set[int]) -> bytes:
    """An empty DATA frame flagged END_STREAM for each stream: the client's half-close."""
    return b"".join(
        (0).to_bytes(3, "big") + bytes([_DATA, _END_STREAM]) + s.to_bytes(4, "big")
        for s in sorted(streams)
    )


class _Link:
    """One direction's way out: writes what the relay read, in order, `delay_s` after it
    was read (a network's one-way latency; with 0, at once), and says whether the other
    side still takes bytes."""

    def __init__(self, writer: asyncio.StreamWriter, delay_s: float) -> None:
        self._writer = writer
        self._delay_s = delay_s
        self._failed = False
        self._late: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run_late()) if delay_s > 0 else None

    async def send(self, data: bytes) -> bool:
        if self._task is None:
            await self._write(data)
        elif not self._failed:
            self._late.put_nowait((asyncio.get_running_loop().time() + self._delay_s, data))
        return not self._failed

    async def flush(self) -> bool:
        """Wait until everything sent has been written (or could not be)."""
        if self._task is not None and not self._task.done():
            self._late.put_nowait(None)
            await self._task
        return not self._failed

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._failed = True

    async def _run_late(self) -> None:
        loop = asyncio.get_running_loop()
        while (item := await self._late.get()) is not None:
            due, data = item
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not self._failed:
                await self._write(data)


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    frames: Http2Streams,
    delay_s: float = 0.0,
) -> None:
    """Copy until `reader` ends, then end `writer` with a FIN (after ending the client's
    open streams, when `reader` is the client). When `writer` cannot take more, keep
    draining `reader` so that closing it later sends no reset."""
    link = _Link(writer, delay_s)
    writable = True
    try:
        try:
            while data := await reader.read(_CHUNK):
                frames.feed(data)
                if writable:
                    writable = await link.send(data)
        except (ConnectionError, OSError):
            pass  # the reader's side was reset: treat it as its end
        if not await link.flush():
            return
    finally:
        link.cancel()
    with suppress(ConnectionError, OSError):
        if frames.from_client and frames.open and frames.at_frame_boundary:
            log.info("client gone; ending its streams %s", sorted(frames.open))
            writer.write(end_streams(frames.open))
            await writer.drain()
            await asyncio.sleep(_SETTLE_S)
        if writer.can_write_eof():
            writer.write_eof()


async def _relay(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    target: tuple[str, int],
    latency_s: float,
) -> None:
    try:
        upstream_r, upstream_w = await asyncio.open_connection(*target)
    except OSError as exc:
        log.warning("cannot reach %s:%s: %s", *target, exc)
        client_w.close()
        return
    for w in (client_w, upstream_w):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    streams: set[int] = set()
    to_upstream = asyncio.ensure_future(
        _pump(client_r, upstream_w, Http2Streams(streams, from_client=True), latency_s / 2)
    )
    to_client = asyncio.ensure_future(
        _pump(upstream_r, client_w, Http2Streams(streams, from_client=False), latency_s / 2)
    )
    _, pending = await asyncio.wait({to_upstream, to_client}, return_when="FIRST_COMPLETED")
    if pending:
        # One side ended and its FIN went on; give the other side time to end in turn.
        _, pending = await asyncio.wait(pending, timeout=_LINGER_S)
    for task in pending:
        task.cancel()
    for w in (upstream_w, client_w):
        w.close()
        with suppress(ConnectionError, OSError):
            await w.wait_closed()


async def serve(listen: tuple[str, int], target: tuple[str, int], latency_s: float = 0.0) -> None:
    server = await asyncio.start_server(
        lambda r, w: _relay(r, w, target, latency_s), *listen, reuse_address=True, backlog=128
    )
    log.info(
        "relaying %s:%s to %s:%s, %g ms added to each round trip",
        *listen,
        *target,
        latency_s * 1000,
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gannet.dev.relay",
        description="Forward TCP to the Pub/Sub emulator; a client's reset reaches it as a "
        "normal close, so a killed subscriber's messages come back after their ack deadline.",
    )
    parser.add_argument("listen_port", type=int, help="port clients connect to")
    parser.add_argument("target_port", type=int, help="the emulator's port")
    parser.add_argument("--host", default="127.0.0.1", help="address of both (default 127.0.0.1)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="add this to each round trip, half each way, as the network to Pub/Sub itself "
        "would (default 0)",
    )
    args = parser.parse_args(argv)
    if args.latency_ms < 0:
        parser.error("--latency-ms is at least 0, e.g. 20")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    listen, target = (args.host, args.listen_port), (args.host, args.target_port)
    with suppress(KeyboardInterrupt):
        asyncio.run(serve(listen, target, args.latency_ms / 1000))


if __name__ == "__main__":
    main()
