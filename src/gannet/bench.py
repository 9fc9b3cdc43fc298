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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

from gannet import clients, demo, provision
from gannet.local_services import LocalServices, Ports
from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, ModelResolver, yolo_loader
from gannet.outcome import Decision, Processor
from gannet.pipeline import Limits, Pipeline, decode_image
from gannet.pipeline_config import ConfigSource
from gannet.publish import make_task, publish_tasks, upload_image
from gannet.settings import Settings
from gannet.sink import Sink
from gannet.storage import Storage, local_version, read_local
from gannet.task import parse_task

TENANT = "bench-tenant"


def scene_files(count: int) -> list[Path]:
    manifest = json.loads((demo.SAMPLES / "manifest.json").read_text())
    scenes = [demo.SAMPLES / e["file"] for e in manifest["images"] if e.get("kind") != "large"]
    return [scenes[i % len(scenes)] for i in range(count)]


def bare_model(settings: Settings, files: list[Path], batch: int) -> dict[str, float]:
    """(a): the model alone, on images already decoded in memory."""
    from ultralytics import YOLO

    configs = ConfigSource(settings.config_uri, read_local, local_version)
    loaded = configs.current()
    spec = loaded.config.models["detection"]
    model = YOLO(loaded.model_uri(spec))
    images = [decode_image(f.read_bytes(), settings.max_image_pixels) for f in files]
    kwargs = {
        "imgsz": spec.imgsz,
        "conf": spec.confidence_threshold,
        "device": "cpu",
        "verbose": False,
    }
    model.predict(images[0], **kwargs)  # warm-up, not timed
    started = time.perf_counter()
    for image in images:
        model.predict(image, **kwargs)
    single = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        model.predict(images[i : i + batch], **kwargs)
    batched = time.perf_counter() - started
    return {
        "per_image_s": single,
        "batched_s": batched,
        "images_per_s": len(images) / single,
        "batched_images_per_s": len(images) / batched,
    }


def daemon_end_to_end(
    services: LocalServices, settings: Settings, urls: list[str], runners: int, log_path: Path
) -> dict[str, float]:
    """(b): `gannet run` as a pod runs it, fed through the emulator."""
    tasks = [make_task(TENANT, url, "DETECTION", f"b-{uuid.uuid4().hex}") for url in urls]
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
        started = time.perf_counter()
        publish_tasks(publisher, settings.topic_path(), tasks)
        rows = demo.wait_for_rows(
            settings.database_url,
            {TENANT: [t.task_id for t in tasks]},
            timeout_s=600,
            progress=False,
        )
        elapsed = time.perf_counter() - started
    finally:
        daemon.stop()
    failed = sum(r["status"] != "succeeded" for r in rows.values())
    if len(rows) != len(tasks) or failed:
        raise RuntimeError(
            f"daemon finished {len(rows)}/{len(tasks)} ({failed} failed); see {log_path}"
        )
    return {"seconds": elapsed, "images_per_s": len(tasks) / elapsed}


