"""A task's own statements, each sent as one blocking libpq call (PQexec, PQexecParams).

Why: psycopg's cursor runs a statement as a non-blocking loop, and every step of that
loop (send, flush, busy check, poll, read, each result and the end of the results) lets
go of the GIL. On a busy daemon a thread that lets go of the GIL waits to get it back
while the others run, so each step can cost a context switch. Counted with a probe on
PyEval_SaveThread, a task's claim (gannet_start) let go of the GIL 9 times through a
cursor and its fenced commit 24 times; as blocking calls, once per round trip: 1 and 2.
In the plumbing bench the two PostgreSQL stages' CPU per image fell by half
(docs/benchmark.md, "PostgreSQL in blocking libpq calls").

The price is paid here, in a few lines: parameters go as text, and rows come back as
text, decoded by column type for the handful of types the per-task functions return.
Connections, the pool, transactions and error classes stay psycopg's; everything that
is not on a task's path uses psycopg's cursors as usual.

Neither a blocking call nor a cursor has a bound of its own on the wait for an answer,
and the kernel's (sink.py's keepalives and tcp_user_timeout) sees only a peer that
stops acknowledging. A peer that acknowledges but never answers (a connection pooler or
proxy whose server went away, a server hung on its disk) held a runner, its message
leased, until the stall watch restarted the pod ten minutes later. `Deadline` shuts the
connection's socket when a round trip (or a transaction, for cursors) outlasts its
deadline, from the thread of socket_deadlines.py: the call fails at once, the task is
nacked and the pool replaces the connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import psycopg
from psycopg import pq
from psycopg.errors import error_from_result

from gannet.socket_deadlines import SocketDeadlines

Conn = psycopg.Connection[Any]

_DEADLINES = SocketDeadlines("gannet-db-deadline")


class Deadline:
    """`with Deadline(conn, s):` shuts `conn`'s socket if the block is still waiting on
    it `s` seconds later; the error it then raises says so (OperationalError: the pool
    drops the connection). A class, not a generator: it is on every task's path."""

    __slots__ = ("_conn", "_deadline_s")

    def __init__(self, conn: Conn, deadline_s: float) -> None:
        self._conn = conn
        self._deadline_s = deadline_s

    def __enter__(self) -> None:
        deadline = time.monotonic() + self._deadline_s
        _DEADLINES.watch(self._conn, deadline, self._conn.pgconn.socket)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if _DEADLINES.forget(self._conn):
            raise psycopg.OperationalError(
                f"PostgreSQL gave no answer within {self._deadline_s:g} s "
                "(GANNET_DB_ANSWER_DEADLINE_S); the connection was dropped"
            ) from exc


# Decoders of the text format by type OID (bool, int4, int8, float8, json, jsonb). Any
# other type comes back as str.
_DECODE: dict[int, Callable[[str], Any]] = {
    16: lambda v: v == "t",
    20: int,
    23: int,
    701: float,
    114: json.loads,
    3802: json.loads,
}
_DONE = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)


def param(value: object) -> bytes | None:
    """A parameter in text format, as UTF-8 (the connection's client encoding must be
    UTF8: Sink's pool sets it); bytes pass as they are (a JSON document already
    encoded), dicts and lists as JSON."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode()
    return str(value).encode()


def literals(conn: Conn, values: Sequence[object]) -> tuple[bytes, ...]:
    """`values` as quoted literals, converted as `param` converts them (NULL for None).
    Their types are left for PostgreSQL to resolve, as with untyped parameters: from the
    function they are passed to."""
    escaping = pq.Escaping(conn.pgconn)
    out = []
    for value in values:
        text = param(value)
        out.append(b"NULL" if text is None else escaping.escape_literal(text))
    return tuple(out)


def execute(
    conn: Conn, query: bytes, params: Sequence[object] | None, deadline_s: float
) -> pq.abc.PGresult:
    """Run `query` in one round trip, answered within `deadline_s`; with several
    statements (no `params`), the last one's result. PostgreSQL's errors raise psycopg's
    classes for their SQLSTATE, as a cursor would; a broken connection raises
    OperationalError (the pool drops it)."""
    with Deadline(conn, deadline_s):
        if params is None:
            result = conn.pgconn.exec_(query)
        else:
            result = conn.pgconn.exec_params(query, [param(p) for p in params])
    if result.status in _DONE:
        return result
    encoding = conn.info.encoding
    if conn.pgconn.status == pq.ConnStatus.BAD:
        raise psycopg.OperationalError(result.get_error_message(encoding))
    raise error_from_result(result, encoding=encoding)


def rows(conn: Conn, result: pq.abc.PGresult) -> list[dict[str, Any]]:
    """The result's rows as dicts of column name to value."""
    encoding = conn.info.encoding
    columns = []
    for i in range(result.nfields):
        name = (result.fname(i) or b"").decode(encoding)
        columns.append((i, name, _DECODE.get(result.ftype(i), str)))
    out = []
    for row in range(result.ntuples):
        values: dict[str, Any] = {}
        for i, name, decode in columns:
            raw = result.get_value(row, i)
            values[name] = None if raw is None else decode(raw.decode(encoding))
        out.append(values)
    return out


def one(
    conn: Conn, query: bytes, params: Sequence[object] | None, deadline_s: float
) -> dict[str, Any]:
    """The one row `query` returns (the per-task functions always return one)."""
    found = rows(conn, execute(conn, query, params, deadline_s))
    if len(found) != 1:
        raise psycopg.InterfaceError(f"expected one row, got {len(found)}")
    return found[0]
