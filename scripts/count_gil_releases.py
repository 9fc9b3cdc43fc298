#!/usr/bin/env python3
"""How many times each step of a runner's work lets go of the GIL, counted exactly.

On a busy daemon every release of the GIL can cost the thread a wait and a context
switch to get it back (docs/benchmark.md: the GIL convoy), so the count per image is a
figure that does not drift with the VM. Each step runs 500 times in this process while
`perf stat` counts calls of CPython's PyEval_SaveThread (a uprobe: needs perf and root;
the probe is added once and left in place).

    YOLO_OFFLINE=1 .venv/bin/python scripts/count_gil_releases.py
    YOLO_OFFLINE=1 .venv/bin/python scripts/count_gil_releases.py io
    YOLO_OFFLINE=1 .venv/bin/python scripts/count_gil_releases.py segment
    YOLO_OFFLINE=1 .venv/bin/python scripts/count_gil_releases.py pipeline

The first: the demo detector's pre-processing, the batcher's float conversion and the
post-processing of samples/scene_01.jpg (split_predictor) with boxes_to_detections.
`io`: on local services of its own, a task's claim (Sink.start) and its fenced commit
(Sink.save_claimed), as the runners send them. `segment`: the demo segmenter's
post-processing of the same photo (its NMS on the host), its masks made inside their
boxes (a CPU's path) and by ultralytics' arithmetic in chunks of segments (a GPU's
path: masks.segments_on_device, here on the CPU), and for
comparison ultralytics' NMS alone, torchvision's (imported here for it). `pipeline`: a
runner's whole work on one photo (decode, the pipeline's steps, the result's JSON) for
the demo's DETECTION, agro's FULL_PIPELINE and vending's SHELF_AUDIT, at 640x480 and
4032x3024, counted in the runner's thread only (the models' batcher threads run the
forward passes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

CALLS = 500
EVENT = "probe_libpython3:PyEval_SaveThread"


def add_probe(probe: str = "PyEval_SaveThread") -> None:
    """A uprobe on this Python's libpython (perf's syntax: `drop_gil`, `take_gil%return`),
    added once and left in place; its event is probe_libpython3:<probe>, with `%return`
    as `__return`."""
    library = Path(sysconfig.get_config_var("LIBDIR")) / str(sysconfig.get_config_var("LDLIBRARY"))
    listed = subprocess.run(["perf", "probe", "-l"], capture_output=True, text=True).stdout
    if f"probe_libpython3:{probe.replace('%return', '__return')} " not in listed:
        subprocess.run(["perf", "probe", "-x", str(library), "-a", probe], check=True)


def count(step: Callable[[], object], calls: int = CALLS, thread_only: bool = False) -> float:
    """GIL releases per call of `step`, in this process (`thread_only`: in the calling
    thread, not the model's batcher threads)."""
    for _ in range(20):
        step()
    target = ["-t", str(threading.get_native_id())] if thread_only else ["-p", str(os.getpid())]
    perf = subprocess.Popen(
        ["perf", "stat", "-x", ",", "-e", EVENT, *target],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # perf attaches
    for _ in range(calls):
        step()
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate()
    line = next(x for x in err.splitlines() if EVENT in x)
    return int(line.split(",")[0]) / calls


def model_steps() -> dict[str, Callable[[], object]]:
    import cv2

    from gannet.model_cache import ModelKey, yolo_loader
    from gannet.settings import REPO_ROOT
    from gannet.split_predictor import SplitPredictor
    from gannet.steps import boxes_to_detections

    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(REPO_ROOT / "models/demo/detect.pt"), "v", "cpu", 640, "detect"))
    split = SplitPredictor(model)
    image = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    inputs = split.preprocess(image)
    (output,) = split.forward([inputs])
    return {
        "pre-process (runner)": lambda: split.preprocess(image),
        "float input (batcher)": lambda: split._model_input(inputs),
        "post-process + detections (runner)": lambda: boxes_to_detections(
            split.postprocess(output, inputs, image, 0.25), 0.25
        ),
    }


def main() -> None:
    add_probe()
    if sys.argv[1:2] == ["io"]:
        io()
        return
    if sys.argv[1:2] == ["pipeline"]:
        for name, (step, calls) in pipeline_steps().items():
            print(f"{name:36} {count(step, calls, True):6.1f} GIL releases per photo")
        return
    steps = segment_steps() if sys.argv[1:2] == ["segment"] else model_steps()
    for name, step in steps.items():
        print(f"{name:36} {count(step):6.1f} GIL releases per call")


