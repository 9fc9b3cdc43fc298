"""`gannet soak`: many tasks, poison among them, crashes and a database restart; then count.

One run on services of its own: publish N tasks (valid DETECTION tasks on the sample
images, and a fraction of poison of the twelve kinds in POISON_KINDS: every permanent
failure the README lists), run one daemon at a time and hurt it at random moments: kill
-9 (twice), SIGTERM (once) and a PostgreSQL restart (once). A killed or stopped daemon
is replaced at once, as Kubernetes would. Once every task has settled, the report says
what a user would ask: was anything lost, did any task run the model twice to an ack,
did every poison message reach the dead-letter topic with its reason and leave what its
kind must and nothing else (its failed row; none for another tenant's task_id, whose
owner's row and claim stay as they were; never a result), did every success's callback
reach the soak's receiver (a slow one, so that each fault finds callbacks queued and in
flight: those of a killed daemon are sent by the next after GANNET_CALLBACK_LEASE_S),
how fast, and how much memory.

The daemons serve a deployment config of the soak's own (`write_deployment`): the demo
industry for the soak's tenant and for the tenant that owns the task ids its poison
takes, and no other, so that a tenant it does not name is refused (unknown_tenant).

Every random choice (which tasks are poison, their order, each fault's moment) comes from
one seeded RNG, and the seed is in the report, so a run that found something can be
repeated. The moments are fractions of the valid tasks committed, not times, so the same
seed hurts the daemon at the same point of the work on a faster or slower machine.

How double inference is told apart from an expected re-run (see `classify_inferences`):
each settled delivery logs one JSON line with its outcome, and `"inferred": true` when
the model ran to completion in it. A daemon killed with -9 logs nothing for what it was
running, so those re-runs leave no trace and are not counted. A task whose earlier
inferences all ended in a nack (PostgreSQL down at its commit, a shutdown) was re-run
because of a fault; a task inferred again after an inference that ended acked ran
twice for nothing, and that is a defect.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import psycopg
from google.api_core import exceptions as gexc

from gannet.dev.demo import DaemonProcess
from gannet.dev.local_services import ServiceError
from gannet.dev.publish import make_task, upload_image
from gannet.dev.stack import SAMPLES, Stack, make_stack, prepared_services
from gannet.errors import CommandError
from gannet.settings import REPO_ROOT
from gannet.sink import Sink
from gannet.task import TaskResult
from gannet.text import format_table

VALID = "valid"
OTHER_TENANTS_TASK_ID = "other_tenants_task_id"
# Poison kind -> the error_code the daemon must dead-letter it with (README, outcomes).
POISON_KINDS: dict[str, str] = {
    "bad_json": "bad_json",
    "oversized_body": "body_too_large",
    "unknown_field": "schema_error",
    "bad_tenant_id": "schema_error",
    "unknown_pipeline": "unknown_pipeline",
    "other_tenant_prefix": "image_outside_tenant",
    "bucket_not_allowed": "bucket_not_allowed",
    "missing_image": "image_not_found",
    "undecodable_image": "image_undecodable",
    "image_too_large": "image_too_large",
    "unknown_tenant": "unknown_tenant",
    OTHER_TENANTS_TASK_ID: "task_id_conflict",
}
# Poison that must leave no row (README, outcomes: a failed row where the task is
# identifiable): a body that names no task_id or no valid tenant_id, an oversized body
# (never parsed for its ids), and another tenant's task_id, which stays its owner's.
# Every other kind gets a failed row with its
# error_code, under the tenant its body names (an unknown tenant's too).
NO_ROW = frozenset({"bad_json", "oversized_body", "bad_tenant_id", OTHER_TENANTS_TASK_ID})
# The industry config the daemons serve the soak's tenants with (write_deployment).
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
OWNER_HOLDER = "gannet-soak"  # the claim holder of the owner's seeded successes
FAULT_LABELS = {
    "kill9": "kill -9",
    "sigterm": "SIGTERM",
    "postgres_restart": "PostgreSQL restart",
}
# Outcomes of a settled delivery (outcome.py): acked, or nacked for another try.
ACKED = frozenset({"succeeded", "duplicate", "quarantined"})
NACKED = frozenset({"retry", "error", "busy", "shutdown"})
# Faults fire between these fractions of the valid tasks committed: not before the
# daemon is busy, and not so late that nothing is left to recover.
FAULT_WINDOW = (0.05, 0.90)
POLL_S = 0.5  # a fault fires within ~10 tasks of its moment at 20 tasks/s
# While a fault waits for its moment, at most this many valid tasks are published past
# it: enough that the daemon it hits is at work, and the work cannot all settle first.
FAULT_LEAD = 20
PROGRESS_S = 5.0
QUIET_PROGRESS_S = 30.0  # while nothing moves, a line this often still shows it is alive
RSS_POLL_S = 0.5
STOP_TIMEOUT_S = 60.0  # above the Stack's 20 s shutdown grace
# The receiver answers each callback after this: four threads of one tenant's (a
# quarter of 16) then send about as fast as the daemon commits, so callbacks queue.
CALLBACK_ANSWER_S = 0.2
CALLBACK_LEASE_S = 4.0  # a killed daemon's callbacks are the next one's after this
CALLBACKS_SETTLE_S = 90.0  # after the tasks settle, for the last callbacks to arrive


# -- counting inferences (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class Inferences:
    """Per task, the outcome of every delivery that ran the model to completion."""

    per_task: dict[str, list[str]]
    rerun_after_fault: list[str]
    inferred_more_than_once: list[str]
    other_repeats: list[str]  # >1 inference with an outcome not known here (reported)
    flag_seen: bool  # whether any line carried `inferred` at all


def classify_inferences(entries: Iterable[Mapping[str, Any]]) -> Inferences:
    """Sort tasks that ran the model more than once into expected re-runs and defects.

    `entries` are the daemons' JSON log lines in the order they were written (daemon
    after daemon). A re-run after a fault: every inference before the last ended in a
    nack, so its result never reached an ack. Inferred more than once: an inference
    followed one that ended acked, so the model ran again on a task already settled,
    whatever that second run ended in.
    """
    per_task: dict[str, list[str]] = {}
    flag_seen = False
    for entry in entries:
        flag_seen = flag_seen or "inferred" in entry
        task_id, outcome = entry.get("task_id"), entry.get("outcome")
        if entry.get("inferred") is True and task_id and outcome:
            per_task.setdefault(str(task_id), []).append(str(outcome))
    rerun, twice, other = [], [], []
    for task_id, outcomes in per_task.items():
        if len(outcomes) < 2:
            continue
        if any(o in ACKED for o in outcomes[:-1]):
            twice.append(task_id)
        elif all(o in NACKED for o in outcomes[:-1]):
            rerun.append(task_id)
        else:
            other.append(task_id)
    return Inferences(per_task, sorted(rerun), sorted(twice), sorted(other), flag_seen)


# -- the workload -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tenants:
    """The soak's tenant and the two others its poison names: `owner` owns task ids
    before the first publish (the owner of another tenant's task_id), `unknown` is one
    the daemons' deployment does not serve."""

    own: str
    owner: str
    unknown: str

    @classmethod
    def of(cls, tenant: str) -> Tenants:
        return cls(tenant, f"{tenant}-owner", f"{tenant}-unknown")


def write_deployment(path: Path, tenants: Tenants) -> Path:
    """The daemons' config: the demo industry for the soak's tenant and the owner, no
    default industry, so that any other tenant is refused as unknown_tenant. (JSON is
    YAML.)"""
    deployment = {
        "deployment": "soak",
        "industries": {"demo": str(DEMO_CONFIG)},
        "tenants": {tenants.own: "demo", tenants.owner: "demo"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(deployment, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Assets:
    """What the tasks point at, uploaded once and shared by every task."""

    bucket: str
    scenes: list[str]
    not_an_image: str
    too_large: str
    unknown_tenants_scene: str  # a scene under the unknown tenant's prefix
    max_body_bytes: int  # the daemons' limit (GANNET_MAX_BODY_BYTES)


@dataclass(frozen=True)
class Message:
    body: bytes
    kind: str  # VALID or a key of POISON_KINDS
    task_id: str  # the body's (bad JSON: of the body it was cut from)
    tenant: str  # the body's tenant_id, where its row and result object would be (ditto)

    @property
    def valid(self) -> bool:
        return self.kind == VALID

    @property
    def expected_code(self) -> str | None:
        return POISON_KINDS.get(self.kind)


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a header: claims width x height pixels in 45 bytes, so it is
    refused as too large before anything is decoded (and costs nothing to upload)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def upload_assets(stack: Stack, tenants: Tenants) -> Assets:
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    scenes = [e["file"] for e in manifest["images"] if e.get("kind", "scene") != "large"]
    bucket = stack.settings.allowed_buckets[0]
    return Assets(
        bucket=bucket,
        scenes=[stack.upload(name) for name in scenes],
        not_an_image=stack.upload("notes.jpg", data=b"this is a text file, not a JPEG"),
        too_large=stack.upload("huge.png", data=png_header(8000, 8000)),
        unknown_tenants_scene=upload_image(
            stack.storage, bucket, tenants.unknown, SAMPLES / scenes[0], "samples"
        ),
        max_body_bytes=stack.settings.max_body_bytes,
    )


def build_workload(
    rng: random.Random,
    tenants: Tenants,
    assets: Assets,
    tasks: int,
    poison_fraction: float,
    callback_url: str | None = None,
) -> list[Message]:
    """Valid tasks and poison (every kind in turn), shuffled: the publish order; each
    with `callback_url`, where one is given."""
    poison = round(tasks * poison_fraction)
    kinds = list(POISON_KINDS)
    order = [VALID] * (tasks - poison) + [kinds[i % len(kinds)] for i in range(poison)]
    rng.shuffle(order)
    return [
        _message(kind, f"{tenants.own}-{i:05d}", tenants, assets, rng, callback_url)
        for i, kind in enumerate(order)
    ]


def _message(
    kind: str,
    task_id: str,
    tenants: Tenants,
    assets: Assets,
    rng: random.Random,
    callback_url: str | None = None,
) -> Message:
    task = make_task(
        tenants.own, rng.choice(assets.scenes), "DETECTION", task_id, callback_url=callback_url
    )
    body = task.model_dump_json(exclude_none=True)
    if kind == VALID:
        return Message(body.encode(), kind, task_id, tenants.own)
    if kind == "bad_json":
        return Message(
            f'{{"task_id": "{task_id}", "tenant_id": '.encode(), kind, task_id, tenants.own
        )
    if kind == "oversized_body":
        # The valid body, padded with spaces to one byte over the limit: still a valid
        # task in every other way, so a daemon that let it through would run it.
        return Message(body.encode().ljust(assets.max_body_bytes + 1), kind, task_id, tenants.own)
    poisoned = {**json.loads(body), **_poison_changes(kind, task_id, tenants, assets)}
    return Message(json.dumps(poisoned).encode(), kind, poisoned["task_id"], poisoned["tenant_id"])


def _poison_changes(kind: str, task_id: str, tenants: Tenants, assets: Assets) -> dict[str, Any]:
    """What is wrong with the valid body, one thing per kind, as test_poison.py (and, for
    another tenant's task_id, test_dispatch.py) makes each kind."""
    tenant, bucket = tenants.own, assets.bucket
    changes: dict[str, dict[str, Any]] = {
        "unknown_field": {"colour": "red"},
        "bad_tenant_id": {"tenant_id": "Not A Tenant!"},
        "unknown_pipeline": {"pipeline": "NO_SUCH_PIPELINE"},
        "other_tenant_prefix": {"image_url": f"gs://{bucket}/someone-else/samples/scene_01.jpg"},
        "bucket_not_allowed": {"image_url": f"gs://not-an-image-bucket/{tenant}/scene_01.jpg"},
        "missing_image": {"image_url": f"gs://{bucket}/{tenant}/missing/{task_id}.jpg"},
        "undecodable_image": {"image_url": assets.not_an_image},
        "image_too_large": {"image_url": assets.too_large},
        # A tenant the deployment does not serve, with an image under its own prefix: a
        # daemon that served it would run it.
        "unknown_tenant": {"tenant_id": tenants.unknown, "image_url": assets.unknown_tenants_scene},
        # A task_id the owner committed a success for before the first publish
        # (seed_owners_successes).
        OTHER_TENANTS_TASK_ID: {"task_id": owners_task_id(task_id, tenants)},
    }
    return changes[kind]


def owners_task_id(task_id: str, tenants: Tenants) -> str:
    """The owner's task_id that the poison made from `task_id` takes."""
    return tenants.owner + task_id.removeprefix(tenants.own)


# -- faults -----------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str  # a key of FAULT_LABELS
    fraction: float  # of the valid tasks committed
    trigger: int  # ... as a count: fires once this many valid tasks have succeeded
    fired_at_s: float | None = None  # since the first publish
    fired_at_succeeded: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return FAULT_LABELS[self.kind]


def fault_counts(args: argparse.Namespace) -> dict[str, int]:
    return {
        "kill9": args.kills,
        "sigterm": args.sigterms,
        "postgres_restart": args.postgres_restarts,
    }


def plan_faults(rng: random.Random, valid: int, counts: Mapping[str, int]) -> list[Fault]:
    """Each fault's moment, drawn uniformly in FAULT_WINDOW; no two at the same count."""
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    low, high = (max(1, round(f * valid)) for f in FAULT_WINDOW)
    if len(kinds) > high - low + 1:
        raise CommandError(
            f"{len(kinds)} faults need as many distinct moments between {low} and {high} "
            f"valid tasks: publish more tasks or ask for fewer faults"
        )
    faults: list[Fault] = []
    for kind in kinds:
        taken = {f.trigger for f in faults}
        while True:
            fraction = rng.uniform(*FAULT_WINDOW)
            trigger = min(high, max(low, round(fraction * valid)))
            if trigger not in taken:
                break
        faults.append(Fault(kind, round(fraction, 4), trigger))
    return sorted(faults, key=lambda f: f.trigger)


def publishable(
    valid: list[bool], faults: list[Fault], published: int, settled: int, window: int
) -> int:
    """How many of the messages (in publish order; `valid` says which are valid) may be
    published now. At most `window` unsettled, as backends that publish as work arrives
    would; and while a fault has not fired, no more than FAULT_LEAD valid tasks past its
    moment, nor the last valid task. Without that a daemon faster than the poll could
    finish every task before a late fault fired, and the soak would not test it. Always
    one valid task past the last fault fired, since the next fires only once something
    more was committed (`Soak.fire_due`)."""
    limit = min(len(valid), max(published, settled + window))
    waiting = [f.trigger for f in faults if f.fired_at_s is None]
    if not waiting:
        return limit
    fired = [f.fired_at_succeeded or 0 for f in faults if f.fired_at_s is not None]
    nearest = min(waiting)
    cap = max(min(nearest + FAULT_LEAD, sum(valid) - 1), nearest, max(fired, default=0) + 1)
    seen = 0
    for i in range(limit):
        seen += valid[i]
        if seen > cap:
            return max(published, i)
    return limit


# -- what the soak watches --------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    status: str
    updated_at: float
    delivery_attempt: int | None
    tenant: str
    error_code: str | None


def committed_rows(database_url: str, tenants: Iterable[str]) -> dict[str, Row]:
    """Every row of these tenants (each read as row-level security lets it read its
    own), without the results: the poll shares two cores with what it watches, so it
    reads only what it counts."""
    rows: dict[str, Row] = {}
    with psycopg.connect(database_url) as conn, conn.transaction():
        for tenant in tenants:
            conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant,))
            found = conn.execute(
                "SELECT task_id, status, extract(epoch FROM updated_at)::float8,"
                " delivery_attempt, error_code FROM task_results WHERE tenant_id = %s",
                (tenant,),
            ).fetchall()
            for task_id, status, updated, attempt, code in found:
                rows[task_id] = Row(status, updated, attempt, tenant, code)
    return rows


def seed_owners_successes(database_url: str, owner: str, task_ids: list[str]) -> None:
    """Commit a success for each of the owner's task ids, as a daemon would (its claim
    taken, then the fenced commit that keeps it for good), before the first publish: the
    ids that another tenant's task_id poison then takes. (Their result objects are not
    written: nothing reads them.)"""
    if not task_ids:
        return
    sink = Sink(database_url, pool_size=1)
    sink.open()
    try:
        for task_id in task_ids:
            if not sink.start(task_id, owner, OWNER_HOLDER, ttl_s=60).claimed:
                raise RuntimeError(f"could not claim the owner's task {task_id}")
            record = TaskResult(
                task_id=task_id,
                tenant_id=owner,
                pipeline="DETECTION",
                status="succeeded",
                result={"owner": owner},
                result_uri=f"gs://owner-results/{owner}/{task_id}.json",
                delivery_attempt=1,
            )
            sink.save_claimed(record, OWNER_HOLDER, lambda: None)
    finally:
        sink.close()


def owners_rows(database_url: str, owner: str, task_ids: list[str]) -> dict[str, Any]:
    """The owner's row and claim of each task id, every column, as the owner reads them:
    what another tenant's task with the same id must leave as it was."""
    if not task_ids:
        return {}
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.current_tenant', %s, true)", (owner,))
        found: dict[str, Any] = {task_id: {} for task_id in task_ids}
        for table in ("task_results", "task_claims"):
            for task_id, row in conn.execute(
                f"SELECT task_id, to_jsonb(t) FROM {table} t WHERE task_id = ANY(%s)",
                (task_ids,),
            ).fetchall():
                found[task_id][table] = row
    return found


@dataclass(frozen=True)
class Letter:
    body: bytes
    attributes: dict[str, str]


class DeadLetterReader:
    """Pulls (and acks) the dead-letter subscription on a thread of its own: an empty
    pull on the emulator blocks for seconds, and the fault loop must not wait for it."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.error: gexc.GoogleAPICallError | None = None
        self._letters: list[Letter] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-dead-letters", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        subscription = self.stack.settings.dead_letter_subscription
        while not self._stop.is_set():
            try:
                # An empty pull returns about a second before its deadline: half a second
                # here, which is also what stop() waits for at most.
                got = self.stack.pull(subscription, max_messages=100, timeout_s=1.5)
            except gexc.DeadlineExceeded:
                continue  # nothing there yet
            except gexc.GoogleAPICallError as exc:  # raised again on the main thread
                self.error = exc
                return
            with self._lock:
                self._letters += [Letter(m.data, dict(m.attributes)) for m in got]

    def letters(self) -> list[Letter]:
        if self.error is not None:
            raise RuntimeError(f"reading the dead-letter subscription failed: {self.error}")
        with self._lock:
            return list(self._letters)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def resident_kib(pid: int, field: str = "VmHWM") -> int:
    """The daemon's peak resident memory so far (VmHWM, the kernel's high-water mark; or
    with `field` VmRSS, now), in KiB; 0 once it has exited. With GANNET_PROCESSES > 1,
    the supervisor's and each daemon process's summed (for peaks an upper bound: they
    need not coincide)."""
    try:
        children = [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return 0
    return sum(_status_kib(p, field) for p in [pid, *children])


def _status_kib(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0])
    return 0


# A daemon's memory growth is read over the second half of the tasks it saw succeed (the
# first half warms it: models, pools, caches, the allocator's arenas), and only over
# at least this many tasks: fewer say nothing of a leak.
GROWTH_MIN_TASKS = 1000


def rss_growth_mib_per_1000(samples: list[tuple[int, int]]) -> float | None:
    """The least-squares slope of one daemon's resident memory (KiB) against the tasks
    succeeded so far, over the second half of its samples' span of tasks, in MiB per
    1000 tasks; None when that half spans fewer than GROWTH_MIN_TASKS. A leak of a few
    KB a task shows here long before it shows in the peak."""
    if not samples:
        return None
    first, last = samples[0][0], samples[-1][0]
    middle = first + (last - first) / 2
    half = [(n, kib) for n, kib in samples if n >= middle]
    if last - middle < GROWTH_MIN_TASKS or len(half) < 2:
        return None
    mean_n = sum(n for n, _ in half) / len(half)
    mean_kib = sum(kib for _, kib in half) / len(half)
    spread = sum((n - mean_n) ** 2 for n, _ in half)
    if spread == 0:
        return None
    slope = sum((n - mean_n) * (kib - mean_kib) for n, kib in half) / spread
    return round(slope * 1000 / 1024, 2)


class RssSampler:
    """Samples every live daemon's memory every RSS_POLL_S on a thread of its own, so
    samples go on while the main thread waits for a daemon to start or stop."""

    def __init__(self, daemons: list[DaemonProcess]) -> None:
        self.daemons = daemons
        self.peak_kib: dict[int, int] = {}  # pid -> peak
        # pid -> (valid tasks succeeded, resident KiB now), taken as the soak polls rows
        self.growth: dict[int, list[tuple[int, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_POLL_S):
            for daemon in list(self.daemons):
                if daemon.proc.poll() is None:
                    pid = daemon.proc.pid
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), resident_kib(pid))

    def at(self, succeeded: int) -> None:
        """Each live daemon's resident memory now, against the tasks succeeded so far."""
        for daemon in list(self.daemons):
            if daemon.proc.poll() is None:
                kib = resident_kib(daemon.proc.pid, "VmRSS")
                if kib:
                    self.growth.setdefault(daemon.proc.pid, []).append((succeeded, kib))

    def longest(self) -> list[tuple[int, int]]:
        """The samples of the daemon that saw the most tasks succeed."""
        spans = {pid: s[-1][0] - s[0][0] for pid, s in self.growth.items() if s}
        return self.growth[max(spans, key=spans.__getitem__)] if spans else []

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# -- where the run stands ---------------------------------------------------------------


@dataclass
class Tally:
    """The valid and poison tasks as rows and dead letters show them now."""

    succeeded: dict[str, Row]  # valid task -> its succeeded row
    valid_dead: set[str]  # valid tasks that reached the dead-letter topic
    poison_codes: dict[str, list[str | None]]  # poison task -> error_code of each letter
    foreign_letters: int  # letters whose body the soak never published
    poison_succeeded: set[str] = field(default_factory=set)  # poison run to a success row

    def count(self) -> int:
        """Tasks settled for good so far (succeeded or dead-lettered)."""
        settled_poison = set(self.poison_codes) | self.poison_succeeded
        return len(self.succeeded) + len(self.valid_dead) + len(settled_poison)

    def settled(self, valid: set[str], poison: set[str]) -> bool:
        """Everything settled for good: success, or a dead letter (for poison, with a
        reason). A valid task on the dead-letter topic is lost, but settled all the same;
        so is poison that a daemon ran to a success (it will never be dead-lettered)."""
        with_reason = {t for t, codes in self.poison_codes.items() if any(codes)}
        return (
            valid <= set(self.succeeded) | self.valid_dead
            and poison <= with_reason | self.poison_succeeded
        )


def tally(messages: list[Message], rows: dict[str, Row], letters: list[Letter]) -> Tally:
    by_body = {m.body: m for m in messages}
    valid = {m.task_id for m in messages if m.valid}
    poison = {m.task_id for m in messages if not m.valid}
    result = Tally(
        succeeded={t: r for t, r in rows.items() if t in valid and r.status == "succeeded"},
        valid_dead=set(),
        poison_codes={},
        foreign_letters=0,
        poison_succeeded={t for t, r in rows.items() if t in poison and r.status == "succeeded"},
    )
    for letter in letters:
        message = by_body.get(letter.body)
        if message is None:
            result.foreign_letters += 1
        elif message.valid:
            result.valid_dead.add(message.task_id)
        else:
            codes = result.poison_codes.setdefault(message.task_id, [])
            codes.append(letter.attributes.get("error_code"))
    return result


def poison_effects(
    messages: list[Message],
    rows: Mapping[str, Row],
    results: set[str],
    owners_before: Mapping[str, Any],
    owners_after: Mapping[str, Any],
) -> dict[str, list[str]]:
    """Poison kind -> what its messages left that they must not, or did not leave what
    they must (first few), beside their dead letters (README, outcomes): a failed row
    with the kind's error_code under the tenant the body names, except for the kinds of
    NO_ROW, which leave no row at all; never a result object (`results`: the names of
    those in the results bucket under the tenants' prefixes); and another tenant's task_id
    leaves the owner's row and claim as they were before the first publish."""
    wrong: dict[str, list[str]] = {}
    for message in messages:
        if not message.valid:
            for problem in _poison_effect(message, rows, results, owners_before, owners_after):
                wrong.setdefault(message.kind, []).append(f"{message.task_id}: {problem}")
    return {kind: problems[:5] for kind, problems in wrong.items()}


def _poison_effect(
    message: Message,
    rows: Mapping[str, Row],
    results: set[str],
    owners_before: Mapping[str, Any],
    owners_after: Mapping[str, Any],
) -> list[str]:
    task_id, tenant, problems = message.task_id, message.tenant, []
    if f"{tenant}/{task_id}.json" in results:
        problems.append(f"a result object was written for tenant {tenant}")
    row = rows.get(task_id)
    if message.kind in NO_ROW:
        if row is not None:
            problems.append(f"a {row.status} row ({row.error_code}) under tenant {row.tenant}")
    elif row is None:
        problems.append(f"no failed row under tenant {tenant}")
    elif (row.status, row.error_code, row.tenant) != ("failed", message.expected_code, tenant):
        problems.append(f"a {row.status} row ({row.error_code}) under tenant {row.tenant}")
    if message.kind == OTHER_TENANTS_TASK_ID:
        before, after = owners_before.get(task_id), owners_after.get(task_id)
        if not before or before != after:
            problems.append(f"the owner's row or claim changed: {before} -> {after}")
    return problems


# -- the run ----------------------------------------------------------------------------


class CallbackReceiver:
    """Every task's callback_url: an HTTP server on 127.0.0.1 counting the callbacks it
    receives by task_id, each answered 200 after CALLBACK_ANSWER_S."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(CALLBACK_ANSWER_S)
                with receiver._lock:
                    receiver.received[body["task_id"]] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # the soak prints its own lines
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/soak"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def missing(self, task_ids: Iterable[str]) -> list[str]:
        with self._lock:
            return sorted(t for t in task_ids if not self.received[t])

    def twice(self) -> int:
        with self._lock:
            return sum(1 for n in self.received.values() if n > 1)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Soak:
    """One soak on one Stack: publish, drive the faults, wait for everything to settle."""

    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.tenants = Tenants.of(stack.tenant)
        self.deployment = write_deployment(stack.tmp / "deployment.yaml", self.tenants)
        self.receiver = CallbackReceiver()
        rng = random.Random(args.seed)
        assets = upload_assets(stack, self.tenants)
        self.messages = build_workload(
            rng, self.tenants, assets, args.tasks, args.poison, self.receiver.url
        )
        self.valid = {m.task_id for m in self.messages if m.valid}
        self.poison = {m.task_id for m in self.messages if not m.valid}
        self.faults = plan_faults(rng, len(self.valid), fault_counts(args))
        # The owner's successes that another tenant's task_id poison takes the ids of,
        # and what they are before the first publish.
        self.owned = sorted(m.task_id for m in self.messages if m.kind == OTHER_TENANTS_TASK_ID)
        seed_owners_successes(stack.settings.database_url, self.tenants.owner, self.owned)
        self.owners_before = self.owners_rows()
        self.crashes: list[dict[str, Any]] = []  # daemons that exited without being told
        self.daemon: DaemonProcess | None = None
        self.first_publish = 0.0  # wall clock, comparable to the rows' updated_at
        self._started = 0.0  # monotonic, at the first publish
        self.published = 0  # of self.messages, in order

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def start_daemon(self) -> DaemonProcess:
        self.daemon = self.stack.start_daemon(
            GANNET_RUNNERS=str(self.args.runners),
            GANNET_CONFIG_URI=str(self.deployment),
            GANNET_ALLOW_HTTP_CALLBACKS="true",
            GANNET_CALLBACK_ALLOW_PRIVATE_ADDRESSES="true",
            GANNET_CALLBACK_LEASE_S=str(CALLBACK_LEASE_S),
        )
        return self.daemon

    def wait_callbacks(self, succeeded: Iterable[str]) -> list[str]:
        """Wait up to CALLBACKS_SETTLE_S for a callback of every success (those a killed
        daemon held come after its lease); the task_ids still without one."""
        deadline = time.monotonic() + CALLBACKS_SETTLE_S
        succeeded = list(succeeded)
        missing = self.receiver.missing(succeeded)
        while missing and time.monotonic() < deadline:
            self.replace_if_exited()
            time.sleep(POLL_S)
            missing = self.receiver.missing(succeeded)
        print(
            f"[{self.elapsed():5.0f}s] callbacks: {len(succeeded) - len(missing)}/"
            f"{len(succeeded)} successes called back",
            flush=True,
        )
        return missing

    def publish_more(self, settled: int) -> None:
        """Keep at most --window published tasks unsettled, as backends that publish as
        work arrives would. The emulator pushes every message it has to one stream,
        ignoring the subscriber's flow control, so an unbounded backlog would all sit
        leased on whichever daemon a fault hits, which real Pub/Sub never does. A fault
        that has not fired holds publishing back (`publishable`)."""
        if not self._started:
            self.first_publish, self._started = time.time(), time.monotonic()
        valid = [m.valid for m in self.messages]
        upto = publishable(valid, self.faults, self.published, settled, self.args.window)
        batch = self.messages[self.published : upto]
        if not batch:
            return
        topic = self.stack.settings.topic_path()
        for future in [self.stack.publisher.publish(topic, m.body) for m in batch]:
            future.result(timeout=120)
        self.published += len(batch)
        if self.published == len(self.messages):
            print(
                f"[{self.elapsed():5.0f}s] published all {len(self.messages)} tasks "
                f"({len(self.valid)} valid, {len(self.poison)} poison)",
                flush=True,
            )

    def drive(self, letters: DeadLetterReader, sampler: RssSampler) -> Tally:
        """Fire each fault when its moment comes; return once everything settled or the
        settle timeout passed (the caller tells which from the tally)."""
        deadline = time.monotonic() + self.args.settle_timeout_s
        progress = _Progress(self)
        while True:
            now = tally(self.messages, self.rows(), letters.letters())
            sampler.at(len(now.succeeded))
            self.fire_due(len(now.succeeded))  # before: the last task may have settled
            self.publish_more(now.count())
            if now.settled(self.valid, self.poison) or time.monotonic() > deadline:
                return now
            self.replace_if_exited()
            progress.maybe_print(now)
            time.sleep(POLL_S)

    def rows(self) -> dict[str, Row]:
        """The rows of the soak's tenant and of the unknown one (whose failed rows are
        the unknown_tenant poison's); the owner's are read whole, before and after."""
        tenants = (self.tenants.own, self.tenants.unknown)
        return committed_rows(self.stack.settings.database_url, tenants)

    def owners_rows(self) -> dict[str, Any]:
        return owners_rows(self.stack.settings.database_url, self.tenants.owner, self.owned)

    def poison_effects(self, rows: Mapping[str, Row]) -> dict[str, list[str]]:
        """`poison_effects` on what the database and the results bucket hold now."""
        client, bucket = self.stack.storage.client, self.stack.settings.results_bucket
        results = {
            blob.name
            for tenant in (self.tenants.own, self.tenants.unknown)
            for blob in client.list_blobs(bucket, prefix=f"{tenant}/")
        }
        return poison_effects(self.messages, rows, results, self.owners_before, self.owners_rows())

    def fire_due(self, succeeded: int) -> None:
        """The next fault whose moment has come, once something was committed since the
        last one: a moment that passed while a daemon was starting then hits a daemon at
        work, not one that has not taken a message yet."""
        fired = [f.fired_at_succeeded for f in self.faults if f.fired_at_succeeded is not None]
        due = [f for f in self.faults if f.fired_at_s is None and f.trigger <= succeeded]
        if due and succeeded > max(fired, default=-1):
            self.fire(due[0], succeeded)

    def fire(self, fault: Fault, succeeded: int) -> None:
        fault.fired_at_s = round(self.elapsed(), 1)
        fault.fired_at_succeeded = succeeded
        print(
            f"[{self.elapsed():5.0f}s] fault: {fault.label} at {succeeded}/{len(self.valid)} "
            f"valid succeeded (drawn: {fault.trigger}, {fault.fraction:.0%})",
            flush=True,
        )
        if fault.kind == "postgres_restart":
            fault.detail["down_s"] = round(self.stack.services.restart_postgres(), 2)
        else:
            sig = signal.SIGKILL if fault.kind == "kill9" else signal.SIGTERM
            fault.detail.update(self.stop_daemon(sig))
            fault.detail["replaced_by_pid"] = self.start_daemon().proc.pid
        print(f"[{self.elapsed():5.0f}s]        done: {_detail_text(fault.detail)}", flush=True)

    def stop_daemon(self, sig: signal.Signals) -> dict[str, Any]:
        """Signal the running daemon and wait for it to exit."""
        daemon = self.daemon
        assert daemon is not None
        started = time.monotonic()
        try:
            code = daemon.stop(sig, timeout_s=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"daemon {daemon.proc.pid} did not exit within {STOP_TIMEOUT_S:.0f}s of "
                f"{sig.name}; see {daemon.log_path}"
            ) from exc
        return {
            "pid": daemon.proc.pid,
            "exit_code": code,
            "exit_s": round(time.monotonic() - started, 2),
        }

    def replace_if_exited(self) -> None:
        """A daemon that exits on its own is a finding: record it, start another."""
        daemon = self.daemon
        if daemon is None or daemon.proc.poll() is None:
            return
        crash = {
            "pid": daemon.proc.pid,
            "exit_code": daemon.proc.returncode,
            "at_s": round(self.elapsed(), 1),
            "log": str(daemon.log_path),
        }
        self.crashes.append(crash)
        print(f"[{self.elapsed():5.0f}s] daemon exited on its own: {crash}", flush=True)
        self.start_daemon()


class _Progress:
    """A line every PROGRESS_S while tasks settle (every QUIET_PROGRESS_S while none do),
    so a user sees the soak is alive and how fast it goes."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.last_at = time.monotonic()
        self.last_succeeded = 0
        self.last_dead = 0

    def maybe_print(self, now: Tally) -> None:
        at = time.monotonic()
        soak, succeeded = self.soak, len(now.succeeded)
        dead = sum(1 for codes in now.poison_codes.values() if any(codes))
        moved = (succeeded, dead) != (self.last_succeeded, self.last_dead)
        if at - self.last_at < (PROGRESS_S if moved else QUIET_PROGRESS_S):
            return
        rate = (succeeded - self.last_succeeded) / (at - self.last_at)
        pid = soak.daemon.proc.pid if soak.daemon else "-"
        print(
            f"[{soak.elapsed():5.0f}s] {succeeded}/{len(soak.valid)} valid succeeded, "
            f"{dead}/{len(soak.poison)} poison dead-lettered, {rate:.1f} tasks/s, "
            f"daemon #{len(soak.stack.daemons)} (pid {pid})",
            flush=True,
        )
        self.last_at, self.last_succeeded, self.last_dead = at, succeeded, dead


def _detail_text(detail: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in detail.items())


# -- the report -------------------------------------------------------------------------


def build_report(
    soak: Soak,
    final: Tally,
    entries: list[dict[str, Any]],
    peak_kib: Mapping[int, int],
    effects: Mapping[str, list[str]],
    uncalled: list[str] | None = None,
) -> dict[str, Any]:
    """What the run showed, as the JSON report holds it; `ok` decides the exit status.
    `uncalled`: the successes whose callback never reached the receiver."""
    args = soak.args
    inferences = classify_inferences(entries)
    missing = sorted(soak.valid - set(final.succeeded) - final.valid_dead)
    # Where to look for a lost task: the outcome its last settled delivery logged. None
    # at all: it reached only killed daemons, or no daemon; a nack (retry, busy): it was
    # never redelivered. Either points at Pub/Sub's redelivery rather than the daemon.
    last_outcome = {e.get("task_id"): e["outcome"] for e in entries if e.get("outcome")}
    undead = sorted(t for t in soak.poison if not any(final.poison_codes.get(t, [])))
    lost = len(missing) + len(final.valid_dead) + len(undead)
    last_commit = max((r.updated_at for r in final.succeeded.values()), default=None)
    seconds = (last_commit - soak.first_publish) if last_commit else None
    codes = Counter(c or "(none)" for cs in final.poison_codes.values() for c in cs)
    report: dict[str, Any] = {
        "seed": args.seed,
        "pubsub_flow_control": args.pubsub_flow_control,
        "tasks": len(soak.messages),
        "valid": len(soak.valid),
        "poison": len(soak.poison),
        "poison_kinds": dict(Counter(m.kind for m in soak.messages if not m.valid)),
        "settled": final.settled(soak.valid, soak.poison),
        "faults": [asdict(f) | {"label": f.label} for f in soak.faults],
        "daemons_started": len(soak.stack.daemons),
        "unexpected_daemon_exits": soak.crashes,
        "succeeded": len(final.succeeded),
        "redelivered": sum(1 for r in final.succeeded.values() if (r.delivery_attempt or 1) > 1),
        "lost": lost,
        "lost_detail": {
            "valid_without_success": missing,
            "valid_dead_lettered": sorted(final.valid_dead),
            "poison_not_dead_lettered": undead,
        },
        "lost_by_last_outcome": dict(
            Counter(last_outcome.get(t, "never settled by a daemon") for t in missing)
        ),
        "inferred_more_than_once": inferences.inferred_more_than_once,
        "rerun_after_fault": inferences.rerun_after_fault,
        "other_repeated_inference": inferences.other_repeats,
        "inferred_flag_in_logs": inferences.flag_seen,
        "poison_dead_lettered": len(soak.poison) - len(undead),
        "dead_letters_by_code": dict(sorted(codes.items())),
        "unexpected_reasons": _unexpected_reasons(soak.messages, final),
        "poison_succeeded": sorted(final.poison_succeeded),
        "poison_wrong_effects": dict(effects),
        "dead_lettered_more_than_once": sum(1 for c in final.poison_codes.values() if len(c) > 1),
        "foreign_dead_letters": final.foreign_letters,
        "callbacks_missing": uncalled or [],
        "callbacks_twice": soak.receiver.twice(),
        "seconds": round(seconds, 1) if seconds else None,
        "valid_per_s": round(len(final.succeeded) / seconds, 2) if seconds else None,
        "peak_rss_mib": round(max(peak_kib.values(), default=0) / 1024, 1),
        "peak_rss_mib_per_daemon": {str(p): round(k / 1024, 1) for p, k in peak_kib.items()},
        "daemon_logs": [str(d.log_path) for d in soak.stack.daemons],
    }
    report["ok"] = (
        lost == 0
        and not inferences.inferred_more_than_once
        and not report["unexpected_reasons"]
        and not report["poison_wrong_effects"]
        and not uncalled
    )
    return report


def _unexpected_reasons(messages: list[Message], final: Tally) -> dict[str, list[str | None]]:
    """Poison kind -> codes seen other than the one its kind must get (first few)."""
    wrong: dict[str, list[str | None]] = {}
    for message in messages:
        for code in final.poison_codes.get(message.task_id, []):
            if not message.valid and code != message.expected_code:
                wrong.setdefault(message.kind, []).append(code)
    return {kind: codes[:5] for kind, codes in wrong.items()}


def print_report(report: dict[str, Any]) -> None:
    print()
    print(
        format_table(
            ["fault", "drawn at", "fired at (valid succeeded)", "at s", "what happened"],
            [
                [
                    f["label"],
                    f"{f['trigger']} ({f['fraction']:.0%})",
                    "NOT FIRED" if f["fired_at_s"] is None else str(f["fired_at_succeeded"]),
                    "-" if f["fired_at_s"] is None else f"{f['fired_at_s']:.1f}",
                    _detail_text(f["detail"]),
                ]
                for f in report["faults"]
            ],
        )
    )
    print()
    print(format_table(["result", "value"], [[k, v] for k, v in _summary(report)]))
    codes = report["dead_letters_by_code"]
    print("\ndead letters by error_code: " + (_detail_text(codes) or "none"))
    for problem in _problems(report):
        print(f"  ! {problem}")
    verdict = "OK" if report["ok"] else "FAILED"
    wrong = set(report["unexpected_reasons"]) | set(report["poison_wrong_effects"])
    print(
        f"\n{verdict}: {report['lost']} lost, "
        f"{len(report['inferred_more_than_once'])} inferred more than once."
        + (f" Poison handled wrongly: {', '.join(sorted(wrong))}." if wrong else "")
    )


def _summary(report: dict[str, Any]) -> list[tuple[str, str]]:
    rate, poison = report["valid_per_s"], report["poison"]
    return [
        ("seed", str(report["seed"])),
        ("tasks", f"{report['tasks']} ({report['valid']} valid, {poison} poison)"),
        ("valid succeeded", f"{report['succeeded']}/{report['valid']}"),
        ("lost", str(report["lost"])),
        ("inferred more than once", str(len(report["inferred_more_than_once"]))),
        ("re-run after a fault", str(len(report["rerun_after_fault"]))),
        ("valid redelivered (attempt > 1)", str(report["redelivered"])),
        ("poison dead-lettered with a reason", f"{report['poison_dead_lettered']}/{poison}"),
        ("poison kinds with a wrong row or result", str(len(report["poison_wrong_effects"]))),
        ("successes never called back", str(len(report["callbacks_missing"]))),
        ("successes called back twice", str(report["callbacks_twice"])),
        ("daemons started", str(report["daemons_started"])),
        ("throughput", f"{rate} valid tasks/s over {report['seconds']} s" if rate else "-"),
        ("peak RSS of a daemon", f"{report['peak_rss_mib']} MiB"),
        ("RSS growth, second half", _growth_text(report.get("rss_growth_mib_per_1000_tasks"))),
    ]


def _growth_text(growth: float | None) -> str:
    if growth is None:
        return f"- (fewer than {GROWTH_MIN_TASKS} tasks in a daemon's second half)"
    return f"{growth:+.2f} MiB per 1000 tasks"


def _problems(report: dict[str, Any]) -> list[str]:
    """Lines that name what went wrong, with a few task ids to grep the logs for."""
    problems = [f"{k}: {len(v)} e.g. {v[:3]}" for k, v in report["lost_detail"].items() if v]
    if report["lost_by_last_outcome"]:
        problems.append(
            "valid tasks without success, by the last outcome a daemon logged for them: "
            + _detail_text(report["lost_by_last_outcome"])
        )
    if report["inferred_more_than_once"]:
        problems.append(f"inferred more than once: e.g. {report['inferred_more_than_once'][:3]}")
    if report["other_repeated_inference"]:
        problems.append(f"other repeated inference: e.g. {report['other_repeated_inference'][:3]}")
    if not report["inferred_flag_in_logs"]:
        problems.append("no log line carries `inferred`: double inference could not be counted")
    if report["unexpected_reasons"]:
        problems.append(f"unexpected error_code per poison kind: {report['unexpected_reasons']}")
    if report["poison_succeeded"]:
        problems.append(f"poison run to a success: e.g. {report['poison_succeeded'][:3]}")
    for kind, found in report["poison_wrong_effects"].items():
        problems.append(f"poison {kind} left the wrong rows or results: {found}")
    if report["callbacks_missing"]:
        problems.append(f"never called back: e.g. {report['callbacks_missing'][:3]}")
    if report["unexpected_daemon_exits"]:
        problems.append(f"daemons exited on their own: {report['unexpected_daemon_exits']}")
    if not report["settled"]:
        problems.append("not everything settled before --settle-timeout-s")
    return problems


# -- the command ------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="gannet-soak-"))
    report_path = args.report or state / "soak-report.json"
    gated = "; each stream held to its lease, as by Pub/Sub" if args.pubsub_flow_control else ""
    print(
        f"Soak: seed {args.seed}, {args.tasks} tasks{gated}; services, logs and report in {state}"
    )
    # Refuse a plan that cannot be drawn now, not after the services took a minute.
    plan_faults(
        random.Random(args.seed), args.tasks - round(args.tasks * args.poison), fault_counts(args)
    )
    try:
        report = run(args, state)
    except ServiceError as exc:
        print(f"\nsoak could not start: {exc}\nlogs: {state}", flush=True)
        return 2
    except RuntimeError as exc:
        print(f"\nsoak failed: {exc}\nlogs: {state}", flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; logs: {state}", flush=True)
        raise
    report["state_dir"] = str(state)
    print_report(report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    print(f"\nJSON report: {report_path}")
    if not report["ok"]:
        print(f"daemon logs: {state}")
    return 0 if report["ok"] else 1


def run(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """The whole soak on services of its own; everything it started is stopped again,
    whatever happens (an error, Ctrl-C)."""
    print("Starting Pub/Sub emulator, GCS emulator and PostgreSQL ...", flush=True)
    with prepared_services(state / "services", args.pubsub_flow_control) as services:
        stack = make_stack(services, state, ack_deadline_s=10)
        soak = Soak(stack, args)
        _print_plan(soak)
        sampler = RssSampler(stack.daemons)
        letters = DeadLetterReader(stack)
        try:
            soak.start_daemon()
            final = soak.drive(letters, sampler)
            done = "settled" if final.settled(soak.valid, soak.poison) else "settle timeout"
            print(f"[{soak.elapsed():5.0f}s] {done}; waiting for the callbacks", flush=True)
            uncalled = soak.wait_callbacks(final.succeeded)
            print(f"[{soak.elapsed():5.0f}s] stopping the daemon with SIGTERM", flush=True)
            soak.stop_daemon(signal.SIGTERM)
            rows = soak.rows()
            final = tally(soak.messages, rows, letters.letters())
            effects = soak.poison_effects(rows)
        finally:
            letters.stop()
            sampler.stop()
            soak.receiver.stop()
            _kill_leftovers(stack.daemons)
        entries = [e for daemon in stack.daemons for e in daemon.log_entries()]
        report = build_report(soak, final, entries, sampler.peak_kib, effects, uncalled)
        longest = sampler.longest()
        report["rss_growth_mib_per_1000_tasks"] = rss_growth_mib_per_1000(longest)
        report["rss_kib_by_tasks_succeeded"] = longest  # that daemon's samples
        return report


def _print_plan(soak: Soak) -> None:
    plan = ", ".join(f"{f.label} at {f.trigger} ({f.fraction:.0%})" for f in soak.faults)
    print(f"faults, by valid tasks succeeded: {plan or 'none'}", flush=True)


def _kill_leftovers(daemons: list[DaemonProcess]) -> None:
    """Daemons still running after an error or Ctrl-C: nothing of theirs matters now."""
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.stop(signal.SIGKILL, timeout_s=30)
