"""`gannet demo` and `gannet services`: the whole path of a message on one machine.

The demo starts the local services, publishes one task per sample image, runs the real
daemon (`gannet run`, as a child process) until every task has a row, prints what came
out next to what the images are known to contain, and stops everything again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from gannet import clients, sink
from gannet.dev import provision
from gannet.dev.local_services import LocalServices, Ports, free_ports
from gannet.dev.publish import make_task, publish_tasks, upload_image
from gannet.dev.trace_receiver import TraceReceiver, format_tree, task_trace
from gannet.settings import REPO_ROOT, Settings
from gannet.storage import Storage
from gannet.task import Task
from gannet.text import format_table
from gannet.tracing import Tracing

SAMPLES = REPO_ROOT / "samples"
DEMO_TENANT = "demo-tenant"


DEMO_FARM = "demo-farm"  # agro tenant in configs/deployment.yaml
DEMO_SHOP = "demo-shop"  # vending tenant in configs/deployment.yaml
DEPLOYMENT_CONFIG = REPO_ROOT / "configs" / "deployment.yaml"


@dataclass(frozen=True)
class DemoTask:
    """One demo task and what its image is known to contain."""

    image: str
    pipeline: str
    config: str
    tenant: str
    expected: dict[str, int]
    expected_segments: int | None = None  # patches, when the pipeline segments
    expected_labels: dict[str, int] | None = None  # colours, when it classifies


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def demo_tasks(manifest: dict[str, Any]) -> list[DemoTask]:
    """DETECTION on every scene (demo industry), then the agro and vending pipelines."""
    scenes = [e for e in manifest["images"] if e.get("kind", "scene") != "large"]
    large = [e for e in manifest["images"] if e.get("kind") == "large"]
    tasks = [
        DemoTask(e["file"], "DETECTION", "demo.yaml", DEMO_TENANT, _nonzero(e["counts"]))
        for e in scenes
    ]
    tasks += [
        DemoTask(
            e["file"],
            "FULL_PIPELINE",
            "agro.yaml",
            DEMO_FARM,
            _nonzero(e["counts"]),
            expected_segments=len(e["patches"]),
        )
        for e in scenes
        if e["patches"]
    ]
    tasks += [
        DemoTask(e["file"], "FIELD_ANALYSIS", "agro.yaml", DEMO_FARM, _nonzero(e["counts"]))
        for e in large
    ]
    tasks += [
        DemoTask(
            e["file"],
            "SHELF_AUDIT",
            "vending.yaml",
            DEMO_SHOP,
            _nonzero(e["counts"]),
            expected_segments=len(e["patches"]),
            expected_labels=_nonzero(e["color_counts"]),
        )
        for e in scenes
        if e["shapes"]
    ]
    return tasks


def check_result(item: DemoTask, result: dict[str, Any]) -> tuple[dict[str, int], str, bool]:
    """(counts, what else was found as text, whether everything matches the manifest)."""
    got = {k: v for k, v in result_counts(result, item.pipeline).items() if v}
    ok = got == item.expected
    extra = []
    if item.expected_segments is not None:
        segments = len((result.get("segmentation") or {}).get("segments", []))
        ok = ok and segments == item.expected_segments
        extra.append(f"segments={segments}")
        coverage = (result.get("estimation") or {}).get("coverage_percent")
        if coverage is not None:
            extra.append(f"cover={coverage:.1f}%")
    if item.expected_labels is not None:
        labels = (result.get("classification") or {}).get("counts", {})
        ok = ok and labels == item.expected_labels
        extra.append(counts_text(labels))
    return got, " ".join(extra), ok


def expected_text(item: DemoTask) -> str:
    parts = [counts_text(item.expected)]
    if item.expected_segments is not None:
        parts.append(f"segments={item.expected_segments}")
    if item.expected_labels is not None:
        parts.append(counts_text(item.expected_labels))
    return " ".join(parts)


def local_settings(services: LocalServices, **overrides: Any) -> Settings:
    return Settings(
        project=services.project,
        pubsub_emulator_host=services.pubsub_host,
        storage_emulator_host=services.gcs_endpoint,
        database_url=services.database_url,
        owner_database_url=services.owner_url,
        **overrides,
    )


def prepare(services: LocalServices, settings: Settings, ack_deadline_s: int = 30) -> None:
    """Schema, topics, subscriptions and buckets, as terraform would in the cloud."""
    sink.migrate_as_configured(settings.database_url, settings.owner_database_url)
    publisher, subscriber = clients.pubsub_clients(settings)
    provision.ensure_pubsub(settings, publisher, subscriber, ack_deadline_s=ack_deadline_s)
    provision.ensure_buckets(
        clients.storage_client(settings), [*settings.allowed_buckets, settings.results_bucket]
    )


class DaemonProcess:
    """`gannet run` as a child process, the way a pod runs it."""

    def __init__(
        self, env: dict[str, str], log_path: Path, command: list[str] | None = None
    ) -> None:
        """`command` replaces `python -m gannet run` (the bench's plumbing mode)."""
        self.log_path = log_path
        env = {**os.environ, **env}
        processes = int(env.get("GANNET_PROCESSES") or 1)  # each its own port after ours
        self.metrics_port = int(
            env.get("GANNET_METRICS_PORT") or free_ports(1 + processes if processes > 1 else 1)
        )
        env = {
            **env,
            "GANNET_METRICS_PORT": str(self.metrics_port),
            "PYTHONUNBUFFERED": "1",
        }
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        # Where this process's lines start: a log shared by runs (a bench's rounds, the
        # demo's state dir) is appended to, and its earlier lines are not this run's.
        self._log_from = self._log.tell()
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "gannet", "run"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gannet run exited with {self.proc.returncode}; "
                    f"see {self.log_path}:\n{self.tail()}"
                )
            try:
                url = f"http://127.0.0.1:{self.metrics_port}/readyz"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gannet run not ready after {timeout_s}s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Its exit code. subprocess.TimeoutExpired when it did not exit within
        `timeout_s`, once it is killed: a daemon that ignored the signal must not outlive
        the command that started it."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log.close()

    def _own_log(self) -> list[str]:
        with self.log_path.open("rb") as log:
            log.seek(self._log_from)
            return log.read().decode(errors="replace").splitlines()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self._own_log()[-lines:])

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self._own_log():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return entries


