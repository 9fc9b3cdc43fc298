"""PostgreSQL: migrations, row-level security per tenant, idempotent writes."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from conftest import Gate

from gannet import sink
from gannet.errors import ErrorCode, PermanentError, TransientError
from gannet.task import TaskResult


def result(tenant: str, task_id: str, status: str = "succeeded", **kw) -> TaskResult:
    return TaskResult(
        task_id=task_id,
        tenant_id=tenant,
        status=status,
        result={"detection": {"counts": {"circle": 1}}} if status == "succeeded" else None,
        **{"pipeline": "DETECTION", **kw},
    )


def test_migrate_is_idempotent_and_reports_the_version(services, db):
    done = sink.migrate_as_configured(services.database_url, services.owner_url)
    assert done.applied == [] and done.version == sink.SCHEMA_VERSION  # conftest migrated
    assert db.schema_version() == sink.SCHEMA_VERSION


def test_the_app_role_cannot_bypass_rls(services):
    with psycopg.connect(services.database_url) as conn:
        super_, bypass = conn.execute(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert not super_ and not bypass


def test_the_daemons_role_can_neither_turn_rls_off_nor_delete_and_says_so(services, db):
    """The tables' owner is bound by row-level security (FORCE) but may turn it off,
    delete rows or replace the tables; the daemon's role, made and granted by the
    migration, may only read, add and update rows: a bug or an injection in one of its
    queries cannot open every tenant's rows. `Sink.role` tells the daemon which kind it
    connects as."""
    for statement in (
        "ALTER TABLE task_results DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE task_claims NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY tenant_isolation ON task_results",
        "DELETE FROM task_results",
        "DROP TABLE task_claims",
        "CREATE TABLE task_results_2 (task_id text)",
        "CREATE ROLE helper LOGIN",
    ):
        with psycopg.connect(services.database_url) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    with psycopg.connect(services.owner_url) as conn:  # the owner may: the test can fail
        conn.execute("ALTER TABLE task_results DISABLE ROW LEVEL SECURITY")
        conn.rollback()
    assert db.role() == sink.Role("gannet_worker", bypasses_rls=False, owns_tables=False)
    owner = sink.Sink(services.owner_url, pool_size=1)
    owner.open()
    try:
        assert owner.role() == sink.Role("gannet", bypasses_rls=False, owns_tables=True)
    finally:
        owner.close()


@pytest.fixture
def fresh_database(services) -> dict[str, str]:
    """A database of its own, owned by gannet, not migrated; its URLs as settings."""
    name = f"fresh_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER gannet")
    return services.database_env(name)


def test_migrate_makes_the_daemons_role_and_grants_it_once(services, fresh_database, caplog):
    """The owner's migration makes the daemon's role from GANNET_DATABASE_URL (a plain
    role, not a cloud provider's user with its memberships) and grants it its rows; a
    URL naming no role, or a role to make without a password, is said with what to do;
    a later migration grants nothing again (each GRANT is an audit log line at each
    pod's start) unless a right went missing."""
    owner, daemons = (
        fresh_database["GANNET_OWNER_DATABASE_URL"],
        fresh_database["GANNET_DATABASE_URL"],
    )
    role = f"worker_{uuid.uuid4().hex[:8]}"
    url = daemons.replace("gannet_worker:gannet@", f"{role}:s3cret@")
    database = owner.rsplit("/", 1)[1]
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        # A plaintext password would be stored as md5 then: the verifier stays SCRAM.
        conn.execute(f"ALTER ROLE gannet IN DATABASE {database} SET password_encryption = 'md5'")
    with pytest.raises(sink.MigrationFailed, match="GANNET_DATABASE_URL names no user"):
        sink.migrate_as_configured(daemons.replace("gannet_worker:gannet@", ""), owner)
    with pytest.raises(sink.MigrationFailed, match=f"{role} does not exist, and .* no password"):
        sink.migrate_as_configured(url.replace(":s3cret@", "@"), owner)
    with pytest.raises(psycopg.OperationalError):  # not made by the refusal above
        psycopg.connect(url, connect_timeout=5)

    caplog.set_level("INFO", logger="gannet.sink")
    assert sink.migrate_as_configured(url, owner).applied == []  # migrated by the refusals
    assert [r.message for r in caplog.records if getattr(r, "fields", {}).get("role") == role] == [
        "daemon's role made",
        "daemon's role granted its rows",
    ]
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM task_results").fetchone() == (0,)
        attributes = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles"
            " WHERE rolname = current_user"
        ).fetchone()
        assert attributes == (False, False, False, False)
    with psycopg.connect(services.admin_url) as conn:  # the password sent as a verifier
        (stored,) = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)
        ).fetchone()
    assert stored.startswith("SCRAM-SHA-256$") and "s3cret" not in stored

    caplog.clear()
    sink.migrate_as_configured(url, owner)
    assert not [r for r in caplog.records if getattr(r, "fields", {}).get("role") == role]
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(f"REVOKE UPDATE ON task_claims FROM {role}")
    sink.migrate_as_configured(url, owner)
    assert "daemon's role granted its rows" in [r.message for r in caplog.records]

    # The password rotated in the Secret: the role takes the URL's new one.
    rotated = url.replace(":s3cret@", ":n3w-s3cret@")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(rotated, connect_timeout=5)
    caplog.clear()
    sink.migrate_as_configured(rotated, owner)
    assert [r.message for r in caplog.records] == [
        "daemon's role given GANNET_DATABASE_URL's password"
    ]
    psycopg.connect(rotated, connect_timeout=5).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url, connect_timeout=5)


