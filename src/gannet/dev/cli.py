"""The local harness's commands: `gannet publish`, `demo`, `services`, `bench` and `soak`.

Argument definitions only; each command imports its module when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gannet.errors import CommandError
from gannet.settings import REPO_ROOT, Settings


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return value


def _add_service_ports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pubsub-port", type=_port, default=8085, help="Pub/Sub emulator port (default 8085)"
    )
    parser.add_argument(
        "--gcs-port", type=_port, default=9023, help="GCS emulator port (default 9023)"
    )
    parser.add_argument(
        "--postgres-port",
        type=_port,
        default=54329,
        help="throwaway PostgreSQL port (default 54329)",
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


# The flags only some of `gannet bench`'s modes read, and those modes: the others refuse
# them, so that a run never reports figures of something other than what was asked for.
_PLUMBING, _FLOOD, _IN_PROCESS, _MODEL = "--plumbing", "--flood", "--in-process", "the model bench"
_BENCH_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "--sizes": ("sizes", (_PLUMBING, _IN_PROCESS)),
    "--runners-sweep": ("runners_sweep", (_PLUMBING, _IN_PROCESS)),
    "--pipeline": ("pipeline", (_PLUMBING, _IN_PROCESS)),
    "--baseline": ("baseline", (_PLUMBING,)),
    "--no-gil": ("gil", (_PLUMBING,)),
    "--no-trace": ("trace", (_PLUMBING,)),
    "--trace-only": ("trace_only", (_PLUMBING,)),
    "--gil-only": ("gil_only", (_PLUMBING,)),
    "--gcs-latency-ms": ("gcs_latency_ms", (_PLUMBING,)),
    "--pubsub-latency-ms": ("pubsub_latency_ms", (_PLUMBING,)),
    "--pubsub-flow-control": ("pubsub_flow_control", (_PLUMBING,)),
    "--gcs-tls": ("gcs_tls", (_PLUMBING,)),
    "--device": ("device", (_IN_PROCESS,)),
    "--bulk": ("bulk", (_FLOOD,)),
    "--interactive": ("interactive", (_FLOOD,)),
    "--spacing": ("spacing", (_FLOOD,)),
    "--lanes": ("lanes", (_FLOOD,)),
    "--images": ("images", (_MODEL, _PLUMBING, _IN_PROCESS)),
}


def _given(args: argparse.Namespace, flag: str, dest: str) -> bool:
    """Whether a mode-specific flag was given: each defaults to None, False or 0, but a
    --no-X flag, which turns a default on off."""
    value = getattr(args, dest)
    if flag.startswith("--no-"):
        return value is False
    return value is not None and value is not False and value != 0


def bench_mode(args: argparse.Namespace) -> str:
    """The one mode asked for, once every flag given is one it reads (CommandError)."""
    modes = [m for m in (_PLUMBING, _FLOOD, _IN_PROCESS) if getattr(args, m[2:].replace("-", "_"))]
    if len(modes) > 1:
        raise CommandError(f"{' and '.join(modes)} are modes of their own: choose one")
    mode = modes[0] if modes else _MODEL
    for flag, (dest, modes_of_flag) in _BENCH_FLAGS.items():
        if _given(args, flag, dest) and mode not in modes_of_flag:
            raise CommandError(
                f"{flag} goes with {' or '.join(modes_of_flag)}, not with {mode}; "
                "drop it or choose that mode"
            )
    return mode


# Each mode's report, by default: one mode's run no longer overwrites another's.
_REPORTS = {
    _MODEL: "bench.json",
    _PLUMBING: "plumbing.json",
    _FLOOD: "flood.json",
    _IN_PROCESS: "in-process.json",
}


def cmd_bench(args: argparse.Namespace) -> int:
    mode = bench_mode(args)
    if args.output is None:
        args.output = REPO_ROOT / "bench-results" / _REPORTS[mode]
    if mode == _IN_PROCESS:
        from gannet.dev import bench_device
        from gannet.dev.bench_plumbing import check_pipeline, check_sizes

        check_sizes(args.sizes)
        if args.pipeline:
            check_pipeline(args.pipeline)

        args.images = args.images or 500
        return bench_device.main(args)
    if mode == _FLOOD:
        from gannet.dev import bench_flood

        args.runners = args.runners or Settings().runners
        args.bulk = args.bulk or 2000
        args.interactive = args.interactive or 20
        args.spacing = 0.5 if args.spacing is None else args.spacing
        args.lanes = args.lanes or "interactive:4,bulk:1:3"
        try:
            Settings(lanes=args.lanes).lane_list()
        except ValueError as exc:  # pydantic's ValidationError is one
            raise CommandError(f"--lanes {args.lanes!r}: {exc}") from exc
        return bench_flood.main(args)
    if mode == _PLUMBING:
        from gannet.dev import bench_plumbing

        args.runners = args.runners or Settings().runners
        args.images = args.images or 1000
        return bench_plumbing.main(args)
    args.runners = args.runners or 8
    args.images = args.images or 256
    from gannet.dev import bench

    return bench.main(args)


def cmd_soak(args: argparse.Namespace) -> int:
    from gannet.dev import soak

    return soak.main(args)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1)")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _sweep(text: str) -> list[tuple[int, int | None]]:
    """'4,8,4:32' -> [(4, None), (8, None), (4, 32)]: runners, and messages leased."""
    entries: list[tuple[int, int | None]] = []
    for entry in text.split(","):
        runners, _, leased = entry.partition(":")
        entries.append((_positive(runners), _positive(leased) if leased else None))
    return entries


SOAK_DESCRIPTION = """\
Soak the daemon: on services of its own (free ports), publish --tasks tasks, of which
--poison are poison of twelve kinds (bad JSON, an oversized body, an unknown field, a
bad tenant id, an unknown pipeline, an image under another tenant's prefix or in a
bucket not allowed, a missing, an undecodable and an oversized image, an unknown tenant
and a task_id another tenant owns), and run one daemon at a time while, at random
moments, it is killed with -9 (--kills), stopped with SIGTERM (--sigterms) and
PostgreSQL is restarted (--postgres-restarts). A stopped daemon is replaced at once, as
Kubernetes would. Each moment is a random fraction (5-90 %) of the valid tasks
succeeded, drawn from --seed: the same seed repeats the same run.

