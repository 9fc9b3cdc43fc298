"""`gannet publish`: what a backend does, as a command: tasks for images, task ids out."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1

from gannet import clients
from gannet.settings import Settings
from gannet.storage import Storage
from gannet.task import Task
from gannet.tracing import Tracing


def make_task(
    tenant: str,
    image_url: str,
    pipeline: str,
    task_id: str | None = None,
    **optional: Any,
) -> Task:
    """A validated task, so a publisher learns about a bad field before Gannet does."""
    options = {}
    if optional.get("confidence") is not None:
        options["confidence_override"] = optional.pop("confidence")
    optional.pop("confidence", None)
    fields = {k: v for k, v in optional.items() if v is not None}
    return Task(
        task_id=task_id or uuid.uuid4().hex,
        tenant_id=tenant,
        image_url=image_url,
        pipeline=pipeline,
        options=options,
        **fields,
    )


def publish_tasks(
    publisher: pubsub_v1.PublisherClient, topic_path: str, tasks: list[Task]
) -> list[str]:
    """Publish and wait for the server to accept each; returns the message ids."""
    futures = [
        publisher.publish(topic_path, task.model_dump_json(exclude_none=True).encode())
        for task in tasks
    ]
    return [f.result(timeout=60) for f in futures]


def upload_image(storage: Storage, bucket: str, tenant: str, path: Path, prefix: str) -> str:
    name = f"{tenant}/{prefix}/{path.name}"
    storage.client.bucket(bucket).blob(name).upload_from_filename(str(path))
    return f"gs://{bucket}/{name}"


def main(settings: Settings, args: argparse.Namespace) -> int:
    # With GANNET_TRACE_EXPORTER set, each task starts a trace here that the daemon
    # continues, as a traced backend's would.
    tracing = Tracing.from_settings(settings, "gannet-publish")
    try:
        return _publish(settings, args)
    finally:
        if tracing is not None:
            tracing.shutdown()


def lane_topic(settings: Settings, lane: str | None) -> str:
    """The topic path of a lane of GANNET_LANES (None: the first); ValueError names them."""
    return settings.path("topics", settings.lane(lane).topic)


def _publish(settings: Settings, args: argparse.Namespace) -> int:
    try:
        topic = lane_topic(settings, args.lane)
    except ValueError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    publisher, _ = clients.pubsub_clients(settings)
    storage = Storage(clients.storage_client(settings))
    tasks = []
    for image in args.images:
        if image.startswith("gs://"):
            url = image
        else:
            path = Path(image)
            if not path.is_file():
                print(f"error: {image} is not a file or gs:// URL", flush=True)
                return 2
            url = upload_image(storage, settings.allowed_buckets[0], args.tenant, path, "uploads")
        task_id = f"{args.task_id_prefix}{uuid.uuid4().hex}"
        tasks.append(
            make_task(
                args.tenant,
                url,
                args.pipeline,
                task_id,
                session_id=args.session_id,
                confidence=args.confidence,
                callback_url=args.callback_url,
            )
        )
    publish_tasks(publisher, topic, tasks)
    for task in tasks:
        print(json.dumps({"task_id": task.task_id, "image_url": task.image_url}))
    return 0
