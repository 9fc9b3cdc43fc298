"""A GPU that fails under the daemon: what the runner's error does to the pod.

CUDA errors are of two kinds. One a single input causes (a kernel refusing a shape)
leaves the device usable: that task is nacked and the pod goes on. A sticky one (an
illegal memory access, a kernel's fault, an uncorrectable ECC error) fails every later
CUDA call of the process (CUDA Runtime API, cudaErrorIllegalAddress: "the process must
be terminated and relaunched"), so the daemon must exit to be started afresh. A
synchronize of the device's default stream tells them apart; here that stream is
replaced (no GPU on this machine), the runner's device is only a name, and the pipeline
is one that raises what a model's forward pass raises on a broken GPU. The claim is
PostgreSQL's; the storage and the settlers are never reached on this path (the task
fails before its result is written), so they are empty stand-ins.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gannet.dev.publish import make_task
from gannet.dispatch import Dispatcher, WorkItem
from gannet.metrics import Metrics
from gannet.outcome import Decision
from gannet.sink import Sink

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


class FailingPipeline:
    """A pipeline whose run fails as a model's forward pass on a broken GPU does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def run(self, *args: Any) -> Any:
        raise self.error


def _dispatcher(error: Exception, device: str, sink: Sink) -> Dispatcher:
    return Dispatcher(
        FailingPipeline(error),  # type: ignore[arg-type]
        sink,
        SimpleNamespace(),  # type: ignore[arg-type]
        {"default": SimpleNamespace()},  # type: ignore[dict-item]
        Metrics(),
        "results",
        10_000,
        [device],
        1,
        holder="pod-a",
        claim_ttl_s=60,
    )


def _item() -> WorkItem:
    task = make_task("t-a", "gs://gannet-images/t-a/x.jpg", "DETECTION")
    return WorkItem(task, SimpleNamespace(), 1)  # type: ignore[arg-type]


def _free_for_another_pod(sink: Sink, item: WorkItem) -> bool:
    """Whether another pod can claim the task at once: a nacked task's claim is given up,
    so its redelivery need not wait out the claim's TTL."""
    return sink.start(item.task.task_id, item.task.tenant_id, "pod-b", 60).claimed


class Stream:
    """A device's default stream; its synchronize fails with `error` (a sticky one)."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def synchronize(self) -> None:
        if self.error is not None:
            raise self.error


def _default_stream(monkeypatch: pytest.MonkeyPatch, error: Exception | None) -> list[Any]:
    """torch.cuda.default_stream as on a GPU whose context holds `error` (None: none)."""
    asked: list[Any] = []

    def default_stream(device: Any = None) -> Stream:
        asked.append(device)
        return Stream(error)

    monkeypatch.setattr(torch.cuda, "default_stream", default_stream)
    return asked


def test_a_sticky_cuda_error_marks_the_device_lost_so_the_daemon_restarts(
    monkeypatch: pytest.MonkeyPatch, db: Sink
) -> None:
    """The task is nacked (it may well succeed on another pod), and the dispatcher says
    the device is lost, which makes the daemon's loop fail /healthz and exit. Before,
    the pod stayed live and nacked every task it leased from then on."""
    asked = _default_stream(monkeypatch, torch.AcceleratorError(ILLEGAL_ADDRESS))
    dispatcher = _dispatcher(torch.AcceleratorError(ILLEGAL_ADDRESS), "cuda:0", db)
    item = _item()
    outcome = dispatcher.process(item, "cuda:0")
    assert outcome.decision is Decision.NACK
    assert _free_for_another_pod(db, item)
    assert asked == ["cuda:0"]
    assert dispatcher.device_lost is not None
    assert dispatcher.device_lost.startswith("cuda:0: ")
    assert "illegal memory access" in dispatcher.device_lost


def test_a_cuda_error_that_leaves_the_device_usable_fails_only_its_task(
    monkeypatch: pytest.MonkeyPatch, db: Sink
) -> None:
    """One input's error (here a kernel's launch refused) must not restart the pod: a
    poison image would then take every pod it reaches down in turn."""
    asked = _default_stream(monkeypatch, None)
    error = torch.AcceleratorError("CUDA error: invalid configuration argument")
    dispatcher = _dispatcher(error, "cuda:0", db)
    item = _item()
    outcome = dispatcher.process(item, "cuda:0")
    assert outcome.decision is Decision.NACK
    assert _free_for_another_pod(db, item)
    assert asked == ["cuda:0"] and dispatcher.device_lost is None


def test_an_error_on_a_cpu_runner_asks_no_gpu(monkeypatch: pytest.MonkeyPatch, db: Sink) -> None:
    asked = _default_stream(monkeypatch, torch.AcceleratorError(ILLEGAL_ADDRESS))
    dispatcher = _dispatcher(RuntimeError("a bug"), "cpu", db)
    assert dispatcher.process(_item(), "cpu").decision is Decision.NACK
    assert asked == [] and dispatcher.device_lost is None
