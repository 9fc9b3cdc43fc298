"""`gannet bench`: how close the daemon gets to the bare model, measured side by side.

In one run, on the same images and the same model:
  (a) bare model: decoded images straight into `model.predict`, one image per call (and,
      for reference, in batches of the daemon's batch size);
  (b) the daemon end to end: publish -> Pub/Sub emulator -> `gannet run` -> GCS emulator
      -> PostgreSQL, timed from the first publish to the last committed row;
  (c) a one-message-at-a-time worker: pull one message, run the same pipeline, write the
      same result, ack, repeat.
It prints b/a and b/c and writes everything as JSON. Absolute numbers depend on the
machine; the ratios are what the daemon's design is responsible for.

A shared VM's speed drifts by 10-20 % from minute to minute, so one pass of each can
mislead: `--rounds` repeats (a), (c), (b) back to back and reports each round's ratios
and their median. During (b) it also counts the CPU every process spent per image, because
on a small machine the emulators share the cores that (a) has to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import psycopg

from gannet import clients, daemon
from gannet.config_sources import ConfigSource
from gannet.dev import demo, stack
from gannet.dev.local_services import LocalServices, Ports
from gannet.dev.publish import make_task, publish_tasks, upload_image
from gannet.metrics import Metrics
from gannet.model_cache import _precision
from gannet.outcome import Decision
from gannet.pipeline import decode_image
from gannet.pool import resolve_devices
from gannet.settings import Settings
from gannet.storage import Storage, local_version, read_local
from gannet.text import format_table

TENANT = "bench-tenant"


def demo_scenes() -> list[Path]:
    """The demo's 640x480 sample scenes (not the large image meant for slicing)."""
    manifest = json.loads((demo.SAMPLES / "manifest.json").read_text())
    return [demo.SAMPLES / e["file"] for e in manifest["images"] if e.get("kind") != "large"]


def scene_files(count: int) -> list[Path]:
    scenes = demo_scenes()
    return [scenes[i % len(scenes)] for i in range(count)]


def bare_model(settings: Settings, files: list[Path], batch: int, device: str) -> dict[str, float]:
    """(a): the model alone, on images already decoded in memory, as ultralytics runs it
    out of the box. For reference, also in batches, and with the daemon's traced forward
    pass (traced.py), so a reader can tell the daemon's plumbing from its model speed-up.
    On the daemon's device, at its precision (FP16 on CUDA): against a model on the CPU,
    a daemon on a GPU would look several times faster than the bare model."""
    from ultralytics.models import YOLO

    from gannet.traced import trace_forward

    configs = ConfigSource(settings.config_uri, read_local, local_version)
    loaded = configs.current()
    spec = loaded.config.models["detection"]
    model = YOLO(loaded.model_uri(spec))
    images = [decode_image(f.read_bytes(), settings.max_image_pixels) for f in files]
    kwargs: dict[str, Any] = {
        "imgsz": spec.imgsz,
        "conf": spec.confidence_threshold,
        "device": device,
        "verbose": False,
        **_precision(device),
    }

    def per_image() -> float:
        model.predict(images[0], **kwargs)  # warm-up, not timed
        started = time.perf_counter()
        for image in images:
            model.predict(image, **kwargs)
        return time.perf_counter() - started

    single = per_image()
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        model.predict(images[i : i + batch], **kwargs)
    batched = time.perf_counter() - started
    report = {
        "per_image_s": single,
        "batched_s": batched,
        "images_per_s": len(images) / single,
        "batched_images_per_s": len(images) / batched,
    }
    if trace_forward(model, spec.imgsz, device, half=device.startswith("cuda")):
        report["traced_images_per_s"] = len(images) / per_image()
    return report


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU of each named process and its live descendants, so far.

    Only this process is counted without its descendants: they are the others."""
    totals: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            root = psutil.Process(pid)
            procs = [root] if pid == os.getpid() else [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        totals[name] = total
    return totals


def cpu_ms_per_image(
    before: dict[str, float], after: dict[str, float], images: int
) -> dict[str, float]:
    """Each named process's CPU ms per image between two cpu_seconds() readings."""
    return {name: (after[name] - before.get(name, 0.0)) * 1000 / images for name in after}


def wait_committed(
    database_url: str, tenant: str, task_ids: list[str], timeout_s: float
) -> tuple[float, int]:
    """(wall-clock time of the last commit, failed rows) once every task has a row.

    The end time comes from the rows' own updated_at, not from when a poll noticed, so
    the poll can be slow and cheap: it shares the machine with what it measures.
    """
    deadline = time.monotonic() + timeout_s
    done = 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            with conn.transaction():
                conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))
                row = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE status <> 'succeeded'),"
                    " extract(epoch FROM max(updated_at))"
                    " FROM task_results WHERE task_id = ANY(%s)",
                    (task_ids,),
                ).fetchone()
            assert row is not None
            done, failed, last = row
            if done >= len(task_ids):
                return float(last), int(failed)
            time.sleep(0.5)
    raise RuntimeError(f"only {done}/{len(task_ids)} tasks had a row after {timeout_s:.0f}s")


