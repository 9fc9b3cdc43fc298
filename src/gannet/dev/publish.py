"""`gannet publish`: what a backend does, as a command: tasks for images, task ids out."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core.exceptions import GoogleAPICallError, RetryError
from google.cloud.storage.retry import DEFAULT_RETRY
from pydantic import ValidationError

from gannet import clients
from gannet.errors import PermanentError
from gannet.settings import Settings
from gannet.storage import Storage, check_image_url
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


def upload_name(tenant: str, path: Path, prefix: str) -> str:
    """The object upload_image writes a local file to: known before it is uploaded."""
    return f"{tenant}/{prefix}/{path.name}"


def upload_image(storage: Storage, bucket: str, tenant: str, path: Path, prefix: str) -> str:
    """A GCS that cannot be reached is given up after about a minute (10 s a connection;
    the library's default retried silently for 120 s), not a slow upload: each request
    may take 60 s (a 25 MB photo at 5 Mbit/s takes 42 s)."""
    name = upload_name(tenant, path, prefix)
    blob = storage.client.bucket(bucket).blob(name)
    blob.upload_from_filename(str(path), timeout=(10, 60), retry=DEFAULT_RETRY.with_timeout(60))
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


# The command's flag for each of the task's fields, to name in an error.
_FLAGS = {
    "tenant_id": "--tenant",
    "pipeline": "--pipeline",
    "session_id": "--session-id",
    "options.confidence_override": "--confidence",
    "callback_url": "--callback-url",
    "task_id": "--task-id-prefix",
    "image_url": "the image",
}


def _publish(settings: Settings, args: argparse.Namespace) -> int:
    try:
        topic = lane_topic(settings, args.lane)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Every task is checked before anything is uploaded or published.
    bucket = settings.allowed_buckets[0]
    uploads: dict[str, Path] = {}
    tasks = []
    for image in args.images:
        url = image
        if not image.startswith("gs://"):
            path = Path(image)
            if not path.is_file():
                print(f"error: {image} is not a file or gs:// URL", file=sys.stderr)
                return 2
            url = f"gs://{bucket}/{upload_name(args.tenant, path, 'uploads')}"
            other = uploads.get(url)
            if other is not None and other.resolve() != path.resolve():
                # One object for both: both tasks would have run on the second's image.
                print(
                    f"error: {other} and {path} would both upload to {url}: rename one",
                    file=sys.stderr,
                )
                return 2
            uploads[url] = path
        try:
            tasks.append(
                make_task(
                    args.tenant,
                    url,
                    args.pipeline,
                    f"{args.task_id_prefix}{uuid.uuid4().hex}",
                    session_id=args.session_id,
                    confidence=args.confidence,
                    callback_url=args.callback_url,
                )
            )
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                print(f"error: {_FLAGS.get(where, where)}: {err['msg']}", file=sys.stderr)
            return 2
        task = tasks[-1]
        try:  # the daemon's own check of the tenant's prefix: it would dead-letter the task
            # Not of the bucket: these settings need not list the deployment's buckets.
            check_image_url(task.image_url, task.tenant_id, [task.image_url.bucket])
        except PermanentError as exc:
            print(f"error: {image}: {exc.code}: {exc.message}", file=sys.stderr)
            return 2
    for variable, host in (
        ("GANNET_PUBSUB_EMULATOR_HOST", settings.pubsub_emulator_host),
        ("GANNET_STORAGE_EMULATOR_HOST", settings.storage_emulator_host),
    ):
        if host and (missing := _nothing_listens(host)):
            # Else the upload gave up after 44 s and the publish after 60, each blaming
            # a bucket or topic that may well exist.
            print(
                f"error: nothing listens on {missing} ({variable}): is `gannet services` "
                "running? It prints the variables to export; nothing was published",
                file=sys.stderr,
            )
            return 2
    publisher, _ = clients.pubsub_clients(settings)
    storage = Storage(clients.storage_client(settings))
    for url, path in uploads.items():
        try:
            upload_image(storage, bucket, args.tenant, path, "uploads")
        except (GoogleAPICallError, RetryError, OSError) as exc:
            print(
                f"error: could not upload {path} to {url} ({_reason(exc)}); check that "
                f"bucket {bucket} exists (the first of GANNET_ALLOWED_BUCKETS), that GCS "
                "can be reached, GANNET_PROJECT and your credentials; nothing was published",
                file=sys.stderr,
            )
            return 2
    futures = [
        (task, publisher.publish(topic, task.model_dump_json(exclude_none=True).encode()))
        for task in tasks
    ]
    failed = 0
    for task, future in futures:  # each accepted task's id is printed, whatever the rest do
        try:
            future.result(timeout=60)
        except (GoogleAPICallError, RetryError, TimeoutError) as exc:
            failed += 1
            print(
                f"error: {task.image_url} was not published to {topic} ({_reason(exc)}); "
                "check that the topic exists (terraform, or `gannet services` locally, "
                "started with the same GANNET_LANES for a lane's topic), "
                "GANNET_PROJECT and your credentials, then publish that image again",
                file=sys.stderr,
                flush=True,
            )
            continue
        print(json.dumps({"task_id": task.task_id, "image_url": task.image_url}), flush=True)
    return 1 if failed else 0


def _nothing_listens(host: str) -> str | None:
    """`host` (host:port, or an http:// URL) when a connection to it is refused."""
    address = urllib.parse.urlsplit(host if "://" in host else f"//{host}")
    try:
        socket.create_connection((address.hostname or "", address.port or 80), timeout=2).close()
    except ConnectionRefusedError:
        return address.netloc
    except OSError:  # a name that does not resolve, a timeout: the clients will say
        return None
    return None


def _reason(exc: BaseException) -> str:
    """The error's own words, or its kind where it has none (a future's TimeoutError)."""
    return str(exc) or type(exc).__name__
