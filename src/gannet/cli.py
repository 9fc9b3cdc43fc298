"""The `gannet` command. Thin: every subcommand calls a function that tests can reach.

The entry point of all three layers: the daemon's own commands are here, the local
harness's come from `gannet.dev.cli` and the operator's from `gannet.cluster.cli`. Both
only define arguments; a command imports its module when it runs, so `gannet run`
imports neither the harness nor the kubernetes client.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys

from pydantic import SecretStr, ValidationError

from gannet.cluster import cli as cluster_cli
from gannet.dev import cli as dev_cli
from gannet.errors import CommandError
from gannet.lanes import flow_control
from gannet.settings import (
    DATABASE_URLS,
    Settings,
    refused_settings,
    settings_table,
    unknown_variables,
    without_password,
)

DESCRIPTION = """\
Gannet: the GPU vision worker. It pulls tasks from a Pub/Sub subscription, runs the
Ultralytics YOLO pipeline the tenant's industry config names, writes the result to
PostgreSQL and GCS, and acks only after the result is committed.

Settings come from GANNET_* environment variables (`gannet settings` lists them)."""


def cmd_run(args: argparse.Namespace) -> int:
    settings = Settings()
    if settings.supervises:
        from gannet.supervisor import supervise

        return supervise(settings, [sys.executable, "-m", "gannet", "run"])
    from gannet import daemon

    return daemon.run(settings)


def cmd_migrate(args: argparse.Namespace) -> int:
    import psycopg

    from gannet import logs, sink

    settings = Settings()
    logs.configure(settings.log_level)
    try:
        done = sink.migrate_as_configured(
            settings.database_url, settings.owner_database_url, settings.db_connect_wait_s
        )
    except psycopg.OperationalError as exc:
        raise CommandError(sink.cannot_connect(exc, settings.owner_database()[1])) from exc
    except sink.MigrationFailed as exc:
        raise CommandError(str(exc)) from exc
    ours = "" if done.version == sink.SCHEMA_VERSION else f" (this gannet's: {sink.SCHEMA_VERSION})"
    print(
        f"database schema at version {done.version}{ours}; applied now: {done.applied or 'nothing'}"
    )
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_table())
        return 0
    # As an environment sets them, so that a line can be pasted back: a list comma-joined
    # (not Python's ['a']), an unset one commented out (an empty value is not "unset"),
    # with what it comes to where it follows other settings.
    settings = Settings()
    derived = _derived(settings)
    for name, value in settings.model_dump().items():
        if name in DATABASE_URLS and value is not None:
            value = without_password(value)
        if name in derived:
            print(f"# GANNET_{name.upper()} is {derived[name]}")
        elif value is None:
            print(f"# GANNET_{name.upper()} is unset")
        elif isinstance(value, SecretStr):
            print(f"# GANNET_{name.upper()} is set (not shown)")
        elif isinstance(value, list):
            print(f"GANNET_{name.upper()}={','.join(map(str, value))}")
        else:
            print(f"GANNET_{name.upper()}={value}")
    return 0


def _derived(s: Settings) -> dict[str, str]:
    """What the settings that follow others come to, where they do: the daemon's values,
    not the fields' (a default of None, or the demo's config where industry and models
    bucket name another)."""
    derived: dict[str, str] = {}
    if s.config_location() != s.config_uri:
        derived["config_uri"] = (
            f"unset: {s.config_location()} (GANNET_MODELS_BUCKET/GANNET_INDUSTRY/config.yaml)"
        )
    if s.db_pool_size is None:
        derived["db_pool_size"] = f"unset: {s.db_connections()} (GANNET_RUNNERS + 4)"
    if s.max_messages is None:
        derived["max_messages"] = (
            f"unset: {flow_control(None, s.runners, None)} per lane (2 x GANNET_RUNNERS; a lane "
            "with a cap: 2 x its cap)"
        )
    if s.config_check_s is None:
        where = "gs://" if s.config_location().startswith("gs://") else "local"
        derived["config_check_s"] = f"unset: {s.config_every_s():g} s (a {where} config)"
    return derived


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gannet",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "run",
        help="run the daemon (the GKE container's entrypoint)",
        description="Pull tasks and process them until SIGTERM. "
        "Readiness on /readyz, metrics on /metrics (GANNET_METRICS_PORT). "
        "With GANNET_PROCESSES=N (default 1) it runs N daemon processes, each pinned to "
        "its share of the CPUs, behind a supervisor that serves that port for all of them.",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("db", help="database commands")
    db_sub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    m = db_sub.add_parser(
        "migrate",
        help="apply pending schema migrations (idempotent)",
        description="Create or upgrade Gannet's schema (task_results, task_claims and the "
        "per-task functions) as GANNET_OWNER_DATABASE_URL's role, making "
        "GANNET_DATABASE_URL's role where it does not exist and granting it reading, "
        "adding and updating rows (without "
        "GANNET_OWNER_DATABASE_URL: as GANNET_DATABASE_URL's role, which then owns them), "
        "waiting up to GANNET_DB_CONNECT_WAIT_S for PostgreSQL to accept connections. Safe "
        "to run from several pods at once (advisory lock).",
    )
    m.set_defaults(func=cmd_migrate)
    cluster_cli.add_db_commands(db_sub)

    p = sub.add_parser(
        "settings",
        help="show the effective GANNET_* settings",
        description="Print every setting as GANNET_NAME=value: its default, or what the "
        "environment sets (the database password as ***); an unset one as a comment, with "
        "what it comes to where it follows others (# GANNET_DB_POOL_SIZE is unset: 8 "
        "(GANNET_RUNNERS + 4)). With --markdown, the README's table of every setting, its "
        "default and its meaning.",
    )
    p.add_argument("--markdown", action="store_true", help="print the README table instead")
    p.set_defaults(func=cmd_settings)

    dev_cli.add_commands(sub)
    cluster_cli.add_commands(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP (a closed terminal) behave like Ctrl-C, so `with
    LocalServices(...)` stops what it started: the services run in sessions of their
    own, which a hang-up does not reach."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Ultralytics reads this at import: never download weights, fonts or datasets, and
    # send no telemetry. Workers on GKE usually have no internet egress anyway.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.func is not cmd_run:  # the daemon has its own SIGTERM drain, and logs these
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)
        # Every command reads its settings from GANNET_* (publish, dead-letters, db
        # migrate too): a misspelt one would leave a default in force without a word.
        for warning in unknown_variables():
            print(f"warning: {warning}", file=sys.stderr)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone away shows here, not in the flush at exit
        return code
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        if exc.title == Settings.__name__:  # a GANNET_* variable that Settings refuses
            print(
                f"error: a GANNET_* setting is not valid:\n{refused_settings(exc)}", file=sys.stderr
            )
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():  # a pipe or socket of the command's own: its error
            raise
        # The reader went away (`gannet settings | head -1`): no traceback, and none
        # either from the interpreter's flush of the rest at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE, which a shell reports so


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an
    error on its write end)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):  # no file descriptor (a test's captured stdout)
        return False
