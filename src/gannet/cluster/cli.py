"""The operator's commands (`gannet ops`, `gannet scaling`, `gannet dead-letters`,
`gannet db purge`, `gannet config check`).

Only the argument definitions live here, so that building the parser imports nothing
heavy: each command imports its module (and with it the kubernetes client) when it runs,
and `gannet run` never pays for them.
"""

from __future__ import annotations

import argparse
import sys

from gannet.cluster import scaling
from gannet.settings import Settings


def cmd_ops_status(args: argparse.Namespace) -> int:
    from gannet.cluster import ops

    return ops.run_status(args)


def cmd_ops_scale(args: argparse.Namespace) -> int:
    from gannet.cluster import ops

    return ops.run_scale(args)


def cmd_ops_deploy(args: argparse.Namespace) -> int:
    from gannet.cluster import deploy

    return deploy.run_deploy(args)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from gannet import clients
    from gannet.cluster import dead_letters

    wrong = dead_letters.refusal(args)
    if wrong:
        print(f"error: {wrong}", file=sys.stderr)
        return 2
    settings = Settings()
    publisher, subscriber = clients.pubsub_clients(settings)
    declared = settings.lane_list()
    try:
        lanes = declared if args.lane is None else [settings.lane(args.lane)]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.subscription and len(lanes) > 1:
        print(
            "error: --subscription names one dead-letter subscription: add --lane NAME",
            file=sys.stderr,
        )
        return 2
    own = lanes[0].dead_letter_subscription
    if args.subscription not in (None, own) and args.replay and args.lane is None:
        # Replayed letters go to the lane's topic: another lane's would land in this one.
        print(
            f"error: {args.subscription} is not lane {lanes[0].name!r}'s dead-letter "
            f"subscription ({own}), whose topic ({lanes[0].topic}) a replay goes to; name "
            "the lane it belongs to with --lane NAME (set GANNET_LANES as in the overlay)",
            file=sys.stderr,
        )
        return 2
    worst = 0
    for lane in lanes:
        if len(lanes) > 1 and not args.json:
            print(f"lane {lane.name}:")
        name = args.subscription or lane.dead_letter_subscription
        rc = dead_letters.main(
            args,
            publisher,
            subscriber,
            settings.path("topics", lane.topic),
            settings.path("subscriptions", name),
            lane.name if len(declared) > 1 else None,
        )
        worst = max(worst, rc)
    return worst


def cmd_db_purge(args: argparse.Namespace) -> int:
    import psycopg

    from gannet.cluster import purge

    if args.older_than < 0 or args.batch < 1:
        print("error: --older-than must be 0 or more days, --batch 1 or more", file=sys.stderr)
        return 2
    tenants = list(dict.fromkeys(t.strip() for t in args.tenant if t.strip()))
    try:
        url, setting = Settings().owner_database()
        return purge.main(url, tenants, args.older_than, args.batch, args.dry_run, setting)
    except psycopg.errors.UndefinedTable as exc:
        print(f"error: {exc.diag.message_primary}: run `gannet db migrate` first", file=sys.stderr)
        return 2
    except psycopg.errors.InsufficientPrivilege as exc:
        print(
            f"error: {exc.diag.message_primary}: the purge deletes as the tables' owner: "
            "set GANNET_OWNER_DATABASE_URL (the daemon's own role may not delete)",
            file=sys.stderr,
        )
        return 2
    except psycopg.Error as exc:  # a lost connection, a batch's tries spent
        print(
            f"error: the purge stopped ({exc.__class__.__name__}: {exc}); the batches "
            "before it are deleted, run it again for the rest",
            file=sys.stderr,
        )
        return 1