def one_at_a_time(settings: Settings, urls: list[str]) -> dict[str, float]:
    """(c): the simplest correct worker: pull one, process, write, ack, repeat."""
    publisher, subscriber = clients.pubsub_clients(settings)
    storage = Storage(clients.storage_client(settings))
    sink = Sink(settings.database_url, pool_size=2)
    sink.open()
    metrics = Metrics()
    configs = ConfigSource(settings.config_uri, read_local, local_version)
    cache = ModelCache(
        yolo_loader(lambda uri, version: Path(uri)), metrics, max_batch=1, window_s=0.0
    )
    pipeline = Pipeline(
        configs,
        storage,
        cache,
        ModelResolver(local_version),
        Limits(settings.allowed_buckets, settings.max_image_bytes, settings.max_image_pixels),
    )
    processor = Processor(pipeline, sink, storage, settings.results_bucket, metrics)
    pipeline.warm(["cpu"])
    tasks = [make_task(TENANT, url, "DETECTION", f"c-{uuid.uuid4().hex}") for url in urls]
    publish_tasks(publisher, settings.topic_path(), tasks)
    path = settings.subscription_path()
    done = 0
    started = time.perf_counter()
    try:
        while done < len(tasks):
            response = subscriber.pull(
                request={"subscription": path, "max_messages": 1}, timeout=30
            )
            for received in response.received_messages:
                task = parse_task(received.message.data, settings.max_body_bytes)
                loaded = pipeline.check(task)
                outcome = processor.process(task, loaded, received.delivery_attempt, "cpu")
                if outcome.decision is not Decision.ACK:
                    raise RuntimeError(f"one-at-a-time worker failed: {outcome.error}")
                subscriber.acknowledge(request={"subscription": path, "ack_ids": [received.ack_id]})
                done += 1
        elapsed = time.perf_counter() - started
    finally:
        cache.close()
        sink.close()
    return {"seconds": elapsed, "images_per_s": len(tasks) / elapsed}


def fresh_queue(services: LocalServices, name: str, ack_deadline_s: int = 30) -> Settings:
    """Settings with a topic, subscription and dead-letter topic of their own, created."""
    settings = demo.local_settings(
        services,
        topic=f"{name}-tasks",
        subscription=f"{name}-tasks-sub",
        dead_letter_topic=f"{name}-dead",
    )
    publisher, subscriber = clients.pubsub_clients(settings)
    provision.ensure_pubsub(settings, publisher, subscriber, ack_deadline_s=ack_deadline_s)
    return settings


def main(args: argparse.Namespace) -> int:
    files = scene_files(args.images)
    ports = Ports(args.pubsub_port, args.gcs_port, args.postgres_port)
    state = args.state_dir / "bench"
    report: dict[str, Any] = {
        "images": len(files),
        "runners": args.runners,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    with LocalServices(state, ports) as services:
        base = demo.local_settings(services)
        demo.prepare(services, base)
        storage = Storage(clients.storage_client(base))
        uploaded = {
            f: upload_image(storage, base.allowed_buckets[0], TENANT, f, "bench")
            for f in set(files)
        }
        urls = [uploaded[f] for f in files]

        print(f"(a) bare model on {len(files)} decoded images ...", flush=True)
        report["bare_model"] = bare_model(base, files, base.batch_size)
        print("(c) one-message-at-a-time worker ...", flush=True)
        report["one_at_a_time"] = one_at_a_time(fresh_queue(services, "bench-c"), urls)
        print(f"(b) daemon end to end with {args.runners} runners ...", flush=True)
        report["daemon"] = daemon_end_to_end(
            services, fresh_queue(services, "bench-b"), urls, args.runners, state / "daemon.log"
        )

    a = report["bare_model"]["images_per_s"]
    b = report["daemon"]["images_per_s"]
    c = report["one_at_a_time"]["images_per_s"]
    report["ratios"] = {
        "daemon_vs_bare_model": b / a,
        "daemon_vs_bare_model_batched": b / report["bare_model"]["batched_images_per_s"],
        "daemon_vs_one_at_a_time": b / c,
    }
    print()
    print(
        demo.format_table(
            ["measurement", "images/s"],
            [
                ["(a) bare model, one image per call", f"{a:.2f}"],
                [
                    f"    bare model, batches of {base.batch_size}",
                    f"{report['bare_model']['batched_images_per_s']:.2f}",
                ],
                ["(b) daemon end to end", f"{b:.2f}"],
                ["(c) one message at a time", f"{c:.2f}"],
            ],
        )
    )
    r = report["ratios"]
    print(
        f"\nb/a = {r['daemon_vs_bare_model']:.2f}   (target >= 0.9)"
        f"\nb/a(batched) = {r['daemon_vs_bare_model_batched']:.2f}"
        f"\nb/c = {r['daemon_vs_one_at_a_time']:.2f}   (target >= 1.3)"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nJSON report: {args.output}")
    return 0