def test_a_member_of_the_databases_owner_or_of_a_bypassing_role_is_told_apart(services):
    """Cloud SQL's shape: its users are members of cloudsqlsuperuser, which owns the
    databases it makes, and so their schema public, whose owner may drop any table in
    it. A daemon's role that is such a member counts as owning the tables (a warning
    at start); one that is a member of a BYPASSRLS role may SET ROLE to it and read
    every tenant's rows (the daemon refuses it)."""
    x = uuid.uuid4().hex[:6]
    group, bypass, database = f"dbowner_{x}", f"bypass_{x}", f"cloudlike_{x}"
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {group} NOLOGIN")
        conn.execute(f"CREATE ROLE {bypass} NOLOGIN BYPASSRLS")
        conn.execute(f"GRANT {group} TO gannet")
        conn.execute(f"CREATE DATABASE {database} OWNER {group}")
    urls = services.database_env(database)
    worker = urls["GANNET_DATABASE_URL"].replace("gannet_worker:", f"worker_{x}:")
    sink.migrate_as_configured(worker, urls["GANNET_OWNER_DATABASE_URL"])

    def role() -> sink.Role:
        store = sink.Sink(worker, pool_size=1)
        store.open()
        try:
            return store.role()
        finally:
            store.close()

    assert role() == sink.Role(f"worker_{x}", bypasses_rls=False, owns_tables=False)
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute(f"GRANT {group} TO worker_{x}")
    assert role().owns_tables
    with psycopg.connect(worker, autocommit=True) as conn:  # what that membership allows
        conn.execute("DROP TABLE task_claims")
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute(f"REVOKE {group} FROM worker_{x}")
        conn.execute(f"GRANT {bypass} TO worker_{x}")
    assert role().bypasses_rls


def test_a_right_the_daemons_role_lacks_is_retried_not_a_tenants_conflict(fresh_database):
    """Row-level security's refusals and a missing right share PostgreSQL's error code:
    a right revoked by hand (or a table a migration added but did not grant) made every
    task a permanent task_id_conflict, dead-lettered with the wrong reason. It is a
    transient error that says what to run; a tenant's conflict stays permanent."""
    owner, daemons = (
        fresh_database["GANNET_OWNER_DATABASE_URL"],
        fresh_database["GANNET_DATABASE_URL"],
    )
    sink.migrate_as_configured(daemons, owner)
    store = sink.Sink(daemons, pool_size=1)
    store.open()
    try:
        assert store.start("t-1", "tenant-a", "pod-1", 60).claimed
        with pytest.raises(PermanentError) as conflict:  # another tenant's id
            store.start("t-1", "tenant-b", "pod-1", 60)
        assert conflict.value.code == ErrorCode.TASK_ID_CONFLICT
        with psycopg.connect(owner, autocommit=True) as conn:
            conn.execute("REVOKE INSERT ON task_claims FROM gannet_worker")
        with pytest.raises(TransientError, match="gannet db migrate") as refused:
            store.start("t-2", "tenant-a", "pod-1", 60)
        assert refused.value.code == ErrorCode.DEPENDENCY_UNAVAILABLE
        assert store.role().missing == ("INSERT on task_claims",)
    finally:
        store.close()


