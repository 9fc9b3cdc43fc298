"""`gannet db purge`: delete a tenant's old rows, each with its claim.

The daemon deletes no row of them, so task_results and task_claims grow with every task while
the buckets' lifecycle rules delete images and result objects. Row-level security shows
a role one tenant's rows at a time (the policies are forced, on the tables' owner too),
so the operator names the tenants; each is purged in batches of its own short
transactions, so that a purge of millions of rows neither holds locks for long nor
writes its WAL in one burst beside the daemon's commits.

A row goes with its claim: a success's row deleted alone would leave its task_id held
for good (a republished task of that id answered as one another worker runs, then
dead-lettered). A live claim (a failed task being retried) stays: its commit writes the
row again; a claim locked by a commit under way is skipped, with its row.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from gannet import sink
from gannet.errors import CommandError

# A batch in four statements of one transaction, locking as a worker's commit does:
# the claim first (gannet_fence), then the row (gannet_finish). The other order, the row
# deleted and then its claim, deadlocked with a commit whose claim had expired while it
# ran (a retry of an old failed task). A claim a worker holds now is skipped, with its
# row. The index (tenant_id, created_at) finds the rows; updated_at keeps a failed row a
# later attempt overwrote, and is checked again as the row is deleted.
_OLD = "tenant_id = %(tenant)s AND created_at < %(before)s AND updated_at < %(before)s"
_FOUND = f"SELECT task_id FROM task_results WHERE {_OLD} LIMIT %(batch)s"
_CLAIMS = "SELECT task_id FROM task_claims WHERE task_id = ANY(%(found)s)"
_LOCK_CLAIMS = """
SELECT task_id FROM task_claims WHERE task_id = ANY(%(found)s)
FOR UPDATE SKIP LOCKED
"""
_DELETE_ROWS = """
DELETE FROM task_results
WHERE task_id = ANY(%(ids)s) AND updated_at < %(before)s
RETURNING task_id
"""
_DELETE_CLAIMS = """
DELETE FROM task_claims
WHERE task_id = ANY(%(ids)s) AND (expires_at <= now() OR expires_at = 'infinity')
"""
_COUNT = f"SELECT count(*) FROM task_results WHERE {_OLD}"  # what a purge would find
_PROGRESS_EVERY_S = 5.0
_TRIES = 5  # a batch refused for a lock (a deadlock's victim, say) is tried again


@dataclass
class Purged:
    rows: int = 0
    claims: int = 0


def _as_tenant(conn: psycopg.Connection[Any], tenant: str) -> None:
    conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))


def count(conn: psycopg.Connection[Any], tenant: str, before: datetime) -> int:
    """How many of the tenant's rows a purge with this cut-off would delete."""
    with conn.transaction():
        _as_tenant(conn, tenant)
        row = conn.execute(_COUNT, {"tenant": tenant, "before": before}).fetchone()
    return int(row[0]) if row else 0


def purge(conn: psycopg.Connection[Any], tenant: str, before: datetime, batch: int) -> Purged:
    """Deletes the tenant's rows last written before `before`, with their claims, a
    batch per transaction; says how far it got every few seconds on stderr."""
    done = Purged()
    said = time.monotonic()
    while True:
        found, rows, claims = _tried(conn, tenant, before, batch)
        done.rows += rows
        done.claims += claims
        if found < batch or not rows:  # the end, or only rows whose claims are held
            return done
        if time.monotonic() - said >= _PROGRESS_EVERY_S:
            print(f"{tenant}: {done.rows} rows deleted so far ...", file=sys.stderr)
            said = time.monotonic()


def _tried(
    conn: psycopg.Connection[Any], tenant: str, before: datetime, batch: int
) -> tuple[int, int, int]:
    for attempt in range(1, _TRIES + 1):
        try:
            return _batch(conn, tenant, before, batch)
        except (psycopg.errors.TransactionRollback, psycopg.errors.LockNotAvailable):
            if attempt == _TRIES:
                raise
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def _batch(
    conn: psycopg.Connection[Any], tenant: str, before: datetime, batch: int
) -> tuple[int, int, int]:
    """(rows found, rows deleted, claims deleted) of one batch, in one transaction."""
    with conn.transaction():
        _as_tenant(conn, tenant)
        found = [
            r[0] for r in conn.execute(_FOUND, {"tenant": tenant, "before": before, "batch": batch})
        ]
        if not found:
            return 0, 0, 0
        claimed = {r[0] for r in conn.execute(_CLAIMS, {"found": found})}
        locked = {r[0] for r in conn.execute(_LOCK_CLAIMS, {"found": found})}
        ids = [t for t in found if t in locked or t not in claimed]
        gone = [r[0] for r in conn.execute(_DELETE_ROWS, {"ids": ids, "before": before})]
        freed = conn.execute(_DELETE_CLAIMS, {"ids": gone}).rowcount
    return len(found), len(gone), freed


def main(
    database_url: str,
    tenants: list[str],
    days: float,
    batch: int,
    dry_run: bool,
    setting: str = "GANNET_DATABASE_URL",
) -> int:
    """CommandError, naming `setting`, when PostgreSQL cannot be reached; a psycopg
    error from a batch (its tries spent) ends the run, each batch before it committed."""
    before = datetime.now(UTC) - timedelta(days=days)
    try:
        conn = psycopg.connect(database_url, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise CommandError(sink.cannot_connect(exc, setting)) from exc
    with conn:
        for tenant in tenants:
            if dry_run:
                n = count(conn, tenant, before)
                print(f"{tenant}: {n} rows last written before {before:%Y-%m-%d %H:%M} UTC")
                continue
            done = purge(conn, tenant, before, batch)
            print(
                f"{tenant}: deleted {done.rows} rows last written before "
                f"{before:%Y-%m-%d %H:%M} UTC, and {done.claims} claims"
            )
    return 0