def fetch_rows(database_url: str, tenant: str, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Rows as the tenant sees them (RLS), keyed by task id."""
    with psycopg.connect(database_url) as conn:
        return _tenant_rows(conn, tenant, task_ids)


def _tenant_rows(
    conn: psycopg.Connection[Any], tenant: str, task_ids: list[str]
) -> dict[str, dict[str, Any]]:
    with conn.transaction():
        conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))
        cur = conn.cursor(row_factory=dict_row)
        cur.execute("SELECT * FROM task_results WHERE task_id = ANY(%s)", (task_ids,))
        return {row["task_id"]: row for row in cur.fetchall()}


def wait_for_rows(
    database_url: str,
    by_tenant: dict[str, list[str]],
    timeout_s: float,
    progress: bool = True,
    poll_s: float = 0.3,
) -> dict[str, dict[str, Any]]:
    """The rows of every task of `by_tenant` once each has one, or those there are after
    `timeout_s`; read every `poll_s` on one connection."""
    total = sum(len(ids) for ids in by_tenant.values())
    deadline = time.monotonic() + timeout_s
    rows: dict[str, dict[str, Any]] = {}
    shown = -1
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            rows = {}
            for tenant, ids in by_tenant.items():
                rows.update(_tenant_rows(conn, tenant, ids))
            if progress and len(rows) != shown:
                shown = len(rows)
                print(f"  {len(rows)}/{total} tasks have a result", flush=True)
            if len(rows) >= total:
                return rows
            time.sleep(poll_s)
    return rows


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v) or "none"


def result_counts(result: dict[str, Any], pipeline: str) -> dict[str, int]:
    section = result.get("estimation") or result.get("detection") or {}
    return dict(section.get("counts") or {})


def main(args: argparse.Namespace) -> int:
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    tasks = demo_tasks(manifest)
    ports = Ports(args.pubsub_port, args.gcs_port, args.postgres_port)
    state = args.state_dir / "demo"
    print(
        f"Starting Pub/Sub emulator, GCS emulator and PostgreSQL (logs in {state}) ...", flush=True
    )
    receiver = TraceReceiver() if args.trace else None
    with LocalServices(state, ports) as services:
        traced = receiver.env() if receiver else {}
        settings = local_settings(services, **receiver.settings() if receiver else {})
        # With --trace the demo publishes as a traced backend would: each task's trace
        # starts at its publish, and the daemon continues it.
        tracing = Tracing.from_settings(settings, "gannet-publish")
        prepare(services, settings)
        storage = Storage(clients.storage_client(settings))
        publisher, _ = clients.pubsub_clients(settings)
        published = []
        for i, item in enumerate(tasks, 1):
            url = upload_image(
                storage, settings.allowed_buckets[0], item.tenant, SAMPLES / item.image, "samples"
            )
            task = make_task(item.tenant, url, item.pipeline, f"demo-{i:03d}-{item.image}")
            published.append((item, task))
        publish_tasks(publisher, settings.topic_path(), [t for _, t in published])
        print(f"Published {len(published)} tasks to {settings.topic_path()}", flush=True)
        if tracing is not None:
            tracing.shutdown()

        env = {
            **services.env(),
            "GANNET_RUNNERS": str(args.runners),
            "GANNET_CONFIG_URI": str(DEPLOYMENT_CONFIG),
            **traced,
        }
        daemon = DaemonProcess(env, state / "daemon.log")
        print(f"Started `gannet run` (JSON logs in {daemon.log_path}); waiting ...", flush=True)
        try:
            daemon.wait_ready()
            by_tenant: dict[str, list[str]] = {}
            for item, task in published:
                by_tenant.setdefault(item.tenant, []).append(task.task_id)
            rows = wait_for_rows(settings.database_url, by_tenant, timeout_s=300)
        except RuntimeError as exc:  # the daemon could not start: say why, stop everything
            print(f"\n{exc}", flush=True)
            return 1
        finally:
            code = daemon.stop()
        print(f"Daemon stopped on SIGTERM with exit code {code}.\n")

        table, mismatches = [], 0
        for item, task in published:
            row = rows.get(task.task_id)
            if row is None:
                table.append(
                    [
                        item.image,
                        item.tenant,
                        item.pipeline,
                        "NO RESULT",
                        "",
                        expected_text(item),
                        "MISSING",
                        "-",
                        "-",
                    ]
                )
                mismatches += 1
                continue
            if row["status"] != "succeeded":
                table.append(
                    [
                        item.image,
                        item.tenant,
                        item.pipeline,
                        f"failed: {row['error_code']}",
                        "",
                        expected_text(item),
                        "FAILED",
                        "-",
                        "-",
                    ]
                )
                mismatches += 1
                continue
            got, found, ok = check_result(item, row["result"])
            mismatches += not ok
            table.append(
                [
                    item.image,
                    item.tenant,
                    item.pipeline,
                    counts_text(got),
                    found,
                    expected_text(item),
                    "ok" if ok else "MISMATCH",
                    f"{row['timings'].get('total_ms', 0):.0f}",
                    row["result_uri"],
                ]
            )
        print(
            format_table(
                [
                    "image",
                    "tenant",
                    "pipeline",
                    "counts",
                    "segments / labels",
                    "expected",
                    "check",
                    "latency ms",
                    "result",
                ],
                table,
            )
        )
        print(
            f"\nRows were written to PostgreSQL's task_results, result JSON to "
            f"gs://{settings.results_bucket}/; the demo stops its services and deletes their "
            f"data as it exits. To keep them and look: `{gannet_command()} services` "
            '(README, "Running it locally by hand").'
        )
        if receiver is not None:
            print_trace(receiver, next(t for i, t in published if i.pipeline == "FULL_PIPELINE"))
            receiver.stop()
        if mismatches:
            print(f"\n{mismatches} task(s) did not match the known contents; see {daemon.log_path}")
            return 1
        print(f"\nAll {len(table)} results match the known contents.")
        return 0


def gannet_command() -> str:
    """How to type `gannet` here: its name where the shell finds it, else the venv's
    script (README's `.venv/bin/gannet`), else the module, so a pasted line runs."""
    if shutil.which("gannet"):
        return "gannet"
    script = Path(sys.executable).parent / "gannet"
    return os.path.relpath(script) if script.exists() else f"{sys.executable} -m gannet"


def print_trace(receiver: TraceReceiver, task: Task) -> None:
    """One task's trace as the local OTLP receiver got it, from publish to ack."""
    try:
        spans = receiver.wait_for(lambda got: len(task_trace(got, task.task_id)) > 5)
    except TimeoutError as exc:
        print(f"\nno trace for {task.task_id}: {exc}")
        return
    trace = task_trace(spans, task.task_id)
    print(
        f"\nTrace {trace[0].trace_id} of task {task.task_id} ({len(trace)} spans, "
        f"{len(spans)} received in all; ms are each span's wall time):"
    )
    print(format_tree(trace))


def serve(args: argparse.Namespace) -> int:
    ports = Ports(args.pubsub_port, args.gcs_port, args.postgres_port)
    with LocalServices(args.state_dir / "services", ports) as services:
        prepare(services, local_settings(services))
        print("Local services are up. In another shell:\n")
        for key, value in services.env().items():
            print(f"export {key}={value}")
        gannet = gannet_command()
        print(
            f"\nthen: {gannet} run   |   {gannet} publish --tenant demo-tenant --pipeline "
            "DETECTION samples/scene_01.jpg\nCtrl-C stops everything.",
            flush=True,
        )
        try:
            # Not signal.pause(): a signal that lands after the last bytecode and before
            # pause() starts leaves its handler pending and pause() waiting for another,
            # for good (a closed terminal's SIGHUP, sent as the line above is read, hung
            # `gannet services` in 2 of 3 runs of its test). A sleep ends; the handler
            # then runs within the second.
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("stopping ...")
    return 0