def add_db_commands(db_sub: argparse._SubParsersAction) -> None:
    """`gannet db purge` (an operator's command) beside the core's `gannet db migrate`."""
    p = db_sub.add_parser(
        "purge",
        help="delete tenants' rows older than N days, each with its claim",
        description="Delete each named tenant's task_results rows last written more than "
        "--older-than days ago, with their task_claims rows (a task_id purged is free "
        "again: a task republished with it runs anew), in batches of one short "
        "transaction each. The daemon deletes no row, while the buckets' lifecycle rules "
        "delete images and result objects. Row-level security shows one tenant's rows at "
        "a time, so name every tenant (for instance those of configs/deployment.yaml). "
        "A task a worker runs or commits now keeps its claim. Runs as the tables' owner, "
        "GANNET_OWNER_DATABASE_URL (else GANNET_DATABASE_URL): the daemon's role may not "
        "delete. Use --dry-run first.",
    )
    p.add_argument(
        "--tenant",
        action="append",
        required=True,
        metavar="TENANT",
        help="a tenant whose rows to purge (repeatable)",
    )
    p.add_argument(
        "--older-than",
        type=float,
        required=True,
        metavar="DAYS",
        help="rows last written more than DAYS days ago (0: every row of the tenant)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=5000,
        help="rows deleted per transaction (default 5000)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="count the rows that would go; delete nothing"
    )
    p.set_defaults(func=cmd_db_purge)


def cmd_config_check(args: argparse.Namespace) -> int:
    from gannet.cluster import config_check

    return config_check.run_check(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_dead_letters(sub)
    scaling.add_commands(sub)
    _add_ops(sub)
    _add_config(sub)


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check a pipeline config before pushing it")
    verbs = p.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    c = verbs.add_parser(
        "check",
        help="say whether the daemon would serve a config, and what it serves",
        description="Load a config as the daemon does (an industry config or a deployment "
        "mapping, a local path or gs://): its schema, every pipeline's steps and params, "
        "model paths, tenant routing, then every enabled model on the CPU with the class "
        "filters that name its classes. Prints what it would serve, or the error a pod "
        "would log when rejecting it, and exits 2. Run it before `gcloud storage cp` or a "
        "ConfigMap change. Tenants' own models (gs://MODELS_BUCKET/models/TENANT/...) load "
        "on first use: --tenant T loads T's as its first task would (the file, its kind, "
        "the class filters of the industry that serves T) and says whether they would "
        "serve, or refuse T's tasks as tenant_model_invalid (exit 2).",
    )
    c.add_argument(
        "uri",
        nargs="?",
        help="the config: a path or gs://BUCKET/... (default: the daemon's, "
        "GANNET_CONFIG_URI or gs://GANNET_MODELS_BUCKET/GANNET_INDUSTRY/config.yaml)",
    )
    c.add_argument(
        "--industry",
        help="serve only this industry, as GANNET_INDUSTRY does (default: GANNET_INDUSTRY)",
    )
    c.add_argument(
        "--no-models",
        action="store_true",
        help="skip loading the models (seconds each; a download for gs:// weights)",
    )
    c.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="T",
        help="also load tenant T's own models from GANNET_MODELS_BUCKET (repeatable), "
        "e.g. after T uploaded one, before replaying its tenant_model_invalid letters",
    )
    c.set_defaults(func=cmd_config_check)


def _add_dead_letters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dead-letters",
        help="list the dead-letter subscription; replay tasks once the cause is fixed, "
        "or discard letters handled otherwise",
        description="List what is in the dead-letter subscription, with each message's "
        "error_code and reason (retries_exhausted: Pub/Sub gave up after "
        "max_delivery_attempts transient failures, e.g. a database outage). Listing "
        "removes nothing. With --replay, the chosen messages are republished to "
        "GANNET_TOPIC and only then acked. Replaying a task that already succeeded is "
        "harmless: the daemon acks it without running the models. With --discard, the "
        "chosen messages are acked and gone (a letter whose backend was told, a task no "
        "longer wanted): the dead-letter subscription keeps them 31 days otherwise, and "
        "GannetDeadLettersUnhandled fires after 3. With several lanes "
        "(GANNET_LANES) each lane's dead letters are listed in turn and replayed to that "
        "lane's own topic.",
    )
    p.add_argument("--lane", help="only this lane of GANNET_LANES (default: every lane)")
    p.add_argument(
        "--code",
        action="append",
        metavar="CODE",
        help="only messages with this error_code (repeatable), e.g. retries_exhausted, "
        "image_not_found, unknown_pipeline",
    )
    p.add_argument("--tenant", help="only this tenant's messages")
    p.add_argument(
        "--message",
        action="append",
        metavar="ID",
        help="only the message with this id (repeatable; the listing's message column)",
    )
    p.add_argument("--replay", action="store_true", help="republish the chosen messages")
    p.add_argument(
        "--discard",
        action="store_true",
        help="ack the chosen messages without republishing them: they are gone for good",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="with --replay or --discard: every message, any code",
    )
    p.add_argument(
        "--limit", type=int, default=1000, help="look at this many messages at most (default 1000)"
    )
    p.add_argument(
        "--subscription",
        help="dead-letter subscription id (default: each lane's, as terraform names "
        "them: GANNET_DEAD_LETTER_TOPIC + '-sub' for the first lane, "
        "GANNET_DEAD_LETTER_TOPIC + '-LANE-sub' for the others); with several lanes, "
        "add --lane",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.set_defaults(func=cmd_dead_letters)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--namespace", "-n", default="gannet", help="namespace of the worker (default: gannet)"
    )
    p.add_argument(
        "--deployment",
        default="gannet-worker",
        help="name of the worker Deployment (default: gannet-worker)",
    )
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config, else in-cluster)",
    )
    p.add_argument("--context", default=None, help="kubeconfig context (default: current)")


