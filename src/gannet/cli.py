"""The `gannet` command. Thin: every subcommand calls a function that tests can reach."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from gannet import ops, scaling
from gannet.settings import REPO_ROOT, Settings, settings_table

DESCRIPTION = """\
Gannet: the GPU vision worker. It pulls tasks from a Pub/Sub subscription, runs the
Ultralytics YOLO pipeline the tenant's industry config names, writes the result to
PostgreSQL and GCS, and acks only after the result is committed.

Settings come from GANNET_* environment variables (`gannet settings` lists them)."""


def _add_service_ports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pubsub-port", type=int, default=8085, help="Pub/Sub emulator port (default 8085)"
    )
    parser.add_argument(
        "--gcs-port", type=int, default=9023, help="GCS emulator port (default 9023)"
    )
    parser.add_argument(
        "--postgres-port", type=int, default=54329, help="throwaway PostgreSQL port (default 54329)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=REPO_ROOT / ".state",
        help="where service data and logs go (default .state/)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from gannet import daemon

    return daemon.run(Settings())


def cmd_migrate(args: argparse.Namespace) -> int:
    from gannet import logs, sink

    settings = Settings()
    logs.configure(settings.log_level)
    applied = sink.migrate(settings.database_url)
    print(f"schema at version {sink.SCHEMA_VERSION}; applied now: {applied or 'nothing'}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from gannet import publish

    return publish.main(Settings(), args)


def cmd_demo(args: argparse.Namespace) -> int:
    from gannet import demo

    return demo.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from gannet import bench

    return bench.main(args)


def cmd_services(args: argparse.Namespace) -> int:
    from gannet import demo

    return demo.serve(args)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from gannet import clients, dead_letters, provision

    settings = Settings()
    publisher, subscriber = clients.pubsub_clients(settings)
    name = args.subscription or provision.dead_letter_subscription(settings)
    return dead_letters.main(
        args,
        publisher,
        subscriber,
        settings.topic_path(),
        subscriber.subscription_path(settings.project, name),
    )


def cmd_settings(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_table())
        return 0
    for name, value in Settings().model_dump().items():
        print(f"GANNET_{name.upper()}={value}")
    return 0


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
        "Readiness on /readyz, metrics on /metrics (GANNET_METRICS_PORT).",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("db", help="database commands")
    db_sub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    m = db_sub.add_parser(
        "migrate",
        help="apply pending schema migrations (idempotent)",
        description="Create or upgrade task_results in GANNET_DATABASE_URL. "
        "Safe to run from several pods at once (advisory lock).",
    )
    m.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "publish",
        help="publish tasks for local image files or gs:// URLs",
        description="Publish one task per image to GANNET_TOPIC and print the "
        "task ids. Local files are first uploaded to "
        "gs://BUCKET/TENANT/uploads/ (BUCKET: the first GANNET_ALLOWED_BUCKETS).",
    )
    p.add_argument("images", nargs="+", help="local image files or gs://BUCKET/TENANT/... URLs")
    p.add_argument("--tenant", required=True, help="tenant id ([a-z0-9-], max 63)")
    p.add_argument("--pipeline", required=True, help="pipeline name from the industry config")
    p.add_argument("--session-id", help="optional session id stored with each result")
    p.add_argument("--confidence", type=float, help="options.confidence_override (0..1)")
    p.add_argument("--callback-url", help="optional https URL that receives the summary")
    p.add_argument(
        "--task-id-prefix",
        default="",
        help="prefix for generated task ids (default: none; ids are random)",
    )
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "demo",
        help="run the whole path locally and show the results",
        description="Start the emulators and PostgreSQL, publish tasks for the "
        "sample images, run the daemon until they are done, print a table, "
        "stop everything. Exit 1 if a count differs from the known contents.",
    )
    _add_service_ports(p)
    p.add_argument("--runners", type=int, default=2, help="runner threads (default 2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "services",
        help="start the local emulators and PostgreSQL, print env",
        description="Start the Pub/Sub emulator, the GCS emulator and a "
        "throwaway PostgreSQL, create the topics, buckets and schema, print the "
        "environment to export, and keep running until Ctrl-C.",
    )
    _add_service_ports(p)
    p.set_defaults(func=cmd_services)

    p = sub.add_parser(
        "bench",
        help="measure bare model vs daemon vs one-at-a-time worker",
        description="On the same images and model, in one run: (a) bare model "
        "predict throughput, (b) the daemon end to end through the emulators and "
        "PostgreSQL, (c) a one-message-at-a-time worker. Prints b/a and b/c per round "
        "and their medians, the CPU each process spent per image during (b), and "
        "writes JSON.",
    )
    p.add_argument("--images", type=int, default=256, help="tasks per measurement (default 256)")
    p.add_argument("--runners", type=int, default=8, help="daemon runner threads (default 8)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="repeat (a), (c), (b) this many times and report the median ratios (default 3)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "bench-results" / "bench.json",
        help="where the JSON report goes",
    )
    _add_service_ports(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "dead-letters",
        help="list the dead-letter subscription; replay tasks once the cause is fixed",
        description="List what is in the dead-letter subscription, with each message's "
        "error_code and reason (retries_exhausted: Pub/Sub gave up after "
        "max_delivery_attempts transient failures, e.g. a database outage). Listing "
        "removes nothing. With --replay, the chosen messages are republished to "
        "GANNET_TOPIC and only then acked. Replaying a task that already succeeded is "
        "harmless: the daemon acks it without running the models.",
    )
    p.add_argument(
        "--code",
        action="append",
        metavar="CODE",
        help="only messages with this error_code (repeatable), e.g. retries_exhausted, "
        "image_not_found, unknown_pipeline",
    )
    p.add_argument("--tenant", help="only this tenant's messages")
    p.add_argument("--replay", action="store_true", help="republish the chosen messages")
    p.add_argument("--all", action="store_true", help="with --replay: every message, any code")
    p.add_argument(
        "--limit", type=int, default=1000, help="look at this many messages at most (default 1000)"
    )
    p.add_argument(
        "--subscription",
        help="dead-letter subscription id (default: GANNET_DEAD_LETTER_TOPIC + '-sub', "
        "as terraform creates it)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser("settings", help="show the effective GANNET_* settings")
    p.add_argument("--markdown", action="store_true", help="print the README table instead")
    p.set_defaults(func=cmd_settings)

    scaling.add_commands(sub)
    ops.add_commands(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM behaves like Ctrl-C, so `with LocalServices(...)` stops what it started."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Ultralytics reads this at import: never download weights, fonts or datasets, and
    # send no telemetry. Workers on GKE usually have no internet egress anyway.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.func is not cmd_run:  # the daemon has its own SIGTERM drain
        signal.signal(signal.SIGTERM, _interrupt)
    from gannet.clients import NoCredentials
    from gannet.local_services import ServiceError

    try:
        return int(args.func(args) or 0)
    except (NoCredentials, ServiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
