"""`gannet bench --flood`: does interactive work wait behind a bulk backfill?

Tenant A publishes --bulk tasks at once (a backfill); while they drain, tenant B publishes
--interactive tasks, one every --spacing seconds. Measured side by side in one run, each
on a fresh queue and a fresh daemon (the real demo model, the real services):
  - alone:   B's tasks with nothing else queued (B's latency without a flood), and A's
             flood with nothing else (A's throughput alone);
  - one sub: A and B on one subscription (GANNET_LANES unset: today's single queue);
  - lanes:   A on the bulk lane, B on the interactive lane (--lanes).
Latency is from B's publish to its committed row (the row's updated_at, the same clock).
Targets (the lanes issue): with lanes, B's p95 <= 2x its p95 alone, and A's throughput
>= 0.9x of A's alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from gannet import clients
from gannet.dev import bench, demo, stack
from gannet.dev.local_services import LocalServices
from gannet.dev.publish import lane_topic, make_task, publish_tasks, upload_image
from gannet.settings import Settings
from gannet.storage import Storage
from gannet.task import Task
from gannet.text import format_table

TENANT_A, TENANT_B = "flood-a", "flood-b"


def committed_at(database_url: str, tenant: str, task_ids: list[str]) -> dict[str, float]:
    """task_id -> commit time (epoch s) of the rows that exist; a failed row is an error
    (the bench's tasks are all good: the daemon's log says what went wrong)."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))
        rows = conn.execute(
            "SELECT task_id, extract(epoch FROM updated_at), status, error_code"
            " FROM task_results WHERE task_id = ANY(%s)",
            (task_ids,),
        ).fetchall()
    failed = [(task_id, code) for task_id, _, status, code in rows if status != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {tenant}'s tasks failed, e.g. {failed[0]}")
    return {task_id: float(at) for task_id, at, _, _ in rows}


def wait_all(settings: Settings, tenant: str, ids: list[str], timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        done = committed_at(settings.database_url, tenant, ids)
        if len(done) == len(ids):
            return done
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tenant}: {len(done)}/{len(ids)} committed after {timeout_s}s")
        time.sleep(0.5)


def trickle(
    settings: Settings, tasks: list[Task], lane: str | None, spacing_s: float
) -> dict[str, float]:
    """Publish one task every `spacing_s`, as a user clicking would; task_id -> publish
    time (taken before the publish call, so the client's own time counts as latency)."""
    publisher, _ = clients.pubsub_clients(settings)
    topic = lane_topic(settings, lane)
    published: dict[str, float] = {}
    for task in tasks:
        published[task.task_id] = time.time()
        publish_tasks(publisher, topic, [task])
        time.sleep(spacing_s)
    return published


def one_run(
    services: LocalServices,
    name: str,
    urls: dict[str, list[str]],
    args: argparse.Namespace,
    *,
    lanes: str,
    bulk: int,
    interactive: int,
    log_path: Path,
) -> dict[str, Any]:
    """A fresh queue (with `lanes`), a fresh daemon; A floods the last lane, B trickles
    into the first. Returns B's latencies and A's throughput."""
    settings = stack.fresh_queue(services, f"flood{name}{uuid.uuid4().hex[:6]}", lanes=lanes)
    names = [lane.name for lane in settings.lane_list()]
    a_lane, b_lane = names[-1], names[0]
    a_urls, b_urls = urls[TENANT_A], urls[TENANT_B]
    a_tasks = [
        make_task(TENANT_A, a_urls[i % len(a_urls)], "DETECTION", f"a-{uuid.uuid4().hex}")
        for i in range(bulk)
    ]
    b_tasks = [
        make_task(TENANT_B, b_urls[i % len(b_urls)], "DETECTION", f"b-{uuid.uuid4().hex}")
        for i in range(interactive)
    ]
    env = {
        **services.env(),
        "GANNET_TOPIC": settings.topic,
        "GANNET_SUBSCRIPTION": settings.subscription,
        "GANNET_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "GANNET_LANES": lanes,
        "GANNET_RUNNERS": str(args.runners),
    }
    daemon = demo.DaemonProcess(env, log_path)
    try:
        daemon.wait_ready()
        publisher, _ = clients.pubsub_clients(settings)
        a_started = time.time()
        if a_tasks:
            publish_tasks(publisher, lane_topic(settings, a_lane), a_tasks)
        b_published: dict[str, float] = {}
        if b_tasks:
            if a_tasks:  # B starts once A's flood is draining, not while it is published
                wait_some(settings, [t.task_id for t in a_tasks], min(20, bulk))
            b_published = trickle(settings, b_tasks, b_lane, args.spacing)
        a_left = len(a_tasks) - len(
            committed_at(settings.database_url, TENANT_A, [t.task_id for t in a_tasks])
        )
        b_done = wait_all(settings, TENANT_B, list(b_published), 900)
        a_done = wait_all(settings, TENANT_A, [t.task_id for t in a_tasks], 3600)
    finally:
        daemon.stop()
    latencies = sorted(b_done[i] - b_published[i] for i in b_published)
    result: dict[str, Any] = {
        "lanes": lanes or "(one subscription)",
        "b_tasks": len(b_done),
        "a_tasks": len(a_done),
    }
    if latencies:
        result["b_latency_s"] = {
            "p50": statistics.median(latencies),
            "p95": percentile(latencies, 95),
            "max": latencies[-1],
        }
    if a_done:
        result["a_images_per_s"] = len(a_done) / (max(a_done.values()) - a_started)
        result["a_left_when_b_was_done"] = a_left
    return result


def wait_some(settings: Settings, ids: list[str], count: int) -> None:
    deadline = time.monotonic() + 600
    while len(committed_at(settings.database_url, TENANT_A, ids)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the flood did not start draining in 600 s")
        time.sleep(0.2)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile (of 20 samples, p95 is the 19th)."""
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def one_round(
    services: LocalServices, urls: dict[str, list[str]], args: argparse.Namespace, n: int
) -> dict[str, Any]:
    logs = args.state_dir / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    plan = [
        ("b_alone", "", 0, args.interactive),
        ("a_alone", args.lanes, args.bulk, 0),
        ("one_subscription", "", args.bulk, args.interactive),
        ("lanes", args.lanes, args.bulk, args.interactive),
    ]
    for name, lanes, bulk, interactive in plan:
        print(f"round {n}: {name} (A {bulk} bulk, B {interactive} interactive) ...", flush=True)
        runs[name] = one_run(
            services,
            name.replace("_", ""),
            urls,
            args,
            lanes=lanes,
            bulk=bulk,
            interactive=interactive,
            log_path=logs / f"flood-{name}.log",
        )
        print(f"  {summary(runs[name])}", flush=True)
    alone_p95 = runs["b_alone"]["b_latency_s"]["p95"]
    a_alone = runs["a_alone"]["a_images_per_s"]
    return {
        "runs": runs,
        "ratios": {
            "lanes_b_p95_vs_alone": runs["lanes"]["b_latency_s"]["p95"] / alone_p95,
            "one_sub_b_p95_vs_alone": runs["one_subscription"]["b_latency_s"]["p95"] / alone_p95,
            "lanes_a_throughput_vs_alone": runs["lanes"]["a_images_per_s"] / a_alone,
        },
    }


def summary(run: dict[str, Any]) -> str:
    parts = []
    if "b_latency_s" in run:
        b = run["b_latency_s"]
        parts.append(f"B p50 {b['p50']:.2f} s, p95 {b['p95']:.2f} s")
    if "a_images_per_s" in run:
        parts.append(f"A {run['a_images_per_s']:.1f} img/s")
    return ", ".join(parts)


def main(args: argparse.Namespace) -> int:
    return bench.run_and_report(args, run, print_report)


def run(services: LocalServices, args: argparse.Namespace) -> dict[str, Any]:
    """Every round on already running services; the report as `main` writes it."""
    base = demo.local_settings(services)
    demo.prepare(services, base)
    storage = Storage(clients.storage_client(base))
    bucket = base.allowed_buckets[0]
    scenes = bench.demo_scenes()
    urls = {  # each tenant's images under its own prefix, as the cheap checks demand
        tenant: [upload_image(storage, bucket, tenant, path, "flood") for path in scenes]
        for tenant in (TENANT_A, TENANT_B)
    }
    report: dict[str, Any] = {
        "bulk": args.bulk,
        "interactive": args.interactive,
        "spacing_s": args.spacing,
        "lanes": args.lanes,
        "runners": args.runners,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "rounds": [one_round(services, urls, args, n) for n in range(1, args.rounds + 1)],
    }
    rounds = report["rounds"]
    report["median_ratios"] = {
        key: statistics.median(r["ratios"][key] for r in rounds) for key in rounds[0]["ratios"]
    }
    return report


def print_report(report: dict[str, Any]) -> None:
    rows = []
    for n, r in enumerate(report["rounds"], 1):
        runs = r["runs"]
        for name in ("b_alone", "a_alone", "one_subscription", "lanes"):
            run = runs[name]
            b = run.get("b_latency_s")
            rows.append(
                [
                    str(n),
                    name.replace("_", " "),
                    f"{b['p50']:.2f}" if b else "",
                    f"{b['p95']:.2f}" if b else "",
                    f"{run['a_images_per_s']:.1f}" if "a_images_per_s" in run else "",
                ]
            )
    print()
    print(format_table(["round", "run", "B p50 s", "B p95 s", "A img/s"], rows))
    m = report["median_ratios"]
    print(
        f"\nlanes {report['lanes']!r}, {report['runners']} runners, A {report['bulk']} bulk, "
        f"B {report['interactive']} interactive every {report['spacing_s']} s"
        f"\nmedian B p95 with lanes / alone = {m['lanes_b_p95_vs_alone']:.2f}   (target <= 2)"
        f"\nmedian B p95 on one subscription / alone = {m['one_sub_b_p95_vs_alone']:.2f}"
        f"\nmedian A img/s with lanes / alone = {m['lanes_a_throughput_vs_alone']:.2f}"
        "   (target >= 0.9)"
    )
