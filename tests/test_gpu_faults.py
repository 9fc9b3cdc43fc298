"""A GPU that fails under the daemon: what the runner's error does to the pod.

CUDA errors are of two kinds. One a single input causes (a kernel refusing a shape)
leaves the device usable: that task is nacked and the pod goes on. A sticky one (an
illegal memory access, a kernel's fault, an uncorrectable ECC error) fails every later
CUDA call of the process (CUDA Runtime API, cudaErrorIllegalAddress: "the process must
be terminated and relaunched"), so the daemon must exit to be started afresh. A
synchronize of the device's default stream tells them apart; here that stream is
replaced (no GPU on this machine), and the runner's device is only a name.
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
from gannet.sink import Start

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


class FailingPipeline:
    """A pipeline whose run fails as a model's forward pass on a broken GPU does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def run(self, *args: Any) -> Any:
        raise self.error


class ClaimingSink:
    """The claim is always ours; a release is noted."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def start(self, task_id: str, *args: Any) -> Start:
        return Start(None, claimed=True)

    def release(self, task_id: str, *args: Any) -> None:
        self.released.append(task_id)


def _dispatcher(error: Exception, device: str) -> Dispatcher:
    return Dispatcher(
        FailingPipeline(error),  # type: ignore[arg-type]
        ClaimingSink(),  # type: ignore[arg-type]
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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The task is nacked (it may well succeed on another pod), and the dispatcher says
    the device is lost, which makes the daemon's loop fail /healthz and exit. Before,
    the pod stayed live and nacked every task it leased from then on."""
    asked = _default_stream(monkeypatch, torch.AcceleratorError(ILLEGAL_ADDRESS))
    dispatcher = _dispatcher(torch.AcceleratorError(ILLEGAL_ADDRESS), "cuda:0")
    outcome = dispatcher.process(_item(), "cuda:0")
    assert outcome.decision is Decision.NACK
    assert asked == ["cuda:0"]
    assert dispatcher.device_lost is not None
    assert dispatcher.device_lost.startswith("cuda:0: ")
    assert "illegal memory access" in dispatcher.device_lost


def test_a_cuda_error_that_leaves_the_device_usable_fails_only_its_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One input's error (here a kernel's launch refused) must not restart the pod: a
    poison image would then take every pod it reaches down in turn."""
    asked = _default_stream(monkeypatch, None)
    error = torch.AcceleratorError("CUDA error: invalid configuration argument")
    dispatcher = _dispatcher(error, "cuda:0")
    outcome = dispatcher.process(_item(), "cuda:0")
    assert outcome.decision is Decision.NACK
    assert asked == ["cuda:0"] and dispatcher.device_lost is None


def test_an_error_on_a_cpu_runner_asks_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _default_stream(monkeypatch, torch.AcceleratorError(ILLEGAL_ADDRESS))
    dispatcher = _dispatcher(RuntimeError("a bug"), "cpu")
    assert dispatcher.process(_item(), "cpu").decision is Decision.NACK
    assert asked == [] and dispatcher.device_lost is None
