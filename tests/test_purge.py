"""`gannet db purge` against the real PostgreSQL, with the daemon's schema and roles."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from conftest import gannet

# task_id, tenant, status, age in days, claim: (expires in seconds from now, or
# "infinity" as a success keeps it)
ROWS: list[tuple[str, str, str, int, str]] = [
    ("old-success", "tenant-a", "succeeded", 400, "infinity"),
    ("old-failure", "tenant-a", "failed", 400, "-60"),  # released when it failed
    ("old-failure-retried-now", "tenant-a", "failed", 400, "600"),  # a worker runs it
    ("recent-success", "tenant-a", "succeeded", 3, "infinity"),
    ("other-tenants-old", "tenant-b", "succeeded", 400, "infinity"),
]


@pytest.fixture
def database(services) -> str:
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS purged")
        conn.execute("CREATE DATABASE purged OWNER gannet")
    return services.database_env("purged")["GANNET_DATABASE_URL"]


def _env(services: Any) -> dict[str, str]:
    return {**services.env(), **services.database_env("purged")}


def _seen(url: str, tenant: str) -> tuple[set[str], set[str]]:
    with psycopg.connect(url) as conn:
        conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))
        rows = {r[0] for r in conn.execute("SELECT task_id FROM task_results")}
        claims = {r[0] for r in conn.execute("SELECT task_id FROM task_claims")}
    return rows, claims


def test_purge_deletes_a_tenants_old_rows_with_their_claims_and_nothing_else(services, database):
    """A year of rows grows the tables the daemon reads on every task; an operator
    purges one tenant's old rows. Its recent rows, another tenant's rows and the claim
    of a task a worker runs now stay; a purged success's task_id is free again, so a
    task republished with it runs anew instead of being dead-lettered as held."""
    env = _env(services)
    out = gannet("db", "purge", "--tenant", "tenant-a", "--older-than", "30", env=env)
    assert out.returncode == 2 and "run `gannet db migrate` first" in out.stderr, out.stderr
    assert gannet("db", "migrate", env=env).returncode == 0
    with psycopg.connect(database) as conn:
        for task_id, tenant, status, days, claim in ROWS:
            with conn.transaction():
                conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))
                conn.execute(
                    "INSERT INTO task_results (task_id, tenant_id, status, created_at,"
                    " updated_at) VALUES (%s, %s, %s, now() - make_interval(days => %s),"
                    " now() - make_interval(days => %s))",
                    (task_id, tenant, status, days, days),
                )
                expires = "'infinity'" if claim == "infinity" else f"now() + interval '{claim} s'"
                conn.execute(
                    "INSERT INTO task_claims (task_id, tenant_id, holder, expires_at)"
                    f" VALUES (%s, %s, 'pod-1', {expires})",
                    (task_id, tenant),
                )

    out = gannet("db", "purge", "--tenant", "tenant-a", "--older-than", "30", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("tenant-a: 3 rows last written before")
    assert _seen(database, "tenant-a")[0] == {r[0] for r in ROWS if r[1] == "tenant-a"}

    out = gannet(
        "db", "purge", "--tenant", "tenant-a", "--older-than", "30", "--batch", "2", env=env
    )
    assert out.returncode == 0, out.stderr
    assert "tenant-a: deleted 3 rows" in out.stdout and "and 2 claims" in out.stdout
    rows, claims = _seen(database, "tenant-a")
    assert rows == {"recent-success"}
    assert claims == {"recent-success", "old-failure-retried-now"}
    assert _seen(database, "tenant-b") == ({"other-tenants-old"}, {"other-tenants-old"})

    with psycopg.connect(database) as conn:
        (claimed, *_), *_ = conn.execute(
            "SELECT * FROM gannet_start('old-success', 'tenant-a', 'pod-2', 60)"
        ).fetchall()
    assert claimed is True


def test_purge_beside_a_commit_holding_its_claim_neither_waits_nor_deadlocks(services, database):
    """A worker's commit locks the task's claim (gannet_fence), then writes its row
    (gannet_finish). A purge that deleted the row first and then waited on the claim
    deadlocked with such a commit (a retry of an old failed task whose claim had expired
    while it ran): PostgreSQL killed one side, the purge or the worker's commit. The
    purge locks claims first, as the worker does, and skips a claim a worker holds,
    with its row; the commit then lands."""
    env = _env(services)
    assert gannet("db", "migrate", env=env).returncode == 0
    with psycopg.connect(database) as conn:
        for task_id in ("old-failure-retried", "old-other"):
            with conn.transaction():
                conn.execute("SELECT set_config('app.current_tenant', 'tenant-a', true)")
                conn.execute(
                    "INSERT INTO task_results (task_id, tenant_id, status, created_at,"
                    " updated_at) VALUES (%s, 'tenant-a', 'failed', now() - interval"
                    " '400 days', now() - interval '400 days')",
                    (task_id,),
                )
                conn.execute(
                    "INSERT INTO task_claims VALUES (%s, 'tenant-a', 'pod-1', now() - interval"
                    " '1 s')",  # expired while its retry ran
                    (task_id,),
                )
    with psycopg.connect(database) as worker:
        worker.execute("SELECT * FROM gannet_fence('old-failure-retried', 'tenant-a', 'pod-1')")
        out = gannet("db", "purge", "--tenant", "tenant-a", "--older-than", "30", env=env)
        assert out.returncode == 0, out.stderr
        assert "tenant-a: deleted 1 rows" in out.stdout  # old-other; not the one held
        (written,) = worker.execute(
            "SELECT gannet_finish('pod-1', 'old-failure-retried', 'tenant-a', 'succeeded',"
            " 'DETECTION', NULL, NULL, NULL, '{}'::jsonb, 'gs://r/x.json', 2, '{}'::jsonb)"
        ).fetchone()
        worker.commit()
    assert written is True
    rows, _ = _seen(database, "tenant-a")
    assert rows == {"old-failure-retried"}
