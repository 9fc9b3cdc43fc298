"""PostgreSQL: the schema and its migrations, and the one transaction per result.

Every transaction sets app.current_tenant first, and row-level security checks every row
against it, so a bug in a query cannot leak or overwrite another tenant's results.
Writes are idempotent on task_id: a success is never overwritten, and a redelivered task
whose success is committed is recognised before any model runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import psycopg
from psycopg import conninfo, sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from gannet import pgexec
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
    (
        3,
        """
        -- A task's two transactions as one call each: the claim (gannet_start) in one
        -- round trip, the fenced commit in four (BEGIN, gannet_fence, gannet_finish,
        -- COMMIT) instead of six. Each round trip also costs the daemon a GIL handoff;
        -- see docs/benchmark.md. SECURITY INVOKER (the default): row-level security
        -- applies inside, checked against the tenant each function sets first.
        CREATE FUNCTION gannet_start(p_task text, p_tenant text, p_holder text, p_ttl_s float8)
        RETURNS TABLE (claimed boolean, task_id text, result jsonb, result_uri text,
                       callback_status text, left_s float8)
        LANGUAGE plpgsql AS $fn$
        BEGIN
            PERFORM set_config('app.current_tenant', p_tenant, true);
            RETURN QUERY SELECT false, r.task_id, r.result, r.result_uri, r.callback_status,
                NULL::float8
                FROM task_results r WHERE r.task_id = p_task AND r.status = 'succeeded';
            IF FOUND THEN RETURN; END IF;
            -- Free, expired or already ours. Another tenant's row fails the update's
            -- policy check (insufficient_privilege): the task_id is not this tenant's.
            INSERT INTO task_claims AS c (task_id, tenant_id, holder, expires_at)
            VALUES (p_task, p_tenant, p_holder, now() + make_interval(secs => p_ttl_s))
            ON CONFLICT ON CONSTRAINT task_claims_pkey DO UPDATE
                SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                WHERE c.holder = EXCLUDED.holder OR c.expires_at <= now();
            IF FOUND THEN
                RETURN QUERY SELECT true, p_task, NULL::jsonb, NULL::text, NULL::text,
                    NULL::float8;
                RETURN;
            END IF;
            -- Not ours. The holder may have committed while we waited for its lock;
            -- each statement of a volatile function sees what is committed when it starts.
            RETURN QUERY SELECT false, r.task_id, r.result, r.result_uri, r.callback_status,
                NULL::float8
                FROM task_results r WHERE r.task_id = p_task AND r.status = 'succeeded';
            IF FOUND THEN RETURN; END IF;
            RETURN QUERY SELECT false, NULL::text, NULL::jsonb, NULL::text, NULL::text,
                coalesce((SELECT greatest(0, extract(epoch FROM
                    least(c.expires_at, now() + interval '1 hour') - now()))::float8
                    FROM task_claims c WHERE c.task_id = p_task), 0);
        END
        $fn$;

        -- The fence: lock the claim row; ours, or (not ours) whether a success stands.
        CREATE FUNCTION gannet_fence(p_task text, p_tenant text, p_holder text)
        RETURNS TABLE (mine boolean, committed boolean, left_s float8)
        LANGUAGE plpgsql AS $fn$
        DECLARE
            v_holder text;
            v_left float8;
        BEGIN
            PERFORM set_config('app.current_tenant', p_tenant, true);
            SELECT c.holder, greatest(0, extract(epoch FROM
                    least(c.expires_at, now() + interval '1 hour') - now()))::float8
                INTO v_holder, v_left
                FROM task_claims c WHERE c.task_id = p_task FOR UPDATE;
            IF v_holder = p_holder THEN
                RETURN QUERY SELECT true, false, v_left;
                RETURN;
            END IF;
            RETURN QUERY SELECT false, EXISTS (SELECT 1 FROM task_results r
                WHERE r.task_id = p_task AND r.status = 'succeeded'), coalesce(v_left, 0);
        END
        $fn$;

        -- After gannet_fence, in its transaction: upsert the success (never over another
        -- success) and keep the claim for good. False when a success already stood.
        CREATE FUNCTION gannet_finish(p_holder text, p_task text, p_tenant text,
            p_status text, p_pipeline text, p_session text, p_image_id text,
            p_image_url text, p_result jsonb, p_result_uri text, p_attempt integer,
            p_timings jsonb)
        RETURNS boolean
        LANGUAGE plpgsql AS $fn$
        DECLARE
            v_written boolean;
        BEGIN
            INSERT INTO task_results AS t (task_id, tenant_id, status, pipeline, session_id,
                image_id, image_url, result, result_uri, delivery_attempt, timings)
            VALUES (p_task, p_tenant, p_status, p_pipeline, p_session, p_image_id,
                p_image_url, p_result, p_result_uri, p_attempt, p_timings)
            ON CONFLICT ON CONSTRAINT task_results_pkey DO UPDATE SET
                status = EXCLUDED.status, pipeline = EXCLUDED.pipeline,
                result = EXCLUDED.result, result_uri = EXCLUDED.result_uri,
                error_code = NULL, error = NULL,
                delivery_attempt = EXCLUDED.delivery_attempt, timings = EXCLUDED.timings,
                image_url = EXCLUDED.image_url, updated_at = now()
            WHERE t.status <> 'succeeded';
            v_written := FOUND;
            -- Nothing written and this tenant cannot see the row: another tenant's id.
            IF NOT v_written AND NOT EXISTS (
                SELECT 1 FROM task_results r WHERE r.task_id = p_task) THEN
                RAISE EXCEPTION 'task_id belongs to another tenant'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            UPDATE task_claims SET expires_at = 'infinity'
                WHERE task_id = p_task AND holder = p_holder;
            RETURN v_written;
        END
        $fn$;
        """,
    ),
    (
        4,
        """
        -- The fence also says whether a success stands when the claim is ours. Under the
        -- claim row's lock no one else can commit one (every success commits through the
        -- fence), so gannet_finish's answer is known before it runs, and the daemon sends
        -- "gannet_finish; COMMIT" as one round trip instead of two. A daemon of schema 3
        -- reads `committed` only when the claim is not its own, so it runs on this too.
        CREATE OR REPLACE FUNCTION gannet_fence(p_task text, p_tenant text, p_holder text)
        RETURNS TABLE (mine boolean, committed boolean, left_s float8)
        LANGUAGE plpgsql AS $fn$
        DECLARE
            v_holder text;
            v_left float8;
        BEGIN
            PERFORM set_config('app.current_tenant', p_tenant, true);
            SELECT c.holder, greatest(0, extract(epoch FROM
                    least(c.expires_at, now() + interval '1 hour') - now()))::float8
                INTO v_holder, v_left
                FROM task_claims c WHERE c.task_id = p_task FOR UPDATE;
            RETURN QUERY SELECT coalesce(v_holder = p_holder, false),
                EXISTS (SELECT 1 FROM task_results r
                    WHERE r.task_id = p_task AND r.status = 'succeeded'),
                coalesce(v_left, 0);
        END
        $fn$;
        """,
    ),
    (
        5,
        """
        -- Another tenant's claim on the task_id is refused (insufficient_privilege). The
        -- claim's upsert finds that row and writes nothing, but PostgreSQL checks the
        -- upsert's WHERE before the row's policy, so no policy error is raised there, and
        -- gannet_start answered as for a task another worker is running: nacked and
        -- redelivered until Pub/Sub gave up, with no reason recorded. Claims are never
        -- deleted, so a row the upsert met and this tenant cannot see is another's.
        CREATE OR REPLACE FUNCTION gannet_start(p_task text, p_tenant text, p_holder text,
            p_ttl_s float8)
        RETURNS TABLE (claimed boolean, task_id text, result jsonb, result_uri text,
                       callback_status text, left_s float8)
        LANGUAGE plpgsql AS $fn$
        BEGIN
            PERFORM set_config('app.current_tenant', p_tenant, true);
            RETURN QUERY SELECT false, r.task_id, r.result, r.result_uri, r.callback_status,
                NULL::float8
                FROM task_results r WHERE r.task_id = p_task AND r.status = 'succeeded';
            IF FOUND THEN RETURN; END IF;
            INSERT INTO task_claims AS c (task_id, tenant_id, holder, expires_at)
            VALUES (p_task, p_tenant, p_holder, now() + make_interval(secs => p_ttl_s))
            ON CONFLICT ON CONSTRAINT task_claims_pkey DO UPDATE
                SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                WHERE c.holder = EXCLUDED.holder OR c.expires_at <= now();
            IF FOUND THEN
                RETURN QUERY SELECT true, p_task, NULL::jsonb, NULL::text, NULL::text,
                    NULL::float8;
                RETURN;
            END IF;
            IF NOT EXISTS (SELECT 1 FROM task_claims c WHERE c.task_id = p_task) THEN
                RAISE EXCEPTION 'task_id belongs to another tenant'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            -- Not ours. The holder may have committed while we waited for its lock;
            -- each statement of a volatile function sees what is committed when it starts.
            RETURN QUERY SELECT false, r.task_id, r.result, r.result_uri, r.callback_status,
                NULL::float8
                FROM task_results r WHERE r.task_id = p_task AND r.status = 'succeeded';
            IF FOUND THEN RETURN; END IF;
            RETURN QUERY SELECT false, NULL::text, NULL::jsonb, NULL::text, NULL::text,
                coalesce((SELECT greatest(0, extract(epoch FROM
                    least(c.expires_at, now() + interval '1 hour') - now()))::float8
                    FROM task_claims c WHERE c.task_id = p_task), 0);
        END
        $fn$;
        """,
    ),
    (
        6,
        """
        -- A success row's created_at/updated_at say when its result was written. now()
        -- is the transaction's start, which gannet_fence opens before the result's GCS
        -- write: the rows read as written before their result existed (by the write's
        -- time, up to seconds for a large photo), and the benches' last-commit times
        -- fell short by as much. clock_timestamp() is the statement's own time, in the
        -- round trip that commits.
        CREATE OR REPLACE FUNCTION gannet_finish(p_holder text, p_task text, p_tenant text,
            p_status text, p_pipeline text, p_session text, p_image_id text,
            p_image_url text, p_result jsonb, p_result_uri text, p_attempt integer,
            p_timings jsonb)
        RETURNS boolean
        LANGUAGE plpgsql AS $fn$
        DECLARE
            v_written boolean;
        BEGIN
            INSERT INTO task_results AS t (task_id, tenant_id, status, pipeline, session_id,
                image_id, image_url, result, result_uri, delivery_attempt, timings,
                created_at, updated_at)
            VALUES (p_task, p_tenant, p_status, p_pipeline, p_session, p_image_id,
                p_image_url, p_result, p_result_uri, p_attempt, p_timings,
                clock_timestamp(), clock_timestamp())
            ON CONFLICT ON CONSTRAINT task_results_pkey DO UPDATE SET
                status = EXCLUDED.status, pipeline = EXCLUDED.pipeline,
                result = EXCLUDED.result, result_uri = EXCLUDED.result_uri,
                error_code = NULL, error = NULL,
                delivery_attempt = EXCLUDED.delivery_attempt, timings = EXCLUDED.timings,
                image_url = EXCLUDED.image_url, updated_at = clock_timestamp()
            WHERE t.status <> 'succeeded';
            v_written := FOUND;
            -- Nothing written and this tenant cannot see the row: another tenant's id.
            IF NOT v_written AND NOT EXISTS (
                SELECT 1 FROM task_results r WHERE r.task_id = p_task) THEN
                RAISE EXCEPTION 'task_id belongs to another tenant'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            UPDATE task_claims SET expires_at = 'infinity'
                WHERE task_id = p_task AND holder = p_holder;
            RETURN v_written;
        END
        $fn$;
        """,
    ),
    (
        7,
        """
        -- A new outcome over a failed row takes its session_id and image_id too (where
        -- it has them): a task refused for its schema has a failed row without them, and
        -- its corrected republish's success kept none, missing from its session's rows.
        CREATE OR REPLACE FUNCTION gannet_finish(p_holder text, p_task text, p_tenant text,
            p_status text, p_pipeline text, p_session text, p_image_id text,
            p_image_url text, p_result jsonb, p_result_uri text, p_attempt integer,
            p_timings jsonb)
        RETURNS boolean
        LANGUAGE plpgsql AS $fn$
        DECLARE
            v_written boolean;
        BEGIN
            INSERT INTO task_results AS t (task_id, tenant_id, status, pipeline, session_id,
                image_id, image_url, result, result_uri, delivery_attempt, timings,
                created_at, updated_at)
            VALUES (p_task, p_tenant, p_status, p_pipeline, p_session, p_image_id,
                p_image_url, p_result, p_result_uri, p_attempt, p_timings,
                clock_timestamp(), clock_timestamp())
            ON CONFLICT ON CONSTRAINT task_results_pkey DO UPDATE SET
                status = EXCLUDED.status, pipeline = EXCLUDED.pipeline,
                session_id = coalesce(EXCLUDED.session_id, t.session_id),
                image_id = coalesce(EXCLUDED.image_id, t.image_id),
                result = EXCLUDED.result, result_uri = EXCLUDED.result_uri,
                error_code = NULL, error = NULL,
                delivery_attempt = EXCLUDED.delivery_attempt, timings = EXCLUDED.timings,
                image_url = EXCLUDED.image_url, updated_at = clock_timestamp()
            WHERE t.status <> 'succeeded';
            v_written := FOUND;
            -- Nothing written and this tenant cannot see the row: another tenant's id.
            IF NOT v_written AND NOT EXISTS (
                SELECT 1 FROM task_results r WHERE r.task_id = p_task) THEN
                RAISE EXCEPTION 'task_id belongs to another tenant'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            UPDATE task_claims SET expires_at = 'infinity'
                WHERE task_id = p_task AND holder = p_holder;
            RETURN v_written;
        END
        $fn$;
        """,
    ),
    (
        8,
        """
        -- Callbacks owed: a row per committed success with a callback_url, written in the
        -- commit and deleted with the callback's final outcome (Sink.set_callback_status).
        -- The pod that committed holds it (`holder`) and renews `due_at` while its
        -- callback waits; one that died, or stopped before sending it, leaves it due, and
        -- any pod takes it over (Sink.take_callbacks). Without row-level security: a
        -- sweep takes rows due whatever their tenant, and a row holds only ids, times and
        -- a count; the URL and the result are read from task_results under the tenant.
        ALTER TABLE task_results ADD COLUMN callback_url text;
        CREATE TABLE callback_outbox (
            task_id    text PRIMARY KEY,
            tenant_id  text NOT NULL,
            holder     text,
            due_at     timestamptz NOT NULL,
            attempts   integer NOT NULL DEFAULT 0
        );
        CREATE INDEX callback_outbox_due ON callback_outbox (due_at);

        -- gannet_finish of migration 7 and the callback's URL: kept on the row, and owed
        -- in callback_outbox, held by p_holder for p_callback_lease_s. The 12-argument
        -- function stays for a daemon of an earlier schema during a rolling update.
        CREATE FUNCTION gannet_finish(p_holder text, p_task text, p_tenant text,
            p_status text, p_pipeline text, p_session text, p_image_id text,
            p_image_url text, p_result jsonb, p_result_uri text, p_attempt integer,
            p_timings jsonb, p_callback_url text, p_callback_lease_s float8)
        RETURNS boolean
        LANGUAGE plpgsql AS $fn$
        DECLARE
            v_written boolean;
        BEGIN
            INSERT INTO task_results AS t (task_id, tenant_id, status, pipeline, session_id,
                image_id, image_url, result, result_uri, delivery_attempt, timings,
                callback_url, created_at, updated_at)
            VALUES (p_task, p_tenant, p_status, p_pipeline, p_session, p_image_id,
                p_image_url, p_result, p_result_uri, p_attempt, p_timings, p_callback_url,
                clock_timestamp(), clock_timestamp())
            ON CONFLICT ON CONSTRAINT task_results_pkey DO UPDATE SET
                status = EXCLUDED.status, pipeline = EXCLUDED.pipeline,
                session_id = coalesce(EXCLUDED.session_id, t.session_id),
                image_id = coalesce(EXCLUDED.image_id, t.image_id),
                result = EXCLUDED.result, result_uri = EXCLUDED.result_uri,
                error_code = NULL, error = NULL,
                delivery_attempt = EXCLUDED.delivery_attempt, timings = EXCLUDED.timings,
                image_url = EXCLUDED.image_url, callback_url = EXCLUDED.callback_url,
                updated_at = clock_timestamp()
            WHERE t.status <> 'succeeded';
            v_written := FOUND;
            -- Nothing written and this tenant cannot see the row: another tenant's id.
            IF NOT v_written AND NOT EXISTS (
                SELECT 1 FROM task_results r WHERE r.task_id = p_task) THEN
                RAISE EXCEPTION 'task_id belongs to another tenant'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            IF v_written AND p_callback_url IS NOT NULL THEN
                INSERT INTO callback_outbox (task_id, tenant_id, holder, due_at)
                VALUES (p_task, p_tenant, p_holder,
                    clock_timestamp() + make_interval(secs => p_callback_lease_s))
                ON CONFLICT (task_id) DO NOTHING;
            END IF;
            UPDATE task_claims SET expires_at = 'infinity'
                WHERE task_id = p_task AND holder = p_holder;
            RETURN v_written;
        END
        $fn$;
        """,
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

# What the daemon's role may do when it is not the tables' owner: rows read, added and
# updated, under row-level security. An owner can turn that security off (ALTER TABLE
# ... DISABLE ROW LEVEL SECURITY) and delete rows; this role can do neither, but for
# callback_outbox's rows (no tenant's data: ids, times, a count; no row-level
# security, since every pod takes over every tenant's), deleted with their outcome. A
# migration that adds a table the daemon uses adds it here. `migrate` grants these;
# the daemon checks them at start (`Sink.role`).
_WORKER_RIGHTS: dict[str, tuple[str, ...]] = {
    "task_results": ("SELECT", "INSERT", "UPDATE"),
    "task_claims": ("SELECT", "INSERT", "UPDATE"),
    "schema_migrations": ("SELECT",),
    # Ids and times only (migration 8); a row goes with its callback's final outcome.
    "callback_outbox": ("SELECT", "INSERT", "UPDATE", "DELETE"),
}
_ROLE = """
SELECT current_user, EXISTS (
    SELECT 1 FROM pg_roles b WHERE (b.rolsuper OR b.rolbypassrls)
        AND pg_has_role(current_user, b.oid, 'MEMBER')), coalesce((
    SELECT pg_has_role(current_user, c.relowner, 'MEMBER')
        OR pg_has_role(current_user, n.nspowner, 'MEMBER')
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = to_regclass('task_results')), false)
"""
# Of the tables that exist: the daemon checks its role before the schema's version.
_MISSING_RIGHTS = """
SELECT t.right_ || ' on ' || t.table_ FROM unnest(%s::text[], %s::text[]) AS t(table_, right_)
WHERE CASE WHEN to_regclass(t.table_) IS NULL THEN false
    ELSE NOT has_table_privilege(%s, to_regclass(t.table_), t.right_) END
