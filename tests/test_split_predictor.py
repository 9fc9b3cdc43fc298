"""The runners' own pre-processing gives the network exactly ultralytics' input.

The runners letterbox with ultralytics' LetterBox but turn the result into a tensor
themselves (OpenCV channel split, uint8; the batcher thread divides by 255). If that ever
differed from ultralytics' own preprocess by one value, answers could drift from the
bare model's; this compares them bit for bit on the shapes photos come in.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gannet.model_cache import ModelKey, yolo_loader
from gannet.settings import REPO_ROOT
from gannet.split_predictor import SplitPredictor

MODELS = REPO_ROOT / "models" / "demo"


@pytest.mark.parametrize(("weights", "task"), [("detect.pt", "detect"), ("segment.pt", "segment")])
def test_runner_inputs_equal_ultralytics_preprocess(weights: str, task: str):
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(MODELS / weights), "v", "cpu", 640, task))
    split = SplitPredictor(model)
    scene = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    for width, height in [(640, 480), (1920, 1080), (1200, 1600), (333, 517)]:
        image = cv2.resize(scene, (width, height))
        ours = split.preprocess(image)
        assert ours.dtype == torch.uint8  # the cheap path was taken
        theirs = model.predictor.preprocess([image])
        assert torch.equal(split._model_input(ours), theirs), (width, height)


def test_classifier_keeps_ultralytics_own_transforms():
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(MODELS / "classify.pt"), "v", "cpu", 64, "classify"))
    crop = np.full((50, 70, 3), 200, dtype=np.uint8)
    ours = SplitPredictor(model).preprocess(crop)
    assert torch.equal(ours, model.predictor.preprocess([crop]))