def test_pods_migrating_at_once_all_succeed(services, fresh_database):
    """Every new pod's init container migrates, makes and grants the daemon's role at
    once (a scale-up, a rollout): two GRANTs on one table at once fail with "tuple
    concurrently updated", two CREATE ROLEs with a duplicate; the migrations' lock
    keeps them apart, so no pod is left in Init:Error."""
    owner = fresh_database["GANNET_OWNER_DATABASE_URL"]
    for round_ in range(3):
        role = f"worker_{round_}_{uuid.uuid4().hex[:6]}"
        url = fresh_database["GANNET_DATABASE_URL"].replace("gannet_worker:", f"{role}:")
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(sink.migrate_as_configured, [url] * 8, [owner] * 8))
        assert all(d.version == sink.SCHEMA_VERSION for d in done)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM task_claims").fetchone() == (0,)


def test_a_pooled_connection_keeps_no_tenant_after_any_operation(services):
    """The tenant is set per transaction (set_config's is_local): set for the session, the
    next checkout of that connection, for another tenant's task or a raw query, would
    see the last tenant's rows. After each operation, a success's, a refused one's and
    one that failed midway, the pool's one connection has no tenant and sees no row."""
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    store = sink.Sink(services.database_url, pool_size=1)
    store.open()

    def left_behind() -> tuple[str, int, int]:
        with store.pool.connection() as conn:
            tenant = conn.execute("SELECT current_setting('app.current_tenant', true)")
            rows = conn.execute("SELECT count(*) FROM task_results").fetchone()[0]
            claims = conn.execute("SELECT count(*) FROM task_claims").fetchone()[0]
            return (tenant.fetchone()[0] or "", rows, claims)

    try:
        assert store.start(f"{a}-1", a, "pod-a", 60).claimed
        assert left_behind() == ("", 0, 0)
        assert store.save_claimed(result(a, f"{a}-1"), "pod-a", lambda: None)
        assert left_behind() == ("", 0, 0)
        assert not store.start(f"{a}-1", a, "pod-a", 60).claimed  # the success is read
        assert left_behind() == ("", 0, 0)
        store.set_callback_status(f"{a}-1", a, "delivered: HTTP 200", "pod-a")
        assert store.save(result(a, f"{a}-2", status="failed", error_code="bad_json"))
        assert left_behind() == ("", 0, 0)
        with pytest.raises(PermanentError):  # b's task of a's id: refused midway
            store.save(result(b, f"{a}-1", status="failed", error_code="bad_json"))
        assert left_behind() == ("", 0, 0)
        assert store.find_success(f"{a}-1", a) is not None
        assert left_behind() == ("", 0, 0)
    finally:
        store.close()


def test_a_tenant_can_neither_read_nor_write_another_tenants_rows(services, db):
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    task_a = f"{a}-1"
    assert db.save(result(a, task_a))
    assert db.find_success(task_a, a) is not None
    assert db.find_success(task_a, b) is None  # invisible to b

    with psycopg.connect(services.database_url) as conn:  # a raw session, no helper
        conn.execute("SELECT set_config('app.current_tenant', %s, false)", (b,))
        assert conn.execute("SELECT count(*) FROM task_results").fetchone()[0] == 0
        updated = conn.execute(
            "UPDATE task_results SET error = 'x' WHERE task_id = %s", (task_a,)
        ).rowcount
        assert updated == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO task_results (task_id, tenant_id, status) "
                "VALUES ('forged', %s, 'failed')",
                (a,),
            )
    with psycopg.connect(services.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM task_results").fetchone()[0] == 0, (
            "without app.current_tenant no row is visible"
        )


