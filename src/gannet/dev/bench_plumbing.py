"""`gannet bench --plumbing`: what the daemon itself spends per image, around the model.

On a GPU the forward pass costs a few milliseconds; whatever the daemon spends around it
(Pub/Sub, GCS, decode, pre- and post-processing, JSON, PostgreSQL) decides whether the
GPU is fed or idle. This mode measures exactly that: the daemon runs with the network's
answers recorded once per input and replayed (gannet/dev/replay.py), everything else
real, through the emulators and PostgreSQL, on JPEGs of several sizes:

  640x480, 1920x1080, 4032x3024, and a mix of phone, drone and shelf shapes (4:3, 16:9,
  3:2 and portrait), generated from the synthetic scene generator at bench time.

For each size it reports images/s and the daemon's CPU ms per image split by stage (from
the daemon's own gannet_stage_cpu_seconds counter; what no stage accounts for is the
Pub/Sub client's and other background threads), with the daemon pinned to one core and
to two (`taskset`), and the time a thread held the GIL per image (py-spy --gil, sampled at
GIL_RATE Hz in a separate run, py-spy in the real-time class: GIL-held seconds = (samples +
errors) / GIL_RATE, see start_py_spy and stop_py_spy).

With `--baseline REV` the daemon of commit REV (its src/ from `git archive`) is measured
the same way in the same run, interleaved with this tree's, so a change is judged side
by side rather than against figures from another hour of this drifting VM.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import psutil

from gannet import clients
from gannet.dev import demo, stack
from gannet.dev.bench import (
    TENANT,
    cpu_ms_per_image,
    cpu_seconds,
    demo_scenes,
    shares_by_worker,
    wait_committed,
)
from gannet.dev.local_services import LocalServices, Ports
from gannet.dev.publish import make_task, publish_tasks, upload_image
from gannet.dev.trace_receiver import TraceReceiver
from gannet.errors import CommandError, GannetError
from gannet.settings import REPO_ROOT, Settings
from gannet.storage import Storage
from gannet.text import format_table

SIZES = ("640x480", "1920x1080", "4032x3024", "mix")  # the default run's image sets
# "phone": 4032x3024 with a sensor's grain, 3.5 MB a file as a 12 MP phone writes it (the
# smooth 4032x3024 scenes make 1.1-1.5 MB): the bytes a real bucket sends over TLS.
IMAGE_SETS = (*SIZES, "phone")
PHONE_GRAIN = 8.0  # the grain's standard deviation, in 8-bit levels
# The mix: phone 4:3, drone 16:9, camera 3:2, phone portrait 3:4, shelf 2:3 portrait.
MIX = ((1600, 1200), (1920, 1080), (1800, 1200), (1200, 1600), (1000, 1500))
DISTINCT = 6  # distinct images per size; the tasks cycle through them
# py-spy's samples per second. In the real-time class (start_py_spy) each sample stops
# a thread for well under a millisecond, now and then the GIL's holder: so not faster.
# At 4032x3024, 25, 50, 100 and 250 Hz read the same within their noise (docs/benchmark.md).
GIL_RATE = 100
GIL_RUN = "2 cores, py-spy --gil"
PER_CORE_RUN = "GANNET_PROCESSES=2, a core each"
TRACED_RUN = "2 cores, traced at sampling 1.0"
THIS_TREE = "this tree"
IMGSZ = 640  # the detector's input size in this mode (the demo config's is 416)
DETECTOR = REPO_ROOT / "models" / "demo" / "detect.pt"  # the demo's detector (write_config)

# Stage counter names -> what the report calls them, in the order of a message's path.
STAGES = {
    "receive": "parse + checks",
    "lookup": "PG lookup/claim",
    "fetch": "GCS read",
    "decode": "decode",
    "preprocess": "pre-process",
    "forward": "forward (replayed)",  # the replay itself: a hash of the input
    "inference": "wait for forward",
    "postprocess": "post-process",
    "detection": "step's own",
    "result_json": "result JSON",
    "gcs_write": "GCS write",
    "sink": "PG commit",
    "settle": "ack + log",
}


@dataclass(frozen=True)
class Daemon:
    """One daemon to measure: this tree's, or a baseline commit's src/."""

    name: str
    src: Path  # its src/, first on PYTHONPATH


def synthetic_module() -> ModuleType:
    """scripts/synthetic_scenes.py, the generator the demo's samples came from."""
    path = REPO_ROOT / "scripts" / "synthetic_scenes.py"
    spec = importlib.util.spec_from_file_location("synthetic_scenes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def images_for(size: str, out: Path, count: int = DISTINCT) -> list[Path]:
    """DISTINCT JPEGs of `size`: the demo's own samples at 640x480; larger ones are scenes
    drawn at a quarter or half the size and scaled up (the shapes stay large enough for a
    640-pixel model input to see), JPEG quality 90 as a phone writes them; "phone" adds a
    sensor's grain to 4032x3024 ones (PHONE_GRAIN). `count` < DISTINCT: only the first
    `count` of them (the same files, drawn in the same order), fewer to draw."""
    if size == "640x480":
        return demo_scenes()
    out.mkdir(parents=True, exist_ok=True)
    if size == "mix":
        dims = list(MIX)
    else:
        across, _, down = ("4032x3024" if size == "phone" else size).partition("x")
        dims = [(int(across), int(down))] * DISTINCT
    scenes = synthetic_module()
    rng = np.random.default_rng(20261201)
    files = []
    for i, (width, height) in enumerate(dims[: min(count, DISTINCT)]):
        path = out / f"{size}-{i}.jpg"
        if not path.exists():
            factor = 4 if width * height > 4_000_000 else 2
            scene = scenes.make_scene(rng, width // factor, height // factor)
            image = cv2.resize(scene.image, (width, height), interpolation=cv2.INTER_CUBIC)
            if size == "phone":
                grain = np.asarray(rng.normal(0.0, PHONE_GRAIN, image.shape), np.float32)
                image = np.clip(image + grain, 0, 255).astype(np.uint8)
            ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            path.write_bytes(data.tobytes())
        files.append(path)
    return files


def pipeline_under_test(args: argparse.Namespace) -> tuple[Path, str]:
    """The config file and pipeline the tasks ask for: `--pipeline CONFIG:NAME`, or by
    default the demo detector alone at imgsz IMGSZ (write_config)."""
    if args.pipeline:
        config, name = split_pipeline(args.pipeline)
        return config.resolve(), name
    return write_config(args.state_dir / "bench"), "DETECTION"


def split_pipeline(spec: str) -> tuple[Path, str]:
    """'configs/agro.yaml:FULL_PIPELINE' -> (its config file, its pipeline's name)."""
    config, _, name = spec.rpartition(":")
    return Path(config), name


def write_config(out: Path) -> Path:
    """The demo detector in a one-step DETECTION pipeline at imgsz IMGSZ."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plumbing.yaml"
    path.write_text(
        "industry: plumbing\nversion: 1\nmodels:\n  detection:\n"
        f"    path: {DETECTOR}\n"
        "    confidence_threshold: 0.5\n    classes: [circle, square, triangle]\n"
        f"    imgsz: {IMGSZ}\npipelines:\n  DETECTION:\n    - detection\n"
    )
    return path


def scrape(port: int) -> dict[str, float]:
    """The daemon's stage counters ("cpu:STAGE" CPU seconds, "wall:STAGE" wall seconds)
    and batch-size histogram, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('gannet_stage_cpu_seconds_total{stage="'):
            stage = line.split('"')[1]
            values[f"cpu:{stage}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith('gannet_stage_seconds_sum{stage="'):
            stage = line.split('"')[1]
            values[f"wall:{stage}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(("gannet_batch_size_sum ", "gannet_batch_size_count ")):
            name, value = line.split(" ")
            values[name] = float(value)
    return values


def ms_per_task(
    before: dict[str, float], after: dict[str, float], kind: str, n: int
) -> dict[str, float]:
    """Per stage, the milliseconds (of `kind`: "cpu" or "wall") two scrapes differ by,
    per task of the `n` run between them."""
    prefix = f"{kind}:"
    return {
        key.removeprefix(prefix): (after[key] - before.get(key, 0.0)) * 1000 / n
        for key in after
        if key.startswith(prefix)
    }


def measure(
    services: LocalServices,
    queue: Settings,
    urls: list[str],
    daemon: Daemon,
    cpus: str,
    args: argparse.Namespace,
    log_path: Path,
    gil: bool = False,
    stage_cpu: bool = False,
    processes: int = 1,
    receiver: TraceReceiver | None = None,
    runners: int | None = None,
    leased: int | None = None,
) -> dict[str, Any]:
    """One daemon on `cpus` (with `processes` > 1, its supervisor and that many daemon
    processes, each pinned to its share): warm up on every distinct image (recording the
    network's answers), then publish the tasks and time them to the last committed row.
    With a `receiver`, the daemon traces every task to it. `runners`: instead of
    args.runners; `leased`: GANNET_MAX_MESSAGES (default: the daemon's, 2 x runners)."""
    config, pipeline = pipeline_under_test(args)
    env = {
        **daemon_env(services, queue, config, daemon.src, runners or args.runners, leased),
        "GANNET_STAGE_CPU": "1" if stage_cpu else "0",
        "GANNET_PROCESSES": str(processes),
        **(receiver.env() if receiver else {}),
        "GANNET_TRACE_SAMPLE_RATIO": "1.0",
    }
    command = replay_command(cpus)
    # Processes share what any of them recorded (replay.py --answers), in a store of this
    # measurement's own, so no answer outlives the run that recorded it.
    answers = log_path.with_suffix(f".answers-{uuid.uuid4().hex[:8]}")
    if processes > 1:
        command += ["--answers", str(answers)]
    proc = demo.DaemonProcess(env, log_path, command=command)
    publisher, _ = clients.pubsub_clients(queue)
    spy: subprocess.Popen[bytes] | None = None
    idle: IdleClock | None = None
    try:
        proc.wait_ready(timeout_s=300)
        distinct = sorted(set(urls))
        # One round per process: the first records each answer, the others load it.
        warm = [
            make_task(TENANT, u, pipeline, f"w-{uuid.uuid4().hex}") for u in distinct * processes
        ]
        publish_tasks(publisher, queue.topic_path(), warm)
        wait_committed(queue.database_url, TENANT, [t.task_id for t in warm], timeout_s=300)
        tasks = [make_task(TENANT, u, pipeline, f"p-{uuid.uuid4().hex}") for u in urls]
        task_ids = [t.task_id for t in tasks]
        gil_file = log_path.with_suffix(".gil.txt")
        if gil:
            spy = start_py_spy(proc.proc.pid, gil_file)
        # CPU of the daemon and, under a supervisor, of every daemon process it runs.
        pid = {"daemon": proc.proc.pid}
        # And of everything else that serves the daemon on these same cores: the
        # emulators, PostgreSQL and this process (which publishes and polls).
        rest = {**services.pids(), "bench": os.getpid()}
        before, cpu_before = scrape(proc.metrics_port), cpu_seconds(pid)["daemon"]
        rest_before = cpu_seconds(rest)
        threads_before, idle = threads(proc.proc.pid), IdleClock()
        started = time.time()
        publish_tasks(publisher, queue.topic_path(), tasks)
        finished, failed = wait_committed(queue.database_url, TENANT, task_ids, timeout_s=900)
        after, cpu_after = scrape(proc.metrics_port), cpu_seconds(pid)["daemon"]
        rest_after = cpu_seconds(rest)
        counted = threads(proc.proc.pid) - threads_before
        idle_cores = idle.cores_between(started, finished)
        gil_samples = stop_py_spy(spy, gil_file) if spy else None
        # After the CPU readings, so that this query is not charged to the services.
        shares = shares_by_worker(queue.database_url, TENANT, task_ids) if processes > 1 else []
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if idle is not None:
            idle.stop()
        stop_daemon(proc, daemon.name)
        shutil.rmtree(answers, ignore_errors=True)
    if failed:
        raise RuntimeError(f"{failed} of {len(tasks)} tasks failed; see {log_path}")
    traced = None
    if receiver is not None:  # every task's span arrived: the run did trace them all
        ids = {t.task_id for t in tasks}
        spans = receiver.wait_for(
            lambda got: ids <= {s.attributes.get("gannet.task_id") for s in got}, 60
        )
        traced = sum(1 for s in spans if s.attributes.get("gannet.task_id") in ids) / len(ids)
    n = len(tasks)
    seconds = finished - started
    services_by_name = cpu_ms_per_image(rest_before, rest_after, n)
    stages = ms_per_task(before, after, "cpu", n)
    total = (cpu_after - cpu_before) * 1000 / n
    batches = after["gannet_batch_size_count"] - before.get("gannet_batch_size_count", 0.0)
    images = after["gannet_batch_size_sum"] - before.get("gannet_batch_size_sum", 0.0)
    report: dict[str, Any] = {
        "images_per_s": n / seconds,
        "cpu_ms_per_image": total,
        "services_cpu_ms_per_image": sum(services_by_name.values()),
        "services_cpu_ms_per_image_by_name": services_by_name,
        "stages_cpu_ms_per_image": stages,
        "stages_wall_ms_per_task": ms_per_task(before, after, "wall", n),
        "other_threads_cpu_ms_per_image": total - sum(stages.values()),
        "mean_batch_size": images / batches if batches else 0.0,
        "switches_per_image": counted.switches / n,
        "cpu_wait_ms_per_image": counted.cpu_wait_s * 1000 / n,
        "idle_cores": idle_cores,
    }
    if processes > 1:  # the Pub/Sub emulator may give one process every message
        report["busiest_process_share"] = shares[0] if shares else 0.0
    if gil_samples is not None:
        report["gil_ms_per_image"] = gil_samples / GIL_RATE * 1000 / n
    if traced is not None:
        report["spans_per_image_with_task_id"] = traced
    return report


def daemon_env(
    services: LocalServices,
    queue: Settings,
    config: Path,
    src: Path,
    runners: int,
    leased: int | None = None,
) -> dict[str, str]:
    """The environment of a measured daemon: the local services, `queue`'s topic and
    subscription, `config`, the `src` tree's code, `runners`, and `leased`
    (GANNET_MAX_MESSAGES; default: the daemon's, 2 x runners); one torch thread."""
    return {
        **services.env(),
        "GANNET_RUNNERS": str(runners),
        "GANNET_TOPIC": queue.topic,
        "GANNET_SUBSCRIPTION": queue.subscription,
        "GANNET_DEAD_LETTER_TOPIC": queue.dead_letter_topic,
        "GANNET_CONFIG_URI": str(config),
        "GANNET_TORCH_THREADS": "1",
        "PYTHONPATH": str(src),
        **({"GANNET_MAX_MESSAGES": str(leased)} if leased else {}),
    }


def replay_command(cpus: str) -> list[str]:
    """A daemon whose network's answers are replayed (replay.py), pinned to `cpus`."""
    return ["taskset", "-c", cpus, sys.executable, "-m", "gannet.dev.replay"]


@dataclass(frozen=True)
class Threads:
    """Linux's per-thread counters, summed over every live thread of a process tree (a
    thread that ended meanwhile is missed)."""

    switches: int  # voluntary (waits: the GIL, a lock, a socket) and involuntary ones
    cpu_wait_s: float  # runnable but not running: time spent waiting for a CPU

    def __sub__(self, other: Threads) -> Threads:
        return Threads(self.switches - other.switches, self.cpu_wait_s - other.cpu_wait_s)


def threads(pid: int) -> Threads:
    """`pid`'s and its descendants' thread counters so far. Context switches each cost a
    few microseconds of CPU, and the daemon's threads hand work to each other dozens of
    times per image. The wait for a CPU (the second field of schedstat) says whether the
    cores bind: a thread waiting for the GIL sleeps and is not counted there."""
    try:
        root = psutil.Process(pid)
        pids = [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return Threads(0, 0.0)
    switches, waited_ns = 0, 0
    for each in pids:
        for task in Path(f"/proc/{each}/task").glob("*"):
            try:
                status = (task / "status").read_text()
                schedstat = (task / "schedstat").read_text().split()
            except OSError:  # the thread ended between the listing and the read
                continue
            switches += sum(int(n) for n in _SWITCHES.findall(status))
            waited_ns += int(schedstat[1])
    return Threads(switches, waited_ns / 1e9)


def idle_cpu_seconds() -> float:
    """Idle (and I/O wait) time of all of this machine's CPUs so far, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


class IdleClock:
    """The machine's idle CPU time, read every 50 ms on a thread of its own until asked.

    Why: a run ends at its last commit (the rows' own time), and the poll that notices it
    sleeps 0.5 s; read once after the poll, the idle time would include that drain, up
    to half a second of idle cores added to a run of a few seconds."""

    def __init__(self, every_s: float = 0.05) -> None:
        self._samples = [(time.time(), idle_cpu_seconds())]
        self._stop = threading.Event()
        self._every_s = every_s
        self._thread = threading.Thread(target=self._sample, name="idle-clock", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._every_s):
            self._samples.append((time.time(), idle_cpu_seconds()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cores_between(self, start: float, end: float) -> float:
        """Idle cores on average from wall-clock `start` to `end` (the samples nearest
        to each), once sampling has stopped."""
        self.stop()

        def nearest(t: float) -> tuple[float, float]:
            return min(self._samples, key=lambda sample: abs(sample[0] - t))

        (t0, idle0), (t1, idle1) = nearest(start), nearest(end)
        return (idle1 - idle0) / (t1 - t0) if t1 > t0 else 0.0


_SWITCHES = re.compile(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)$", re.M)


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling only the thread that holds the GIL, without pausing the daemon.
    Its summary line (samples and errors) goes to `out` with ".summary" added.

    py-spy runs in the real-time class (SCHED_FIFO), so each sample is taken when its
    tick comes. An ordinary py-spy waits for a core when both are busy and gets one when
    a thread blocks, a moment at which that thread has just let go of the GIL: it read the
    GIL-held time about 15 % low, at 640x480 and at 4032x3024 alike (docs/benchmark.md,
    "The GIL-held figure read low while the cores were busy"). Where the real-time class
    is refused, it runs as before and says so.
    """
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    rate = str(GIL_RATE)
    command = [spy, "record", "--gil", "--nonblocking", "--rate", rate, "--format", "raw"]
    if real_time_allowed():
        command = ["chrt", "--fifo", "1", *command]
    with summary_path(out).open("wb") as summary:
        proc = subprocess.Popen(
            [*command, "-o", str(out), "--pid", str(pid)],
            stdout=summary,
            stderr=subprocess.STDOUT,
        )
    time.sleep(1.0)  # py-spy attaches
    if proc.poll() is not None:
        raise RuntimeError(
            "py-spy could not attach (needs ptrace: run as root or with CAP_SYS_PTRACE)"
        )
    return proc


@functools.cache
def real_time_allowed() -> bool:
    """Whether this process may start one in the real-time class (root, or
    CAP_SYS_NICE); said once when it may not."""
    try:
        allowed = subprocess.run(["chrt", "--fifo", "1", "true"], capture_output=True).returncode
    except FileNotFoundError:  # no util-linux
        allowed = 1
    if allowed != 0:
        print(
            "  (py-spy runs at the normal priority: `chrt --fifo` was refused or is missing; "
            "the GIL-held figure then reads about 15 % low)",
            flush=True,
        )
    return allowed == 0


def summary_path(out: Path) -> Path:
    return out.with_name(out.name + ".summary")


def stop_daemon(proc: demo.DaemonProcess, name: str) -> None:
    """SIGTERM, then SIGKILL after 60 s, saying so: the tasks are committed by now, and a
    baseline from before signals.py can deadlock in its own SIGTERM handler now and then
    (docs/benchmark.md), which should not cost the bench its figures."""
    try:
        proc.stop()
    except subprocess.TimeoutExpired:  # killed by now
        print(f"  ({name}'s daemon did not stop within 60 s of SIGTERM; killed)", flush=True)


def stop_py_spy(proc: subprocess.Popen[bytes], out: Path) -> int:
    """Sampling ticks at which some thread held the GIL: the samples py-spy wrote plus
    the ticks it reported as errors.

    Why the errors count: with --gil, py-spy reads only the stack of the thread that
    holds the GIL, and without pausing the daemon that read fails now and then, because
    that thread's frames change while they are read. Such a tick is an error and writes
    no sample, though the GIL was held. Measured against py-spy pausing the daemon at
    each tick (no errors), 10 s each in turns at 100 Hz on a 640x480 run: 478 and 448
    GIL-held ticks paused; 347 and 386 samples plus 96 and 84 errors without pausing.
    Counting the samples alone read the GIL-held time about a fifth too low
    (docs/benchmark.md, "The GIL-held figure counted py-spy's errors out")."""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    summary = summary_path(out).read_text(errors="replace")
    return count_samples(out.read_text(errors="replace")) + count_errors(summary)


# A raw sample is "frame;frame;... (file.py:N) COUNT". Sampling without pausing the
# daemon (--nonblocking) now and then reads a frame's name while it changes, and the
# garbage can hold newlines (once, a line of the /metrics page): only a line that ends
# in a frame's ")" and a count ends a sample.
_SAMPLE_END = re.compile(r"\) (\d+)$")


def count_samples(raw: str) -> int:
    """The samples in py-spy's raw output."""
    return sum(int(m.group(1)) for line in raw.splitlines() if (m := _SAMPLE_END.search(line)))


_ERRORS = re.compile(r"Samples: \d+ Errors: (\d+)")


def count_errors(summary: str) -> int:
    """The ticks py-spy could not sample, from the line it prints when it stops
    ("... Samples: N Errors: M")."""
    found = _ERRORS.findall(summary)
    if not found:
        raise RuntimeError(
            "py-spy printed no 'Samples: N Errors: M' line, so the GIL-held time cannot be "
            f"counted; its output: {summary.strip()[-500:]!r}"
        )
    return int(found[-1])


# The daemon before any change to the hot path: 88ae9f0, where this mode was added, with
# only the switch that later kept the stage CPU clock off unless GANNET_STAGE_CPU=1
# (plumbing_baseline.patch), so both daemons are measured alike. A name rather than a
# git tag: a clone does not always carry tags.
BASELINE = "plumbing-baseline"
BASELINE_COMMIT = "88ae9f0"
BASELINE_PATCH = Path(__file__).with_name("plumbing_baseline.patch")


def baseline_commit(rev: str) -> str:
    """The commit whose src/ a --baseline REV runs (before the baseline's patch)."""
    return BASELINE_COMMIT if rev == BASELINE else rev


def baseline_src(rev: str, out: Path) -> Path:
    """Commit `rev`'s src/ tree (or the plumbing baseline's), to run its daemon beside
    this one. Kept under the commit's hash, not `rev`: a name such as HEAD moves, and a
    tree extracted under it would be measured as the baseline long after."""
    commit = subprocess.run(
        [
            "git",
            "-C",
            str(REPO_ROOT),
            "rev-parse",
            "--verify",
            f"{baseline_commit(rev)}^{{commit}}",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = out / (f"baseline-{rev}" if rev == BASELINE else f"baseline-{commit}")
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", commit, "src"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        if rev == BASELINE:  # outside any repository (the state dir is inside this one)
            env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(target.parent)}
            apply = ["git", "apply", str(BASELINE_PATCH)]
            subprocess.run(apply, cwd=target, env=env, check=True, capture_output=True)
    return target / "src"


# A run: (label, cpus, py-spy --gil, GANNET_STAGE_CPU, processes, traced).
Run = tuple[str, str, bool, bool, int, bool]


def plan_runs(args: argparse.Namespace, traced: bool) -> tuple[list[Run], list[Run]]:
    """The runs of one round: a baseline's and this tree's. The clean runs give
    images/s and CPU per image; the stage split, the GIL and tracing each perturb what
    they measure (clock syscalls, sampling, spans), so each gets a run of its own."""
    two_cores: Run = ("2 cores", "0,1", False, False, 1, False)
    gil_run: Run = (GIL_RUN, "0,1", True, False, 1, False)
    if args.gil_only:  # the GIL beside the clean run it is read against, for many rounds
        return [two_cores, gil_run], [two_cores, gil_run]
    cores = [two_cores, ("1 core", "1", False, False, 1, False)]
    cores.append(("2 cores, stage CPU", "0,1", False, True, 1, False))
    if args.gil:
        cores.append(gil_run)
    # This tree's daemon only (a baseline's has neither): every task traced, next to
    # the clean 2-core run it is compared with, so the VM's drift within a round falls
    # on both alike; and one daemon process per core (GANNET_PROCESSES=2).
    traced_run: list[Run] = [(TRACED_RUN, "0,1", False, False, 1, True)] if traced else []
    if args.trace_only:
        return cores, [two_cores, *traced_run]
    per_core: Run = (PER_CORE_RUN, "0,1", False, False, 2, False)
    return cores, [two_cores, *traced_run, *cores[1:], per_core]


def one_size(
    services: LocalServices,
    base: Settings,
    size: str,
    daemons: list[Daemon],
    args: argparse.Namespace,
    receiver: TraceReceiver | None = None,
) -> dict[str, Any]:
    files = images_for(size, args.state_dir / "bench" / "images")
    services.empty_storage()
    storage = Storage(clients.storage_client(base))
    bucket = base.allowed_buckets[0]
    uploaded = [upload_image(storage, bucket, TENANT, f, "plumbing") for f in files]
    urls = [uploaded[i % len(uploaded)] for i in range(args.images)]
    if args.runners_sweep:
        return sweep(services, urls, daemons, size, args)
    rounds: dict[str, list[dict[str, Any]]] = {d.name: [] for d in daemons}
    theirs, ours = plan_runs(args, traced=receiver is not None)
    for n in range(1, args.rounds + 1):
        for daemon in in_turn(daemons, n):
            result: dict[str, Any] = {}
            runs = ours if daemon.name == THIS_TREE else theirs
            if receiver is not None and n % 2 == 0:  # every other round traced first: the second
                runs = [runs[1], runs[0], *runs[2:]]  # run of a pair is not always it
            for label, cpus, gil, split, processes, traced in runs:
                print(f"  {size} round {n}: {daemon.name} daemon, {label} ...", flush=True)
                queue = stack.fresh_queue(services, f"pl-{uuid.uuid4().hex[:8]}")
                log = args.state_dir / "bench" / f"plumbing-{daemon.name.replace(' ', '-')}.log"
                result[label] = measure(
                    services,
                    queue,
                    urls,
                    daemon,
                    cpus,
                    args,
                    log,
                    gil,
                    split,
                    processes,
                    receiver if traced else None,
                )
            rounds[daemon.name].append(result)
    return {name: summarize(results) for name, results in rounds.items()}


def in_turn(daemons: list[Daemon], round_number: int) -> list[Daemon]:
    """The daemons in the order round `round_number` measures them: the baseline first
    in odd rounds, this tree first in even ones. In one hour of this VM the daemon that
    ran second was 6-9 % faster in each of four rounds, the same code both times
    (docs/benchmark.md, "The shipped pipelines' post-processing in NumPy"); whatever
    the cause, rounds in both orders split such an effect between the daemons instead
    of giving all of it to one."""
    return daemons if round_number % 2 else daemons[::-1]


def sweep(
    services: LocalServices,
    urls: list[str],
    daemons: list[Daemon],
    size: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """`--runners-sweep`: each daemon on 2 cores at each runner count, the daemons and
    counts in turn within each round (so the VM's drift falls on all of them alike);
    medians by daemon and count.

    With GCS taking tens of milliseconds a request, a runner spends most of a task
    waiting on it: images/s then grows with the runners until the CPU binds, which a
    bench against emulators that answer at once cannot show."""
    log = args.state_dir / "bench" / "plumbing-sweep.log"
    # An entry is runners, or runners:leased (GANNET_MAX_MESSAGES; default 2 x runners).
    counts = [(r, m or 2 * r) for r, m in args.runners_sweep]
    runs: dict[str, dict[tuple[int, int], list[dict[str, Any]]]] = {
        d.name: {c: [] for c in counts} for d in daemons
    }
    for n in range(1, args.rounds + 1):
        for runners, leased in counts:
            for daemon in in_turn(daemons, n):
                what = f"{runners} runners, {leased} leased"
                print(f"  {size} round {n}: {daemon.name}, {what} ...", flush=True)
                queue = stack.fresh_queue(services, f"pl-{uuid.uuid4().hex[:8]}")
                result = measure(
                    services, queue, urls, daemon, "0,1", args, log, runners=runners, leased=leased
                )
                runs[daemon.name][(runners, leased)].append(result)
    return {
        name: {
            "sweep": {
                f"{runners}:{leased}": {
                    key: statistics.median(r[key] for r in results)
                    for key in ("images_per_s", "cpu_ms_per_image", "mean_batch_size")
                }
                | {"runners": runners, "leased": leased, "rounds": results}
                | {"task_wall_ms": median_stages(r["stages_wall_ms_per_task"] for r in results)}
                for (runners, leased), results in by_count.items()
            }
        }
        for name, by_count in runs.items()
    }


def median_stages(runs: Iterable[dict[str, float]]) -> dict[str, float]:
    """Per stage, the median over the runs that have it."""
    by_stage: dict[str, list[float]] = {}
    for run in runs:
        for stage, ms in run.items():
            by_stage.setdefault(stage, []).append(ms)
    return {stage: statistics.median(values) for stage, values in by_stage.items()}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of every figure the report shows."""
    two = [r["2 cores"] for r in rounds]
    summary: dict[str, Any] = {
        "rounds": rounds,
        "images_per_s": statistics.median(r["images_per_s"] for r in two),
        "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in two),
        "services_cpu_ms_per_image": statistics.median(r["services_cpu_ms_per_image"] for r in two),
        "services_cpu_ms_per_image_by_name": {
            name: statistics.median(r["services_cpu_ms_per_image_by_name"][name] for r in two)
            for name in two[0]["services_cpu_ms_per_image_by_name"]
        },
        "mean_batch_size": statistics.median(r["mean_batch_size"] for r in two),
        "switches_per_image": statistics.median(r["switches_per_image"] for r in two),
        "cpu_wait_ms_per_image": statistics.median(r["cpu_wait_ms_per_image"] for r in two),
        "idle_cores": statistics.median(r["idle_cores"] for r in two),
    }
    one = [r["1 core"] for r in rounds if "1 core" in r]
    if one:  # not with --trace-only
        summary["images_per_s_1_core"] = statistics.median(r["images_per_s"] for r in one)
        summary["scaling_2_over_1_core"] = statistics.median(
            a["images_per_s"] / b["images_per_s"] for a, b in zip(two, one, strict=True)
        )
    split = [r["2 cores, stage CPU"] for r in rounds if "2 cores, stage CPU" in r]
    if split:
        # From the run with GANNET_STAGE_CPU on: its own total, which the clock
        # syscalls make a little higher than the clean run's.
        summary["stages_cpu_ms_per_image"] = {
            stage: statistics.median(r["stages_cpu_ms_per_image"].get(stage, 0.0) for r in split)
            for stage in split[0]["stages_cpu_ms_per_image"]
        }
        summary["other_threads_cpu_ms_per_image"] = statistics.median(
            r["other_threads_cpu_ms_per_image"] for r in split
        )
        summary["split_run_cpu_ms_per_image"] = statistics.median(
            r["cpu_ms_per_image"] for r in split
        )
    per_core = [r[PER_CORE_RUN] for r in rounds if PER_CORE_RUN in r]
    if per_core:
        summary["per_core"] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in per_core),
            "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in per_core),
            "over_1_core": statistics.median(
                r[PER_CORE_RUN]["images_per_s"] / r["1 core"]["images_per_s"]
                for r in rounds
                if PER_CORE_RUN in r
            ),
            "busiest_process_share": statistics.median(
                r["busiest_process_share"] for r in per_core
            ),
        }
    traced = [r for r in rounds if TRACED_RUN in r]
    if traced:
        summary["traced"] = {
            "images_per_s": statistics.median(r[TRACED_RUN]["images_per_s"] for r in traced),
            "cpu_ms_per_image": statistics.median(
                r[TRACED_RUN]["cpu_ms_per_image"] for r in traced
            ),
            # Side by side in each round: traced over untraced, both on 2 cores.
            "over_untraced": statistics.median(
                r[TRACED_RUN]["images_per_s"] / r["2 cores"]["images_per_s"] for r in traced
            ),
            "cpu_over_untraced": statistics.median(
                r[TRACED_RUN]["cpu_ms_per_image"] / r["2 cores"]["cpu_ms_per_image"] for r in traced
            ),
            "tasks_traced": min(r[TRACED_RUN]["spans_per_image_with_task_id"] for r in traced),
        }
    gil = [r[GIL_RUN]["gil_ms_per_image"] for r in rounds if GIL_RUN in r]
    if gil:
        summary["gil_ms_per_image"] = statistics.median(gil)
    return summary


def run(services: LocalServices, args: argparse.Namespace) -> dict[str, Any]:
    base = demo.local_settings(services)
    demo.prepare(services, base)
    # The daemon under test runs from a copy of src/ taken now, so editing the tree
    # while the bench runs (the package is installed editable) cannot change it midway.
    snapshot = args.state_dir / "bench" / "this-tree"
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(REPO_ROOT / "src", snapshot / "src")
    daemons = [Daemon(THIS_TREE, snapshot / "src")]
    if args.baseline:
        src = baseline_src(args.baseline, args.state_dir / "bench")
        daemons.insert(0, Daemon(f"baseline {args.baseline}", src))
    report: dict[str, Any] = {
        "mode": "plumbing",
        "images": args.images,
        "runners": args.runners,
        "runners_sweep": args.runners_sweep,
        "gcs_latency_ms": args.gcs_latency_ms,
        "pubsub_latency_ms": args.pubsub_latency_ms,
        "pubsub_flow_control": args.pubsub_flow_control,
        "gcs_tls": args.gcs_tls,
        "rounds": args.rounds,
        "pipeline": args.pipeline or f"DETECTION, the demo detector at imgsz {IMGSZ}",
        "machine": {"cpu_count": os.cpu_count()},
        "sizes": {},
    }
    # The OTLP endpoint of the traced run, in this process: what a collector would do.
    receiver = TraceReceiver() if args.trace and not args.gil_only else None
    try:
        added = network(report).removesuffix("; ")
        over = f" ({added})" if added else ""
        for size in args.sizes or SIZES:
            print(f"plumbing mode, {size}, {report['pipeline']}{over}:", flush=True)
            report["sizes"][size] = one_size(services, base, size, daemons, args, receiver)
    finally:
        if receiver is not None:
            receiver.stop()
    return report


# The stages of a runner's task that wait on something (gannet_stage_seconds), as the
# sweep's table names them: what holds a runner when the runners are too few.
TASK_STAGES = [
    ("total", "task ms"),
    ("lookup", "claim"),
    ("fetch", "read"),
    ("inference", "model"),
    ("sink", "write+commit"),
]


def print_sweep(report: dict[str, Any]) -> None:
    rows = []
    for size, by_daemon in report["sizes"].items():
        counts = next(iter(by_daemon.values()))["sweep"]
        for count in counts:  # the daemons side by side at each count
            for name, summary in by_daemon.items():
                s = summary["sweep"][count]
                rows.append(
                    [
                        size,
                        name,
                        str(s["runners"]),
                        str(s["leased"]),
                        f"{s['images_per_s']:.1f}",
                        f"{s['cpu_ms_per_image']:.2f}",
                        f"{s['mean_batch_size']:.1f}",
                    ]
                    + [
                        f"{s['task_wall_ms'][stage]:.1f}" if stage in s["task_wall_ms"] else "-"
                        for stage, _ in TASK_STAGES
                    ]
                )
    print()
    header = ["size", "daemon", "runners", "leased", "img/s", "CPU ms/img", "batch"]
    print(format_table(header + [label for _, label in TASK_STAGES], rows))
    print(
        f"(on 2 cores; medians of {report['rounds']} rounds; {report['images']} "
        f"tasks each; {network(report) or 'the emulators as they answer; '}"
        "CPU ms/img: the daemon's; then the wall ms a runner spent per task, in all and "
        "on the stages that wait: the PostgreSQL claim, the GCS read, the model (its "
        "batch's turn included), the GCS write and the commit)"
    )


def network(report: dict[str, Any]) -> str:
    """What the run added to the emulators' answers, as a footnote's clause ("" if none)."""
    said = []
    if report.get("gcs_latency_ms"):
        said.append(f"every GCS request {report['gcs_latency_ms']:g} ms slower")
    if report.get("gcs_tls"):
        said.append("GCS over HTTPS")
    if report.get("pubsub_latency_ms"):
        said.append(f"every round trip to Pub/Sub {report['pubsub_latency_ms']:g} ms slower")
    if report.get("pubsub_flow_control"):
        said.append("each stream sent at most its lease's unacked messages, as by Pub/Sub")
    return "".join(f"{s}; " for s in said)


def print_rounds(report: dict[str, Any]) -> None:
    """Each round's images/s and GIL-held ms per image, and this tree's over the
    baseline's in the same round: the VM drifts from minute to minute, so a change shows
    in how many rounds it wins, more than in the medians."""
    if report["rounds"] < 2:
        return
    print("Per round (2 cores):")
    for size, by_daemon in report["sizes"].items():
        figures = {}
        for name, s in by_daemon.items():
            speed = [r["2 cores"]["images_per_s"] for r in s["rounds"]]
            gil = [r[GIL_RUN]["gil_ms_per_image"] for r in s["rounds"] if GIL_RUN in r]
            figures[name] = (speed, gil)
            said = f"images/s {', '.join(f'{v:.1f}' for v in speed)}"
            if gil:
                said += f"; GIL ms/img {', '.join(f'{v:.2f}' for v in gil)}"
            print(f"  {size}, {name}: {said}")
        if len(figures) == 2:
            (speed_a, gil_a), (speed_b, gil_b) = figures.values()
            ratios = [b / a for a, b in zip(speed_a, speed_b, strict=True)]
            said = f"images/s {', '.join(f'{r:.2f}' for r in ratios)}"
            if gil_a and gil_b:
                gil_ratios = [b / a for a, b in zip(gil_a, gil_b, strict=True)]
                lower = sum(r < 1 for r in gil_ratios)
                said += (
                    f"; GIL {', '.join(f'{r:.2f}' for r in gil_ratios)} (median "
                    f"{statistics.median(gil_ratios):.2f}, lower in {lower} of {len(gil_ratios)})"
                )
            print(f"  {size}, {THIS_TREE} over the baseline: {said}")
            print("  (the baseline ran first in odd rounds, this tree in even ones)")


def print_report(report: dict[str, Any]) -> None:
    if report.get("runners_sweep"):
        print_sweep(report)
        return
    header = ["size", "daemon", "img/s", "1 core", "2/1", "CPU ms/img", "GIL ms/img"]
    header += ["switches/img", "CPU wait ms/img", "idle cores", "batch", "services ms/img"]
    header += ["CPU cap img/s"]
    cores = report["machine"]["cpu_count"]
    rows = []
    for size, by_daemon in report["sizes"].items():
        for name, s in by_daemon.items():
            gil = s.get("gil_ms_per_image")
            one, scaling = s.get("images_per_s_1_core"), s.get("scaling_2_over_1_core")
            services = s["services_cpu_ms_per_image"]
            rows.append(
                [
                    size,
                    name,
                    f"{s['images_per_s']:.1f}",
                    "-" if one is None else f"{one:.1f}",
                    "-" if scaling is None else f"{scaling:.2f}",
                    f"{s['cpu_ms_per_image']:.2f}",
                    "-" if gil is None else f"{gil:.2f}",
                    f"{s['switches_per_image']:.0f}",
                    f"{s['cpu_wait_ms_per_image']:.2f}",
                    f"{s['idle_cores']:.2f}",
                    f"{s['mean_batch_size']:.1f}",
                    f"{services:.2f}",
                    f"{cores * 1000 / (s['cpu_ms_per_image'] + services):.0f}",
                ]
            )
    print()
    print(format_table(header, rows))
    print(
        f"(medians of {report['rounds']} rounds; {report['images']} tasks each; "
        + network(report)
        + "daemon on 2 cores unless said; 2/1: images/s on 2 cores over 1 core; switches: context "
        "switches of the daemon's threads; CPU wait: the time its threads were ready to run "
        "but waited for a core (not for the GIL: a thread waiting for it sleeps); idle "
        "cores: how much of the machine nothing ran on, on average; services: the "
        "emulators', PostgreSQL's and the bench's own CPU per image, on the same cores; "
        f"CPU cap: what {cores} cores could do at the daemon's and the services' CPU per "
        "image, with no GIL and no waiting)"
    )
    print_rounds(report)
    print("Services' CPU ms per image, by process (2 cores):")
    for size, by_daemon in report["sizes"].items():
        for name, s in by_daemon.items():
            parts = ", ".join(
                f"{service} {ms:.2f}"
                for service, ms in s["services_cpu_ms_per_image_by_name"].items()
            )
            print(f"  {size}, {name}: {parts}")
    per_core = [
        [
            size,
            f"{by_daemon[THIS_TREE]['images_per_s_1_core']:.1f}",
            f"{by_daemon[THIS_TREE]['images_per_s']:.1f}",
            f"{pc['images_per_s']:.1f}",
            f"{pc['over_1_core']:.2f}",
            f"{pc['cpu_ms_per_image']:.2f}",
            f"{100 * pc['busiest_process_share']:.0f} %",
        ]
        for size, by_daemon in report["sizes"].items()
        if (pc := by_daemon[THIS_TREE].get("per_core"))
    ]
    if per_core:
        print("\nOne daemon process per core (this tree, GANNET_PROCESSES=2): images/s of")
        header = ["size", "1 process, 1 core", "1 process, 2 cores", "2 processes, a core each"]
        print(format_table([*header, "÷ 1 core", "CPU ms/img", "busiest's tasks"], per_core))
        print(
            "(busiest's tasks: the share of the tasks the busier process ran. The Pub/Sub "
            "emulator ignores each stream's flow control and sends a subscription's messages "
            "down one stream, so here one process may run nearly all of them; Pub/Sub "
            "itself stops at GANNET_MAX_MESSAGES per stream, as --pubsub-flow-control "
            "does: docs/benchmark.md)"
        )
    traced = [
        [
            size,
            f"{by_daemon[THIS_TREE]['images_per_s']:.1f}",
            f"{t['images_per_s']:.1f}",
            f"{t['over_untraced']:.2f}",
            f"{by_daemon[THIS_TREE]['cpu_ms_per_image']:.2f}",
            f"{t['cpu_ms_per_image']:.2f}",
        ]
        for size, by_daemon in report["sizes"].items()
        if (t := by_daemon[THIS_TREE].get("traced"))
    ]
    if traced:
        print(
            "\nTracing (this tree, 2 cores): every task traced (GANNET_TRACE_SAMPLE_RATIO=1.0, "
            "OTLP to a receiver in the bench process) against tracing off, side by side"
        )
        header = ["size", "off img/s", "traced img/s", "traced/off", "off CPU ms", "traced CPU ms"]
        print(format_table(header, traced))
    for size, by_daemon in report["sizes"].items():
        names = list(by_daemon)
        if "stages_cpu_ms_per_image" not in by_daemon[names[0]]:
            continue
        stage_rows = [
            [label, *(f"{by_daemon[n]['stages_cpu_ms_per_image'].get(k, 0.0):.2f}" for n in names)]
            for k, label in STAGES.items()
        ]
        stage_rows.append(
            [
                "other threads",
                *(f"{by_daemon[n]['other_threads_cpu_ms_per_image']:.2f}" for n in names),
            ]
        )
        stage_rows.append(
            ["total", *(f"{by_daemon[n]['split_run_cpu_ms_per_image']:.2f}" for n in names)]
        )
        print(f"\n{size}: daemon CPU ms per image by stage (2 cores, GANNET_STAGE_CPU=1)")
        print(format_table(["stage", *names], stage_rows))


def check_sizes(sizes: list[str] | None) -> None:
    """--sizes names image sets the bench can make (both modes)."""
    unknown = [size for size in sizes or () if size not in IMAGE_SETS]
    if unknown:
        raise CommandError(
            f"unknown image set {', '.join(unknown)}; choose from {', '.join(IMAGE_SETS)}"
        )


def check_args(args: argparse.Namespace) -> None:
    """Refuse a typo before minutes of services and daemons, saying what would work."""
    if args.trace_only and (not args.trace or args.baseline):
        raise CommandError(
            "--trace-only measures this tree with tracing off and on: leave out --no-trace "
            "and --baseline"
        )
    if args.runners_sweep and args.trace_only:
        raise CommandError("--runners-sweep and --trace-only are two different runs: pick one")
    if args.gil_only and (args.trace_only or args.runners_sweep or not args.gil):
        raise CommandError(
            "--gil-only runs the 2-core and py-spy runs alone: leave out --no-gil, "
            "--trace-only and --runners-sweep"
        )
    if args.gcs_latency_ms < 0 or args.pubsub_latency_ms < 0:
        raise CommandError("--gcs-latency-ms and --pubsub-latency-ms are at least 0, e.g. 20")
    if args.pipeline:
        check_pipeline(args.pipeline)
    check_sizes(args.sizes)
    if args.baseline:
        spec = f"{baseline_commit(args.baseline)}:src/gannet/dev/replay.py"
        found = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "cat-file", "-e", spec], capture_output=True
        )
        if found.returncode != 0:
            raise CommandError(
                f"--baseline {args.baseline}: no such commit in this clone, or it predates "
                "the plumbing mode (no src/gannet/dev/replay.py). The daemon from before "
                f"the hot-path work is {BASELINE}."
            )


def check_pipeline(spec: str) -> None:
    """`--pipeline CONFIG:NAME` names a config file that loads and one of its pipelines."""
    from gannet.config_schema import ConfigError
    from gannet.config_sources import open_configs
    from gannet.storage import local_version, read_local

    config, name = split_pipeline(spec)
    if not config.is_file():
        raise CommandError(
            f"--pipeline {spec}: give a config file and one of its pipelines, e.g. "
            "configs/agro.yaml:FULL_PIPELINE"
        )
    try:
        open_configs(str(config), read_local, local_version).for_tenant(TENANT).plan(name)
    except GannetError as exc:
        raise CommandError(f"--pipeline {spec}: {exc.message}") from exc
    except ConfigError as exc:  # the config itself: what a pod would reject
        raise CommandError(f"--pipeline {spec}: {exc}") from exc


def main(args: argparse.Namespace) -> int:
    check_args(args)
    ports = Ports(args.pubsub_port, args.gcs_port, args.postgres_port)
    state = args.state_dir / "bench"
    with LocalServices(
        state,
        ports,
        gcs_latency_ms=args.gcs_latency_ms,
        pubsub_latency_ms=args.pubsub_latency_ms,
        pubsub_flow_control=args.pubsub_flow_control,
        gcs_tls=args.gcs_tls,
    ) as services:
        # This process uploads the images and reads the results over HTTPS too.
        os.environ.update(services.tls_env())
        report = run(services, args)
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nJSON report: {args.output}")
    return 0
