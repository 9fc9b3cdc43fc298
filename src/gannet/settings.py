"""Every knob of the daemon, read once from GANNET_* environment variables.

The defaults run against the local emulators started by `gannet demo` / `make test`, so
a new user needs no configuration; production overrides them in the k8s ConfigMap.
Only the entry point (cli) builds a Settings; everything else receives values from it.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gannet.lanes import Lane, flow_control, parse_lanes

GpuDecode = Literal["auto", "all", "off"]  # where JPEGs decode on a GPU (Settings.gpu_decode)

REPO_ROOT = Path(__file__).resolve().parents[2]


# Settings holding a PostgreSQL URL: checked by libpq's parser, shown without password.
DATABASE_URLS = ("database_url", "owner_database_url")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GANNET_", extra="ignore", populate_by_name=True)

    project: str = Field("gannet-local", description="Google Cloud project id.")
    topic: str = Field("gannet-tasks", description="Topic that backends publish tasks to.")
    subscription: str = Field("gannet-tasks-sub", description="Subscription the daemon pulls.")
    dead_letter_topic: str = Field(
        "gannet-dead-letter", description="Topic that quarantined (poison) messages go to."
    )
    lanes: str = Field(
        "",
        description="Lanes sharing the runners, as name:weight[:cap], e.g. "
        "'interactive:4,bulk:1:2' (empty: one lane, 'default'). Each lane is its own "
        "topic, subscription and dead-letter topic: the first lane's are the three above, "
        "lane L's add '-L'. When every lane has work, runners go to lanes by weight; an "
        "idle lane's share goes to the others; cap: most of the lane's tasks running at "
        "once per process (docs/architecture.md, Lanes).",
    )
    database_url: str = Field(
        "postgresql://gannet_worker:gannet@127.0.0.1:54329/gannet",
        description="PostgreSQL URL (libpq form) the daemon connects with. The daemon "
        "refuses to start as a superuser, a role that bypasses row-level security or one "
        "not granted its rows, and warns as an owner of gannet's tables, who may turn "
        "row-level security off: GANNET_OWNER_DATABASE_URL's role owns them.",
    )
    owner_database_url: str | None = Field(
        None,
        description="PostgreSQL URL of the role that owns gannet's tables, for `gannet db "
        "migrate` and `gannet db purge`; `gannet db migrate` then makes GANNET_DATABASE_URL's "
        "role (where it does not exist, with that URL's password) and grants it only "
        "reading, adding and updating rows. Unset: GANNET_DATABASE_URL's role migrates "
        "and owns the tables, as before.",
    )
    db_pool_size: int | None = Field(
        None,
        ge=1,
        description="PostgreSQL connections in the pool (default runners + 4: a runner holds "
        "one while it claims its task and from the fence to the commit, the result's GCS "
        "write included; the rest serve failed messages' rows and callbacks' status).",
    )
    db_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a task waits for a PostgreSQL connection before it is nacked.",
    )
    db_answer_deadline_s: float = Field(
        60.0,
        gt=0,
        description="How long one round trip to PostgreSQL (a claim, a commit, a failed "
        "task's row) may wait for its answer before its connection is dropped and the task "
        "nacked: a server, pooler or proxy that keeps the connection open but stopped "
        "answering. Keep it above the 30 s lock timeout.",
    )
    db_connect_wait_s: float = Field(
        15.0,
        gt=0,
        description="How long the daemon (and `gannet db migrate`) waits at start for "
        "PostgreSQL to accept connections before it exits, saying so (raise it when a "
        "sidecar such as the Cloud SQL Auth Proxy starts slowly). A refusal (a wrong "
        "password, user or database name) ends the wait at once.",
    )
    results_bucket: str = Field("gannet-results", description="Bucket for result JSON.")
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["gannet-images"],
        description="Comma-separated buckets that task images may come from.",
    )
    config_uri: str = Field(
        str(REPO_ROOT / "configs" / "demo.yaml"),
        description="Industry (or deployment) config: a local path or gs://. Unset, with "
        "GANNET_INDUSTRY and GANNET_MODELS_BUCKET set: gs://MODELS_BUCKET/INDUSTRY/config.yaml "
        "(docs/pipelines.md).",
    )
    industry: str | None = Field(None, description="Serve only this industry (optional).")
    models_bucket: str | None = Field(
        None, description="Bucket with per-tenant models at models/TENANT_ID/ (optional)."
    )
    model_cache_dir: Path = Field(
        Path("/tmp/gannet-models"), description="Where weights from gs:// are cached."
    )
    processes: int = Field(
        1,
        ge=1,
        description="Daemon processes in the pod, each with its own runners, stream and "
        "models, pinned to its own share of the CPUs: one Python interpreter per core or two "
        "instead of one for all (docs/architecture.md, Processes). Above 1 a supervisor "
        "starts them and serves the pod's probes and summed metrics.",
    )
    process_hung_s: float = Field(
        60.0,
        ge=20.0,
        le=3600.0,
        description="With GANNET_PROCESSES above 1: a daemon process that stops answering "
        "the supervisor this long after its last answer (a hung CUDA call, a deadlock) is "
        "killed and started again, and its leased tasks go to the others; they wait that "
        "long first. The supervisor asks every 10 s, so the kill comes up to 10 s later "
        "(and at least 20: below, one slow answer after a good one would kill it). "
        "A one-process pod's liveness probe does this (15 s x 4 in the manifest).",
    )
    process_index: int | None = Field(
        None, ge=0, description="Set by the supervisor on the processes it starts (not by hand)."
    )
    supervisor_pid: int | None = Field(
        None,
        ge=1,
        description="Set by the supervisor on the processes it starts (not by hand): its "
        "own pid, so that a process whose supervisor died even before it started notices.",
    )
    runners: int = Field(
        4,
        ge=1,
        le=256,
        description="Runner threads (spread over the devices; 256 at most: 100,000 failed to "
        "start their threads).",
    )
    devices: str = Field(
        "auto", description="'auto' (every cuda:i, else cpu) or a list like 'cuda:0,cuda:1'."
    )
    max_messages: int | None = Field(
        None,
        ge=1,
        description="Flow control: messages leased at once, per lane, at first and at the "
        "least (default 2 x runners; a lane with a cap: 2 x its cap); the lease grows from "
        "it while runners wait behind it (GANNET_LEASE_GROWTH).",
    )
    lease_growth: int = Field(
        4,
        ge=1,
        le=16,
        description="A lane's stream leases up to this many times its GANNET_MAX_MESSAGES "
        "while runners sit idle because every leased message is taken (acks on their way to "
        "a distant Pub/Sub hold slots), and back down while leased messages wait for a "
        "runner (lease.py): with Pub/Sub 20 ms away and a fast model, 4 runners starting "
        "from 8 fed the model 220 images/s, 141 leasing a fixed 8 (docs/benchmark.md). "
        "1: the lease stays fixed.",
    )
    model_memory_budget_mb: int = Field(
        0,
        ge=0,
        description="Per-device MB for loaded models, their CUDA graphs included (counted "
        "as each model loads); LRU eviction above (0 = no limit).",
    )
    model_idle_evict_s: float = Field(
        3600.0,
        ge=0,
        description="A loaded model nobody asked for in this long is evicted (its memory "
        "and thread freed; the next task that needs it loads it again); 0 = never. Old "
        "generations of a model stop being asked for once a config or tenant moves on.",
    )
    model_load_wait_s: float = Field(
        15.0,
        gt=0,
        description="How long a task waits for its model to load (a tenant's own model on "
        "first use, one evicted since) before it is nacked and retried; the load goes on, "
        "so one tenant's slow download does not hold every runner.",
    )
    max_model_mb: int = Field(
        1024,
        ge=1,
        description="Largest model file downloaded from GCS (a tenant's own weights "
        "included): a download is held in memory whole.",
    )
    stream_ack_deadline_s: int = Field(
        60,
        ge=10,
        le=600,
        description="Lease per extension; a crashed pod's messages return after this long. "
        "Against the gcloud emulator, which sends a stream more than its lease, what the "
        "daemon leaves unread this long comes back as duplicates, one per deadline (at 10 "
        "s and a backlog of 1200, 3.7 per success; at 60 s, 1.0): not against Pub/Sub, "
        "which sends no more than the lease.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of each model's forward pass (default: ultralytics' "
        "choice, all cores but one).",
    )
    safe_model_load: bool = Field(
        True,
        description="Unpickle .pt weights with torch's weights_only and ultralytics' "
        "allow-list of its model classes, so that a weights file (a tenant's own too) "
        "cannot run code when loaded; off only for trusted custom architectures.",
    )
    torchscript: bool = Field(
        True,
        description="Run forward passes as TorchScript traces, which release the GIL "
        "(a model whose trace disagrees with eager mode stays eager). A model loaded after "
        "start-up is traced in a child process (a few seconds), which keeps nothing here.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On a CUDA device, replay each model's forward pass as CUDA graphs, "
        "one per input shape, recorded the first time a shape comes: one launch instead "
        "of one per kernel, which set the pace of a small model on a fast GPU "
        "(docs/benchmark.md). A shape whose graph fails to record or disagrees with the "
        "trace runs the trace. At most 32 shapes per model (a warning names the first "
        "past that). Graphs hold GPU memory, counted in GANNET_MODEL_MEMORY_BUDGET_MB: "
        "measured on an H200 with the demo detector at imgsz 640, 9 graphs of 640x480 "
        "photos 116 MiB, 30 of a mix of five shapes 224 MiB. Needs GANNET_TORCHSCRIPT.",
    )
    stage_cpu: bool = Field(
        False,
        description="Count each stage's thread CPU in gannet_stage_cpu_seconds (for "
        "profiling: two clock syscalls per stage, each a point where the kernel can "
        "preempt a thread that holds the GIL; gannet bench --plumbing turns it on).",
    )
    sched_batch: bool = Field(
        True,
        description="Run the daemon's threads under Linux's SCHED_BATCH policy: a thread "
        "that wakes another (handing over the GIL, a queued task, a result) keeps its core "
        "instead of being preempted by it: a quarter fewer context switches and about 14 % "
        "less CPU per image in the plumbing bench (docs/benchmark.md). Off: the default "
        "policy, SCHED_OTHER.",
    )
    decode_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Photos of 4 MP or more are decoded (on the CPU) on threads this much "
        "nicer than the rest, one per runner, so that on busy cores the threads holding "
        "the GIL get a core first: at 4032x3024 and on phone photos, 0.87x the GIL-held "
        "time per image in the plumbing bench (median of 20 rounds), as py-spy read it at "
        "the normal priority; read in the real-time class, 1.01x against 0 at 4032x3024 "
        "(4 rounds) and 0.92x on phone photos (3 rounds; docs/benchmark.md). 0: each "
        "runner decodes its own photos.",
    )
    gpu_decode: GpuDecode = Field(
        "auto",
        description="On a CUDA device, decode JPEGs there (nvJPEG) and letterbox them "
        "there: their pixels never pass through the CPU. auto: every JPEG where the GPU "
        "has a JPEG engine (A100, H100, H200: in batches, in hardware); where it has none "
        "(a T4: one photo at a time, its Huffman stage on one CPU core per process), only "
        "the JPEGs the runners cannot decode at reduced scale, the others on the CPU's "
        "every core. all: every JPEG on the GPU. off: none (true and false mean auto and "
        "off). Other formats, and JPEGs nvJPEG refuses, are decoded on the CPU.",
    )
    batch_size: int = Field(8, ge=1, description="Most images one model call takes.")
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        description="How long a model's batcher waits to fill a batch (0: a batch is "
        "what queued during the last forward pass).",
    )
    max_body_bytes: int = Field(256 * 1024, ge=1, description="Largest accepted message body.")
    max_image_bytes: int = Field(25 * 1024 * 1024, ge=1, description="Largest accepted image file.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Largest accepted width x height.")
    metrics_port: int = Field(
        9090, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz."
    )
    claim_ttl_s: float = Field(
        60.0,
        gt=0,
        description="How long a task's claim keeps other pods from running it; a crashed "
        "pod's claim is taken over after this.",
    )
    shutdown_grace_s: float = Field(
        25.0, ge=0, description="On SIGTERM, how long in-flight work may finish."
    )
    task_stall_s: float = Field(
        600.0,
        ge=0,
        description="A task running longer than this means the process is stuck (a GPU "
        "that hung without an error, a deadlock): /healthz fails, the daemon drains, "
        "nacks that task and exits 1 for a restart. 0: never.",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    pubsub_emulator_host: str | None = Field(
        None,
        validation_alias=AliasChoices("GANNET_PUBSUB_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST"),
        description="host:port of a Pub/Sub emulator (PUBSUB_EMULATOR_HOST works too).",
    )
    storage_emulator_host: str | None = Field(
        None, description="http://host:port of a GCS emulator (local runs and tests)."
    )
    backlog_from_monitoring: bool = Field(
        False, description="Poll Cloud Monitoring for the subscription's backlog."
    )
    backlog_poll_s: float = Field(30.0, gt=0, description="Cloud Monitoring poll interval.")
    model_check_s: float = Field(
        30.0,
        ge=0,
        description="How often model versions and per-tenant model listings are re-read.",
    )
    config_check_s: float | None = Field(
        None,
        gt=0,
        description="How often the config (GANNET_CONFIG_URI) is checked for a change. "
        "Unset: every 30 s for a gs:// config (a metadata request per config and pod), "
        "every 5 s for a local file (a stat).",
    )
    callback_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Timeout of each attempt of a result callback: connecting, sending "
        "and the answer's status and headers together (the body is not read); the host's "
        "DNS lookup before it has as long again.",
    )
    callback_retries: int = Field(
        6,
        ge=0,
        le=10,
        description="Callback retries after the first try (network, 429, 5xx). A retry "
        "waits without a thread: 6 at 1 s doubling reach a receiver down for a minute.",
    )
    callback_backoff_s: float = Field(
        1.0, ge=0, description="Wait before the first callback retry; doubles per retry."
    )
    callback_workers: int = Field(
        16,
        ge=1,
        description="Threads that send callbacks (off the runner threads), started as "
        "needed; at most a quarter of them on one tenant's callbacks at a time, and one "
        "while its receiver fails.",
    )
    callback_lease_s: float = Field(
        60.0,
        ge=4,
        le=3600,
        description="How long a callback owed stays its pod's without a renewal (every "
        "quarter of it): one whose pod died is sent by another pod after this, one a "
        "stopping pod could not send at once. Shorter: sooner after a crash, more renewals.",
    )
    allow_http_callbacks: bool = Field(
        False, description="Allow http:// callback URLs (default: https only)."
    )
    callback_allow_private_addresses: bool = Field(
        False,
        description="Allow callbacks to private/loopback/link-local addresses (local tests only).",
    )
    callback_ca_file: str | None = Field(
        None, description="Extra CA bundle (PEM) to trust for https callbacks (optional)."
    )
    callback_signing_key: SecretStr | None = Field(
        None,
        description="Signs each result callback (HMAC-SHA256 of the timestamp and the body, "
        "in its Gannet-Signature header) so that receivers can tell it came from this "
        "deployment; 32 characters or more (`openssl rand -hex 32`), from a Secret. Unset: "
        "callbacks are unsigned.",
    )
    trace_exporter: Literal["off", "otlp", "cloud_trace"] = Field(
        "off",
        description="Where task traces go: off (no cost), otlp (GANNET_TRACE_OTLP_ENDPOINT) "
        "or cloud_trace (Cloud Trace's OTLP endpoint, with the pod's Workload Identity).",
    )
    trace_otlp_endpoint: str = Field(
        "http://localhost:4317", description="OTLP gRPC endpoint when GANNET_TRACE_EXPORTER=otlp."
    )
    trace_sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces kept; a task whose publisher sampled it is kept.",
    )

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            value = [b.strip() for b in value.split(",") if b.strip()]
        if isinstance(value, list) and not value:  # every task would be refused
            raise ValueError("name at least one bucket (comma-separated) that images come from")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        """logging's own names, in any case: another raised in logging, a traceback."""
        level = value.strip().upper()
        if level not in _LEVELS:
            raise ValueError(f"one of {', '.join(_LEVELS)}")
        return level

    @field_validator("owner_database_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """A Secret's empty key: libpq took "" for the local socket."""
        return None if value == "" else value

    @field_validator(*DATABASE_URLS)
    @classmethod
    def _libpq_url(cls, value: str | None) -> str | None:
        """A URL libpq cannot parse was taken for a database not up yet: the start's
        wait, then `is it running?` (or a traceback, from `gannet db migrate`)."""
        if value is None:
            return None
        try:
            conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            raise ValueError(
                f"not a PostgreSQL URL ({_unquoted(str(exc).strip(), value)}): write it as "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (?sslmode=require for a "
                "direct connection to Cloud SQL)"
            ) from None
        return value

    @field_validator("gpu_decode", mode="before")
    @classmethod
    def _gpu_decode_bools(cls, value: object) -> object:
        """It was a switch: what turned it on or off still does."""
        if isinstance(value, bool):
            return "auto" if value else "off"
        if isinstance(value, str):
            word = value.strip().lower()
            return {"true": "auto", "1": "auto", "false": "off", "0": "off"}.get(word, word)
        return value

    @field_validator("callback_signing_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        """A short key can be guessed from signed callbacks; an empty one is a mistake
        (an unset Secret's key) rather than a wish for unsigned callbacks."""
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("use 32 characters or more (openssl rand -hex 32), or unset it")
        return value

    @field_validator("lanes")
    @classmethod
    def _check_lanes(cls, value: str) -> str:
        parse_lanes(value, "t", "s", "d")  # raises ValueError with what to write
        return value

    def lane_list(self) -> list[Lane]:
        """The lanes, first (today's topic and subscription) first."""
        return parse_lanes(self.lanes, self.topic, self.subscription, self.dead_letter_topic)

    def lane(self, name: str | None) -> Lane:
        """The lane of that name (None: the first); a ValueError names the lanes."""
        lanes = self.lane_list()
        if name is None:
            return lanes[0]
        for lane in lanes:
            if lane.name == name:
                return lane
        names = ", ".join(lane.name for lane in lanes)
        raise ValueError(f"no lane {name!r} in GANNET_LANES (lanes: {names})")

    def owner_database(self) -> tuple[str, str]:
        """The URL of the role that owns gannet's tables, and the setting it is (errors
        name it): GANNET_OWNER_DATABASE_URL, else the daemon's, which then owns them."""
        if self.owner_database_url is not None:
            return self.owner_database_url, "GANNET_OWNER_DATABASE_URL"
        return self.database_url, "GANNET_DATABASE_URL"

    def db_connections(self) -> int:
        """PostgreSQL connections one process pools. Why it follows the runners: with
        fewer connections than runners, runners queue for one at the claim and at the
        commit, and raising GANNET_RUNNERS for a bucket's latency bought less than it
        should (docs/benchmark.md, "The runners' connections")."""
        return self.db_pool_size or self.runners + 4

    def config_location(self) -> str:
        """GANNET_CONFIG_URI, or gs://MODELS_BUCKET/INDUSTRY/config.yaml when only the
        industry and the models bucket are given (the usual single-industry deployment)."""
        explicit = "config_uri" in self.model_fields_set
        if not explicit and self.industry and self.models_bucket:
            return f"gs://{self.models_bucket}/{self.industry}/config.yaml"
        return self.config_uri

    def config_every_s(self) -> float:
        """How often ConfigWatch checks the configs: GANNET_CONFIG_CHECK_S when set; else a
        gs:// config every 30 s (a metadata request per config and pod each time), a
        local file every 5 s (a stat)."""
        if self.config_check_s is not None:
            return self.config_check_s
        return 30.0 if self.config_location().startswith("gs://") else 5.0

    def lane_flow_control(self, lane: Lane) -> int:
        """Messages one lane's stream leases at once, at first and at the least
        (lease.py grows it up to `lease_growth` times this)."""
        return flow_control(self.max_messages, self.runners, lane.cap)

    def path(self, kind: Literal["topics", "subscriptions"], name: str) -> str:
        return f"projects/{self.project}/{kind}/{name}"

    @property
    def traced(self) -> bool:
        """Tasks are traced (tracing.py); the Pub/Sub clients carry the context."""
        return self.trace_exporter != "off"

    @property
    def supervises(self) -> bool:
        """This process is the supervisor of GANNET_PROCESSES daemons (supervisor.py)."""
        return self.processes > 1 and self.process_index is None

    def subscription_path(self) -> str:
        """The first lane's subscription."""
        return self.path("subscriptions", self.subscription)

    def topic_path(self) -> str:
        """The first lane's topic."""
        return self.path("topics", self.topic)

    @property
    def dead_letter_subscription(self) -> str:
        """The first lane's dead-letter subscription, named as terraform names it."""
        return self.lane_list()[0].dead_letter_subscription


_LEVELS = tuple(logging.getLevelNamesMapping())  # WARN and FATAL too, as logging takes
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)([^/]*)@")  # the password: group 2
_KEY_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)")


def _unquoted(message: str, database_url: str) -> str:
    """libpq's message about a URL it cannot parse, without the URL's password: it
    quotes the token it choked on, often the password itself (a `%` or a space in it)."""
    secrets = [m.group(2) for m in _URL_PASSWORD.finditer(database_url)]
    secrets += [m.group(2).strip("'") for m in _KEY_PASSWORD.finditer(database_url)]
    for secret in filter(None, secrets):
        message = message.replace(secret, "***")
    return without_password(message)


def without_password(database_url: str) -> str:
    """The URL as it may be shown: `gannet settings` output is pasted into tickets and
    chat. Both libpq forms: a URL's user:PASSWORD@ and ?password=, and key=value's
    password=."""
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", database_url))


# Kubernetes' service links: a Service named gannet-worker puts GANNET_WORKER_SERVICE_HOST,
# GANNET_WORKER_PORT=tcp://... and the like into every pod of its namespace.
_SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT)(_\w+)?$")
_SERVICE_LINK_VALUE = re.compile(r"^(tcp|udp|sctp)://")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each GANNET_* variable (of `environ`, by default the process's)
    that is no setting. Settings ignore unknown variables, so a typo in a ConfigMap
    (GANNET_SUBSCRIPTON) left the default in force without a word; a warning names it
    and the setting it was probably meant for."""
    environ = os.environ if environ is None else environ
    known = {f"GANNET_{name.upper()}" for name in Settings.model_fields}
    warnings = []
    for name, value in sorted(environ.items()):
        if not name.startswith("GANNET_") or name in known:
            continue
        if _SERVICE_LINK.search(name) or _SERVICE_LINK_VALUE.match(value):
            continue
        # Without the prefix every pair shared seven letters: GANNET_FOO "was" GANNET_TOPIC.
        suffixes = {k.removeprefix("GANNET_"): k for k in known}
        close = difflib.get_close_matches(name.removeprefix("GANNET_"), suffixes, n=1)
        hint = (
            f"; did you mean {suffixes[close[0]]}?" if close else " (`gannet settings` lists them)"
        )
        warnings.append(f"{name} is not a setting and is ignored{hint}")
    return warnings


def refused_settings(exc: ValidationError) -> str:
    """Settings' refusal as the operator wrote it: the variable (GANNET_RUNNERS, not
    pydantic's field `runners`), the value and why, one line each, without pydantic's
    documentation links."""
    lines = []
    for error in exc.errors(include_url=False):
        why = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a check across settings: its message names them
            lines.append(why)
            continue
        name = str(error["loc"][0])
        value = error["input"]
        if name in DATABASE_URLS and isinstance(value, str):
            value = without_password(value)
        elif name == "callback_signing_key":
            value = "(not shown)"
        lines.append(f"GANNET_{name.upper()}={value!r}: {why}")
    return "\n".join(lines)


def settings_table() -> str:
    """The README's settings table, generated so that it cannot drift from the code."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        if name == "config_uri":
            default = "configs/demo.yaml (in the repo)"
        rows.append(f"| GANNET_{name.upper()} | `{default}` | {field.description} |")
    return "\n".join(rows)