def test_a_success_is_never_overwritten_and_failures_can_be_retried(db):
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    assert db.save(result(tenant, f"{tenant}-f", "failed", error_code="image_not_found"))
    assert db.save(result(tenant, f"{tenant}-f"))  # a later success replaces the failure
    assert db.find_success(f"{tenant}-f", tenant) is not None
    assert not db.save(result(tenant, f"{tenant}-f", "failed", error_code="x"))
    assert db.find_success(f"{tenant}-f", tenant) is not None


def test_a_task_id_taken_by_another_tenant_is_a_permanent_conflict(db):
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    db.save(result(a, f"shared-{a}"))
    with pytest.raises(PermanentError) as err:
        db.save(result(b, f"shared-{a}"))
    assert err.value.code is ErrorCode.TASK_ID_CONFLICT


def test_another_tenants_claim_on_a_task_id_is_a_conflict_not_a_busy_task(db):
    """A claim another tenant holds, live or kept for good after its success, is found
    by the claim's upsert, which then writes nothing: PostgreSQL checks the upsert's
    WHERE before row-level security, so no policy error is raised there. It must still
    be refused as task_id_conflict, not answered as a task another worker is running
    (nacked and redelivered until Pub/Sub gives up, with no reason recorded)."""
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    running, committed = f"run-{a}", f"done-{a}"
    assert db.start(running, a, "pod-a", 60).claimed
    assert db.start(committed, a, "pod-a", 60).claimed
    assert db.save_claimed(result(a, committed), "pod-a", lambda: None)
    for task_id in (running, committed):
        with pytest.raises(PermanentError) as err:
            db.start(task_id, b, "pod-b", 60)
        assert err.value.code is ErrorCode.TASK_ID_CONFLICT, task_id
    assert db.start(running, a, "pod-c", 60).retry_after_s > 0  # a's own: busy, as before


def test_a_failed_tasks_id_stays_its_tenants_and_its_retry_runs(db):
    """A task refused before its claim (in the callback: its schema, its pipeline, an
    image outside the tenant) gets a failed row and had no claim: another tenant's task
    of that id was claimed, ran the model and wrote its result, refused only at its
    commit, and its claim, kept, then refused the first tenant's retries for good."""
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    task_id = f"failed-{a}"
    assert db.save(result(a, task_id, "failed", error_code="unknown_pipeline"))
    with pytest.raises(PermanentError) as err:
        db.start(task_id, b, "pod-b", 60)  # before any download or model
    assert err.value.code is ErrorCode.TASK_ID_CONFLICT
    assert db.start(task_id, a, "pod-a", 60).claimed  # a's own retry runs
    assert db.save_claimed(result(a, task_id), "pod-a", lambda: None)
    assert db.find_success(task_id, a) is not None


def test_another_tenants_refused_task_cannot_take_a_claimed_task_id(db):
    """Tenant a's task is claimed and has no row yet (it runs, or waits for its retry
    after a transient failure). A message of another tenant with the same task_id is
    refused in the callback (a typo'd tenant, an image outside its prefix): its failed
    row took the id, so a's commit, its model run and its result object already written,
    was refused as task_id_conflict and a's task dead-lettered with no row, at every
    retry. The refused message is the conflict; a's task commits."""
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    task_id = f"claimed-{a}"
    assert db.start(task_id, a, "pod-a", 60).claimed
    with pytest.raises(PermanentError) as err:
        db.save(result(b, task_id, "failed", error_code="image_outside_tenant"))
    assert err.value.code is ErrorCode.TASK_ID_CONFLICT
    assert db.save_claimed(result(a, task_id), "pod-a", lambda: None)
    assert db.find_success(task_id, a) is not None