"""
_MIGRATION_LOCK = 0x6A4E_E7  # pg_advisory_xact_lock key: one migrator at a time

# A failed row (Sink.save). Over an earlier failure, what the row says of the task
# (pipeline, session, image) is the new message's where it says it, the earlier one's
# where it cannot (a body refused for its schema names none); gannet_finish likewise.
_UPSERT = """
INSERT INTO task_results (task_id, tenant_id, status, pipeline, session_id, image_id,
    image_url, result, result_uri, error_code, error, delivery_attempt, timings)
VALUES (%(task_id)s, %(tenant_id)s, %(status)s, %(pipeline)s, %(session_id)s, %(image_id)s,
    %(image_url)s, %(result)s, %(result_uri)s, %(error_code)s, %(error)s,
    %(delivery_attempt)s, %(timings)s)
ON CONFLICT (task_id) DO UPDATE SET
    status = EXCLUDED.status, result = EXCLUDED.result,
    pipeline = coalesce(EXCLUDED.pipeline, task_results.pipeline),
    session_id = coalesce(EXCLUDED.session_id, task_results.session_id),
    image_id = coalesce(EXCLUDED.image_id, task_results.image_id),
    result_uri = EXCLUDED.result_uri, error_code = EXCLUDED.error_code,
    error = EXCLUDED.error, delivery_attempt = EXCLUDED.delivery_attempt,
    timings = EXCLUDED.timings, image_url = coalesce(EXCLUDED.image_url, task_results.image_url),
    updated_at = now()
