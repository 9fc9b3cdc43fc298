#!/usr/bin/env python3
"""What a runner's steps cost when another thread wants the GIL.

Every torch call, socket call and database round trip releases the GIL. With a second
core, another thread takes it at once, and the caller waits to get it back: a cost per
release that a measurement in one thread never shows (docs/benchmark.md: the GIL
convoy). Each step runs 100 times in one thread, alone and with a second Python thread
that takes the GIL in short bursts, as the daemon's other threads do. Printed: thread
CPU and wall ms per call.

    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_gil_convoy.py [rounds]
    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_gil_convoy.py io [rounds]
    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_gil_convoy.py segment [rounds]
    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_gil_convoy.py classify [rounds]

The first: the demo detector's output for samples/scene_01.jpg post-processed both
ways, ultralytics' postprocess and gannet's (split_predictor.nms_on_host's), each
followed by boxes_to_detections. `io`: on local services of its own (the GCS emulator
and PostgreSQL, started in a temporary directory), a GCS read of that photo, a result
write, the claim (Sink.start) and the claim plus the fenced commit (Sink.save_claimed).
`segment`: the demo segmenter's post-processing of the same photo (split_predictor's
postprocess) at 640x480 and resized to 4032x3024, its masks made inside their boxes (a
CPU's path) and, at 640x480, by ultralytics' arithmetic a chunk of segments at a time (a
GPU's path), 20 calls a measurement.
`classify`: a runner's part of classifying the six detections of that photo as the
classification step cuts them (the demo classifier's pre- and post-processing of each
crop, the forward pass left out). Run it on two cores, and under `taskset -c 0` to see
the same on one; with PYTHONPATH=<an older tree>/src, to measure that tree's code.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from itertools import count
from pathlib import Path

import cv2
import torch

from gannet.model_cache import ModelKey, yolo_loader
from gannet.settings import REPO_ROOT
from gannet.split_predictor import SplitPredictor
from gannet.steps import boxes_to_detections

CALLS = 100


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["io"]:
        io(int(args[1]) if len(args) > 1 else 2)
        return
    if args[:1] == ["segment"]:
        segment(int(args[1]) if len(args) > 1 else 3)
        return
    if args[:1] == ["classify"]:
        classify(int(args[1]) if len(args) > 1 else 3)
        return
    rounds = int(args[0]) if args else 3
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    weights = REPO_ROOT / "models" / "demo" / "detect.pt"
    model, _ = load(ModelKey(str(weights), "v", "cpu", 640, "detect"))
    split = SplitPredictor(model)
    image = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    inputs = split.preprocess(image)
    (output,) = split.forward([inputs])

    def ours() -> None:
        boxes_to_detections(split.postprocess(output, inputs, image, 0.25), 0.25)

    def theirs() -> None:
        view = split._own_copy()
        with torch.inference_mode():
            (result,) = view.postprocess(output, split._model_input(inputs), [image])
        boxes_to_detections(result, 0.25)

    for _ in range(rounds):
        for busy in (False, True):
            label = "with a busy thread" if busy else "alone"
            old, new = measure(theirs, busy), measure(ours, busy)
            print(f"{label:18}  ultralytics {old}  gannet {new}")


def segment(rounds: int) -> None:
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    weights = REPO_ROOT / "models" / "demo" / "segment.pt"
    model, _ = load(ModelKey(str(weights), "v", "cpu", 640, "segment"))
    in_boxes, theirs = SplitPredictor(model), SplitPredictor(model)
    theirs._masks_in_boxes = False  # a GPU's path (ultralytics' arithmetic), on the CPU
    scene = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    for _ in range(rounds):
        for size in [(640, 480), (4032, 3024)]:
            image = cv2.resize(scene, size)
            inputs = in_boxes.preprocess(image)
            (output,) = in_boxes.forward([inputs])
            ours = partial(in_boxes.postprocess, output, inputs, image, 0.25)
            ultralytics = partial(theirs.postprocess, output, inputs, image, 0.25)
            for busy in (False, True):
                label = f"{size[0]}x{size[1]} " + ("with a busy thread" if busy else "alone")
                line = f"{label:28}  masks in boxes {measure(ours, busy, 20)}"
                if size[0] < 1000:  # a GPU's masks on the CPU at 12 MP: hundreds of ms
                    line += f"  a GPU's masks {measure(ultralytics, busy, 20)}"
                print(line)


def classify(rounds: int) -> None:
    from gannet.steps import square_crop

    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    weights = REPO_ROOT / "models" / "demo" / "classify.pt"
    model, _ = load(ModelKey(str(weights), "v", "cpu", 64, "classify"))
    split = SplitPredictor(model)
    photo = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    manifest = json.loads((REPO_ROOT / "samples" / "manifest.json").read_text())
    shapes = next(e for e in manifest["images"] if e["file"] == "scene_01.jpg")["shapes"]
    crops = [square_crop(photo, shape["bbox"], 0.2) for shape in shapes]
    inputs = [split.preprocess(crop) for crop in crops]
    outputs = split.forward(inputs)

    def runner() -> None:  # a runner's part: each crop in, each answer out
        for crop in crops:
            split.preprocess(crop)
        for crop, x, output in zip(crops, inputs, outputs, strict=True):
            probs = split.postprocess(output, x, crop, 0.5).probs
            int(probs.top1), float(probs.top1conf)

    for _ in range(rounds):
        print(f"{len(crops)} crops  alone {measure(runner, False)}  busy {measure(runner, True)}")


def io(rounds: int) -> None:
    from gannet import clients
    from gannet.dev.demo import local_settings
    from gannet.dev.stack import prepared_services
    from gannet.sink import Sink
    from gannet.storage import Storage
    from gannet.task import GsUrl, TaskResult

    with prepared_services(Path(tempfile.mkdtemp(prefix="gannet-convoy-"))) as services:
        settings = local_settings(services)
        storage = Storage(clients.storage_client(settings))
        bucket = settings.allowed_buckets[0]
        photo = (REPO_ROOT / "samples" / "scene_01.jpg").read_bytes()
        storage.write(bucket, "t/scene_01.jpg", photo, "image/jpeg")
        url = GsUrl.parse(f"gs://{bucket}/t/scene_01.jpg")
        detections = [{"class": "circle", "confidence": 0.9, "box": [1.0, 2.0, 3.0, 4.0]}]
        body = json.dumps({"detection": {"detections": detections * 20}}).encode()
        sink = Sink(settings.database_url)
        sink.open()
        ids: Iterator[int] = count()

        def claim() -> str:
            task_id = f"convoy-{next(ids)}"
            assert sink.start(task_id, "t", "convoy", 60).claimed
            return task_id

        def commit() -> None:
            task_id = claim()
            record = TaskResult(
                task_id=task_id, tenant_id="t", pipeline="DETECTION", status="succeeded"
            )
            sink.save_claimed(record, "convoy", lambda: None)

        steps: dict[str, Callable[[], object]] = {
            "GCS read": lambda: storage.read(url, 10**8),
            "GCS write": lambda: storage.write(
                settings.results_bucket, "t/r.json", body, "application/json"
            ),
            "claim": claim,
            "claim + commit": commit,
        }
        try:
            for _ in range(rounds):
                for name, step in steps.items():
                    print(f"{name:15} alone {measure(step, False)}  busy {measure(step, True)}")
        finally:
            sink.close()


def measure(post: Callable[[], object], busy: bool, calls: int = CALLS) -> str:
    stop = threading.Event()

    def spin() -> None:  # short GIL holds, one after another
        while not stop.is_set():
            sum(range(300))

    other = threading.Thread(target=spin)
    if busy:
        other.start()
    figures: list[float] = []

    def run() -> None:
        for _ in range(5):
            post()
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(calls):
            post()
        figures.extend([time.thread_time() - cpu, time.perf_counter() - wall])

    runner = threading.Thread(target=run)
    runner.start()
    runner.join()
    stop.set()
    if busy:
        other.join()
    cpu, wall = (x / calls * 1000 for x in figures)
    return f"CPU {cpu:.2f} ms, wall {wall:.1f} ms"


if __name__ == "__main__":
    main()
