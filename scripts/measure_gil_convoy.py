#!/usr/bin/env python3
"""What a detector's post-processing costs a runner when another thread wants the GIL.

Every torch call releases the GIL. With a second core, another thread takes it at once,
and the caller waits to get it back: a cost per call that a measurement in one thread
never shows (docs/benchmark.md: the GIL convoy). This runs the demo detector once on
samples/scene_01.jpg and then post-processes its output 100 times in one thread, both
ways: ultralytics' postprocess, and gannet's (split_predictor.detect_on_host), each
followed by boxes_to_detections. It measures each alone and with a second Python thread
that takes the GIL in short bursts, as the daemon's other threads do. Printed: thread
CPU and wall ms per image.

    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_gil_convoy.py [rounds]

Run it on two cores, and under `taskset -c 0` to see the same on one.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import torch

from gannet.model_cache import ModelKey, yolo_loader
from gannet.settings import REPO_ROOT
from gannet.split_predictor import SplitPredictor
from gannet.steps import boxes_to_detections

CALLS = 100


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    weights = REPO_ROOT / "models" / "demo" / "detect.pt"
    model, _ = load(ModelKey(str(weights), "v", "cpu", 640, "detect"))
    split = SplitPredictor(model)
    image = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    inputs = split.preprocess(image)
    (output,) = split.forward([inputs])

    def ours() -> None:
        boxes_to_detections(split.postprocess(output, inputs, image, 0.25), 0.25, [])

    def theirs() -> None:
        view = split._own_copy()
        with torch.inference_mode():
            (result,) = view.postprocess(output, split._model_input(inputs), [image])
        boxes_to_detections(result, 0.25, [])

    for _ in range(rounds):
        for busy in (False, True):
            label = "with a busy thread" if busy else "alone"
            old, new = measure(theirs, busy), measure(ours, busy)
            print(f"{label:18}  ultralytics {old}  gannet {new}")


def measure(post: Callable[[], None], busy: bool) -> str:
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
        for _ in range(CALLS):
            post()
        figures.extend([time.thread_time() - cpu, time.perf_counter() - wall])

    runner = threading.Thread(target=run)
    runner.start()
    runner.join()
    stop.set()
    if busy:
        other.join()
    cpu, wall = (x / CALLS * 1000 for x in figures)
    return f"CPU {cpu:.2f} ms, wall {wall:.1f} ms"


if __name__ == "__main__":
    main()
