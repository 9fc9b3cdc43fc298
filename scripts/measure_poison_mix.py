#!/usr/bin/env python3
"""What a flood of poison costs the valid tasks beside it.

The bar set for it: a poison message is quarantined with a reason and never slows the
daemon (README, Outcomes, gives what this measured). Each poison message here (a body
that is not JSON) is parsed on its callback thread, published to the dead-letter topic
and acked; it never takes a runner, but it holds a slot of the stream's lease until its
ack has gone out, and its parsing, publishing and acking take CPU and the GIL beside the
valid tasks'.

The daemon runs as `gannet bench --plumbing` runs it (the network's answers replayed,
the demo detector at imgsz 640, 640x480 photos, 4 runners, both cores), on a topic of
its own per measurement. Each measurement publishes `--tasks` valid tasks, either alone or
with poison messages spread evenly among them, `--share` of all the messages (0.5: one
after every valid task), and times the valid ones from the first publish to the last
committed row. The two kinds of run take turns, a few rounds, since this VM drifts from
minute to minute; with `--baseline REV`, that commit's daemon too, the two in turns. It
also prints the daemon's and the Pub/Sub emulator's CPU per poison message.

    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_poison_mix.py [--tasks 2000]
        [--rounds 2] [--share 0.5] [--leased N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from gannet import clients
from gannet.dev import bench_plumbing, demo, stack
from gannet.dev.bench import TENANT, cpu_seconds, wait_committed
from gannet.dev.local_services import LocalServices, Ports
from gannet.dev.publish import make_task, publish_tasks, upload_image
from gannet.settings import REPO_ROOT
from gannet.storage import Storage

POISON = b'{"tenant_id": "not JSON'


def dead_lettered(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    prefix = 'gannet_messages_total{outcome="quarantined"}'
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


@dataclass(frozen=True)
class Run:
    valid_per_s: float  # from the first publish to the last valid task's commit
    poison: int
    daemon_cpu_s: float  # until every message is settled
    pubsub_cpu_s: float  # the emulator's, the same span


def measure(
    services: LocalServices,
    src: Path,
    config: Path,
    urls: list[str],
    share: float,
    log: Path,
    leased: int | None = None,
) -> Run:
    """The valid tasks `urls`, with poison as `share` of all the messages, for the daemon
    of the `src` tree."""
    queue = stack.fresh_queue(services, f"px-{uuid.uuid4().hex[:8]}")
    env = bench_plumbing.daemon_env(services, queue, config, src, 4, leased)
    daemon = demo.DaemonProcess(env, log, command=bench_plumbing.replay_command("0,1"))
    publisher, _ = clients.pubsub_clients(queue)
    try:
        daemon.wait_ready(timeout_s=300)
        warm = [make_task(TENANT, u, "DETECTION", f"w-{uuid.uuid4().hex}") for u in set(urls)]
        publish_tasks(publisher, queue.topic_path(), warm)  # records the network's answers
        wait_committed(queue.database_url, TENANT, [t.task_id for t in warm], timeout_s=300)
        tasks = [make_task(TENANT, u, "DETECTION", f"p-{uuid.uuid4().hex}") for u in urls]
        total_poison = round(len(tasks) * share / (1 - share))
        futures, poison = [], 0
        pids = {"daemon": daemon.proc.pid, "pubsub": services.pids()["pubsub"]}
        cpu_before = cpu_seconds(pids)
        started = time.time()
        for i, task in enumerate(tasks, 1):
            body = task.model_dump_json(exclude_none=True).encode()
            futures.append(publisher.publish(queue.topic_path(), body))
            while poison < total_poison * i // len(tasks):
                futures.append(publisher.publish(queue.topic_path(), POISON))
                poison += 1
        for future in futures:
            future.result(timeout=60)
        ids = [t.task_id for t in tasks]
        finished, failed = wait_committed(queue.database_url, TENANT, ids, timeout_s=900)
        deadline = time.monotonic() + 60
        while dead_lettered(daemon.metrics_port) < poison and time.monotonic() < deadline:
            time.sleep(0.2)
        cpu = cpu_seconds(pids)
        if failed or dead_lettered(daemon.metrics_port) < poison:
            raise RuntimeError(f"a task failed or a poison message was not dead-lettered: {log}")
        return Run(
            len(tasks) / (finished - started),
            poison,
            cpu["daemon"] - cpu_before["daemon"],
            cpu["pubsub"] - cpu_before["pubsub"],
        )
    finally:
        bench_plumbing.stop_daemon(daemon, "daemon")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="valid tasks per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--share", type=float, default=0.5, help="poison's share of messages")
    parser.add_argument("--leased", type=int, help="GANNET_MAX_MESSAGES (default: the daemon's)")
    parser.add_argument("--baseline", metavar="REV", help="also measure this commit's daemon")
    args = parser.parse_args()
    if not 0 < args.share < 1:
        parser.error("--share: poison's share of all the messages, between 0 and 1")
    state = Path(tempfile.mkdtemp(prefix="gannet-poison-"))
    config = bench_plumbing.write_config(state)
    # This tree from a copy taken now, as the plumbing bench runs it.
    trees = {"this tree": state / "this-tree" / "src"}
    shutil.copytree(REPO_ROOT / "src", trees["this tree"])
    if args.baseline:
        trees = {args.baseline: bench_plumbing.baseline_src(args.baseline, state), **trees}
    runs: dict[tuple[str, float], list[Run]] = {}
    with LocalServices(state / "services", Ports.free()) as services:
        base = demo.local_settings(services)
        demo.prepare(services, base)
        storage = Storage(clients.storage_client(base))
        files = bench_plumbing.images_for("640x480", state / "images")
        uploaded = [upload_image(storage, base.allowed_buckets[0], TENANT, f, "p") for f in files]
        urls = [uploaded[i % len(uploaded)] for i in range(args.tasks)]
        for n in range(1, args.rounds + 1):
            names = list(trees) if n % 2 else list(trees)[::-1]  # in turns, as the bench
            for name in names:
                for share in (0.0, args.share) if n % 2 else (args.share, 0.0):
                    log = state / f"daemon-{n}-{list(trees).index(name)}-{share}.log"
                    run = measure(services, trees[name], config, urls, share, log, args.leased)
                    runs.setdefault((name, share), []).append(run)
                    print(
                        f"round {n}, {name}, poison {run.poison}: {run.valid_per_s:.1f} valid/s",
                        flush=True,
                    )
    for name in trees:
        report(name, runs[name, 0.0], runs[name, args.share], args.tasks)


def report(name: str, clean: list[Run], mixed: list[Run], tasks: int) -> None:
    """Medians over the rounds. A poison message's CPU: a mixed run's, less its valid
    tasks' at the runs without poison's rate."""
    rate, rate_mixed = (statistics.median(r.valid_per_s for r in rs) for rs in (clean, mixed))
    print(f"{name}: valid tasks/s {rate:.1f} alone, {rate_mixed:.1f} beside poison", end="")
    print(f" ({rate_mixed / rate:.2f}x)")
    for process in ("daemon", "pubsub"):
        valid = statistics.median(getattr(r, f"{process}_cpu_s") for r in clean) / tasks
        poison = statistics.median(
            (getattr(r, f"{process}_cpu_s") - valid * tasks) / r.poison for r in mixed
        )
        print(
            f"  {process} CPU ms per valid task {valid * 1000:.2f}, per poison {poison * 1000:.2f}"
        )


if __name__ == "__main__":
    main()