Once every valid task has succeeded and every poison message is on the dead-letter
topic (or --settle-timeout-s passed), it prints and writes (--report) what it found:
tasks lost, tasks inferred more than once (two inferences that both ended acked),
re-runs caused by a fault, poison dead-lettered per error_code, poison that left the
wrong rows or results (each kind its failed row, or none; never a result object; the
other tenant's row and claim as they were), successes whose callback never reached the
soak's receiver (every task has one; a killed daemon's are sent by the next one) or
reached it twice, throughput and the daemons' peak RSS.

Exit status: 0 when nothing was lost, nothing was inferred more than once, every
success was called back and every poison message got its reason and left what its kind
must, 1 otherwise (or when the
soak itself failed), 2 when a service would not start."""


def cmd_services(args: argparse.Namespace) -> int:
    from gannet.dev import demo

    return demo.serve(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish",
        help="publish tasks for local image files or gs:// URLs",
        description="Publish one task per image to the lane's topic (GANNET_TOPIC for "
        "the first lane of GANNET_LANES, GANNET_TOPIC-LANE for the others) and print the "
        "task ids. Local files are first uploaded to "
        "gs://BUCKET/TENANT/uploads/NAME (BUCKET: the first GANNET_ALLOWED_BUCKETS), "
        "replacing an earlier upload of that name. Against the local services, run after "
        "exporting what `gannet services` prints.",
    )
    p.add_argument("images", nargs="+", help="local image files or gs://BUCKET/TENANT/... URLs")
    p.add_argument("--tenant", required=True, help="tenant id ([a-z0-9-], max 63)")
    p.add_argument("--pipeline", required=True, help="pipeline name from the industry config")
    p.add_argument("--session-id", help="optional session id stored with each result")
    p.add_argument("--confidence", type=float, help="options.confidence_override (0.001..1)")
    p.add_argument("--callback-url", help="optional https URL that receives the summary")
    p.add_argument(
        "--lane",
        help="lane of GANNET_LANES to publish to (default: the first, e.g. interactive; "
        "a bulk backfill goes to its bulk lane)",
    )
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
        "stop everything. Exit 1 if a count differs from the known contents. About 12 s "
        "on 2 cores. Needs the gcloud CLI with its Pub/Sub emulator (and Java) and "
        "PostgreSQL 15's binaries (initdb, postgres) on PATH or in /usr/lib/postgresql.",
    )
    _add_service_ports(p)
    p.add_argument("--runners", type=_positive, default=2, help="runner threads (default 2)")
    p.add_argument(
        "--trace",
        action="store_true",
        help="trace every task (GANNET_TRACE_EXPORTER=otlp to a local OTLP receiver) and "
        "print one task's trace, from its publish to its ack",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "services",
        help="start the local emulators and PostgreSQL, print env",
        description="Start the Pub/Sub emulator, the GCS emulator and a "
        "throwaway PostgreSQL, create the topics, buckets and schema, print the "
        "environment to export, and keep running until Ctrl-C, which stops them all and "
        "deletes their data. Needs the gcloud CLI with its Pub/Sub emulator (and Java) "
        "and PostgreSQL 15's binaries.",
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
        "writes JSON. With --plumbing: the daemon's own cost around the model instead "
        "(the network's answers recorded once per input and replayed, everything else "
        "real) on 640x480, 1920x1080, 4032x3024 and mixed-shape JPEGs: images/s on one "
        "and two cores, CPU ms per image by stage, GIL-held ms per image (py-spy). "
        "With --flood: how long interactive tasks wait behind a bulk backfill, with lanes "
        "and on one subscription, against no backfill at all. With --in-process: the "
        "daemon's model path alone (decode to result JSON) against the bare model, "
        "or a config's pipeline with --pipeline, and how busy it kept the GPU, without "
        "the services, for a GPU host. How long, on 2 cores: the model bench about 1.5 "
        "min; --flood about 15 min; --plumbing with its defaults tens of minutes (every "
        "image set, one and two cores, the GIL and tracing runs: narrow it with --sizes, "
        "--rounds, --no-gil, --no-trace). Each mode starts its own services (not with "
        "--in-process), on the ports below.",
    )
    p.add_argument(
        "--flood",
        action="store_true",
        help="tenant A floods the bulk lane while tenant B trickles interactive tasks: "
        "B's latency with lanes, on one subscription and alone; A's throughput",
    )
    p.add_argument(
        "--bulk", type=_positive, default=None, help="--flood: A's backfill tasks (default 2000)"
    )
    p.add_argument(
        "--interactive", type=_positive, default=None, help="--flood: B's tasks (default 20)"
    )
    p.add_argument(
        "--spacing",
        type=_seconds,
        default=None,
        help="--flood: seconds between B's publishes (default 0.5)",
    )
    p.add_argument(
        "--lanes",
        default=None,
        help="--flood: GANNET_LANES of the lanes run; B uses the first lane, A the last "
        "(default interactive:4,bulk:1:3, prod's)",
    )
    p.add_argument(
        "--plumbing",
        action="store_true",
        help="measure the daemon around a replayed model (see above)",
    )
    p.add_argument(
        "--sizes",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        help="--plumbing or --in-process: comma-separated image sets (default "
        "640x480,1920x1080,4032x3024,mix; with --in-process 640x480,4032x3024); also "
        "phone: 4032x3024 with a sensor's grain, 3.5 MB a file like a phone's photo",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="the daemon's model path alone, in this process: GANNET_RUNNERS threads "
        "from JPEG bytes in memory to result JSON (decode, nvJPEG on CUDA, letterbox, "
        "batched forward, NMS), against the bare model, per call and batched; no Pub/Sub, "
        "GCS or PostgreSQL, so it runs where the emulators cannot (a GPU host)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="--in-process: the device to run on (default: the first of GANNET_DEVICES)",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="--plumbing: also measure the daemon of git commit REV, interleaved with "
        "this tree's, each going first in every other round (REV must have "
        "gannet/dev/replay.py; plumbing-baseline names the daemon before the hot-path "
        "work)",
    )
    p.add_argument(
        "--no-gil",
        dest="gil",
        action="store_false",
        help="--plumbing: skip the py-spy run that measures GIL-held time",
    )
    p.add_argument(
        "--no-trace",
        dest="trace",
        action="store_false",
        help="--plumbing: skip the run with tracing on at sampling 1.0 (OTLP to a local "
        "receiver) that measures what tracing costs",
    )
    p.add_argument(
        "--trace-only",
        action="store_true",
        help="--plumbing: only the two runs that tracing's cost is read from (2 cores, "
        "tracing off and at sampling 1.0, in alternating order), for many rounds quickly",
    )
    p.add_argument(
        "--gil-only",
        action="store_true",
        help="--plumbing: only the 2-core run and the py-spy --gil run, for each daemon, "
        "for many rounds quickly (the GIL-held figure drifts with the VM as images/s does: "
        "compare the daemons round by round, printed per round)",
    )
    p.add_argument(
        "--gcs-latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="--plumbing: add MS to every request the GCS emulator answers, as a real "
        "bucket's round trip would (default 0: the emulator's own, well under 1 ms)",
    )
    p.add_argument(
        "--pubsub-latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="--plumbing: add MS to every round trip to the Pub/Sub emulator (the local "
        "relay holds each byte MS/2 each way), as the network to Pub/Sub itself would: "
        "messages arrive and acks return that much later (default 0)",
    )
    p.add_argument(
        "--pubsub-flow-control",
        action="store_true",
        help="--plumbing: send each streaming pull at most its GANNET_MAX_MESSAGES unacked "
        "messages, as Pub/Sub itself does (a local gate in front of the emulator, which "
        "ignores the limit and sends all it has): the next message then leaves only when "
        "an ack has arrived, and the client modacks it on receipt before handing it over",
    )
    p.add_argument(
        "--gcs-tls",
        action="store_true",
        help="--plumbing: the GCS emulator speaks HTTPS, as Cloud Storage does (a "
        "self-signed certificate that the daemons are told to trust), so a large photo "
        "is read one TLS record (16 KiB) at a time; default plain HTTP",
    )
    p.add_argument(
        "--runners-sweep",
        type=_sweep,
        default=None,
        metavar="N[:M],...",
        help="--plumbing: only images/s on 2 cores, once per entry in each round: N "
        "runners (GANNET_RUNNERS) and M messages leased (GANNET_MAX_MESSAGES, default 2N); "
        "with --baseline, both daemons. E.g. 4,8,4:32 with --gcs-latency-ms 20: what "
        "keeps up with that latency. With --in-process: the daemon once per N runners "
        "in each round, against one bare measurement",
    )
    p.add_argument(
        "--pipeline",
        metavar="CONFIG:NAME",
        help="--plumbing or --in-process: the tasks run pipeline NAME of config file "
        "CONFIG, e.g. configs/agro.yaml:FULL_PIPELINE (default: the demo detector alone at "
        "imgsz 640); with --in-process there is no bare model to compare, and the report "
        "says how busy the GPU was (nvidia-smi) and the share of the time the models' "
        "batcher threads spent in forward passes",
    )
    p.add_argument(
        "--images",
        type=_positive,
        default=None,
        help="tasks per measurement (default 256; with --plumbing 1000: at a few hundred "
        "images/s a shorter run is mostly the daemon starting and finishing, and the "
        "Pub/Sub emulator's first burst going to one of two processes; with --in-process "
        "500)",
    )
    p.add_argument(
        "--runners",
        type=_positive,
        default=None,
        help="daemon runner threads (default 8; with --plumbing, --flood or --in-process "
        "the daemon's own default, GANNET_RUNNERS)",
    )
    p.add_argument(
        "--rounds",
        type=_positive,
        default=3,
        help="repeat every measurement this many times, the daemons and the bare model in "
        "turns, and report the medians (default 3)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where the JSON report goes (default bench-results/bench.json; plumbing.json, "
        "flood.json or in-process.json for those modes)",
    )
    _add_service_ports(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "soak",
        help="many tasks and poison under kill -9, SIGTERM and a database restart",
        description=SOAK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", type=_positive, default=2000, help="tasks to publish (default 2000)")
    p.add_argument(
        "--poison",
        type=_fraction,
        default=0.10,
        help="fraction of the tasks that are poison (default 0.10)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=20261201,
        help="seed of every random choice; printed in the report (default 20261201)",
    )
    p.add_argument("--kills", type=_count, default=2, help="kill -9 of the daemon (default 2)")
    p.add_argument("--sigterms", type=_count, default=1, help="SIGTERM of the daemon (default 1)")
    p.add_argument(
        "--postgres-restarts",
        type=_count,
        default=1,
        help="PostgreSQL restarts, fast shutdown (default 1)",
    )
    p.add_argument("--runners", type=_positive, default=2, help="daemon runner threads (default 2)")
    p.add_argument(
        "--window",
        type=_positive,
        default=100,
        help="at most this many published tasks unsettled at once (default 100): the "
        "emulator ignores flow control and leases all it has to one daemon",
    )
    p.add_argument(
        "--pubsub-flow-control",
        action="store_true",
        help="hold each streaming pull to its lease (GANNET_MAX_MESSAGES unacked), as "
        "Pub/Sub does and the emulator does not (gannet.dev.pubsub_gate): the daemon "
        "then meets Pub/Sub's pacing, one small response per freed slot",
    )
    p.add_argument(
        "--settle-timeout-s",
        type=float,
        default=600.0,
        help="give up waiting for every task to settle after this, from the first "
        "publish (default 600)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where service data and daemon logs go (default: a new temp dir)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="where the JSON report goes (default STATE_DIR/soak-report.json)",
    )
    p.set_defaults(func=cmd_soak)