def shares_by_worker(database_url: str, tenant: str, task_ids: list[str]) -> list[float]:
    """The share of `task_ids` each worker process committed, largest first (a committed
    task keeps its claim, with its worker as holder)."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))
        rows = conn.execute(
            "SELECT count(*) FROM task_claims WHERE task_id = ANY(%s) GROUP BY holder",
            (task_ids,),
        ).fetchall()
    return sorted((count / len(task_ids) for (count,) in rows), reverse=True)


def daemon_end_to_end(
    services: LocalServices,
    settings: Settings,
    urls: list[str],
    runners: int,
    log_path: Path,
    prefix: str = "b",
) -> dict[str, Any]:
    """(b): `gannet run` as a pod runs it, fed through the emulator."""
    tasks = [make_task(TENANT, url, "DETECTION", f"{prefix}-{uuid.uuid4().hex}") for url in urls]
    env = {
        **services.env(),
        "GANNET_RUNNERS": str(runners),
        "GANNET_TOPIC": settings.topic,
        "GANNET_SUBSCRIPTION": settings.subscription,
        "GANNET_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
    }
    daemon = demo.DaemonProcess(env, log_path)
    try:
        daemon.wait_ready()
        publisher, _ = clients.pubsub_clients(settings)
        pids = {"daemon": daemon.proc.pid, **services.pids(), "bench": os.getpid()}
        cpu_before = cpu_seconds(pids)
        started = time.time()
        publish_tasks(publisher, settings.topic_path(), tasks)
        finished, failed = wait_committed(
            settings.database_url, TENANT, [t.task_id for t in tasks], timeout_s=600
        )
        cpu_after = cpu_seconds(pids)
    finally:
        daemon.stop()
    if failed:
        raise RuntimeError(f"{failed} of {len(tasks)} daemon tasks failed; see {log_path}")
    elapsed = finished - started
    per_image = cpu_ms_per_image(cpu_before, cpu_after, len(tasks))
    cpu_ms = {name: round(ms, 2) for name, ms in per_image.items()}
    return {
        "seconds": elapsed,
        "images_per_s": len(tasks) / elapsed,
        "cpu_ms_per_image": cpu_ms,
        "cores_busy": round(sum(cpu_ms.values()) * len(tasks) / 1000 / elapsed, 2),
    }


def one_at_a_time(settings: Settings, urls: list[str]) -> dict[str, float]:
    """(c): the simplest correct worker: pull one, process, write, ack, repeat.

    Built by the daemon's own `build`, so (b) and (c) differ only in how messages reach
    the pipeline: streaming pull and runners, or one synchronous pull at a time."""
    one = settings.model_copy(update={"runners": 1, "batch_size": 1, "batch_window_ms": 0.0})
    parts = daemon.build(one, Metrics())
    dispatcher = parts.dispatcher
    device = parts.devices[0]
    parts.pipeline.warm([device])
    tasks = [make_task(TENANT, url, "DETECTION", f"c-{uuid.uuid4().hex}") for url in urls]
    publish_tasks(parts.publisher, settings.topic_path(), tasks)
    subscriber, path = parts.subscriber_client, settings.subscription_path()
    done = 0
    started = time.perf_counter()
    try:
        while done < len(tasks):
            response = subscriber.pull(
                request={"subscription": path, "max_messages": 1}, timeout=30
            )
            for received in response.received_messages:
                outcome = dispatcher.outcome_here(
                    received.message.data, received.delivery_attempt, device
                )
                if outcome.decision is not Decision.ACK:
                    raise RuntimeError(f"one-at-a-time worker failed: {outcome.error}")
                subscriber.acknowledge(request={"subscription": path, "ack_ids": [received.ack_id]})
                done += 1
        elapsed = time.perf_counter() - started
    finally:
        parts.callbacks.close(timeout_s=0.0)
        parts.close(timeout_s=30.0)
    return {"seconds": elapsed, "images_per_s": len(tasks) / elapsed}


def upload_fresh(services: LocalServices, settings: Settings, files: list[Path]) -> list[str]:
    """The images' gs:// URLs, in an otherwise empty GCS emulator (see `empty_storage`)."""
    services.empty_storage()
    storage = Storage(clients.storage_client(settings))
    bucket = settings.allowed_buckets[0]
    uploaded = {f: upload_image(storage, bucket, TENANT, f, "bench") for f in set(files)}
    return [uploaded[f] for f in files]


