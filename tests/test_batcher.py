"""The batcher in-process: which requests share one model call, and what every waiting
runner gets back when a call fails or the batcher closes.

The forward function is plain Python over numpy arrays (no model): it records each call
and, where a test needs a batch to form, waits on a gate so that the next requests are
known to queue behind a running call. No test depends on a sleep being long enough.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from gannet.batcher import Batcher, BatcherClosed

WAIT_S = 10


class Forward:
    """A forward function that records its calls; the first call waits on `release`
    after setting `entered`. It stacks its inputs, as a model's forward pass does, so
    inputs of different shapes in one call fail as they would on a real model."""

    def __init__(self, fail_on_call: int | None = None, short_by: int = 0) -> None:
        self.calls: list[list[Any]] = []
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on_call = fail_on_call
        self.short_by = short_by

    def __call__(self, items: list[Any]) -> Sequence[Any]:
        self.calls.append(list(items))
        self.threads.append(threading.current_thread().name)
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the first call"
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("CUDA error: device-side assert triggered")
        batch = np.stack(items)
        answers = list(batch.reshape(len(items), -1).sum(axis=1))
        return answers[: len(answers) - self.short_by]


def image(value: float, shape: tuple[int, ...] = (2, 2)) -> np.ndarray:
    return np.full(shape, value, dtype=np.float32)


def answer(item: np.ndarray) -> float:
    return float(item.sum())


def start_behind_a_running_call(
    forward: Forward, name: str = "test", **kw: Any
) -> tuple[Batcher, Callable[[list[Any]], list[Any]]]:
    """A batcher whose first call is running (held by the gate); returns it and a
    submit that the test uses for the requests that queue behind that call."""
    batcher = Batcher(name, forward, window_s=0.0, **{"max_batch": 8, **kw})
    first = batcher.submit([image(100)])
    assert forward.entered.wait(WAIT_S)
    return batcher, lambda items: first + batcher.submit(items)


def test_requests_queued_during_a_forward_pass_share_the_next_call():
    """What queued while the model was busy goes into one call, and each runner gets the
    answer to its own input."""
    forward = Forward()
    sizes: list[int] = []
    batcher, submit = start_behind_a_running_call(
        forward, on_batch=lambda size, seconds: sizes.append(size)
    )
    items = [image(i) for i in range(1, 5)]
    futures = submit(items[:1]) + batcher.submit(items[1:3]) + batcher.submit(items[3:])
    forward.release.set()
    results = [f.result(WAIT_S) for f in futures]
    batcher.close()
    batcher.join(WAIT_S)

    assert [len(call) for call in forward.calls] == [1, 4]
    assert results == [answer(image(100))] + [answer(item) for item in items]
    assert sizes == [1, 4]  # what gannet_batch_size observes


def test_a_call_takes_at_most_max_batch_inputs():
    """Seven queued requests with max_batch=3 make calls of 3, 3 and 1, in order."""
    forward = Forward()
    batcher, submit = start_behind_a_running_call(forward, max_batch=3)
    items = [image(i) for i in range(1, 8)]
    futures = submit(items)
    forward.release.set()
    results = [f.result(WAIT_S) for f in futures]
    batcher.close()

    assert [len(call) for call in forward.calls] == [1, 3, 3, 1]
    assert results == [answer(image(100))] + [answer(item) for item in items]


def test_inputs_of_different_groups_never_share_a_call():
    """Inputs of two shapes, interleaved in the queue, go to the model in one call per
    shape: a mixed call would fail (the arrays cannot be stacked)."""
    forward = Forward()
    batcher, submit = start_behind_a_running_call(forward, group=lambda item: item.shape)
    items = [image(i, (2, 2) if i % 2 else (3, 3)) for i in range(1, 9)]
    futures = submit(items)
    forward.release.set()
    results = [f.result(WAIT_S) for f in futures]
    batcher.close()

    assert results == [answer(image(100))] + [answer(item) for item in items]
    shapes_per_call = [{item.shape for item in call} for call in forward.calls]
    assert shapes_per_call == [{(2, 2)}, {(2, 2)}, {(3, 3)}]
    assert [len(call) for call in forward.calls] == [1, 4, 4]


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ({"fail_on_call": 2}, "device-side assert"),
        ({"short_by": 1}, "model returned 2 results for 3"),
    ],
    ids=["forward-raises", "too-few-results"],
)
def test_a_failed_call_is_reported_to_every_request_in_it(failure, message):
    """When a model call raises, or answers fewer inputs than it was given, every runner
    waiting on that call gets the error (none gets someone else's answer), and the
    batcher goes on serving."""
    forward = Forward(**failure)
    batcher, submit = start_behind_a_running_call(forward)
    futures = submit([image(1), image(2), image(3)])
    forward.release.set()
    failed = futures[1:]
    for future in failed:
        with pytest.raises(RuntimeError, match=message):
            future.result(WAIT_S)
    assert all(f.done() for f in futures)

    forward.fail_on_call, forward.short_by = None, 0
    assert batcher.submit([image(5)])[0].result(WAIT_S) == answer(image(5))
    batcher.close()


def test_close_finishes_what_was_submitted_then_refuses_new_requests():
    """close() while the model is busy: the requests already queued still get their
    answers, a later submit raises BatcherClosed (the runner asks the cache again), and
    the batcher's thread ends."""
    forward = Forward()
    batcher, submit = start_behind_a_running_call(forward, name="closing")
    futures = submit([image(1), image(2)])
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit([image(3)])
    forward.release.set()
    results = [f.result(WAIT_S) for f in futures]
    batcher.join(WAIT_S)

    assert results == [answer(image(100)), answer(image(1)), answer(image(2))]
    assert not any(t.name == "batcher-closing" for t in threading.enumerate())


def test_on_start_runs_in_the_batcher_thread_before_the_first_call():
    """on_start (torch's per-thread CPU thread count) runs on the thread that later runs
    every forward pass, before the first one."""
    events: list[tuple[str, str]] = []

    def on_start() -> None:
        events.append(("on_start", threading.current_thread().name))

    def forward(items: list[Any]) -> list[Any]:
        events.append(("forward", threading.current_thread().name))
        return [answer(item) for item in items]

    batcher = Batcher("threads", forward, max_batch=4, window_s=0.0, on_start=on_start)
    assert batcher.submit([image(1)])[0].result(WAIT_S) == answer(image(1))
    assert batcher.submit([image(2)])[0].result(WAIT_S) == answer(image(2))
    batcher.close()
    batcher.join(WAIT_S)

    assert [what for what, _ in events] == ["on_start", "forward", "forward"]
    assert {thread for _, thread in events} == {"batcher-threads"}


def test_with_a_window_a_request_waits_for_company():
    """With window_s set, a lone request waits (up to the window) for others, so two
    requests that arrive close together share a call even when the model is idle."""
    forward_calls: list[int] = []

    def forward(items: list[Any]) -> list[Any]:
        forward_calls.append(len(items))
        return [answer(item) for item in items]

    batcher = Batcher("window", forward, max_batch=2, window_s=WAIT_S)
    first = batcher.submit([image(1)])
    second = batcher.submit([image(2)])
    assert [f.result(WAIT_S) for f in first + second] == [answer(image(1)), answer(image(2))]
    batcher.close()
    assert forward_calls == [2]


def test_the_most_urgent_requests_run_first_and_the_rest_wait_one_pass_only():
    """Lanes: of what queued behind a running call, the interactive lane's requests
    (urgency 4) get a pass of their own before the bulk lane's (urgency 1); the bulk ones
    then run in the next pass, together with a newer urgent request: held once, they are
    not held again."""
    forward = Forward()
    batcher, _ = start_behind_a_running_call(forward)
    bulk = batcher.submit([image(1), image(2), image(3)], urgency=1)
    urgent = batcher.submit([image(40)], urgency=4)
    forward.release.set()
    assert [f.result(WAIT_S) for f in urgent] == [answer(image(40))]
    assert [f.result(WAIT_S) for f in bulk] == [answer(image(v)) for v in (1, 2, 3)]
    batcher.close()
    batcher.join(WAIT_S)
    sums = [[answer(item) for item in call] for call in forward.calls]
    assert sums == [[400.0], [160.0], [4.0, 8.0, 12.0]]


def test_held_requests_go_with_the_next_urgent_ones():
    forward = Forward()
    gate = threading.Event()
    seen: list[int] = []

    def on_batch(size: int, seconds: float) -> None:
        seen.append(size)
        if len(seen) == 2:  # the urgent pass ran; queue another urgent one behind it
            later.extend(batcher.submit([image(50)], urgency=4))
            gate.set()

    later: list[Any] = []
    batcher, _ = start_behind_a_running_call(forward, on_batch=on_batch)
    bulk = batcher.submit([image(1)], urgency=1)
    batcher.submit([image(40)], urgency=4)
    forward.release.set()
    assert gate.wait(WAIT_S)
    for future in bulk + later:
        future.result(WAIT_S)
    batcher.close()
    batcher.join(WAIT_S)
    sums = [sorted(answer(item) for item in call) for call in forward.calls]
    assert sums == [[400.0], [160.0], [4.0, 200.0]]


@pytest.mark.parametrize("window_s", [0.0, 0.0005])
def test_runners_handing_inputs_to_a_batcher_that_keeps_falling_asleep_all_get_answers(
    window_s: float,
) -> None:
    """A runner wakes the batcher only when it sleeps (batcher._Inbox), and the batcher
    wakes a runner waiting for its answer (batcher.Answer); a wake-up lost on either side
    would leave a thread waiting for ever (here: each answer WAIT_S late, and the test
    past its timeout). Eight threads submit one input at a time, 300 each, so the batcher
    and the runners go to sleep and are woken thousands of times, with and without a
    window."""
    batcher = Batcher("sleepy", lambda items: [answer(item) for item in items], 4, window_s)
    failures: list[str] = []

    def runner(offset: int) -> None:
        for i in range(300):
            item = image(offset + i)
            try:
                (future,) = batcher.submit([item])
                if future.result(WAIT_S) != answer(item):
                    failures.append(f"wrong answer for {offset + i}")
            except Exception as exc:  # noqa: BLE001 - reported by the assert below
                failures.append(f"{offset + i}: {exc!r}")
                return

    threads = [threading.Thread(target=runner, args=(1000 * n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    batcher.join(WAIT_S)
    assert failures == []