def _add_ops(subparsers: argparse._SubParsersAction) -> None:
    """`gannet ops status`, `gannet ops scale` and `gannet ops deploy`."""
    ops = subparsers.add_parser(
        "ops",
        help="Operator commands for the worker on Kubernetes.",
        description="Operator commands for the worker on Kubernetes (uses your kubeconfig).",
    )
    verbs = ops.add_subparsers(dest="ops_command", required=True, metavar="VERB")
    st = verbs.add_parser(
        "status",
        help="Replicas, HPA metrics vs targets, GPU nodes, backlog, pods.",
        description=(
            "Show ready/desired workers, what the HPA sees against its targets and its "
            "conditions, the T4 nodes, the subscription backlog from the external metrics "
            "API, and each pod with its outstanding messages."
        ),
    )
    _common(st)
    st.add_argument(
        "--subscription",
        default=None,
        help="Pub/Sub subscription id whose backlog to show (default: every lane's, from "
        "the worker's ConfigMap: GANNET_SUBSCRIPTION and GANNET_LANES)",
    )
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    st.set_defaults(func=cmd_ops_status)

    sc = verbs.add_parser(
        "scale",
        help="Set the number of workers (or the HPA's floor).",
        description=(
            "Set the worker Deployment's replicas. When an HPA manages it, this refuses "
            "(the HPA would undo it within ~15 s) unless --force; --hpa-min sets the HPA's "
            "minReplicas instead, e.g. to pre-warm GPU nodes before a known batch."
        ),
    )
    sc.add_argument("replicas", type=int, help="number of workers (or the HPA floor)")
    _common(sc)
    sc.add_argument(
        "--hpa-min", action="store_true", help="set the HPA's minReplicas instead of replicas"
    )
    sc.add_argument(
        "--force", action="store_true", help="scale the Deployment even though an HPA owns it"
    )
    sc.add_argument(
        "--dry-run", action="store_true", help="print what would change, change nothing"
    )
    sc.set_defaults(func=cmd_ops_scale)

    dp = verbs.add_parser(
        "deploy",
        help="Apply an overlay with the worker pinned to an image digest; wait; show status.",
        description=(
            "Render a kustomize overlay (kubectl kustomize), point the worker at IMAGE, a "
            "digest reference (REPOSITORY@sha256:...; tags are refused, so what runs is "
            "exactly what was built), apply it, wait for the rollout and print `gannet ops "
            "status`. IMAGE must come from the repository the overlay names: a mismatch "
            "stops before anything is applied. The delivery workflow runs this; "
            "--dry-run prints the manifests instead."
        ),
    )
    dp.add_argument("overlay", help="overlay directory, e.g. k8s/overlays/prod")
    dp.add_argument(
        "--image",
        required=True,
        help="REPOSITORY@sha256:DIGEST, e.g. from `terraform output -raw image_repository` "
        "and the build's digest",
    )
    _common(dp)
    dp.add_argument(
        "--timeout",
        type=int,
        default=900,
        help="seconds to wait for the rollout (default 900: a new T4 node and the image "
        "pull can take minutes)",
    )
    dp.add_argument(
        "--subscription",
        default=None,
        help="subscription whose backlog the status shows (default: every lane's, from "
        "the worker's ConfigMap)",
    )
    dp.add_argument(
        "--dry-run", action="store_true", help="print the pinned manifests, apply nothing"
    )
    dp.set_defaults(func=cmd_ops_deploy)