WHERE task_results.status <> 'succeeded'
RETURNING task_id
"""


_SUCCESS = (
    "SELECT task_id, result, result_uri, callback_status, updated_at FROM task_results"
    " WHERE task_id = %s AND status = 'succeeded'"
)

_START = b"SELECT * FROM gannet_start($1, $2, $3, $4)"
_OWN = (
    "INSERT INTO task_claims (task_id, tenant_id, holder, expires_at)"
    " VALUES (%s, %s, '', now()) ON CONFLICT (task_id) DO NOTHING"
)
_CLAIM_SEEN = "SELECT 1 FROM task_claims WHERE task_id = %s"
_RELEASE = "UPDATE task_claims SET expires_at = now() WHERE task_id = %s AND holder = %s"
# The fence: whoever holds the claim row's lock is the only one who may write the result
# object and commit, so the object at result_uri is always the committed attempt's.
# Sent after BEGIN in the same call, with its three values quoted in (pgexec.literals).
_FENCE = b"SELECT * FROM gannet_fence(%b, %b, %b)"
# A committed success keeps its claim for good (gannet_finish): a worker waiting on the
# claim's row lock then finds it held, looks again and sees the success, instead of
# running the task twice. Sent with COMMIT in the same call, its values quoted in.
_FINISH = b"SELECT gannet_finish(%b); COMMIT"

# Callbacks owed (migration 8): what callback_outbox is, there.
_PAID = """
WITH paid AS (
    DELETE FROM callback_outbox WHERE task_id = %s AND tenant_id = %s AND holder = %s
    RETURNING task_id)
