"""Lanes: runners shared by weight, work-conserving, under caps; each lane's stream,
dead-letter topic and shutdown nacks, against the emulators."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest
from conftest import SCENES, scraped, wait_until

from gannet.dev.stack import make_stack
from gannet.lanes import LaneQueue, parse_lanes
from gannet.outcome import Decision, Outcome, shutdown
from gannet.pool import Job, RunnerPool

# ------------------------------------------------------------------ declaring lanes


def test_one_lane_by_default_keeps_todays_names_and_others_add_their_name():
    assert [(lane.name, lane.subscription) for lane in parse_lanes("", "t", "s", "d")] == [
        ("default", "s")
    ]
    interactive, bulk = parse_lanes("interactive:4, bulk:1:2", "tasks", "tasks-sub", "dead")
    assert (interactive.topic, interactive.subscription, interactive.dead_letter_topic) == (
        "tasks",
        "tasks-sub",
        "dead",
    )
    assert (bulk.topic, bulk.subscription, bulk.dead_letter_topic) == (
        "tasks-bulk",
        "tasks-sub-bulk",
        "dead-bulk",
    )
    assert (interactive.weight, interactive.cap, bulk.weight, bulk.cap) == (4, None, 1, 2)
    assert bulk.dead_letter_subscription == "dead-bulk-sub"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("interactive", "name:weight[:cap]"),
        ("Bulk:1", "lowercase"),
        ("bulk:one", "whole numbers"),
        ("bulk:0", "at least 1"),
        ("bulk:1:0", "at least 1"),
        ("bulk:1,bulk:2", "declared twice"),
    ],
)
def test_a_bad_lane_spec_says_what_is_wrong_and_what_to_write(spec, says):
    with pytest.raises(ValueError, match=re.escape(says)) as caught:
        parse_lanes(spec, "t", "s", "d")
    assert "interactive:4,bulk:1:2" in str(caught.value) or "twice" in str(caught.value)


def test_gannet_run_refuses_a_bad_gannet_lanes_at_start(stack):
    done = stack.gannet("run", GANNET_LANES="bulk:x")
    assert done.returncode == 2
    assert "GANNET_LANES=" in done.stderr and "whole numbers" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ sharing runners


class Recorder:
    """A handler that records which lane's job started when, and how many of each lane
    ran at once."""

    def __init__(self, seconds: float, gate: threading.Event | None = None) -> None:
        self.seconds = seconds
        self.gate = gate
        self.order: list[str] = []
        self.running: Counter[str] = Counter()
        self.most: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, item: str, device: str) -> Outcome:
        lane = item.split("-")[0]
        with self.lock:
            self.order.append(lane)
            self.running[lane] += 1
            self.most[lane] = max(self.most[lane], self.running[lane])
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.seconds)
        with self.lock:
            self.running[lane] -= 1
        return Outcome(Decision.ACK, "succeeded")


def pool_of(recorder: Recorder, runners: int, lanes: dict[str, tuple[int, int | None]]):
    pool: RunnerPool[str] = RunnerPool(["cpu"], runners, recorder, shutdown, lanes)
    return pool


def submit(pool: RunnerPool[str], lane: str, n: int) -> list[Job[str]]:
    jobs = [Job(f"{lane}-{i}", lane) for i in range(n)]
    assert all(pool.submit(job) for job in jobs)
    return jobs


def drain(pool: RunnerPool[str], jobs: list[Job[str]]) -> None:
    for job in jobs:
        assert job.done.wait(30)
    pool.stop_accepting()
    assert pool.join(10)


def test_when_every_lane_has_work_runners_go_to_lanes_by_weight():
    gate = threading.Event()
    recorder = Recorder(0.001, gate)
    pool = pool_of(recorder, 2, {"interactive": (4, None), "bulk": (1, None)})
    # Both lanes have far more work than the window counts, queued before any starts.
    jobs = submit(pool, "bulk", 150) + submit(pool, "interactive", 150)
    pool.start()
    gate.set()
    drain(pool, jobs)
    window = Counter(recorder.order[:100])
    assert 76 <= window["interactive"] <= 84, window  # 4 : 1
    assert recorder.order[100:].count("bulk") > 0


def test_an_idle_lanes_share_goes_to_the_busy_one_work_conserving():
    recorder = Recorder(0.05)
    pool = pool_of(recorder, 3, {"interactive": (4, None), "bulk": (1, None)})
    pool.start()
    jobs = submit(pool, "bulk", 9)
    drain(pool, jobs)
    assert recorder.most["bulk"] == 3  # every runner, although its weight is 1 of 5


def test_a_lanes_cap_holds_and_the_other_lanes_use_the_rest():
    recorder = Recorder(0.03)
    pool = pool_of(recorder, 3, {"interactive": (1, None), "bulk": (4, 1)})
    pool.start()
    jobs = submit(pool, "bulk", 12)
    time.sleep(0.1)
    jobs += submit(pool, "interactive", 12)
    drain(pool, jobs)
    assert recorder.most["bulk"] == 1  # its weight alone would give it 4 of 5
    assert recorder.most["interactive"] >= 2


def test_a_lane_that_was_idle_does_not_starve_the_busy_one_when_it_comes_back():
    """Idle time banks no credit: after bulk ran alone for a while, interactive work that
    arrives gets its 4 : 1 share, not every runner until it has caught up."""
    recorder = Recorder(0.002)
    pool = pool_of(recorder, 1, {"interactive": (4, None), "bulk": (1, None)})
    pool.start()
    jobs = submit(pool, "bulk", 200)
    deadline = time.monotonic() + 20
    while len(recorder.order) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = len(recorder.order)
    jobs += submit(pool, "interactive", 100)
    drain(pool, jobs)
    after = Counter(recorder.order[start + 5 : start + 55])
    assert 6 <= after["bulk"] <= 14, after


def test_a_lane_whose_queue_empties_after_each_task_keeps_to_its_share():
    """Bulk tasks arriving one at a time (each queued when the last was taken) while
    interactive has plenty: bulk re-enters at the current virtual time only when it is
    behind it, never going back to it when it is ahead; going back (a mutation the
    other tests missed) gave bulk 499 of 500 hand-outs instead of its 1 in 5."""
    queue: LaneQueue[object] = LaneQueue({"interactive": (4, None), "bulk": (1, None)})
    for i in range(1000):
        queue.put("interactive", i)
    picks = []
    for _ in range(500):
        if not queue.waiting("bulk"):
            queue.put("bulk", "b")
        name, _ = queue.get()  # type: ignore[misc]  # never None: not closed
        queue.finished(name)
        picks.append(name)
    assert picks.count("bulk") == 100


def test_lanes_level_on_service_go_in_declaration_order():
    """The first lane declared is the first served among lanes level on service (prod's
    interactive before bulk), whichever was queued first."""
    queue: LaneQueue[object] = LaneQueue({"interactive": (1, None), "bulk": (1, None)})
    queue.put("bulk", "b")
    queue.put("interactive", "i")
    assert queue.get() == ("interactive", "i")


def test_a_lane_with_a_task_running_and_none_queued_banks_no_credit_either():
    """Bulk has one long task running and nothing queued while interactive runs 4000
    tasks. Once both have work, bulk gets its 1 in 5, not every runner until its share
    of those 4000 is made up (it got 999 of the next 1000 hand-outs)."""
    queue: LaneQueue[object] = LaneQueue({"interactive": (4, None), "bulk": (1, None)})
    queue.put("bulk", "long")
    assert queue.get() == ("bulk", "long")  # running from here to the end
    for i in range(4000):
        queue.put("interactive", i)
        name, _ = queue.get()  # type: ignore[misc]  # never None: not closed
        queue.finished(name)
    for i in range(2000):
        queue.put("bulk", i)
        queue.put("interactive", i)
    picks = []
    for _ in range(1000):
        name, _ = queue.get()  # type: ignore[misc]  # never None: not closed
        picks.append(name)
        queue.finished(name)
    assert 190 <= picks.count("bulk") <= 210, Counter(picks)


# ------------------------------------------------------------------ against the emulators


@pytest.fixture
def lanes_of(services, tmp_path):
    """Stacks with the given GANNET_LANES; their daemons are stopped afterwards, even
    when a test fails half-way."""
    made = []

    def make(lanes: str) -> Any:
        made.append(make_stack(services, tmp_path, lanes=lanes))
        return made[-1]

    yield make
    for stack in made:
        for daemon in stack.daemons:
            if daemon.proc.poll() is None:
                daemon.stop(timeout_s=30)


@pytest.fixture
def lanes_stack(lanes_of):
    return lanes_of("interactive:4,bulk:1")


def test_poison_in_any_lane_goes_to_that_lanes_dead_letter_topic(lanes_stack):
    stack = lanes_stack
    url = stack.upload(SCENES[0]["file"])
    daemon = stack.start_daemon()
    good = {lane: [stack.task(url) for _ in range(2)] for lane in ("interactive", "bulk")}
    bad = {lane: stack.task(url, pipeline=f"NO_PIPELINE_{lane.upper()}") for lane in good}
    for lane, tasks in good.items():
        stack.publish([*tasks, bad[lane]], lane=lane)

    rows = stack.wait_rows([t.task_id for tasks in good.values() for t in tasks])
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    listed = stack.dead_letters(2)  # `gannet dead-letters --json`: every lane's, by lane
    assert {(d["lane"], d["task_id"], d["error_code"]) for d in listed} == {
        (lane, task.task_id, "unknown_pipeline") for lane, task in bad.items()
    }
    only_bulk = stack.gannet("dead-letters", "--json", "--lane", "bulk").stdout.splitlines()
    assert [json.loads(line)["task_id"] for line in only_bulk] == [bad["bulk"].task_id]
    for lane in ("interactive", "bulk"):
        letters = _pull_all(stack, f"{_lane(stack, lane).dead_letter_subscription}", 1)
        assert [m.attributes["task_id"] for m in letters] == [bad[lane].task_id]
        assert letters[0].attributes["error_code"] == "unknown_pipeline"
        assert letters[0].attributes["subscription"] == _lane(stack, lane).subscription
    logged = {
        e["task_id"]: e["lane"] for e in daemon.log_entries() if e.get("outcome") == "succeeded"
    }
    assert {logged[t.task_id] for t in good["bulk"]} == {"bulk"}
    assert {logged[t.task_id] for t in good["interactive"]} == {"interactive"}
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics") as resp:
        metrics = resp.read().decode()
    assert 'gannet_lane_latency_seconds_count{lane="bulk"} 2.0' in metrics
    assert 'gannet_lane_latency_seconds_count{lane="interactive"} 2.0' in metrics
    assert daemon.stop() == 0


def test_gannet_publish_lane_goes_to_that_lanes_topic(lanes_stack):
    stack = lanes_stack
    url = stack.upload(SCENES[0]["file"])
    args = ("publish", "--tenant", stack.tenant, "--pipeline", "DETECTION")
    done = stack.gannet(*args, "--lane", "bulk", url)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = json.loads(done.stdout.splitlines()[0])["task_id"]
    assert [_task_id(m) for m in _pull_all(stack, _lane(stack, "bulk").subscription, 1)] == [
        task_id
    ]
    assert stack.pull(stack.settings.subscription, timeout_s=1.25) == []  # not the first lane
    wrong = stack.gannet(*args, "--lane", "urgent", url)
    assert wrong.returncode == 2
    assert "no lane 'urgent'" in wrong.stderr and "interactive, bulk" in wrong.stderr


@pytest.mark.slow
def test_sigterm_nacks_the_leased_messages_of_every_lane(lanes_stack):
    """Messages both lanes leased but did not start come back at once after a SIGTERM
    (nacked), not after their lease; nothing is lost."""
    stack = lanes_stack
    url = stack.upload(SCENES[0]["file"])
    daemon = stack.start_daemon(GANNET_RUNNERS="1", GANNET_MAX_MESSAGES="8")
    tasks = {lane: [stack.task(url) for _ in range(16)] for lane in ("interactive", "bulk")}
    for lane, batch in tasks.items():
        stack.publish(batch, lane=lane)
    every = [t.task_id for batch in tasks.values() for t in batch]
    # The signal lands when the daemon's own gauges show both lanes with leased messages
    # waiting. The emulator delivers in bursts, and the runner drains the urgent lane
    # between them, so waiting for the first row instead left it empty now and then.
    # Three each: the one runner cannot start three tasks between this read and the stop.
    wait_until(
        lambda: min(_waiting(daemon, lane) for lane in tasks) >= 3,
        "both lanes with 3 messages waiting",
        60,
    )
    assert daemon.stop(signal.SIGTERM) == 0
    nacked = [e for e in daemon.log_entries() if e.get("outcome") == "shutdown"]
    assert {e["lane"] for e in nacked} == {"interactive", "bulk"}, "both lanes held leases"
    done = set(stack.rows(every))
    # The stream ack deadline is 10 s: what comes back within 3 s was nacked.
    back = {
        lane: {_task_id(m) for m in _pull_all(stack, _lane(stack, lane).subscription, 1, 3)}
        for lane in tasks
    }
    for lane, batch in tasks.items():
        assert {t.task_id for t in batch} - done <= back[lane], lane


def _waiting(daemon: Any, lane: str) -> float:
    return scraped(daemon.metrics_port, "gannet_lane_messages_waiting", lane=lane)


def _lane(stack: Any, name: str) -> Any:
    return next(lane for lane in stack.settings.lane_list() if lane.name == name)


def _task_id(message: Any) -> str:
    return str(json.loads(message.data)["task_id"])


def _pull_all(stack: Any, subscription: str, at_least: int, timeout_s: float = 30) -> list[Any]:
    """What `subscription` has, once `at_least` arrived and a pull then finds nothing
    more: what is there comes at once, and the emulator answers an empty pull about a
    second before its deadline, so that last look takes 0.25 s."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = stack.pull(subscription, timeout_s=1.25)
        got += batch
        if len(got) >= at_least and not batch:
            break
    return got


