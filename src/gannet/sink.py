"""PostgreSQL: the schema and its migrations, and the one transaction per result.

Every transaction sets app.current_tenant first, and row-level security checks every row
against it, so a bug in a query cannot leak or overwrite another tenant's results.
Writes are idempotent on task_id: a success is never overwritten, and a redelivered task
whose success is committed is recognised before any model runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from gannet.errors import ErrorCode, PermanentError, TransientError
from gannet.task import TaskResult

log = logging.getLogger(__name__)

# (version, statements). Append only: a released migration is never edited.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE task_results (
            task_id          text PRIMARY KEY,
            tenant_id        text NOT NULL,
            status           text NOT NULL CHECK (status IN ('succeeded', 'failed')),
            pipeline         text,
            session_id       text,
            image_id         text,
            image_url        text,
            result           jsonb,
            result_uri       text,
            error_code       text,
            error            text,
            delivery_attempt integer,
            timings          jsonb NOT NULL DEFAULT '{}'::jsonb,
            callback_status  text,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX task_results_tenant_created ON task_results (tenant_id, created_at DESC);
        CREATE INDEX task_results_session ON task_results (tenant_id, session_id)
            WHERE session_id IS NOT NULL;
        ALTER TABLE task_results ENABLE ROW LEVEL SECURITY;
        ALTER TABLE task_results FORCE ROW LEVEL SECURITY;
        CREATE POLICY tenant_isolation ON task_results
            USING (tenant_id = current_setting('app.current_tenant', true))
            WITH CHECK (tenant_id = current_setting('app.current_tenant', true));
        """,
    ),
    (
        2,
        """
        -- Who runs a task now, and which tenant owns its task_id. A row is written when a
        -- worker starts a task and kept: it is how a task_id taken by another tenant is
        -- refused before any model runs (RLS hides the owner's row; the claim's update
        -- fails its policy check).
        CREATE TABLE task_claims (
            task_id     text PRIMARY KEY,
            tenant_id   text NOT NULL,
            holder      text NOT NULL,
            expires_at  timestamptz NOT NULL
        );
        ALTER TABLE task_claims ENABLE ROW LEVEL SECURITY;
        ALTER TABLE task_claims FORCE ROW LEVEL SECURITY;
        CREATE POLICY tenant_isolation ON task_claims
            USING (tenant_id = current_setting('app.current_tenant', true))
            WITH CHECK (tenant_id = current_setting('app.current_tenant', true));
        """,
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
_MIGRATION_LOCK = 0x6A4E_E7  # pg_advisory_xact_lock key: one migrator at a time

_UPSERT = """
INSERT INTO task_results (task_id, tenant_id, status, pipeline, session_id, image_id,
    image_url, result, result_uri, error_code, error, delivery_attempt, timings)
VALUES (%(task_id)s, %(tenant_id)s, %(status)s, %(pipeline)s, %(session_id)s, %(image_id)s,
    %(image_url)s, %(result)s, %(result_uri)s, %(error_code)s, %(error)s,
    %(delivery_attempt)s, %(timings)s)
ON CONFLICT (task_id) DO UPDATE SET
    status = EXCLUDED.status, pipeline = EXCLUDED.pipeline, result = EXCLUDED.result,
    result_uri = EXCLUDED.result_uri, error_code = EXCLUDED.error_code,
    error = EXCLUDED.error, delivery_attempt = EXCLUDED.delivery_attempt,
    timings = EXCLUDED.timings, image_url = EXCLUDED.image_url, updated_at = now()
WHERE task_results.status <> 'succeeded'
RETURNING task_id
"""


_SUCCESS = (
    "SELECT task_id, result, result_uri, callback_status, updated_at FROM task_results"
    " WHERE task_id = %s AND status = 'succeeded'"
)

# Take the claim if it is free, expired or already ours. On another tenant's row the
# UPDATE's RLS check fails (InsufficientPrivilege): the task_id is not this tenant's.
_CLAIM = """
INSERT INTO task_claims AS c (task_id, tenant_id, holder, expires_at)
VALUES (%(task_id)s, %(tenant_id)s, %(holder)s, now() + make_interval(secs => %(ttl_s)s))
ON CONFLICT (task_id) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
WHERE c.holder = EXCLUDED.holder OR c.expires_at <= now()
RETURNING task_id
"""
_RELEASE = "UPDATE task_claims SET expires_at = now() WHERE task_id = %s AND holder = %s"
# A committed success keeps its claim for good: a worker waiting on the claim's row lock
# then finds it held, looks again and sees the success, instead of running the task twice.
_DONE = "UPDATE task_claims SET expires_at = 'infinity' WHERE task_id = %s AND holder = %s"
# The fence: whoever holds the claim row's lock is the only one who may write the result
# object and commit, so the object at result_uri is always the committed attempt's.
_LEFT_S = "greatest(0, extract(epoch FROM least(expires_at, now() + interval '1 hour') - now()))"
_FENCE = f"SELECT holder, {_LEFT_S}::float AS left_s FROM task_claims WHERE task_id = %s FOR UPDATE"
_LEFT = f"SELECT {_LEFT_S}::float AS left_s FROM task_claims WHERE task_id = %s"

_CONFLICT = "task_id is already used by another tenant; task ids must be globally unique"


@dataclass(frozen=True)
class Start:
    """What a worker finds when it starts a task: a committed success (then nothing runs),
    or whether it now holds the task's claim (if not, another worker is running it)."""

    success: dict[str, Any] | None
    claimed: bool
    retry_after_s: float | None = None  # not claimed: when the holder's claim runs out


class ClaimLost(TransientError):
    """The task's claim passed to another worker while this one ran it (it ran longer
    than the claim's TTL): this attempt must not write or commit anything."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(ErrorCode.TASK_BUSY, "another worker took the task over")
        self.retry_after_s = retry_after_s


def _transient(exc: Exception) -> TransientError:
    return TransientError(ErrorCode.DEPENDENCY_UNAVAILABLE, f"PostgreSQL: {exc}")


class Sink:
    def __init__(self, database_url: str, pool_size: int = 8, timeout_s: float = 10.0) -> None:
        self.pool = ConnectionPool(
            database_url,
            min_size=1,
            max_size=pool_size,
            timeout=timeout_s,
            open=False,
            kwargs={"autocommit": False, "connect_timeout": 5},
            # No check on every checkout (a round trip per transaction): a broken
            # connection fails its transaction, the task is nacked and retried, and the
            # pool replaces the connection.
        )

    def open(self, wait_s: float = 10.0) -> None:
        self.pool.open(wait=True, timeout=wait_s)

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def tenant_transaction(self, tenant_id: str) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        """A transaction in which RLS sees only `tenant_id`'s rows."""
        try:
            with self.pool.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                cur.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant_id,))
                yield cur
        except PoolTimeout as exc:
            raise _transient(exc) from exc
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PermanentError(ErrorCode.TASK_ID_CONFLICT, _CONFLICT) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise _transient(exc) from exc

    def find_success(self, task_id: str, tenant_id: str) -> dict[str, Any] | None:
        with self.tenant_transaction(tenant_id) as cur:
            cur.execute(_SUCCESS, (task_id,))
            return cur.fetchone()

    def start(self, task_id: str, tenant_id: str, holder: str, ttl_s: float) -> Start:
        """One transaction before any download: a committed success, else the task's claim
        for `ttl_s`. PermanentError(task_id_conflict) when another tenant owns the id."""
        with self.tenant_transaction(tenant_id) as cur:
            cur.execute(_SUCCESS, (task_id,))
            success = cur.fetchone()
            if success is not None:
                return Start(success, claimed=False)
            params = {"task_id": task_id, "tenant_id": tenant_id, "holder": holder, "ttl_s": ttl_s}
            cur.execute(_CLAIM, params)
            if cur.fetchone() is not None:
                return Start(None, claimed=True)
            # Not ours. The holder may have committed while we waited for its lock; each
            # statement sees what is committed when it starts, so this one would see it.
            cur.execute(_SUCCESS, (task_id,))
            success = cur.fetchone()
            if success is not None:
                return Start(success, claimed=False)
            cur.execute(_LEFT, (task_id,))
            held = cur.fetchone()
            return Start(None, claimed=False, retry_after_s=held["left_s"] if held else 0.0)

    def release(self, task_id: str, tenant_id: str, holder: str) -> None:
        """Give the claim up now (the task was nacked), so a redelivery need not wait."""
        with self.tenant_transaction(tenant_id) as cur:
            cur.execute(_RELEASE, (task_id, holder))

    def save(self, record: TaskResult) -> bool:
        """Upsert the row; False when a committed success already stands (not overwritten)."""
        with self.tenant_transaction(record.tenant_id) as cur:
            return _upsert(cur, record)

    def save_claimed(self, record: TaskResult, holder: str, write: Callable[[], object]) -> bool:
        """Commit a success under `holder`'s claim: `write()` (the result object) runs
        inside the transaction while the claim row is locked, then the row is upserted
        and the claim kept for good. When another worker holds the claim now, nothing is
        written: False if that worker committed a success, else ClaimLost."""
        with self.tenant_transaction(record.tenant_id) as cur:
            cur.execute(_FENCE, (record.task_id,))
            claim = cur.fetchone()
            if claim is None or claim["holder"] != holder:
                cur.execute(_SUCCESS, (record.task_id,))
                if cur.fetchone() is not None:
                    return False
                raise ClaimLost(claim["left_s"] if claim else 0.0)
            write()
            written = _upsert(cur, record)
            cur.execute(_DONE, (record.task_id, holder))
            return written

    def set_callback_status(self, task_id: str, tenant_id: str, status: str) -> None:
        with self.tenant_transaction(tenant_id) as cur:
            cur.execute(
                "UPDATE task_results SET callback_status = %s, updated_at = now()"
                " WHERE task_id = %s",
                (status, task_id),
            )

    def schema_version(self) -> int:
        try:
            with self.pool.connection() as conn:
                row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
                if not row or not row[0]:
                    return 0
                version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
                return int(version[0] or 0) if version else 0
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise _transient(exc) from exc


def _upsert(cur: psycopg.Cursor[dict[str, Any]], record: TaskResult) -> bool:
    params = record.model_dump()
    params["result"] = Jsonb(record.result) if record.result is not None else None
    params["timings"] = Jsonb(record.timings)
    cur.execute(_UPSERT, params)
    if cur.fetchone() is not None:
        return True
    # Nothing written: a success stands. If this tenant cannot see it, the task_id
    # belongs to another tenant, and acking would lose this task.
    cur.execute("SELECT 1 FROM task_results WHERE task_id = %s", (record.task_id,))
    if cur.fetchone() is None:
        raise PermanentError(ErrorCode.TASK_ID_CONFLICT, _CONFLICT)
    return False


def migrate(database_url: str) -> list[int]:
    """Apply pending migrations in one transaction each; returns the versions applied."""
    applied: list[int] = []
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for version, sql in MIGRATIONS:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (version,)
                ).fetchone()
                if done:
                    continue
                conn.execute(sql)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
                log.info("migration applied", extra={"fields": {"version": version}})
    return applied