UPDATE task_results SET callback_status = %s, updated_at = now()
WHERE task_id = %s AND EXISTS (SELECT 1 FROM paid) RETURNING task_id
"""
_PAID_ALL = "DELETE FROM callback_outbox WHERE task_id = ANY(%s)"
_RENEW = """
UPDATE callback_outbox o SET due_at = now() + make_interval(secs => %s),
    attempts = greatest(o.attempts, h.attempts)
FROM unnest(%s::text[], %s::int[]) AS h(task_id, attempts)
WHERE o.task_id = h.task_id AND o.holder = %s
RETURNING o.task_id
"""
_HAND_BACK = """
UPDATE callback_outbox o SET holder = NULL, due_at = now(), attempts = h.attempts
FROM unnest(%s::text[], %s::int[]) AS h(task_id, attempts)
WHERE o.task_id = h.task_id AND o.holder = %s
"""
# Due rows, oldest first; a row another pod is taking now is skipped, not waited for.
# Chosen in a CTE, MATERIALIZED: evaluated once. Joined in the UPDATE as a subquery,
# nothing promises it runs once (a known pitfall of LIMIT with SKIP LOCKED), and a
# sweep took 250 rows with the limit at 100 in a live review (not reproduced since).
_TAKE = """
WITH due AS MATERIALIZED (
    SELECT task_id FROM callback_outbox WHERE due_at <= now()
    ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED)
UPDATE callback_outbox o SET holder = %s, due_at = now() + make_interval(secs => %s)
FROM due WHERE o.task_id = due.task_id
RETURNING o.task_id, o.tenant_id, o.attempts
"""
_DUE = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(due_at)), 0)::float8
FROM callback_outbox WHERE due_at <= now()
"""
_OWED = """
SELECT task_id, pipeline, session_id, image_id, image_url, result, result_uri,
    callback_url, callback_status
FROM task_results WHERE task_id = ANY(%s) AND status = 'succeeded'
"""


