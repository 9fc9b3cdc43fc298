"""Calls run on the offload threads (offload.py): what the caller gets back, at what
priority they run, and where their CPU is counted. Plain functions stand in for the
JPEG decode; the daemon's own decode threads are checked in test_end_to_end.py."""

from __future__ import annotations

import logging
import os
import threading
import time

import cv2
import numpy as np
import pytest

from gannet.offload import Offload


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.fixture
def offload():
    charged: list[float] = []
    pool = Offload(2, 5, "test-offload", charged.append)
    pool.charged = charged  # type: ignore[attr-defined]
    yield pool
    pool.close()


def test_a_call_returns_its_value_or_raises_its_error_in_the_caller(offload):
    assert offload.run(int, "12") == 12
    assert offload.run(int, "ff", base=16) == 255
    with pytest.raises(ValueError, match="invalid literal"):
        offload.run(int, "not a number")
    assert offload.run(threading.current_thread).name.startswith("test-offload_")


def test_the_threads_are_nicer_than_the_caller_by_the_given_amount(offload):
    """A decode thread must yield its core to the threads that hold the GIL; here
    every thread of the pool runs 5 nicer than the thread that made it."""
    mine = own_nice()
    assert {offload.run(own_nice) for _ in range(20)} == {min(19, mine + 5)}


def test_as_many_calls_run_at_once_as_there_are_threads(offload):
    """Each runner has one decode at a time here; with one thread per runner none
    waits for another's. Two calls that wait for each other finish only if both run
    at once."""
    both = threading.Barrier(2, timeout=10)
    results: list[int] = []
    caller = threading.Thread(target=lambda: results.append(offload.run(both.wait)))
    caller.start()
    results.append(offload.run(both.wait))
    caller.join()
    assert sorted(results) == [0, 1]


def test_each_call_charges_its_thread_cpu(offload):
    """With GANNET_STAGE_CPU the decode stage is charged the decode threads' CPU, not
    only the runner's hand-over (stages.py)."""

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    offload.run(spin, 0.05)
    assert offload.charged[-1] >= 0.05


def test_a_call_after_close_runs_in_the_caller():
    """A runner left running past the shutdown's grace period still decodes its photo
    instead of waiting for threads that have ended."""
    pool = Offload(1, 5, "test-offload")
    pool.close()
    assert pool.run(threading.current_thread) is threading.current_thread()


def test_large_photos_decode_on_the_offload_threads_to_the_same_pixels(tmp_path):
    """A photo of 4 MP or more is decoded by the pipeline's `decode_run` (the daemon's
    Offload), a smaller one on its runner; the pixels are the same either way, turned
    upright per EXIF, and a JPEG libjpeg-turbo refuses still goes to OpenCV (its error
    raised through the hand-over) and fails as undecodable."""
    from conftest import local_pipeline
    from test_decode import _noise_jpeg, _opencv

    from gannet.dev.bench_plumbing import write_config
    from gannet.dev.publish import make_task
    from gannet.errors import ErrorCode, PermanentError
    from gannet.pipeline import OFFLOAD_MIN_PIXELS, decode_scaled

    pool = Offload(1, 5, "test-decode")
    offloaded: list[str] = []

    def run(fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        offloaded.append(fn.__name__)
        return pool.run(fn, *args, **kwargs)

    pipeline = local_pipeline(str(write_config(tmp_path)))
    pipeline.decode_run = run
    route = pipeline.check(
        make_task("tenant-a", "gs://gannet-images/tenant-a/x.jpg", "DETECTION", "t")
    )
    large = _noise_jpeg(2400, 1800, orientation=6)  # 4.3 MP, decoded at 1/2 for the floor
    small = _noise_jpeg(1920, 1080)
    assert 1920 * 1080 < OFFLOAD_MIN_PIXELS <= 2400 * 1800
    try:
        for data in (large, small):
            frame, scale = pipeline.decode(data, route, "cpu")
            expected, expected_scale = decode_scaled(data, 10**8, route.decode_floor)
            assert np.array_equal(frame, expected) and scale == expected_scale
        assert offloaded == ["decode_jpeg"]  # the large photo's only
        truncated = large[:-20_000]
        refused = _opencv(truncated, cv2.IMREAD_REDUCED_COLOR_2)
        if refused is None:
            with pytest.raises(PermanentError) as err:
                pipeline.decode(truncated, route, "cpu")
            assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
        else:
            assert np.array_equal(pipeline.decode(truncated, route, "cpu")[0], refused)
        assert offloaded == ["decode_jpeg", "decode_jpeg", "imdecode"]  # refused, then OpenCV
    finally:
        pool.close()
        pipeline.cache.close()


def test_a_refused_priority_is_a_warning_and_the_calls_still_run(monkeypatch, caplog):
    """A pod whose seccomp profile refuses setpriority still decodes its photos, at the
    usual priority, and its log says why. (The refusal is simulated: this machine's
    kernel lets any thread lower its own priority.)"""

    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger="gannet.offload"):
        pool = Offload(1, 5, "test-offload")
        try:
            deadline = time.monotonic() + 10  # the thread logs it as it starts
            while "could not lower" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "could not lower this thread's priority" in caplog.text
            assert pool.run(own_nice) == own_nice()
        finally:
            pool.close()