def test_a_retry_that_succeeds_replaces_the_failed_rows_session_and_image(db):
    """A task refused for its schema has a failed row without session_id or image_id
    (the body could not be read for them); its corrected republish succeeded, but the
    row kept the failed attempt's (none): the success was missing from its session's
    rows. A new outcome replaces the row's ids with its own, through either write, and
    keeps the earlier ones where it has none (a later body refused for its schema)."""
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    fixed = {"session_id": "session-42", "image_id": "img-7", "image_url": "gs://b/t/x.jpg"}
    claimed, unclaimed = f"{tenant}-1-claimed", f"{tenant}-2-unclaimed"
    kept_failed, kept_success = f"{tenant}-3-kept-failed", f"{tenant}-4-kept-success"
    unread = {"pipeline": None, "error_code": "schema_error"}  # a body not read for its ids
    for task_id in (claimed, unclaimed):
        assert db.save(result(tenant, task_id, "failed", **unread))
    for task_id in (kept_failed, kept_success):
        assert db.save(result(tenant, task_id, "failed", error_code="image_not_found", **fixed))
    assert db.start(claimed, tenant, "pod-a", 60).claimed
    assert db.save_claimed(result(tenant, claimed, **fixed), "pod-a", lambda: None)
    assert db.save(result(tenant, unclaimed, "failed", error_code="image_not_found", **fixed))
    assert db.save(result(tenant, kept_failed, "failed", **unread))
    assert db.start(kept_success, tenant, "pod-a", 60).claimed
    no_ids = result(tenant, kept_success, image_url=fixed["image_url"])  # a task has its URL
    assert db.save_claimed(no_ids, "pod-a", lambda: None)
    with db.tenant_transaction(tenant) as cur:
        cur.execute(
            "SELECT task_id, status, pipeline, error_code, session_id, image_id, image_url"
            " FROM task_results WHERE session_id = 'session-42' ORDER BY task_id"
        )
        rows = cur.fetchall()
    assert [(r["task_id"], r["status"], r["error_code"]) for r in rows] == [
        (claimed, "succeeded", None),
        (unclaimed, "failed", "image_not_found"),
        (kept_failed, "failed", "schema_error"),
        (kept_success, "succeeded", None),
    ]
    for row in rows:
        assert {k: row[k] for k in fixed} == fixed and row["pipeline"] == "DETECTION", row


def test_a_claimed_commit_writes_only_under_its_claim_and_rolls_back_cleanly(db):
    """save_claimed sends its transaction as two blocking libpq calls ("BEGIN; fence",
    then "finish; COMMIT", their values quoted in). What must hold: a result with quotes,
    backslashes and non-ASCII text is stored as it was; a failed object write commits
    nothing and leaves the pool's connections usable; another worker's live claim
    writes nothing (ClaimLost); and a committed success is not overwritten (False), by
    another worker or by the one that committed it."""
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    task_id = f"{tenant}-c"
    assert db.start(task_id, tenant, "pod-a", 60).claimed
    awkward = {"note": 'it\'s a "quote", a back\\slash, ünïcode; COMMIT; --', "n": [1, 2]}
    record = dataclasses.replace(result(tenant, task_id), result=awkward)

    def failing_write() -> None:
        raise OSError("GCS is down")

    with pytest.raises(OSError):
        db.save_claimed(record, "pod-a", failing_write)
    assert db.find_success(task_id, tenant) is None  # nothing committed
    for _ in range(3):  # every pooled connection is out of its transaction again
        assert db.find_success(task_id, tenant) is None

    with pytest.raises(sink.ClaimLost):  # pod-a's claim is live: pod-b writes nothing
        db.save_claimed(record, "pod-b", lambda: pytest.fail("pod-b wrote the object"))
    written: list[bool] = []
    assert db.save_claimed(record, "pod-a", lambda: written.append(True))
    assert written == [True]
    assert db.find_success(task_id, tenant)["result"] == awkward
    assert not db.save_claimed(record, "pod-b", lambda: pytest.fail("overwrote a success"))
    again = dataclasses.replace(record, result={"n": 3})
    assert not db.save_claimed(again, "pod-a", lambda: None)
    assert db.find_success(task_id, tenant)["result"] == awkward


