"""`gannet db purge`: delete a tenant's old rows, each with its claim.

The daemon deletes no row, so task_results and task_claims grow with every task while
the buckets' lifecycle rules delete images and result objects. Row-level security shows
a role one tenant's rows at a time (the policies are forced, on the tables' owner too),
so the operator names the tenants; each is purged in batches of its own short
transactions, so that a purge of millions of rows neither holds locks for long nor
writes its WAL in one burst beside the daemon's commits.

A row goes with its claim: a success's row deleted alone would leave its task_id held
for good (a republished task of that id answered as one another worker runs, then
dead-lettered). A claim a worker holds now (a failed task being retried) stays: its
commit writes the row again.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

# Rows last written before the cut-off. The index (tenant_id, created_at) finds them;
# updated_at keeps a failed row a later attempt overwrote. The delete checks updated_at
# again: a row committed anew between the batch's SELECT and its DELETE (PostgreSQL
# re-reads a row updated meanwhile) is a fresh success and stays.
_BATCH = """
WITH old AS (
    SELECT task_id FROM task_results
    WHERE tenant_id = %(tenant)s AND created_at < %(before)s AND updated_at < %(before)s
    LIMIT %(batch)s
), gone AS (
    DELETE FROM task_results r USING old
    WHERE r.task_id = old.task_id AND r.updated_at < %(before)s
    RETURNING r.task_id
), freed AS (
    DELETE FROM task_claims c USING gone
    WHERE c.task_id = gone.task_id AND (c.expires_at <= now() OR c.expires_at = 'infinity')
    RETURNING c.task_id
)
SELECT (SELECT count(*) FROM old), (SELECT count(*) FROM gone), (SELECT count(*) FROM freed)
"""
_COUNT = """
SELECT count(*) FROM task_results
WHERE tenant_id = %(tenant)s AND created_at < %(before)s AND updated_at < %(before)s
"""
_PROGRESS_EVERY_S = 5.0


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
        with conn.transaction():
            _as_tenant(conn, tenant)
            row = conn.execute(
                _BATCH, {"tenant": tenant, "before": before, "batch": batch}
            ).fetchone()
        found, rows, claims = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
        done.rows += rows
        done.claims += claims
        if found < batch:
            return done
        if time.monotonic() - said >= _PROGRESS_EVERY_S:
            print(f"{tenant}: {done.rows} rows deleted so far ...", file=sys.stderr)
            said = time.monotonic()


def main(database_url: str, tenants: list[str], days: float, batch: int, dry_run: bool) -> int:
    before = datetime.now(UTC) - timedelta(days=days)
    with psycopg.connect(database_url, connect_timeout=10) as conn:
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