def _columns(pairs: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    """(task_id, attempts) pairs as the two arrays `unnest` takes (_RENEW, _HAND_BACK)."""
    return [task_id for task_id, _ in pairs], [n for _, n in pairs]


_CONFLICT = "task_id is already used by another tenant; task ids must be globally unique"


@dataclass(frozen=True)
class Start:
    """What a worker finds when it starts a task: a committed success (then nothing runs),
    or whether it now holds the task's claim (if not, another worker is running it)."""

    success: dict[str, Any] | None
    claimed: bool
    retry_after_s: float | None = None  # not claimed: when the holder's claim runs out


@dataclass(frozen=True)
class OwedCallback:
    """A callback another pod owed and now this one, as its task's row has it."""

    task_id: str
    tenant_id: str
    pipeline: str
    session_id: str | None
    image_id: str | None
    image_url: str
    result: dict[str, Any]
    result_uri: str
    callback_url: str
    attempts: int  # made before, by the pods that held it


class ClaimLost(TransientError):
    """The task's claim passed to another worker while this one ran it (it ran longer
    than the claim's TTL): this attempt must not write or commit anything."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(ErrorCode.TASK_BUSY, "another worker took the task over")
        self.retry_after_s = retry_after_s


# Where the network drops PostgreSQL's packets without a reset (a failover's old
# address, a NAT that forgot the flow), a runner waited for the kernel to give up on the
# connection, about 15 minutes, its message leased all the while. The kernel now
# gives up after 30 s of unacknowledged data (tcp_user_timeout) or of unanswered
# keepalive probes (first after 10 s idle, then every 5 s): the statement fails, the
# task is nacked and the pool replaces the connection. A busy server acks both; a peer
# that acks but never answers is pgexec.Deadline's.
_DEAD_PEER = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms
}


RECONNECT_S = 10.0


def _transient(exc: Exception) -> TransientError:
    return TransientError(ErrorCode.DEPENDENCY_UNAVAILABLE, f"PostgreSQL: {exc}")


@dataclass(frozen=True)
class Role:
    name: str
    # A superuser or BYPASSRLS, or a member of one (SET ROLE away): every tenant's rows.
    bypasses_rls: bool
    # It, or a role it is a member of, owns task_results or its schema (whose owner may
    # drop the table): it could turn row-level security off, or replace the table.
    owns_tables: bool
    missing: tuple[str, ...] = ()  # of _WORKER_RIGHTS, e.g. "UPDATE on task_claims"


class Sink:
    def __init__(
        self,
        database_url: str,
        pool_size: int = 8,
        timeout_s: float = 10.0,
        lock_timeout_s: float = 30.0,
        idle_in_transaction_s: float = 120.0,
        answer_deadline_s: float = 60.0,
        callback_lease_s: float = 60.0,
    ) -> None:
        """A commit holds its claim row locked while the result object is written
        (save_claimed). A pod that died there (its node lost) kept the lock until the
        server noticed the dead client, by TCP keepalive two hours later by default, and
        the task's redelivery waited on the lock all that while, its runner stuck. The
        server now ends a session idle in a transaction after `idle_in_transaction_s`
        (above a result write's 70 s deadline; a token refresh before it, outside that
        deadline, may take longer, and then the commit fails and the task is retried:
        nothing is lost), and a statement waits for a lock at most `lock_timeout_s`, then
        fails: the task is retried later. A round trip (a cursor's transaction, whole)
        not answered within `answer_deadline_s` drops its connection (pgexec.Deadline):
        above the lock timeout, so that a wait for a lock fails as one."""
        self._answer_deadline_s = answer_deadline_s
        self.callback_lease_s = callback_lease_s  # how long a callback owed stays ours
        timeouts = (
            f"SET lock_timeout = {int(lock_timeout_s * 1000)}; "
            f"SET idle_in_transaction_session_timeout = {int(idle_in_transaction_s * 1000)}"
        ).encode()

        def configure(conn: psycopg.Connection[Any]) -> None:
            conn.execute(timeouts)

        self.pool = ConnectionPool(
            database_url,
            min_size=1,
            max_size=pool_size,
            timeout=timeout_s,
            # How long the pool's attempt to replace a lost connection backs off (1 s,
            # doubling) before it gives up, and a checkout that finds none starts a new
            # one from 1 s. At the default 300 s the waits grew to a minute: a database
            # back after 80 s down was connected to 39 s later, each task meanwhile
            # nacked after its checkout's timeout, using its delivery attempts up.
            reconnect_timeout=RECONNECT_S,
            open=False,
            # Autocommit: a single statement (gannet_start) is its own transaction, in one
            # round trip; everything longer runs in conn.transaction() (BEGIN ... COMMIT).
            # UTF-8 whatever the environment asks (PGCLIENTENCODING): pgexec sends text
            # parameters as UTF-8.
            kwargs={
                "autocommit": True,
                "connect_timeout": 5,
                "client_encoding": "UTF8",
                **_DEAD_PEER,
            },
            # Once per connection, not per task.
            configure=configure,
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
        with (
            self._errors(),
            self.pool.connection() as conn,
            pgexec.Deadline(conn, self._answer_deadline_s),
            conn.transaction(),
        ):
            cur = conn.cursor(row_factory=dict_row)
            cur.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant_id,))
            yield cur

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """PostgreSQL's errors as ours: another tenant's row is permanent, the rest
        (pool timeouts, lost connections) transient."""
        try:
            yield
        except PoolTimeout as exc:
            raise _transient(exc) from exc
        except psycopg.errors.InsufficientPrivilege as exc:
            if "permission denied for" in str(exc):  # a right the role lacks, not a tenant
                raise TransientError(
                    ErrorCode.DEPENDENCY_UNAVAILABLE,
                    f"PostgreSQL refused the daemon's role ({exc}): run `gannet db migrate` "
                    "with GANNET_OWNER_DATABASE_URL, which grants it its rights",
                ) from exc
            raise PermanentError(ErrorCode.TASK_ID_CONFLICT, _CONFLICT) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise _transient(exc) from exc

    def find_success(self, task_id: str, tenant_id: str) -> dict[str, Any] | None:
        with self.tenant_transaction(tenant_id) as cur:
            cur.execute(_SUCCESS, (task_id,))
            return cur.fetchone()

    def start(self, task_id: str, tenant_id: str, holder: str, ttl_s: float) -> Start:
        """One transaction (one round trip, gannet_start) before any download: a committed
        success, else the task's claim for `ttl_s`. PermanentError(task_id_conflict) when
        another tenant owns the id."""
        with self._errors(), self.pool.connection() as conn:
            row = pgexec.one(
                conn, _START, (task_id, tenant_id, holder, ttl_s), self._answer_deadline_s
            )
        if row["claimed"]:
            return Start(None, claimed=True)
        if row["task_id"] is not None:
            return Start(row, claimed=False)
        return Start(None, claimed=False, retry_after_s=row["left_s"])

    def release(self, task_id: str, tenant_id: str, holder: str) -> None:
        """Give the claim up now (the task was nacked), so a redelivery need not wait."""
        with self.tenant_transaction(tenant_id) as cur:
            cur.execute(_RELEASE, (task_id, holder))

    def save(self, record: TaskResult) -> bool:
        """Upsert the row; False when a committed success already stands (not overwritten).

        A failed task's row, often written without a claim (a task refused in the
        callback: its schema, pipeline, image outside the tenant): the task_id's claim is
        taken for the tenant too, where no one holds one, expired at once so that the
        tenant's own retry claims it. Without it another tenant's task of that id was
        claimed, ran the model and wrote its result before its commit was refused, and
        its claim, kept, refused the first tenant's retries for good. Where another
        tenant holds the claim, its task runs or waits for a retry, with no row yet: this
        row is the conflict (PermanentError), or it would take the id from under it."""
        with self.tenant_transaction(record.tenant_id) as cur:
            cur.execute(_OWN, (record.task_id, record.tenant_id))
            # Another tenant's claim stays: the insert did nothing, and RLS hides it.
            cur.execute(_CLAIM_SEEN, (record.task_id,))
            if cur.fetchone() is None:
                raise PermanentError(ErrorCode.TASK_ID_CONFLICT, _CONFLICT)
            return _upsert(cur, record)

    def save_claimed(
        self,
        record: TaskResult,
        holder: str,
        write: Callable[[], object],
        result_json: bytes | None = None,
        callback_url: str | None = None,
    ) -> bool:
        """Commit a success under `holder`'s claim: `write()` (the result object) runs
        inside the transaction while the claim row is locked, then the row is upserted
        and the claim kept for good. When another worker holds the claim now, nothing is
        written: False if that worker committed a success, else ClaimLost.
        `result_json`: `record.result` already encoded as JSON (the result object's
        bytes), stored as it is instead of encoding it again. With a `callback_url`, the
        callback is owed in the same commit (callback_outbox), held by `holder`."""
        # Two round trips, each one blocking libpq call (pgexec.py) of two statements,
        # their values quoted in: "BEGIN; fence", then "gannet_finish; COMMIT". Whether
        # the row is written is the fence's answer: with the claim row locked, no one
        # else commits a success meanwhile. An error anywhere rolls the transaction back
        # before the connection goes back to the pool (an error in gannet_finish skips
        # the COMMIT sent with it).
        with self._errors(), self.pool.connection() as conn:
            try:
                ids = (record.task_id, record.tenant_id, holder)
                fence = b"BEGIN; " + _FENCE % pgexec.literals(conn, ids)
                claim = pgexec.one(conn, fence, None, self._answer_deadline_s)
                if not claim["mine"]:
                    pgexec.execute(conn, b"ROLLBACK", None, self._answer_deadline_s)
                    if claim["committed"]:
                        return False
                    raise ClaimLost(claim["left_s"])
                write()
                finish = _finish_params(record, holder, result_json)
                finish += [callback_url, self.callback_lease_s]
                query = _FINISH % b", ".join(pgexec.literals(conn, finish))
                pgexec.execute(conn, query, None, self._answer_deadline_s)
            except BaseException:
                _roll_back(conn, self._answer_deadline_s)
                raise
        return not claim["committed"]

    def set_callback_status(self, task_id: str, tenant_id: str, status: str, holder: str) -> bool:
        """The callback's final outcome on its row, where `holder` still holds it: it is
        owed no more. False when another worker took it over (its lease ran out): that
        one's outcome is the row's, not this (a review saw a late 503 overwrite another
        worker's delivery)."""
        with self.tenant_transaction(tenant_id) as cur:
            cur.execute(_PAID, (task_id, tenant_id, holder, status, task_id))
            return cur.fetchone() is not None

    def renew_callbacks(self, holder: str, held: list[tuple[str, int]]) -> set[str]:
        """The callbacks `holder` still has waiting, (task_id, attempts made), stay its
        own for another lease, with their attempts (never lowered): a pod killed
        mid-way passes on those counted at its last renewal (its successor used to
        start again from the last hand-back's). The task_ids it still held (the others
        another worker took over, or have their outcome)."""
        rows = self._statement(_RENEW, (self.callback_lease_s, *_columns(held), holder))
        return {str(row[0]) for row in rows}

    def hand_back_callbacks(self, holder: str, owed: list[tuple[str, int]]) -> None:
        """Callbacks `holder` will not send (it is stopping), with the attempts made:
        due now, for any pod to take over."""
        self._statement(_HAND_BACK, (*_columns(owed), holder))

    def take_callbacks(self, holder: str, limit: int) -> list[OwedCallback]:
        """Up to `limit` callbacks owed and due (their pod died, stopped, or froze past
        the lease), now held by `holder`, with what their rows say. A row whose
        callback has an outcome, or whose task row is gone (purged), is owed no more:
        deleted here."""
        taken = self._statement(_TAKE, (limit, holder, self.callback_lease_s))
        by_tenant: dict[str, dict[str, int]] = {}
        for task_id, tenant_id, attempts in taken:
            by_tenant.setdefault(tenant_id, {})[task_id] = attempts
        owed: list[OwedCallback] = []
        paid: list[str] = []
        for tenant_id, attempts_of in by_tenant.items():
            with self.tenant_transaction(tenant_id) as cur:
                cur.execute(_OWED, (list(attempts_of),))
                rows = {row["task_id"]: row for row in cur.fetchall()}
            for task_id, attempts in attempts_of.items():
                row = rows.get(task_id)
                if row is None or row["callback_status"] is not None or not row["callback_url"]:
                    paid.append(task_id)
                    continue
                del row["callback_status"]
                owed.append(OwedCallback(tenant_id=tenant_id, attempts=attempts, **row))
        if paid:
            self._statement(_PAID_ALL, (paid,))
        return owed

    def callbacks_due(self) -> tuple[int, float]:
        """Callbacks owed and due that no pod has taken over yet: how many, and how long
        (s) the oldest has waited."""
        ((count, oldest_s),) = self._statement(_DUE, ())
        return int(count), float(oldest_s)

    def _statement(self, query: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        """One statement, its own transaction, answered within the deadline."""
        with (
            self._errors(),
            self.pool.connection() as conn,
            pgexec.Deadline(conn, self._answer_deadline_s),
        ):
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    @contextmanager
    def _start_up_check(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one of the start-up's checks (`role`, `schema_version`),
        answered within the answer deadline like every statement: without one, a
        PostgreSQL that stopped answering between the pool's opening and them held the
        start for good. A pool timeout or a lost connection is transient."""
        try:
            with (
                self.pool.connection() as conn,
                pgexec.Deadline(conn, self._answer_deadline_s),
            ):
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise _transient(exc) from exc

    def role(self) -> Role:
        """The daemon's role as row-level security sees it (before a migration too)."""
        with self._start_up_check() as conn:
            row = conn.execute(_ROLE).fetchone()
            assert row is not None  # current_user is a role
            missing = _missing_rights(conn, str(row[0]))
        return Role(str(row[0]), bool(row[1]), bool(row[2]), missing)

    def schema_version(self) -> int:
        with self._start_up_check() as conn:
            row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            if not row or not row[0]:
                return 0
            version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
            return int(version[0] or 0) if version else 0


def _roll_back(conn: psycopg.Connection[Any], deadline_s: float) -> None:
    """End a transaction that failed half way (no-op when none is open), answered
    within `deadline_s` like every round trip. On a broken connection (or one whose
    deadline struck) that fails too; the pool then drops the connection, and the first
    error is the one that counts."""
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    try:
        with pgexec.Deadline(conn, deadline_s):
            conn.execute("ROLLBACK")
    except psycopg.Error as exc:
        log.debug("rollback failed; the pool replaces the connection: %s", exc)


def _params(record: TaskResult) -> dict[str, Any]:
    """The row's columns; the JSON ones wrapped as they are."""
    params = {f.name: getattr(record, f.name) for f in fields(record)}
    params["result"] = Jsonb(record.result) if record.result is not None else None
    params["timings"] = Jsonb(record.timings)
    return params


def _finish_params(record: TaskResult, holder: str, result_json: bytes | None) -> list[object]:
    """gannet_finish's arguments, in its order."""
    result: object = result_json if result_json is not None else record.result
    return [
        holder,
        record.task_id,
        record.tenant_id,
        record.status,
        record.pipeline,
        record.session_id,
        record.image_id,
        record.image_url,
        result,
        record.result_uri,
        record.delivery_attempt,
        record.timings,
    ]


def _upsert(cur: psycopg.Cursor[dict[str, Any]], record: TaskResult) -> bool:
    params = _params(record)
    cur.execute(_UPSERT, params)
    if cur.fetchone() is not None:
        return True
    # Nothing written: a success stands. If this tenant cannot see it, the task_id
    # belongs to another tenant, and acking would lose this task.
    cur.execute("SELECT 1 FROM task_results WHERE task_id = %s", (record.task_id,))
    if cur.fetchone() is None:
        raise PermanentError(ErrorCode.TASK_ID_CONFLICT, _CONFLICT)
    return False


# What PostgreSQL says when it answered and refused: the URL is wrong, and waiting for
# the server to come up cannot help (unlike "connection refused" from a proxy sidecar
# that is still starting).
_REFUSALS = (
    "password authentication failed",
    "does not exist",  # the database or the role
    "no pg_hba.conf entry",
    "pg_hba.conf rejects",
    "SSL was required",  # sslmode=require of a server (or a proxy) without TLS
)
# Every connection slot taken: waiting may help, as other clients leave; if it did not,
# the cause is the pools' sizes, not a server that is down.
_FULL = ("too many clients", "remaining connection slots are reserved")


def refused(exc: Exception) -> bool:
    """Whether PostgreSQL answered and refused these credentials or this database."""
    return any(refusal in str(exc) for refusal in _REFUSALS)


def cannot_connect(exc: Exception, setting: str = "GANNET_DATABASE_URL") -> str:
    """What the daemon and `gannet db migrate` say when PostgreSQL did not let them in
    with the URL of `setting`."""
    if refused(exc):
        return (
            f"PostgreSQL refused the connection ({exc}); check the user, password and "
            f"database name in {setting}, and its sslmode (require for a direct "
            "connection to Cloud SQL, disable through the Cloud SQL Auth Proxy)"
        )
    if any(full in str(exc) for full in _FULL):
        return (
            f"PostgreSQL has no connection slot left ({exc}): the pods' pools together "
            "ask for more than its max_connections; lower GANNET_DB_POOL_SIZE or raise "
            "max_connections (docs/runbook.md)"
        )
    return (
        f"cannot connect to PostgreSQL at {setting} ({exc}); is it running? "
        "If it only starts slowly, raise GANNET_DB_CONNECT_WAIT_S"
    )


def connect_waiting(database_url: str, wait_s: float) -> psycopg.Connection[Any]:
    """A connection, waiting up to `wait_s` for PostgreSQL to accept one (a pod starts
    beside a proxy sidecar that may not be up yet); a refusal is raised at once, since
    a wrong URL does not heal. The error raised is libpq's own, which says why."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return psycopg.connect(database_url, connect_timeout=10)
        except psycopg.OperationalError as exc:
            if refused(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


@dataclass(frozen=True)
class Migrated:
    applied: list[int]  # the versions applied now, in order
    version: int  # the database's schema version after: past SCHEMA_VERSION after a rollback


class MigrationFailed(RuntimeError):
    """A migration PostgreSQL refused, rolled back whole; the message says what to do."""


@dataclass(frozen=True)
class Login:
    role: str
    password: str | None
    url: str | None = None  # to check the password works once the role is granted


def daemon_login(database_url: str) -> Login:
    """The role (and password) a URL connects as; MigrationFailed if it names no role
    (libpq would take the operating system's user, which says nothing of the pod's)."""
    params = conninfo.conninfo_to_dict(database_url)
    if not params.get("user"):
        raise MigrationFailed(
            "GANNET_DATABASE_URL names no user: with GANNET_OWNER_DATABASE_URL set, name "
            "the daemon's role in it (postgresql://ROLE:PASSWORD@HOST/DATABASE), the role "
            "the migration makes and grants reading and writing rows"
        )
    password = params.get("password")
    return Login(str(params["user"]), str(password) if password else None, database_url)


def migrate_as_configured(
    database_url: str, owner_database_url: str | None, connect_wait_s: float = 0.0
) -> Migrated:
    """`gannet db migrate`: as the owner's role where one is set, making the daemon's
    role and granting it its rows; else as the daemon's role, which then owns them."""
    if owner_database_url is None:
        return migrate(database_url, connect_wait_s)
    worker = daemon_login(database_url)
    return migrate(owner_database_url, connect_wait_s, worker, "GANNET_OWNER_DATABASE_URL")


def migrate(
    database_url: str,
    connect_wait_s: float = 0.0,
    worker: Login | None = None,
    setting: str = "GANNET_DATABASE_URL",
) -> Migrated:
    """Apply pending migrations in one transaction each, then make `worker`'s role (one
    other than this URL's) where it does not exist, and grant it what the daemon needs
    (`_WORKER_RIGHTS`). Waits up to `connect_wait_s` for PostgreSQL to accept a
    connection (a pod's migrate step starts beside a proxy sidecar that may not be up
    yet); MigrationFailed, naming `setting`, if one is refused."""
    applied: list[int] = []
    conn = connect_waiting(database_url, connect_wait_s)
    with conn:
        with _refusal("creating the migrations' table", setting), _migrating(conn):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for version, statements in MIGRATIONS:
            with _refusal(f"migration {version}", setting), _migrating(conn):
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (version,)
                ).fetchone()
                if done:
                    continue
                conn.execute(statements)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
                log.info("migration applied", extra={"fields": {"version": version}})
        if worker is not None:
            with _refusal(f"giving the daemon's role {worker.role} its rights", setting):
                _confine(conn, worker)
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return Migrated(applied, int(row[0]) if row and row[0] is not None else 0)


@contextmanager
def _migrating(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction holding the migrations' lock: one migrator at a time, as every new
    pod's init container migrates, makes and grants the daemon's role at once."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        yield


def _missing_rights(conn: psycopg.Connection[Any], role: str) -> tuple[str, ...]:
    """Which of `_WORKER_RIGHTS` `role` lacks, as "RIGHT on TABLE"."""
    pairs = [(table, right) for table, rights in _WORKER_RIGHTS.items() for right in rights]
    tables, rights = [t for t, _ in pairs], [r for _, r in pairs]
    return tuple(str(row[0]) for row in conn.execute(_MISSING_RIGHTS, (tables, rights, role)))


def _confine(conn: psycopg.Connection[Any], worker: Login) -> None:
    """The daemon's role, made here as a plain role: one made by Cloud SQL (a
    google_sql_user) is a member of cloudsqlsuperuser, with CREATEROLE and CREATEDB,
    and where that role owns the database (and so its schema public) may drop
    gannet's tables (`Sink.role` counts that as owning them). Its password goes to the server
    as a SCRAM verifier, so that no statement log holds it. A role that exists is kept
    as it is. Rights granted only where missing (the audit log records each GRANT, at
    each pod's start), under the migrations' lock: two pods' GRANTs on one table at
    once fail with "tuple concurrently updated"."""
    with _migrating(conn):
        current = conn.execute("SELECT current_user").fetchone()
        if current and current[0] == worker.role:
            return  # the owner's URL and the daemon's name one role: nothing to grant
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (worker.role,)).fetchone():
            if not worker.password:
                raise MigrationFailed(
                    f"the daemon's role {worker.role} does not exist, and GANNET_DATABASE_URL "
                    "has no password to make it with: put the role's password in the URL "
                    "(docs/operating.md, step 7)"
                )
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(worker.role), sql.Literal(_verifier(conn, worker))
                )
            )
            log.info("daemon's role made", extra={"fields": {"role": worker.role}})
        missing = _missing_rights(conn, worker.role)
        for table, rights in _WORKER_RIGHTS.items() if missing else ():
            conn.execute(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(", ").join(map(sql.SQL, rights)),
                    sql.Identifier(table),
                    sql.Identifier(worker.role),
                )
            )
        if missing:
            log.info("daemon's role granted its rows", extra={"fields": {"role": worker.role}})
    _check_password(conn, worker)


