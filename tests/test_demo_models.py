"""The committed demo models give the exact answers recorded in samples/manifest.json.

The demo, the end-to-end tests and the benchmark all lean on these models being right
about the sample images, so a retrained model or a regenerated manifest that no longer
agree must fail here, loudly: a missing file is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Must precede the first ultralytics import: is_online() is evaluated once at import time.
os.environ.setdefault("YOLO_OFFLINE", "1")

from ultralytics import YOLO

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models" / "demo"
SAMPLES = REPO / "samples"
CONF = 0.5
CROP_PAD = 0.2  # the framing the classifier was trained around (see scripts/synthetic_scenes.py)

EXPECTED = {
    "detect": ({0: "circle", 1: "square", 2: "triangle"}, 416),
    "segment": ({0: "patch"}, 320),
    "classify": ({0: "blue", 1: "red", 2: "yellow"}, 64),
}


def _load(task: str) -> tuple[Any, int]:
    path = MODELS / f"{task}.pt"
    assert path.is_file(), f"{path} is missing: run scripts/train_demo_model.py --task {task}"
    assert path.stat().st_size <= 10 * 1024 * 1024, f"{path} is over 10 MB"
    model = YOLO(str(path))
    names, imgsz = EXPECTED[task]
    assert model.task == task
    assert model.names == names
    assert model.ckpt["train_args"]["imgsz"] == imgsz, "checkpoint does not record its imgsz"
    return model, imgsz


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    path = SAMPLES / "manifest.json"
    assert path.is_file(), f"{path} is missing: run scripts/train_demo_model.py --task samples"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def normal_samples(manifest: dict[str, Any]) -> list[tuple[dict[str, Any], np.ndarray]]:
    import cv2

    out = []
    for entry in manifest["images"]:
        if entry["kind"] == "normal":
            image = cv2.imread(str(SAMPLES / entry["file"]))
            assert image is not None, f"cannot read {entry['file']}"
            out.append((entry, image))
    assert len(out) >= 5
    return out


def test_manifest_is_consistent(manifest: dict[str, Any]) -> None:
    import cv2

    kinds = [e["kind"] for e in manifest["images"]]
    assert kinds.count("large") == 1
    total = (SAMPLES / "manifest.json").stat().st_size
    for entry in manifest["images"]:
        path = SAMPLES / entry["file"]
        assert path.is_file(), f"{path} is missing"
        total += path.stat().st_size
        image = cv2.imread(str(path))
        assert image.shape[:2] == (entry["height"], entry["width"])
        counts = {"circle": 0, "square": 0, "triangle": 0}
        for shape in entry["shapes"]:
            counts[shape["class"]] += 1
            x1, y1, x2, y2 = shape["bbox"]
            assert 0 <= x1 < x2 <= entry["width"] and 0 <= y1 < y2 <= entry["height"]
            assert 22 <= max(x2 - x1, y2 - y1) <= 72
            assert shape["color"] in ("blue", "red", "yellow")
            assert shape["patch"] is None or 0 <= shape["patch"] < len(entry["patches"])
        assert counts == entry["counts"], entry["file"]
        assert entry["patch_count"] == len(entry["patches"])
        for patch in entry["patches"]:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
            cv2.fillPoly(mask, [np.array(patch["polygon"], dtype=np.int32)], 1)
            assert int(mask.sum()) == patch["area"]
    assert total < 3 * 1024 * 1024


def test_detect_counts_match_manifest(normal_samples: list) -> None:
    model, imgsz = _load("detect")
    failures = []
    for entry, image in normal_samples:
        result = model.predict(image, imgsz=imgsz, conf=CONF, verbose=False)[0]
        got = {name: 0 for name in EXPECTED["detect"][0].values()}
        for c in result.boxes.cls.tolist():
            got[result.names[int(c)]] += 1
        if got != entry["counts"]:
            failures.append(f"{entry['file']}: expected {entry['counts']}, got {got}")
    assert not failures, "\n".join(failures)


def test_segment_patches_match_manifest(normal_samples: list) -> None:
    import cv2

    model, imgsz = _load("segment")
    failures = []
    for entry, image in normal_samples:
        # retina_masks: masks at the original image's resolution, so areas compare directly.
        result = model.predict(image, imgsz=imgsz, conf=CONF, retina_masks=True, verbose=False)[0]
        masks = [] if result.masks is None else [m > 0.5 for m in result.masks.data.cpu().numpy()]
        if len(masks) != len(entry["patches"]):
            failures.append(
                f"{entry['file']}: expected {len(entry['patches'])} patches, got {len(masks)}"
            )
            continue
        for i, patch in enumerate(entry["patches"]):
            truth = np.zeros(image.shape[:2], dtype=np.uint8)
            cv2.fillPoly(truth, [np.array(patch["polygon"], dtype=np.int32)], 1)
            truth = truth.astype(bool)
            best = max(masks, key=lambda m, t=truth: int((m & t).sum()))
            area, overlap = int(best.sum()), int((best & truth).sum())
            if abs(area / patch["area"] - 1.0) > 0.10 or overlap < 0.8 * patch["area"]:
                failures.append(
                    f"{entry['file']} patch {i}: area {patch['area']}, mask area {area}, "
                    f"overlap {overlap}"
                )
    assert not failures, "\n".join(failures)


def _crop(image: np.ndarray, bbox: list[int]) -> np.ndarray:
    x1, y1, x2, y2 = bbox
    side = max(x2 - x1, y2 - y1) * (1 + 2 * CROP_PAD)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = image.shape[:2]
    xa, ya = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    xb, yb = min(w, round(cx + side / 2)), min(h, round(cy + side / 2))
    return image[ya:yb, xa:xb]


def test_classify_colors_match_manifest(normal_samples: list) -> None:
    model, imgsz = _load("classify")
    failures = []
    n = 0
    for entry, image in normal_samples:
        if not entry["shapes"]:
            continue
        crops = [_crop(image, s["bbox"]) for s in entry["shapes"]]
        results = model.predict(crops, imgsz=imgsz, verbose=False)
        for shape, result in zip(entry["shapes"], results, strict=True):
            n += 1
            got = result.names[int(result.probs.top1)]
            if got != shape["color"]:
                failures.append(f"{entry['file']} {shape['bbox']}: {shape['color']} -> {got}")
    assert n > 0
    assert not failures, "\n".join(failures)
