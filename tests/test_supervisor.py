"""GANNET_PROCESSES: several daemon processes in one pod behind one supervisor.

The end-to-end test runs the real `gannet run` with two processes against the
emulators: the pod's port must answer as one daemon's would (summed metrics, readiness),
a process killed with -9 must come back, and SIGTERM must drain every process and
leave none behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import psutil
import pytest
from conftest import SCENES, settled, wait_until
from prometheus_client import generate_latest

from gannet.dev.demo import DaemonProcess
from gannet.dev.local_services import free_port, port_in_use
from gannet.metrics import Metrics
from gannet.settings import Settings
from gannet.supervisor import (
    STARTUP_S,
    Supervisor,
    cpu_shares,
    exposition,
    merge_metrics,
)


def test_cpus_are_shared_out_in_contiguous_groups_or_not_at_all():
    assert cpu_shares([3, 2, 1, 0], 2) == [[0, 1], [2, 3]]
    assert cpu_shares(range(5), 2) == [[0, 1, 2], [3, 4]]
    assert cpu_shares(range(4), 4) == [[0], [1], [2], [3]]
    # Fewer CPUs than processes: nothing to pin to; every process may use them all.
    assert cpu_shares([0, 1], 3) == [[0, 1], [0, 1], [0, 1]]


def _value(families, sample_name: str, **labels: str) -> float:
    for family in families:
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {sample_name} {labels}")


def test_the_pods_metrics_are_the_processes_summed_and_the_subscription_gauges_once():
    """What the HPA and dashboards read from a pod with two processes: outstanding
    messages and counters add up; the subscription backlog is not counted twice."""
    first, second = Metrics(), Metrics()
    first.outstanding.set(3)
    second.outstanding.set(5)
    first.messages.labels(outcome="succeeded").inc(10)
    second.messages.labels(outcome="succeeded").inc(4)
    second.messages.labels(outcome="quarantined").inc(1)
    for value in (1, 2, 8):
        first.batch_size.observe(value)
    second.batch_size.observe(4)
    first.backlog.labels("bulk").set(120)
    second.backlog.labels("bulk").set(0)  # only the first process polls Cloud Monitoring
    first.lane_waiting.labels("bulk").set(2)
    second.lane_waiting.labels("bulk").set(3)

    merged = merge_metrics(generate_latest(m.registry).decode() for m in (first, second))

    assert _value(merged, "gannet_messages_outstanding") == 8
    assert _value(merged, "gannet_messages_total", outcome="succeeded") == 14
    assert _value(merged, "gannet_messages_total", outcome="quarantined") == 1
    assert _value(merged, "gannet_batch_size_count") == 4
    assert _value(merged, "gannet_batch_size_sum") == 15
    assert _value(merged, "gannet_batch_size_bucket", le="4.0") == 3
    assert _value(merged, "gannet_subscription_backlog_messages", lane="bulk") == 120
    assert _value(merged, "gannet_lane_messages_waiting", lane="bulk") == 5
    assert not any(s.name.endswith("_created") for f in merged for s in f.samples)


def test_the_backlog_polls_time_is_taken_once_not_summed():
    """The time of the last good backlog poll is a timestamp, like the subscription
    gauges a figure of the whole subscription: only the first process polls, and were
    two to report it, the pod reports the newer, never their sum."""
    first, second = Metrics(), Metrics()
    first.backlog_last_success.labels("bulk").set(1_000)
    second.backlog_last_success.labels("bulk").set(900)

    merged = merge_metrics(generate_latest(m.registry).decode() for m in (first, second))

    assert _value(merged, "gannet_backlog_last_success_timestamp_seconds", lane="bulk") == 1_000


def _get(port: int, path: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            body = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(), exc.code
    return status, json.loads(body) if path != "/metrics" else body


def test_a_dead_processs_counters_go_on_but_not_its_gauges():
    """A process that died leaves its counters and histograms to the pod's sums (they
    must not go down), not its gauges (nothing it held is outstanding any more); carried
    through the text format, as the supervisor keeps them."""
    dead, alive = Metrics(), Metrics()
    dead.messages.labels(outcome="succeeded").inc(10)
    dead.outstanding.set(7)
    dead.batch_size.observe(3)
    alive.messages.labels(outcome="succeeded").inc(2)
    alive.outstanding.set(1)
    retired = exposition(merge_metrics([], [generate_latest(dead.registry).decode()]))

    merged = merge_metrics([generate_latest(alive.registry).decode()], [retired, ""])

    assert _value(merged, "gannet_messages_total", outcome="succeeded") == 12
    assert _value(merged, "gannet_batch_size_count") == 1
    assert _value(merged, "gannet_messages_outstanding") == 1


def _kill_all(supervisor: Supervisor) -> None:
    """A test's end: its supervisor's processes killed and reaped, its asking threads let go."""
    for child in supervisor.children:
        if child.alive():
            assert child.proc is not None
            child.proc.kill()
            child.proc.wait()
    supervisor._asking.shutdown(wait=False)


def test_a_process_that_never_answers_is_killed_to_be_started_again():
    """A daemon process that does not answer /healthz (here a process that is no daemon,
    `sleep`) counts as starting until STARTUP_S has passed, then is killed, and _reap
    starts it again: under a supervisor the pod's /healthz would report it starting
    forever, where a one-process pod's liveness probe restarts it."""
    supervisor = Supervisor(Settings(processes=2, metrics_port=0), ["sleep", "600"])
    for child in supervisor.children:
        supervisor._start(child)
    try:
        now = time.monotonic()
        supervisor._kill_hung(now)
        assert all(child.alive() for child in supervisor.children), "still starting"
        supervisor._kill_hung(now + STARTUP_S + 1)
        for child in supervisor.children:
            assert child.proc is not None and child.proc.wait(timeout=10) == -signal.SIGKILL
        supervisor._reap(now + STARTUP_S + 1)
        assert [child.restarts_total for child in supervisor.children] == [1, 1]
    finally:
        _kill_all(supervisor)