def test_a_success_row_is_stamped_when_it_is_written_not_when_its_transaction_began(db):
    """The transaction opens before the result object's GCS write (the claim is locked
    first), so the transaction's start time put a row's created_at and updated_at before
    its result existed: by the write's time, 0.3 s here (six times the tolerance below).
    Backends reading updated_at as "written at", and the benches' last-commit times,
    read early by as much."""
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    task_id = f"{tenant}-stamp"
    assert db.start(task_id, tenant, "pod-a", 60).claimed
    written_at: list[float] = []

    def slow_write() -> None:
        time.sleep(0.3)
        written_at.append(time.time())

    assert db.save_claimed(result(tenant, task_id), "pod-a", slow_write)
    row = db.find_success(task_id, tenant)
    assert row is not None
    assert row["updated_at"].timestamp() >= written_at[0] - 0.05, row["updated_at"]


def test_a_connection_dropped_between_tasks_fails_one_task_as_retryable(services):
    """A task's statements go as blocking libpq calls (pgexec.py), outside psycopg's
    cursors. A pooled connection the server dropped since its last use (a restart, an
    idle timeout) must fail that one task as transient, so it is nacked and retried, and
    the pool must replace the connection for the next task."""
    store = sink.Sink(services.database_url, pool_size=1)
    store.open()
    try:
        tenant = f"t-{uuid.uuid4().hex[:6]}"
        with store.pool.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(services.database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(TransientError) as err:
            store.start(f"{tenant}-1", tenant, "pod-a", 60)
        assert err.value.code is ErrorCode.DEPENDENCY_UNAVAILABLE
        assert store.start(f"{tenant}-1", tenant, "pod-a", 60).claimed
    finally:
        store.close()


def test_non_ascii_text_is_stored_as_sent_whatever_the_client_encoding(services, monkeypatch):
    """A task's statements send text parameters as UTF-8 (pgexec.py), so the pool's
    connections must speak UTF-8 even where the environment asks libpq for another
    client encoding (PGCLIENTENCODING): an object name with non-ASCII letters must come
    back as it was, not as mojibake."""
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    store = sink.Sink(services.database_url, pool_size=1)
    store.open()
    try:
        tenant = f"t-{uuid.uuid4().hex[:6]}"
        task_id = f"{tenant}-ü"
        url = f"gs://gannet-images/{tenant}/champs/blé-été.jpg"
        assert store.start(task_id, tenant, "pod-a", 60).claimed
        record = result(tenant, task_id, image_url=url)
        assert store.save_claimed(record, "pod-a", lambda: None)
    finally:
        store.close()
    monkeypatch.delenv("PGCLIENTENCODING")
    with psycopg.connect(services.database_url, client_encoding="UTF8") as conn:
        conn.execute("SELECT set_config('app.current_tenant', %s, false)", (tenant,))
        row = conn.execute(
            "SELECT task_id, image_url FROM task_results WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    assert row == (task_id, url)


def test_the_pool_follows_the_runners(monkeypatch):
    """A runner holds a connection at its claim and from the fence to the commit, the
    result's GCS write included, so a pool smaller than the runners made them queue for
    one (docs/benchmark.md, "The runners' connections"). By default the pool has 4 more
    than the runners; GANNET_DB_POOL_SIZE still decides when it is set."""
    from gannet.settings import Settings

    monkeypatch.delenv("GANNET_DB_POOL_SIZE", raising=False)
    monkeypatch.setenv("GANNET_RUNNERS", "4")
    assert Settings().db_connections() == 8
    monkeypatch.setenv("GANNET_RUNNERS", "16")
    assert Settings().db_connections() == 20
    monkeypatch.setenv("GANNET_DB_POOL_SIZE", "6")
    assert Settings().db_connections() == 6


def test_a_pooled_connection_gives_up_on_a_silent_server_within_a_minute(db):
    """A statement once sent has no client-side bound (pgexec blocks in libpq): where
    the network drops PostgreSQL's packets without a reset (a failover's old address),
    a runner waited about 15 minutes for the kernel to give the connection up, its
    message leased all the while. Each connection now tells the kernel to give up after
    30 s of unacknowledged data or unanswered keepalives (probes after 10 s idle, every
    5 s, 3 of them). Dropping packets cannot be staged on this machine (no iptables; tc
    lacks the prio qdisc to single out a port), so what the kernel was told is read
    back from the connection's socket."""
    import socket

    with db.pool.connection() as conn:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
        finally:
            sock.close()


def test_a_commit_stopped_mid_write_does_not_hold_its_tasks_redelivery(services):
    """A commit holds the claim row locked while the result object is written. A pod
    that stops there (its node lost; here a thread asleep in the write) held the lock
    until the server noticed the dead client (two hours of TCP keepalive by default), and
    the redelivered task's claim waited on it all that while, its runner stuck. The
    server ends a session idle in a transaction (1 s here, 120 s by default): the
    redelivery claims the task at once after; the stopped commit fails as retryable.
    A lock held longer by a live session fails a waiting claim after lock_timeout
    (1 s here, 30 s by default), retryable, instead of waiting without end."""
    import threading

    stopped = sink.Sink(services.database_url, pool_size=1, idle_in_transaction_s=1.0)
    other = sink.Sink(services.database_url, pool_size=1, lock_timeout_s=1.0)
    patient = sink.Sink(services.database_url, pool_size=1, lock_timeout_s=600.0)
    for store in (stopped, other, patient):
        store.open()
    try:
        tenant = f"t-{uuid.uuid4().hex[:6]}"
        task_id = f"{tenant}-stopped"
        assert stopped.start(task_id, tenant, "pod-a", 0.5).claimed  # expires in 0.5 s
        failed: list[Exception] = []

        def commit_stopped_in_its_write() -> None:
            try:
                stopped.save_claimed(result(tenant, task_id), "pod-a", lambda: time.sleep(4))
            except Exception as exc:  # noqa: BLE001 (kept for the assertion: retryable)
                failed.append(exc)

        commit = threading.Thread(target=commit_stopped_in_its_write)
        commit.start()
        time.sleep(0.6)  # the fence holds the row lock; pod-a's claim has expired
        started = time.monotonic()
        assert patient.start(task_id, tenant, "pod-b", 60).claimed
        assert time.monotonic() - started < 3  # the server ended pod-a's session at 1 s
        commit.join(10)
        assert failed and isinstance(failed[0], TransientError), failed

        # A live session holding the lock: the claim gives up after its lock_timeout.
        with psycopg.connect(services.database_url) as holder:
            holder.execute("SELECT set_config('app.current_tenant', %s, false)", (tenant,))
            holder.execute("SELECT 1 FROM task_claims WHERE task_id = %s FOR UPDATE", (task_id,))
            started = time.monotonic()
            with pytest.raises(TransientError, match="lock timeout"):
                other.start(task_id, tenant, "pod-c", 60)
            assert time.monotonic() - started < 3
    finally:
        for store in (stopped, other, patient):
            store.close()


def test_the_pool_reconnects_within_seconds_of_the_databases_return(services):
    """PostgreSQL gone for 20 s (conftest's Gate refusing connections), its connections
    cut, then back: the pool's attempts to
    replace its connections backed off up to 300 s (waits doubling from 1 s), so a
    database back after 80 s was connected to 39 s later, every task meanwhile nacked
    after its checkout's timeout. They give up after 10 s, and a checkout starts a new
    one from 1 s: connected again within seconds."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    info = conninfo_to_dict(services.database_url)
    gate = Gate(int(info["port"]))
    url = make_conninfo(**{**info, "host": "127.0.0.1", "port": str(gate.port)})
    store = sink.Sink(url, pool_size=2, timeout_s=1.0)
    store.open()
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    try:
        assert store.find_success("x", tenant) is None
        gate.refuse()
        time.sleep(0.5)  # the cut connections' ends seen by the pool
        down_until = time.monotonic() + 20
        while time.monotonic() < down_until:  # tasks keep asking, and fail as retryable
            with pytest.raises(TransientError):
                store.find_success("x", tenant)
        gate.answer()
        back = time.monotonic()
        while True:
            try:
                assert store.find_success("x", tenant) is None
                break
            except TransientError:
                assert time.monotonic() - back < 8, "not connected again within 8 s"
        print(f"connected again {time.monotonic() - back:.1f} s after the database's return")
    finally:
        store.close()
        gate.close()
