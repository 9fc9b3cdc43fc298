"""The local harness's commands: `gannet publish`, `demo`, `services` and `bench`.

Argument definitions only; each command imports its module when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gannet.settings import REPO_ROOT, Settings


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


def cmd_publish(args: argparse.Namespace) -> int:
    from gannet.dev import publish

    return publish.main(Settings(), args)


def cmd_demo(args: argparse.Namespace) -> int:
    from gannet.dev import demo

    return demo.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from gannet.dev import bench

    return bench.main(args)


def cmd_services(args: argparse.Namespace) -> int:
    from gannet.dev import demo

    return demo.serve(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
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
