"""`gannet bench --in-process` (dev/bench_device.py), run small on the CPU: the figures a
GPU host reports come from this code, and there is no GPU here to try it on first."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from gannet.dev import bench_device
from gannet.settings import REPO_ROOT


def run_bench(
    tmp_path: Path, images: int, runner_counts: list[int], pipeline: str | None = None
) -> dict:
    """`gannet bench --in-process --device cpu --sizes 640x480 --rounds 1`, its report."""
    output = tmp_path / "report.json"
    args = argparse.Namespace(
        device="cpu",
        sizes=["640x480"],
        images=images,
        rounds=1,
        runners=None,
        runners_sweep=[(n, None) for n in runner_counts],
        pipeline=pipeline,
        output=output,
    )
    assert bench_device.main(args) == 0
    report: dict = json.loads(output.read_text())
    return report


def test_the_runners_path_answers_as_the_bare_model_and_reports_each_runner_count(
    tmp_path: Path,
) -> None:
    report = run_bench(tmp_path, images=12, runner_counts=[1, 3])
    (size,) = report["sizes"]
    (round_,) = size["rounds"]
    assert set(round_["bare_images_per_s"]) == {"per_call", "batched", "traced_batched"}
    assert set(round_["daemon"]) == {"1", "3"}
    for daemon in round_["daemon"].values():
        agreement = daemon["agreement"]
        assert agreement["same_count"] == agreement["photos"] == 6, agreement
        assert agreement["largest_box_diff_px"] <= 2.0
        assert daemon["images_per_s"] > 0 and daemon["cpu_ms"] > 0
        # One model, one batcher thread: its forward passes fill at most the wall time.
        assert 0 < daemon["forward_share"] <= 1.0
        # No nvJPEG decoder thread on a CPU: neither its busy time nor its batches.
        assert daemon["decode_share"] is None and daemon["decode_batch"] is None
    # One runner has one photo in flight: every forward pass holds one image.
    assert round_["daemon"]["1"]["mean_batch"] == 1.0
    assert size["median"]["daemon"]["3"]["ratios"] == [round_["daemon"]["3"]["ratio"]]


def test_a_configs_pipeline_runs_its_models_and_reports_their_share_of_the_time(
    tmp_path: Path,
) -> None:
    """`--pipeline` runs a shipped pipeline (two models here) on the runners' path; there is
    no bare model to compare, so the report says how much of the time the models' forward
    passes took."""
    agro = REPO_ROOT / "configs" / "agro.yaml"
    report = run_bench(tmp_path, images=6, runner_counts=[2], pipeline=f"{agro}:FULL_PIPELINE")
    assert report["pipeline"].endswith("agro.yaml:FULL_PIPELINE")
    (size,) = report["sizes"]
    (round_,) = size["rounds"]
    assert "bare_images_per_s" not in round_ and "bare_images_per_s" not in size["median"]
    daemon = round_["daemon"]["2"]
    assert daemon["images_per_s"] > 0 and daemon["cpu_ms"] > 0
    # Segmentation and detection, each on its own batcher thread: their forward passes
    # can overlap, up to twice the wall time.
    assert 0 < daemon["forward_share"] <= 2.0
    assert size["median"]["daemon"]["2"]["forward_share"] == daemon["forward_share"]


def test_gpu_busy_averages_what_nvidia_smi_samples_and_is_absent_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """There is no GPU here, so a stand-in `nvidia-smi` on PATH plays the tool: it answers
    only the query the bench makes (utilisation of GPU 1, CSV numbers, a 100 ms loop), as
    the real one would print it, and then keeps looping until it is stopped."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$*" = "--id=1 --query-gpu=utilization.gpu --format=csv,noheader,nounits '
        '--loop-ms=100" ] || { echo "unexpected: $*" >&2; exit 2; }\n'
        "echo 40; echo 80; echo '[N/A]'; exec sleep 60\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with bench_device.GpuBusy("cuda:1") as gpu:
        deadline = time.monotonic() + 10
        while len(gpu._samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert gpu.share() == 0.6
    with bench_device.GpuBusy("cpu") as cpu:
        pass
    assert cpu.share() is None
