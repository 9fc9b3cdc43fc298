"""One trace per task, received by a real OTLP gRPC server.

The daemon and `gannet publish` run as processes with GANNET_TRACE_EXPORTER=otlp and
export, through their own OTLP exporter (spans.py), to a TraceService gRPC server in the
test process (gannet.dev.trace_receiver: the collector's wire protocol, parsed by
opentelemetry-proto): nothing is mocked, and the Pub/Sub client's own tracing carries the
context through the real emulator.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import SCENES

from gannet.dev.stack import Stack
from gannet.dev.trace_receiver import Span, TraceReceiver, format_tree, task_trace


@pytest.fixture
def receiver() -> Iterator[TraceReceiver]:
    recv = TraceReceiver()
    yield recv
    recv.stop()


def task_span(spans: list[Span], task_id: str) -> Span:
    (span,) = [
        s
        for s in spans
        if s.name == "gannet task" and s.attributes.get("gannet.task_id") == task_id
    ]
    return span


def test_a_published_task_is_one_trace_from_the_publisher_to_the_commit(
    stack: Stack, receiver: TraceReceiver
) -> None:
    recv = receiver
    url = stack.upload(SCENES[0]["file"])
    daemon = stack.start_daemon(**recv.env())
    done = stack.gannet(
        "publish", "--tenant", stack.tenant, "--pipeline", "DETECTION", url, **recv.env()
    )
    assert done.returncode == 0, done.stderr
    task_id = json.loads(done.stdout.splitlines()[-1])["task_id"]
    stack.wait_rows([task_id])
    assert daemon.stop() == 0  # the daemon sends what it buffered before it exits

    spans = recv.wait_for(
        lambda got: any(s.attributes.get("gannet.task_id") == task_id for s in got)
    )
    task = task_span(spans, task_id)
    in_trace = task_trace(spans, task_id)
    assert {s.trace_id for s in in_trace} == {task.trace_id}
    by_id = {s.span_id: s for s in in_trace}

    # The root is the publisher's span, in the publishing process; the daemon continues it.
    (root,) = [s for s in in_trace if not s.parent_id]
    assert root.instance == "gannet-publish" and root.name.endswith(" create")
    chain, span = [], task
    while span.parent_id:
        span = by_id[span.parent_id]
        chain.append(span.name)
    assert chain == [f"{stack.settings.subscription} subscribe", root.name]

    assert task.attributes["gannet.tenant_id"] == stack.tenant
    assert task.attributes["gannet.pipeline"] == "DETECTION"
    assert task.attributes["gannet.industry"] == "demo"  # configs/demo.yaml
    assert task.attributes["gannet.outcome"] == "succeeded"
    assert task.attributes["gannet.delivery_attempt"] == 1
    assert not task.error

    def under_task(s: Span) -> bool:
        while s.parent_id in by_id:
            if s.parent_id == task.span_id:
                return True
            s = by_id[s.parent_id]
        return False

    stages = {s.name for s in in_trace if under_task(s)}
    for stage in (
        "receive",
        "wait for a runner",
        "lookup",
        "fetch",
        "decode",
        "detection",  # the pipeline's step
        "inference",
        "sink",
        "gcs_write",
        "settle",
    ):
        assert stage in stages, f"{stage} missing from {sorted(stages)}"
    # Sub-millisecond stages stay in the task's timings, not in spans (tracing.py).
    assert not stages & {"preprocess", "postprocess", "result_json"}
    (inference,) = [s for s in in_trace if s.name == "inference"]
    (detection,) = [s for s in in_trace if s.name == "detection"]
    assert inference.parent_id == detection.span_id  # the model call, inside its step
    assert detection.start_ns <= inference.start_ns <= inference.end_ns <= detection.end_ns
    assert task.attributes["image.width"] > 0 and task.attributes["image.bytes"] > 0

    # The model ran in a batch: its span links back to this task's span.
    linked = (task.trace_id, task.span_id)
    forwards = [s for s in spans if s.name == "forward" and linked in s.links]
    assert forwards and forwards[0].attributes["gannet.batch_size"] >= 1

    # What `gannet demo --trace` prints: the tree, the task under the publisher's span.
    tree = format_tree(in_trace).splitlines()
    assert tree[0].startswith(root.name)
    assert any(line.startswith("    gannet task") and "outcome=succeeded" in line for line in tree)

    # The task's log lines carry the ids Cloud Logging joins on.
    lines = [
        json.loads(line)
        for line in daemon.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("task_id") == task_id]
    assert mine, "no log line for the task"
    for line in mine:
        assert line["logging.googleapis.com/trace"] == (
            f"projects/{stack.settings.project}/traces/{task.trace_id}"
        )
        assert line["logging.googleapis.com/spanId"] in by_id


def test_a_batched_forward_pass_links_every_task_in_it(
    stack: Stack, receiver: TraceReceiver
) -> None:
    recv = receiver
    tasks = [stack.task(stack.upload(e["file"])) for e in SCENES[:6]]
    stack.publish(tasks)  # published before the daemon starts: they arrive together
    daemon = stack.start_daemon(**recv.env(), GANNET_RUNNERS="4")
    stack.wait_rows([t.task_id for t in tasks])
    assert daemon.stop() == 0
    ids = {t.task_id for t in tasks}
    spans = recv.wait_for(lambda got: ids <= {s.attributes.get("gannet.task_id") for s in got})
    task_spans = [task_span(spans, t.task_id) for t in tasks]
    # Published untraced: each message starts a trace of its own at the subscriber.
    assert len({s.trace_id for s in task_spans}) == len(tasks)
    forwards = [s for s in spans if s.name == "forward"]
    linked = [link for f in forwards for link in f.links]
    expected = [(s.trace_id, s.span_id) for s in task_spans]
    assert sorted(linked) == sorted(expected), "every task is linked by one forward pass"
    for f in forwards:
        assert f.attributes["gannet.batch_size"] == len(f.links)
    assert max(len(f.links) for f in forwards) > 1, "the tasks never shared a forward pass"


def test_a_poisoned_message_span_carries_its_error_code(
    stack: Stack, receiver: TraceReceiver
) -> None:
    recv = receiver
    daemon = stack.start_daemon(**recv.env())
    task = stack.task(f"gs://not-allowed/{stack.tenant}/x.jpg")
    stack.publish([task])
    letters = stack.pull_dead_letters(1)
    assert letters
    assert daemon.stop() == 0
    spans = recv.wait_for(
        lambda got: any(s.attributes.get("gannet.task_id") == task.task_id for s in got)
    )
    span = task_span(spans, task.task_id)
    assert span.error
    assert span.attributes["gannet.outcome"] == "quarantined"
    assert span.attributes["gannet.error_code"] == "bucket_not_allowed"


def test_a_span_carries_the_outcome_applied_not_the_one_decided(
    stack: Stack, receiver: TraceReceiver
) -> None:
    """Poison whose dead letter Pub/Sub refuses (its topic does not exist) is nacked,
    not quarantined: the log line and gannet_messages_total say `retry`. The task's span
    said `quarantined`, the decision before the Settler applied it, so the trace told
    whoever read it that the message was gone when it was coming back."""
    recv = receiver
    daemon = stack.start_daemon(**recv.env(), GANNET_DEAD_LETTER_TOPIC="no-such-dead-letter")
    stack.publish_raw(b"{not json, no dead letter")
    spans = recv.wait_for(
        lambda got: any(s.name == "gannet task" and "gannet.outcome" in s.attributes for s in got)
    )
    assert daemon.stop() == 0
    task = next(s for s in spans if s.name == "gannet task" and "gannet.outcome" in s.attributes)
    assert task.attributes["gannet.outcome"] == "retry"
    assert task.attributes["gannet.error_code"] == "bad_json" and task.error


def test_a_sampled_task_keeps_its_forward_pass_whatever_the_ratio_of_new_traces(
    stack: Stack, receiver: TraceReceiver
) -> None:
    """Prod keeps 1 % of new traces, and every task whose publisher sampled it. The
    forward pass is a new trace of its own, linked to its tasks: kept at that ratio, 99 %
    of the traced tasks' forward spans were dropped, and their trace showed no batch. At a
    ratio of 0 the publisher's sampled task must still be linked from its forward pass."""
    recv = receiver
    url = stack.upload(SCENES[0]["file"])
    daemon = stack.start_daemon(**recv.env(), GANNET_TRACE_SAMPLE_RATIO="0.0")
    done = stack.gannet(
        "publish", "--tenant", stack.tenant, "--pipeline", "DETECTION", url, **recv.env()
    )
    assert done.returncode == 0, done.stderr
    task_id = json.loads(done.stdout.splitlines()[-1])["task_id"]
    stack.wait_rows([task_id])
    assert daemon.stop() == 0
    spans = recv.wait_for(
        lambda got: any(s.attributes.get("gannet.task_id") == task_id for s in got)
    )
    task = task_span(spans, task_id)
    forwards = [s for s in spans if s.name == "forward"]
    assert [f.links for f in forwards] == [[(task.trace_id, task.span_id)]]
    assert forwards[0].attributes["gannet.batch_size"] == 1


@pytest.mark.parametrize(("ratio", "linked"), [(0.0, False), (1.0, True)])
def test_only_a_sampled_task_is_linked_from_a_forward_pass(ratio: float, linked: bool) -> None:
    """At prod's 1 %, most tasks are unsampled: their inference must not make the
    batch's forward pass record a span that links to nothing anyone will see. (Spans
    are sent nowhere: which ones link is decided before any export.)"""
    from opentelemetry import context, trace

    from gannet.spans import Recorder
    from gannet.tracing import current_link

    recorder = Recorder({}, ratio, send=lambda request, timeout_s: None)
    span = recorder.get_tracer("test").start_span("inference")
    token = context.attach(trace.set_span_in_context(span))
    try:
        assert (current_link() is not None) is linked
    finally:
        context.detach(token)
        recorder.shutdown()
    assert current_link() is None  # no span current: tracing off
