"""`gannet bench --in-process` (dev/bench_device.py), run small on the CPU: the figures a
GPU host reports come from this code, and there is no GPU here to try it on first."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gannet.dev import bench_device


def test_the_runners_path_answers_as_the_bare_model_and_reports_each_runner_count(
    tmp_path: Path,
) -> None:
    output = tmp_path / "report.json"
    args = argparse.Namespace(
        device="cpu",
        sizes=["640x480"],
        images=12,
        rounds=1,
        runners=None,
        runners_sweep=[(1, None), (3, None)],
        output=output,
    )
    assert bench_device.main(args) == 0
    report = json.loads(output.read_text())
    (size,) = report["sizes"]
    (round_,) = size["rounds"]
    assert set(round_["bare_images_per_s"]) == {"per_call", "batched", "traced_batched"}
    assert set(round_["daemon"]) == {"1", "3"}
    for daemon in round_["daemon"].values():
        agreement = daemon["agreement"]
        assert agreement["same_count"] == agreement["photos"] == 6, agreement
        assert agreement["largest_box_diff_px"] <= 2.0
        assert daemon["images_per_s"] > 0 and daemon["cpu_ms"] > 0
    # One runner has one photo in flight: every forward pass holds one image.
    assert round_["daemon"]["1"]["mean_batch"] == 1.0
    assert size["median"]["daemon"]["3"]["ratios"] == [round_["daemon"]["3"]["ratio"]]