def segment_steps() -> dict[str, Callable[[], object]]:
    import cv2
    import torch
    import torchvision  # noqa: F401 - ultralytics' NMS uses it when loaded
    from ultralytics.utils.nms import non_max_suppression

    from gannet.model_cache import ModelKey, yolo_loader
    from gannet.settings import REPO_ROOT
    from gannet.split_predictor import SplitPredictor

    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    weights = REPO_ROOT / "models/demo/segment.pt"
    model, _ = load(ModelKey(str(weights), "v", "cpu", 640, "segment"))
    in_boxes, theirs = SplitPredictor(model), SplitPredictor(model)
    theirs._masks_in_boxes = False  # the GPU's path (segments_on_device), on the CPU
    image = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    inputs = in_boxes.preprocess(image)
    (output,) = in_boxes.forward([inputs])
    prediction, args = output[0], in_boxes._predictor.args

    def nms() -> None:
        with torch.inference_mode():
            non_max_suppression(
                prediction, 0.25, args.iou, max_det=args.max_det, nc=len(model.names)
            )

    return {
        "post-process, masks in boxes (CPU)": lambda: in_boxes.postprocess(
            output, inputs, image, 0.25
        ),
        "post-process, a GPU's masks": lambda: theirs.postprocess(output, inputs, image, 0.25),
        "ultralytics' NMS alone": nms,
    }


def pipeline_steps() -> dict[str, tuple[Callable[[], object], int]]:
    """A runner's whole work on one photo (decode, the pipeline's steps, the result's
    JSON) for the demo's and the shipped pipelines, on a 640x480 and a 4032x3024 photo,
    and how many calls to count it over."""
    import cv2

    from gannet.dev.bench_device import build_pipeline
    from gannet.dev.publish import make_task
    from gannet.metrics import Metrics
    from gannet.pipeline import Pipeline
    from gannet.settings import REPO_ROOT, Settings
    from gannet.stages import Timer
    from gannet.storage import encode_json

    def runner(pipeline: Pipeline, name: str, data: bytes) -> Callable[[], object]:
        task = make_task("gil", "gs://bench/gil/x.jpg", name, "gil")  # build_pipeline's bucket
        route = pipeline.check(task)

        def step() -> None:
            frame, scale = pipeline.decode(data, route, "cpu")
            timer = Timer(lambda stage, seconds: None)
            encode_json(pipeline.run_image(task, route, frame, "cpu", timer, None, scale))

        return step

    scene = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    photos = {"640x480": scene, "4032x3024": cv2.resize(scene, (4032, 3024))}
    steps: dict[str, tuple[Callable[[], object], int]] = {}
    plans = [("demo", "DETECTION"), ("agro", "FULL_PIPELINE"), ("vending", "SHELF_AUDIT")]
    for config, name in plans:
        # The daemon's Pipeline on the config's local files, with its default settings.
        path = REPO_ROOT / "configs" / f"{config}.yaml"
        pipeline = build_pipeline(Settings(), path, "cpu", Metrics(), cuda_graphs=False)
        for size, image in photos.items():
            data = cv2.imencode(".jpg", image)[1].tobytes()
            calls = 100 if size == "640x480" else 20
            steps[f"{config} {name} {size}"] = (runner(pipeline, name, data), calls)
    return steps


def io() -> None:
    from itertools import count as numbers

    from gannet.dev.demo import local_settings
    from gannet.dev.stack import prepared_services
    from gannet.sink import Sink
    from gannet.task import TaskResult

    with prepared_services(Path(tempfile.mkdtemp(prefix="gannet-gil-"))) as services:
        sink = Sink(local_settings(services).database_url)
        sink.open()
        ids = numbers()
        claimed: list[str] = []

        def claim() -> None:
            task_id = f"gil-{next(ids)}"
            assert sink.start(task_id, "t", "gil", 60).claimed
            claimed.append(task_id)

        def commit() -> None:
            record = TaskResult(
                task_id=claimed.pop(), tenant_id="t", pipeline="DETECTION", status="succeeded"
            )
            sink.save_claimed(record, "gil", lambda: None)

        steps = {"claim (Sink.start)": claim, "fenced commit (Sink.save_claimed)": commit}
        try:
            for name, step in steps.items():  # in this order: each commit needs a claim
                print(f"{name:36} {count(step):6.1f} GIL releases per call")
        finally:
            sink.close()


if __name__ == "__main__":
    main()