# A daemon process that answers once on its port, then hangs (deadlocked, say).
ANSWERS_ONCE = """
import os, time
from http.server import BaseHTTPRequestHandler, HTTPServer
class Once(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(os.environ["GANNET_METRICS_PORT"])), Once).handle_request()
time.sleep(600)
"""


def test_a_process_that_answered_then_hung_is_killed_after_process_hung_s():
    """A process silent since its last answer is killed after GANNET_PROCESS_HUNG_S
    (60 s by default; 20 s here: a GPU pod's operator may not want its tasks held a
    minute), not the start-up's STARTUP_S (300 s). Its answers were noted only by the
    10 s watch, so one that answered the pod's probes and hung before the watch first
    asked counted as still starting: 300 s."""
    supervisor = Supervisor(
        Settings(processes=1, metrics_port=0, process_hung_s=20),
        [sys.executable, "-c", ANSWERS_ONCE],
    )
    (child,) = supervisor.children
    supervisor._start(child)
    try:
        wait_until(lambda: supervisor.live()[1]["processes"]["0"] == 200, "answered", 30)
        now = time.monotonic()
        supervisor._kill_hung(now + 19)
        assert child.alive(), "killed before GANNET_PROCESS_HUNG_S"
        supervisor._kill_hung(now + 21)
        assert child.proc is not None and child.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        _kill_all(supervisor)


# A stand-in for a daemon process: it writes down each stop signal it gets and exits a
# second after the first, as a drain would.
RECORDING_CHILD = """
import os, sys, threading, time
from gannet.signals import on_signals
index, got = os.environ["GANNET_PROCESS_INDEX"], threading.Event()
def record(signum):
    with open(os.path.join(sys.argv[1], "signals-" + index), "a") as out:
        out.write(f"{signum}\\n")
    got.set()
on_signals(record)
with open(os.path.join(sys.argv[1], "up-" + index), "w") as up:
    up.write(str(os.getpid()))
got.wait()
time.sleep(1)
"""

SUPERVISOR = """
import sys
from gannet.settings import Settings
from gannet.supervisor import supervise
sys.exit(supervise(Settings(processes=2, metrics_port=0), sys.argv[1:]))
"""