def _check_password(conn: psycopg.Connection[Any], worker: Login) -> None:
    """The daemon's URL logs in, or its role gets the URL's password: a password
    rotated in the Secret (a new terraform random_password) left the role with its
    first one, and the daemon crash-looping on `password authentication failed` with
    the Secret Manager's password in its URL. A URL that cannot connect for another
    reason is the daemon's to say (its start names it)."""
    if worker.url is None or worker.password is None:
        return
    try:
        psycopg.connect(worker.url, connect_timeout=10).close()
        return
    except psycopg.OperationalError as exc:
        if "password authentication failed" not in str(exc):
            log.warning(
                "could not log in as the daemon's role to check its password",
                extra={"fields": {"role": worker.role, "error": str(exc)}},
            )
            return
    with _migrating(conn):
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(worker.role), sql.Literal(_verifier(conn, worker))
            )
        )
    log.info(
        "daemon's role given GANNET_DATABASE_URL's password",
        extra={"fields": {"role": worker.role}},
    )


def _verifier(conn: psycopg.Connection[Any], worker: Login) -> str:
    """The password as a SCRAM verifier, so that no statement log holds it."""
    assert worker.password is not None
    verifier = conn.pgconn.encrypt_password(
        worker.password.encode(), worker.role.encode(), b"scram-sha-256"
    )
    return verifier.decode()


@contextmanager
def _refusal(what: str, setting: str) -> Iterator[None]:
    """PostgreSQL refusing a migration's SQL (a role without CREATE on the schema: a
    traceback before) as MigrationFailed saying what failed and what to do; a lost
    connection stays an OperationalError (cannot_connect)."""
    try:
        yield
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MigrationFailed(
            f"{what} failed and was rolled back ({exc}): the role in {setting} must be the "
            "one that owns gannet's tables (the role that first migrated this database), "
            "may create in its schema public (PostgreSQL 15 grants that to the database's "
            "owner only) and, to make the daemon's role, have CREATEROLE (Cloud SQL's "
            "users have it)"
            + (
                "; set GANNET_OWNER_DATABASE_URL to that role's URL, and keep the daemon's "
                "own role in GANNET_DATABASE_URL"
                if setting == "GANNET_DATABASE_URL"
                else ""
            )
        ) from exc
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise MigrationFailed(f"{what} failed and was rolled back: {exc}") from exc