@pytest.mark.slow
def test_messages_waiting_for_their_lanes_turn_keep_their_leases(lanes_of):
    """Bulk messages leased while a much heavier lane keeps the only runner busy for 14 s
    wait longer than the stream's 10 s lease; the client library keeps extending it, so
    they run once, on their first delivery, instead of going back to Pub/Sub. The
    interactive lane is kept from running dry by topping it up from its own gauge, so the
    wait is 14 s on a machine of any speed."""
    stack = lanes_of("interactive:1000,bulk:1")
    url = stack.upload(SCENES[0]["file"])
    bulk = [stack.task(url) for _ in range(3)]
    # 20 leased per lane: the interactive lane keeps a local queue that a slow delivery
    # from the emulator cannot empty, which would give the runner to bulk.
    daemon = stack.start_daemon(GANNET_RUNNERS="1", GANNET_MAX_MESSAGES="20")
    stack.publish([stack.task(url) for _ in range(30)], lane="interactive")
    stack.publish(bulk, lane="bulk")
    until = time.monotonic() + 14
    while time.monotonic() < until:
        if _waiting(daemon, "interactive") < 12:
            stack.publish([stack.task(url) for _ in range(10)], lane="interactive")
        time.sleep(0.1)
    stack.wait_rows([t.task_id for t in bulk], timeout_s=300)
    ids = {t.task_id for t in bulk}
    settled = [e for e in daemon.log_entries() if e.get("task_id") in ids and e.get("outcome")]
    assert sorted(e["task_id"] for e in settled) == sorted(ids), "each settled once"
    assert {e["outcome"] for e in settled} == {"succeeded"}
    assert {e["delivery_attempt"] for e in settled} == {1}
    # The proof is only one if they waited past the lease (stack: 10 s). Stride
    # scheduling may give bulk its 1-in-1001 turn at once; the other two wait.
    waited = [e for e in settled if e["duration_ms"] > 12_000]
    assert len(waited) >= 2, [e["duration_ms"] for e in settled]
    daemon.stop()