def test_one_ctrl_c_reaches_each_process_once(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group. Were the daemon
    processes in the supervisor's group, each would get the terminal's SIGINT and the
    supervisor's SIGTERM, and a second signal means "stop waiting for running work":
    one Ctrl-C would nack every running task instead of letting it finish."""
    command = [sys.executable, "-c", RECORDING_CHILD, str(tmp_path)]
    pod = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, *command],
        start_new_session=True,  # a process group of its own, as a shell gives a command
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("up-*"))) < 2:
            assert time.monotonic() < deadline, "the processes did not start"
            time.sleep(0.05)
        os.killpg(pod.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert pod.wait(timeout=20) == 0
        got = {f.name: f.read_text().split() for f in sorted(tmp_path.glob("signals-*"))}
        assert got == {"signals-0": ["15"], "signals-1": ["15"]}
    finally:
        if pod.poll() is None:
            os.killpg(pod.pid, signal.SIGKILL)
            pod.wait()


def _wait_listening(child: Any) -> None:
    """Until a stand-in process listens on its metrics port."""
    deadline = time.monotonic() + 30
    while not port_in_use(child.metrics_port):
        assert time.monotonic() < deadline, "the stand-in did not listen"
        time.sleep(0.05)


def _stand_in(answer: bytes) -> str:
    """A stand-in daemon process's program: it gives every request on its metrics port
    the same raw `answer`."""
    return f"""
import os, socket
server = socket.create_server(("127.0.0.1", int(os.environ["GANNET_METRICS_PORT"])))
while True:
    conn, _ = server.accept()
    conn.recv(4096)
    conn.sendall({answer!r})
    conn.close()
"""


# A daemon process killed in the middle of each answer: the headers promise more than
# the connection carries before it closes.
CUT_SHORT_CHILD = _stand_in(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n{")


def test_an_answer_cut_short_counts_as_no_answer():
    """A process killed while it answers (an OOM kill in the middle of a scrape) leaves
    the supervisor a response shorter than its headers said. That must count as no
    answer, as a refused connection does: it ended the supervisor's watch loop with
    IncompleteRead, and with it the supervisor, its daemons left running unsignalled."""
    supervisor = Supervisor(
        Settings(processes=2, metrics_port=0), [sys.executable, "-c", CUT_SHORT_CHILD]
    )
    for child in supervisor.children:
        supervisor._start(child)
    try:
        for child in supervisor.children:
            _wait_listening(child)
        supervisor._kill_hung(time.monotonic())  # the watch loop's look, every WATCH_S
        assert all(child.answered_at is None for child in supervisor.children)
        ok, state = supervisor.live()
        assert ok and state["processes"] == {"0": "starting", "1": "starting"}
        assert supervisor.collect()  # the pod's /metrics
    finally:
        _kill_all(supervisor)


# A healthy daemon process.
HEALTHY_CHILD = _stand_in(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")


def _counting_child(successes: int) -> str:
    """A daemon process that has counted `successes` (its /metrics, to every path)."""
    metrics = Metrics()
    metrics.messages.labels(outcome="succeeded").inc(successes)
    text = generate_latest(metrics.registry)
    return _stand_in(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))


def test_what_a_killed_process_counted_since_prometheus_last_asked_is_kept():
    """The supervisor scraped its processes only when Prometheus scraped it (every
    15-30 s): a process killed in between took what it had counted since with it, and
    the pod's counters undercounted for good. The watch, every WATCH_S, scrapes too."""
    supervisor = Supervisor(
        Settings(processes=1, metrics_port=0), [sys.executable, "-c", _counting_child(7)]
    )
    (child,) = supervisor.children
    supervisor._start(child)
    try:
        _wait_listening(child)
        supervisor._watch(time.monotonic())  # no Prometheus scrape before the kill
        assert child.proc is not None
        child.proc.kill()
        child.proc.wait()
        supervisor._reap(time.monotonic())
        assert _value(supervisor.collect(), "gannet_messages_total", outcome="succeeded") == 7
    finally:
        _kill_all(supervisor)


# A supervisor with one stand-in process, in a Python of its own: it prints whether the
# watch loop's look got the process's answer.
ASKS_ONCE = """
import sys, time
from gannet.dev.local_services import port_in_use
from gannet.settings import Settings
from gannet.supervisor import Supervisor
supervisor = Supervisor(Settings(processes=1, metrics_port=0), sys.argv[1:])
(child,) = supervisor.children
supervisor._start(child)
try:
    deadline = time.monotonic() + 30
    while not port_in_use(child.metrics_port):
        assert time.monotonic() < deadline, "the stand-in did not listen"
        time.sleep(0.05)
    supervisor._kill_hung(time.monotonic())  # the watch loop's look, every WATCH_S
    print("answered" if child.answered_at is not None else "no answer")
finally:
    child.proc.kill()
    child.proc.wait()
"""


def test_a_proxy_in_the_pods_environment_does_not_come_between_it_and_its_processes():
    """A pod whose egress goes through a proxy has HTTP_PROXY set, and not always
    127.0.0.1 in NO_PROXY. urllib sent the supervisor's own asks of its processes on
    127.0.0.1 to that proxy: no answer, so every process was killed as hung once its
    start-up time passed, again and again. (The proxy here is a port nobody listens on.)
    The supervisor runs in a Python of its own with the proxy set from its start, as in
    a pod: urllib reads the proxy settings once, into the first opener it builds, so
    set within this test's process they would miss an opener built before."""
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env["HTTP_PROXY"] = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-c", ASKS_ONCE, sys.executable, "-c", HEALTHY_CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["answered"]


def _pod_of_stand_ins(tmp_path: Any, first: str, supervisor: str = "") -> tuple[Any, Any]:
    """A supervisor (the SUPERVISOR script, or `supervisor`) of two stand-ins for daemon
    processes: process 0 runs `first` (Python, under `import os, signal, sys, time`),
    process 1 the RECORDING_CHILD. The pod's process and its log's path."""
    program = tmp_path / "daemon"
    program.write_text(
        f"#!{sys.executable}\n"
        "import os, signal, sys, time\n"
        "if os.environ['GANNET_PROCESS_INDEX'] == '0':\n"
        + textwrap.indent(first, "    ")
        + RECORDING_CHILD
    )
    program.chmod(0o755)
    log = tmp_path / "supervisor.log"
    with log.open("w") as err:
        pod = subprocess.Popen(
            [sys.executable, "-c", supervisor or SUPERVISOR, str(program), str(tmp_path)],
            start_new_session=True,
            stdout=err,
            stderr=subprocess.STDOUT,
        )
    return pod, log


def test_a_supervisor_that_fails_stops_its_processes_before_it_exits(tmp_path):
    """Whatever ends the supervisor's loop (here the daemon's program gone when process 0
    is to be started again: Popen raises), its daemons are passed SIGTERM and waited
    for. In a pod the supervisor is PID 1, and when it exits the kernel kills every
    other process of the pod with SIGKILL: no drain, running tasks lost to their lease."""
    pod, log = _pod_of_stand_ins(
        tmp_path,
        "while not os.path.exists(os.path.join(sys.argv[1], 'up-1')):\n"
        "    time.sleep(0.05)\n"
        "os.remove(sys.argv[0])\n"
        "sys.exit(1)\n",
    )
    try:
        assert pod.wait(timeout=30) == 1
        assert (tmp_path / "signals-1").read_text().split() == ["15"], log.read_text()
        assert "stopping the daemon processes" in log.read_text()
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait()
        left = int((tmp_path / "up-1").read_text())
        if psutil.pid_exists(left):
            psutil.Process(left).kill()


def test_a_process_that_keeps_dying_ends_the_pod_with_its_exit_code(tmp_path):
    """A daemon that dies at every start (a config it cannot load, a GPU in a bad state)
    would, alone in its pod, exit and go into CrashLoopBackOff, restarts counted by
    kubectl. Under a supervisor it was started again every 30 s; then /healthz failed,
    but the kubelet probes liveness only after the startup probe passed, which a pod
    crash-looping from its start never did: 5 minutes before it was restarted. Once the
    back-off is at its longest, the supervisor stops the other process and exits with
    the dying one's code (here with the back-off shortened)."""
    fast = SUPERVISOR.replace(
        "from gannet.supervisor import supervise",
        "import gannet.supervisor as s\ns.BACKOFF_S = (0.1,) * 5\nsupervise = s.supervise",
    )
    pod, log = _pod_of_stand_ins(tmp_path, "sys.exit(3)\n", fast)
    try:
        assert pod.wait(timeout=60) == 3, log.read_text()
        said = log.read_text()
        assert "daemon process 0 died 5 times in a row (exit code 3)" in said
        assert (tmp_path / "signals-1").read_text().split() == ["15"]  # drained, not killed
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait()
        _kill_left(tmp_path)


def test_a_process_wedged_at_shutdown_is_killed_and_named(tmp_path):
    """A process that does not exit after SIGTERM (stopped, or stuck where its drain
    cannot end it) held the supervisor in an untimed wait until the kubelet's SIGKILL,
    which says nothing of which process or why. Past its grace and a margin, it is
    killed, and said."""
    quick = SUPERVISOR.replace("processes=2,", "processes=2, shutdown_grace_s=0.5,").replace(
        "from gannet.supervisor import supervise",
        "import gannet.supervisor as s\ns.STOP_MARGIN_S = 0.5\nsupervise = s.supervise",
    )
    pod, log = _pod_of_stand_ins(
        tmp_path,
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(os.path.join(sys.argv[1], 'up-0'), 'w').close()\n"
        "time.sleep(600)\n",
        quick,
    )
    try:
        wait_until(lambda: (tmp_path / "up-0").exists() and (tmp_path / "up-1").exists(), "up", 30)
        pod.send_signal(signal.SIGTERM)
        assert pod.wait(timeout=30) == 128 + signal.SIGKILL, log.read_text()
        assert "daemon process 0 did not exit within 1 s of SIGTERM; killing it" in log.read_text()
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait()
        _kill_left(tmp_path)


def _kill_left(tmp_path: Any) -> None:
    """The stand-ins a failed test's supervisor left behind (each wrote its pid)."""
    for up in tmp_path.glob("up-*"):
        text = up.read_text()
        if text and psutil.pid_exists(int(text)):
            psutil.Process(int(text)).kill()


def _succeeded(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('gannet_messages_total{outcome="succeeded"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_two_processes_share_the_work_survive_a_kill_9_and_drain_on_sigterm(stack):
    url = stack.upload(SCENES[0]["file"])
    pod = stack.start_daemon(GANNET_PROCESSES="2", GANNET_RUNNERS="2")  # waits for /readyz
    try:
        _, state = _get(pod.metrics_port, "/readyz")
        assert state["processes"] == {"0": True, "1": True}  # type: ignore[index]
        children = psutil.Process(pod.proc.pid).children()
        assert len(children) == 2
        if len(os.sched_getaffinity(0)) >= 2:  # each pinned to its own share of the CPUs
            pinned = [set(os.sched_getaffinity(c.pid)) for c in children]
            assert pinned[0].isdisjoint(pinned[1]), pinned

        # One by one: the emulator hands what it has to one stream, whatever its flow
        # control says (real Pub/Sub does not), so a burst would go to one process; and
        # which stream it picks is its own affair (under a full suite's load one took
        # all 24 once): 24 at least, more until both processes have run some, 60 at most.
        tasks: list[Any] = []

        def by_process() -> Counter[int]:
            ids = {t.task_id for t in tasks}
            return Counter(
                e["process"]
                for e in pod.log_entries()
                if e.get("task_id") in ids and e.get("outcome") == "succeeded"
            )

        while len(tasks) < 24 or (len(by_process()) < 2 and len(tasks) < 60):
            tasks.append(stack.task(url))
            stack.publish(tasks[-1:])
            time.sleep(0.1)
        ids = [t.task_id for t in tasks]
        rows = stack.wait_rows(ids, timeout_s=180)
        assert all(r["status"] == "succeeded" for r in rows.values())
        # Both processes pulled work, and the pod's /metrics counts all of it once.
        done = by_process()
        assert set(done) == {0, 1} and sum(done.values()) == len(tasks), done
        _, metrics = _get(pod.metrics_port, "/metrics")
        assert _succeeded(metrics) == len(tasks)  # type: ignore[arg-type]

        # kill -9 one process: the supervisor starts it again and the pod is ready again.
        victim = children[0]
        victim.kill()
        victim.wait(timeout=10)
        # Not ready within a second: looked at every 20 ms instead of once, a second on.
        deadline = time.monotonic() + 1
        while (status := _get(pod.metrics_port, "/readyz")[0]) == 200:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert status == 503, "a pod missing a process is not ready"
        pod.wait_ready(timeout_s=180)
        restarted = [e for e in pod.log_entries() if "starting it again" in e["message"]]
        assert len(restarted) == 1 and restarted[0]["exit_code"] == -9
        # The supervisor's line names the child it is about, and is not the child's own:
        # a filter on "process": 0 shows that process's lines only.
        assert restarted[0]["child"] in (0, 1) and "process" not in restarted[0]
        _, metrics = _get(pod.metrics_port, "/metrics")
        assert "gannet_daemon_process_restarts_total 1.0" in metrics  # type: ignore[operator]
        # The killed process's counters go on in the pod's sums: they never go down.
        assert _succeeded(metrics) == len(tasks)  # type: ignore[arg-type]
        more = [stack.task(url) for _ in range(8)]
        stack.publish(more)
        assert len(stack.wait_rows([t.task_id for t in more], timeout_s=180)) == 8
        deadline = time.monotonic() + 10  # each row is committed before its count
        while _succeeded(_get(pod.metrics_port, "/metrics")[1]) < len(tasks) + 8:  # type: ignore[arg-type]
            assert time.monotonic() < deadline, "the pod's count did not reach its tasks'"
            time.sleep(0.1)

        # SIGTERM: readiness drops while the processes drain, they all drain, nothing is
        # left running. The signal is acted on by the supervisor's signals thread, so a
        # probe answered by the health thread a moment after the kill may still say 200.
        now = psutil.Process(pod.proc.pid).children()
        pod.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while (status := _get(pod.metrics_port, "/readyz")[0]) == 200:
            assert time.monotonic() < deadline, "still ready 2 s after SIGTERM"
            time.sleep(0.02)
        assert status == 503
        assert pod.proc.wait(timeout=60) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in now)
    finally:
        pod.stop(signal.SIGKILL)
    everything = {t.task_id for t in [*tasks, *more]}
    outcomes = Counter(o for _, o, _ in settled([pod], everything))
    assert outcomes["succeeded"] == len(everything), outcomes


@pytest.mark.slow
def test_daemon_processes_do_not_outlive_a_killed_supervisor(stack):
    """kill -9 of the pod's entry point (a local run's Ctrl-\\, an OOM kill): its daemon
    processes notice and drain themselves instead of pulling on as orphans."""
    pod = stack.start_daemon(GANNET_PROCESSES="2", GANNET_RUNNERS="1")  # waits for /readyz
    try:
        children = psutil.Process(pod.proc.pid).children()
        pod.proc.kill()
        pod.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"still running after their supervisor died: {alive}"
        drained = [e for e in pod.log_entries() if "supervisor process is gone" in e["message"]]
        assert len(drained) == 2
    finally:
        pod.stop(signal.SIGKILL)


@pytest.mark.slow
def test_daemon_processes_do_not_outlive_a_supervisor_killed_while_they_start(stack):
    """kill -9 of the pod's entry point while its daemon processes still load torch and
    their models: they must not go on to pull as orphans once started. A process that
    only then looked who its parent was would see its new one and never notice."""
    env = stack.env(GANNET_PROCESSES="2", GANNET_RUNNERS="1")
    pod = DaemonProcess(env, stack.tmp / "killed-while-starting.log")
    stack.daemons.append(pod)
    try:
        deadline = time.monotonic() + 30
        while len(children := psutil.Process(pod.proc.pid).children()) < 2:
            assert time.monotonic() < deadline, "the supervisor did not start 2 processes"
            time.sleep(0.05)
        pod.proc.kill()
        pod.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=120)
        assert not alive, f"still running after their supervisor died: {alive}"
        gone = [e for e in pod.log_entries() if "supervisor process is gone" in e["message"]]
        assert len(gone) == 2
        assert not any(e["message"] == "gannet is ready" for e in pod.log_entries())
    finally:
        pod.stop(signal.SIGKILL)


def test_an_older_scrape_answered_last_does_not_take_the_counters_back(monkeypatch):
    """The watch's scrape and Prometheus' overlap. When the older one's answer came
    last it was kept, and the pod's counters went back (to Prometheus, a reset: its
    increase() jumps by the whole count). The newer answer stays. Mocked: the order in
    which two answers arrive, which no real process can be made to choose."""
    import threading

    from gannet import supervisor as module

    def metrics_text(successes: int) -> bytes:
        metrics = Metrics()
        metrics.messages.labels(outcome="succeeded").inc(successes)
        return generate_latest(metrics.registry)

    older_may_answer = threading.Event()
    calls: list[str] = []

    def answers(url: str) -> tuple[int, bytes]:
        calls.append(url)
        if len(calls) == 1:  # the older ask: its answer (5) arrives after the newer's
            older_may_answer.wait(10)
            return 200, metrics_text(5)
        if len(calls) == 2:
            return 200, metrics_text(7)
        return 0, b""  # the pod's own scrape afterwards: the process does not answer

    monkeypatch.setattr(module, "_get", answers)
    supervisor = Supervisor(Settings(processes=1, metrics_port=0), [sys.executable, "-c", ""])
    (child,) = supervisor.children
    child.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        older = threading.Thread(target=supervisor._scrape)
        older.start()
        wait_until(lambda: len(calls) == 1, "the older ask sent", 10)
        supervisor._scrape()  # the newer: answered 7 at once
        older_may_answer.set()
        older.join(10)
        assert _value(supervisor.collect(), "gannet_messages_total", outcome="succeeded") == 7
    finally:
        _kill_all(supervisor)