def one_round(
    services: LocalServices, base: Settings, files: list[Path], args: Any, n: int, device: str
) -> dict[str, Any]:
    """(a), (c) and (b) back to back, each on a fresh queue, and their ratios."""
    state = args.state_dir / "bench"
    print(f"round {n}: (a) bare model on {len(files)} decoded images ...", flush=True)
    bare = bare_model(base, files, base.batch_size, device)
    print(f"round {n}: (c) one-message-at-a-time worker ...", flush=True)
    urls = upload_fresh(services, base, files)
    single = one_at_a_time(stack.fresh_queue(services, f"bench-c{n}"), urls)
    print(f"round {n}: (b) daemon end to end with {args.runners} runners ...", flush=True)
    daemon = daemon_end_to_end(
        services,
        stack.fresh_queue(services, f"bench-b{n}"),
        upload_fresh(services, base, files),
        args.runners,
        state / "daemon.log",
        prefix=f"b{n}",
    )
    a, b, c = bare["images_per_s"], daemon["images_per_s"], single["images_per_s"]
    return {
        "bare_model": bare,
        "one_at_a_time": single,
        "daemon": daemon,
        "ratios": {
            "daemon_vs_bare_model": b / a,
            "daemon_vs_bare_model_batched": b / bare["batched_images_per_s"],
            "daemon_vs_bare_model_traced": b / bare.get("traced_images_per_s", a),
            # Against whichever bare figure is highest: the model alone at its best.
            "daemon_vs_best_bare_model": b
            / max(a, bare["batched_images_per_s"], bare.get("traced_images_per_s", a)),
            "daemon_vs_one_at_a_time": b / c,
        },
    }


def main(args: argparse.Namespace) -> int:
    return run_and_report(args, run, print_report)


def run_and_report(
    args: argparse.Namespace,
    run: Callable[[LocalServices, argparse.Namespace], dict[str, Any]],
    print_report: Callable[[dict[str, Any]], None],
) -> int:
    """A bench's rounds on services of its own; the report printed and written as JSON."""
    ports = Ports(args.pubsub_port, args.gcs_port, args.postgres_port)
    with LocalServices(args.state_dir / "bench", ports) as services:
        report = run(services, args)
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nJSON report: {args.output}")
    return 0


def run(services: LocalServices, args: argparse.Namespace) -> dict[str, Any]:
    """Every round on already running services; the report as `main` writes it."""
    files = scene_files(args.images)
    base = demo.local_settings(services)
    demo.prepare(services, base)
    # The device the daemon's runners use (its GANNET_DEVICES, `auto` by default): the
    # bare model runs there too.
    device = resolve_devices(base.devices)[0]
    report: dict[str, Any] = {
        "images": len(files),
        "runners": args.runners,
        "rounds": [],
        "batch_size": base.batch_size,
        "device": device,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    for n in range(1, args.rounds + 1):
        report["rounds"].append(one_round(services, base, files, args, n, device))
    rounds = report["rounds"]
    report["median_ratios"] = {
        key: statistics.median(r["ratios"][key] for r in rounds) for key in rounds[0]["ratios"]
    }
    return report


def print_report(report: dict[str, Any]) -> None:
    rounds = report["rounds"]
    median = report["median_ratios"]
    print()
    print(
        format_table(
            [
                "round",
                "(a) bare, 1/call",
                f"bare, batch {report['batch_size']}",
                "bare, traced",
                "(b) daemon",
                "(c) one at a time",
                "b/a",
                "b/c",
            ],
            [
                [
                    str(n),
                    f"{r['bare_model']['images_per_s']:.2f}",
                    f"{r['bare_model']['batched_images_per_s']:.2f}",
                    f"{r['bare_model'].get('traced_images_per_s', 0):.2f}",
                    f"{r['daemon']['images_per_s']:.2f}",
                    f"{r['one_at_a_time']['images_per_s']:.2f}",
                    f"{r['ratios']['daemon_vs_bare_model']:.2f}",
                    f"{r['ratios']['daemon_vs_one_at_a_time']:.2f}",
                ]
                for n, r in enumerate(rounds, 1)
            ],
        )
    )
    print(f"(images/s; the model on {report.get('device', 'cpu')} in (a), (b) and (c))")
    cpu = sorted(rounds[-1]["daemon"]["cpu_ms_per_image"].items(), key=lambda kv: -kv[1])
    print(
        "\nCPU per image during (b), last round: "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in cpu)
        + f" ({rounds[-1]['daemon']['cores_busy']:.2f} of {os.cpu_count()} cores busy)"
    )
    print(
        f"\nmedian b/a = {median['daemon_vs_bare_model']:.2f}"
        f"\nmedian b/a(best bare: per call, batched or traced) = "
        f"{median['daemon_vs_best_bare_model']:.2f}   (target >= 0.9)"
        f"\nmedian b/a(batched) = {median['daemon_vs_bare_model_batched']:.2f}"
        f"\nmedian b/a(traced) = {median['daemon_vs_bare_model_traced']:.2f}"
        f"\nmedian b/c = {median['daemon_vs_one_at_a_time']:.2f}   (target >= 1.3)"
    )