class InFlight:
    """Samples a daemon's `gannet_lane_messages_in_flight{lane}` from /metrics until
    stopped, keeping the most each lane had running at once."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.most: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pattern = re.compile(r'^gannet_lane_messages_in_flight\{lane="(\w+)"\} (\S+)$', re.M)
        while not self._stop.wait(0.02):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics") as resp:
                text = resp.read().decode()
            for lane, value in pattern.findall(text):
                self.most[lane] = max(self.most[lane], int(float(value)))

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(5)
        return self.most


@pytest.mark.slow
def test_the_daemon_shares_runners_by_weight_and_holds_a_lanes_cap(lanes_of):
    """Both lanes full from the start, 2 runners, bulk capped at 1: in the order rows are
    committed, interactive takes about 4 of every 5 while both have work, and bulk never
    has more than 1 task running."""
    stack = lanes_of("interactive:4,bulk:1:1")
    url = stack.upload(SCENES[0]["file"])
    tasks = {lane: [stack.task(url) for _ in range(30)] for lane in ("interactive", "bulk")}
    for lane, batch in tasks.items():
        stack.publish(batch, lane=lane)
    daemon = stack.start_daemon(GANNET_RUNNERS="2", GANNET_MAX_MESSAGES="6")
    sampler = InFlight(daemon.metrics_port)
    rows = stack.wait_rows([t.task_id for batch in tasks.values() for t in batch])
    most = sampler.stop()
    daemon.stop()
    assert most["bulk"] == 1 and most["interactive"] >= 1, most
    lane_of = {t.task_id: lane for lane, batch in tasks.items() for t in batch}
    order = [lane_of[r["task_id"]] for r in sorted(rows.values(), key=lambda r: r["updated_at"])]
    window = Counter(order[5:30])  # both lanes have work all along this window
    assert 16 <= window["interactive"] <= 23, order


@pytest.mark.slow
def test_the_daemon_gives_an_empty_lanes_runners_to_the_other(lanes_of):
    stack = lanes_of("interactive:4,bulk:1")
    url = stack.upload(SCENES[0]["file"])
    bulk = [stack.task(url) for _ in range(30)]
    stack.publish(bulk, lane="bulk")
    daemon = stack.start_daemon(GANNET_RUNNERS="2", GANNET_MAX_MESSAGES="6")
    sampler = InFlight(daemon.metrics_port)
    stack.wait_rows([t.task_id for t in bulk])
    most = sampler.stop()
    daemon.stop()
    assert most["bulk"] == 2, most  # both runners, though its weight is 1 of 5
