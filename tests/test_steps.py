"""Every step with the real demo models on the sample images, checked against
samples/manifest.json (counts, patch areas, which shape lies on which patch, colours).

The steps run through Pipeline.run_image with the real ModelCache (batchers included),
without Pub/Sub or storage around them: what is tested here is what the steps compute.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import MANIFEST, SAMPLES, SCENES, expected_counts, segmenter_of_80_classes
from PIL import Image

from gannet.config_sources import open_configs
from gannet.dev.publish import make_task
from gannet.errors import ErrorCode, PermanentError
from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, yolo_loader
from gannet.model_resolver import ModelResolver
from gannet.pipeline import Limits, Pipeline
from gannet.settings import REPO_ROOT
from gannet.stages import Timer
from gannet.steps import merge_tiles, tile_origins
from gannet.storage import local_version, read_local

CONFIGS = REPO_ROOT / "configs"
LARGE = next(e for e in MANIFEST["images"] if e["kind"] == "large")
WITH_PATCHES = [e for e in SCENES if e["patches"] and e["shapes"]]


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="module")
def run(metrics, tmp_path_factory):
    """run(config, pipeline, entry, **task options) -> result JSON."""
    cache = ModelCache(yolo_loader(lambda uri, v: Path(uri)), metrics, max_batch=8, window_s=0.005)
    resolver = ModelResolver(local_version)
    pipelines: dict[str, Pipeline] = {}

    def run_one(config: str | Path, pipeline: str, entry: dict[str, Any], **options) -> dict:
        path = str(config if isinstance(config, Path) else CONFIGS / config)
        if path not in pipelines:
            pipelines[path] = Pipeline(
                open_configs(path, read_local, local_version),
                None,
                cache,
                resolver,
                Limits(["gannet-images"], 1, 1),
            )
        p = pipelines[path]
        task = make_task("tenant-a", "gs://gannet-images/tenant-a/x.jpg", pipeline, "t", **options)
        image = cv2.imread(str(SAMPLES / entry["file"]))
        return p.run_image(task, p.check(task), image, "cpu", Timer(lambda s, v: None))

    yield run_one
    cache.close()


def _patch_mask(entry: dict[str, Any], patch: dict[str, Any]) -> np.ndarray:
    mask = np.zeros((entry["height"], entry["width"]), dtype=np.uint8)
    cv2.fillPoly(mask, [np.array(patch["polygon"], dtype=np.int32)], 1)
    return mask.astype(bool)


def _segment_to_patch(entry: dict[str, Any], segments: list[dict[str, Any]]) -> dict[int, int]:
    """Predicted segment id -> manifest patch index, by best overlap of the polygons."""
    out = {}
    for seg in segments:
        pred = np.zeros((entry["height"], entry["width"]), dtype=np.uint8)
        cv2.fillPoly(pred, [np.array(seg["polygon"], dtype=np.int32)], 1)
        overlaps = [
            int((pred.astype(bool) & _patch_mask(entry, p)).sum()) for p in entry["patches"]
        ]
        out[seg["id"]] = int(np.argmax(overlaps))
    return out


# --------------------------------------------------------------------------- pure helpers


def test_tiles_cover_the_image_with_the_configured_overlap():
    assert tile_origins(480, 640, 0.2) == [0]
    assert tile_origins(2400, 640, 0.2) == [0, 512, 1024, 1536, 1760]
    starts = tile_origins(1800, 640, 0.25)
    assert starts[0] == 0 and starts[-1] + 640 == 1800
    assert all(b - a <= 480 for a, b in itertools.pairwise(starts))


def test_merge_keeps_the_whole_box_over_a_cut_one_and_keeps_distinct_objects():
    whole = {"class": "circle", "confidence": 0.7, "box": [100, 100, 140, 140], "_cut": False}
    whole["_tile"] = 0
    cut = {"class": "circle", "confidence": 0.9, "box": [120, 100, 140, 140], "_cut": True}
    cut["_tile"] = 1
    other_class = {"class": "square", "confidence": 0.8, "box": [100, 100, 126, 140], "_cut": True}
    other_class["_tile"] = 2
    far = {"class": "circle", "confidence": 0.6, "box": [300, 300, 330, 330], "_cut": False}
    far["_tile"] = 0
    # Two objects of one tile, the second's box inside the first's: the model told
    # them apart on that tile, and both stay.
    beside = {"class": "circle", "confidence": 0.5, "box": [302, 302, 312, 312], "_cut": False}
    beside["_tile"] = 0
    kept = merge_tiles([cut, whole, other_class, far, beside], threshold=0.5)
    # One object seen three ways (whole, cut, cut and taken for a square): the whole wins.
    assert sorted((d["class"], d["box"]) for d in kept) == [
        ("circle", [100, 100, 140, 140]),
        ("circle", [300, 300, 330, 330]),
        ("circle", [302, 302, 312, 312]),
    ]
    assert all("_cut" not in d and "_tile" not in d for d in kept)


def test_merge_leaves_no_two_boxes_over_the_threshold_and_drops_only_for_a_better_one():
    """On a crowd of random candidates (as a low threshold on a large photo finds): no
    two kept boxes of different tiles overlap by more than the threshold (intersection
    over the smaller), and each candidate dropped overlaps that much a kept one of
    another tile that ranks before it (whole over cut, then confidence)."""
    rng = np.random.default_rng(7)
    candidates = []
    for i, (x, y, w, h) in enumerate(rng.uniform((0, 0, 2, 2), (2000, 1500, 200, 200), (800, 4))):
        box = [round(float(v), 1) for v in (x, y, x + w, y + h)]
        cut = bool(rng.random() < 0.3)
        tile = int(rng.integers(4))
        candidates.append(
            {"id": i, "confidence": float(rng.random()), "box": box, "_cut": cut, "_tile": tile}
        )
    tiles = {d["id"]: d["_tile"] for d in candidates}
    rank = {d["id"]: (d["_cut"], -d["confidence"]) for d in candidates}

    def ios(a: list[float], b: list[float]) -> float:
        iw = min(a[2], b[2]) - max(a[0], b[0])
        ih = min(a[3], b[3]) - max(a[1], b[1])
        smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
        return max(iw, 0) * max(ih, 0) / smaller

    kept = merge_tiles([dict(d) for d in candidates], threshold=0.5)
    ids = {d["id"] for d in kept}
    assert 0 < len(kept) < len(candidates)
    assert any(
        tiles[a["id"]] == tiles[b["id"]] and ios(a["box"], b["box"]) > 0.5
        for a, b in itertools.combinations(kept, 2)
    ), "the premise: overlapping boxes of one tile, both kept"
    for a, b in itertools.combinations(kept, 2):
        assert tiles[a["id"]] == tiles[b["id"]] or ios(a["box"], b["box"]) <= 0.5
    for d in candidates:
        if d["id"] not in ids:
            assert any(
                rank[k["id"]] < rank[d["id"]]
                and tiles[k["id"]] != d["_tile"]
                and ios(k["box"], d["box"]) > 0.5
                for k in kept
            ), d


# --------------------------------------------------------------------------- detection


def test_detection_counts_and_filters(run, tmp_path):
    entry = SCENES[0]
    result = run("agro.yaml", "DETECTION", entry)
    assert result["detection"]["counts"] == expected_counts(entry)
    assert set(result) >= {"detection", "duration_ms", "processed_at", "industry"}

    text = (
        (CONFIGS / "agro.yaml")
        .read_text()
        .replace(
            "  DETECTION:\n    - detection", "  DETECTION:\n    - detection: {classes: [circle]}"
        )
    )
    tmp = tmp_path / "agro-circles.yaml"
    tmp.write_text(text.replace("../models/demo/", f"{REPO_ROOT}/models/demo/"))
    circles = run(tmp, "DETECTION", entry)["detection"]["counts"]
    assert circles == {"circle": entry["counts"]["circle"]}, "the step's class filter"

    strict = text.replace(
        "- detection: {classes: [circle]}", "- detection: {confidence_threshold: 0.999}"
    )
    tmp = tmp_path / "agro-strict.yaml"  # a new file: the fixture keeps one source per path
    tmp.write_text(strict.replace("../models/demo/", f"{REPO_ROOT}/models/demo/"))
    none = run(tmp, "DETECTION", entry)["detection"]
    assert none["confidence_threshold"] == 0.999 and none["counts"] == {}
    overridden = run(tmp, "DETECTION", entry, confidence=0.5)["detection"]
    assert overridden["confidence_threshold"] == 0.5, "confidence_override beats the step"
    assert overridden["counts"] == expected_counts(entry)


def test_a_result_says_when_the_model_kept_as_many_boxes_as_it_may(run, tmp_path):
    """ultralytics keeps at most 300 boxes an image (max_det), the most confident: a
    dense photo's count stopped at 300 without a word (900 shapes drawn on one photo:
    300 boxes). The config's max_detections sets it per model (here 2, on photos of
    more), and each step's result says whether it was reached: its counts may then be
    short, of any class."""
    entry = next(e for e in WITH_PATCHES if sum(e["counts"].values()) > 2)
    assert len(entry["patches"]) >= 1
    full = run("agro.yaml", "FULL_PIPELINE", entry)
    assert full["detection"]["max_detections_reached"] is False
    assert full["segmentation"]["max_detections_reached"] is False
    assert full["detection"]["counts"] == expected_counts(entry)
    text = (
        (CONFIGS / "agro.yaml").read_text().replace("../models/demo/", f"{REPO_ROOT}/models/demo/")
    )
    capped = tmp_path / "agro-capped.yaml"
    capped.write_text(
        text.replace("    imgsz: 416\n", "    imgsz: 416\n    max_detections: 2\n").replace(
            "    imgsz: 320\n", "    imgsz: 320\n    max_detections: 1\n"
        )
    )
    result = run(capped, "FULL_PIPELINE", entry)
    detection, segmentation = result["detection"], result["segmentation"]
    assert len(detection["detections"]) == 2 and detection["max_detections_reached"] is True
    confidences = sorted((d["confidence"] for d in full["detection"]["detections"]), reverse=True)
    assert sorted(d["confidence"] for d in detection["detections"]) == sorted(confidences[:2])
    assert segmentation["max_detections_reached"] is (len(entry["patches"]) >= 1)
    assert len(segmentation["segments"]) == 1
    sliced = run(capped, "FIELD_ANALYSIS", entry)["detection"]
    assert sliced["max_detections_reached"] is True


def test_a_class_filter_is_applied_before_the_models_cap(run, tmp_path):
    """A step keeping circles, its model capped at as many boxes as the photo has
    circles: every circle is found. The filter was applied after NMS had kept the most
    confident boxes of every class, so the cap was spent on squares and triangles the
    step then dropped, and circles went missing (ultralytics' own `classes=` filters
    before the cap)."""
    for entry in SCENES:
        circles = entry["counts"].get("circle", 0)
        if not circles or sum(entry["counts"].values()) == circles:
            continue
        found = run("agro.yaml", "DETECTION", entry)["detection"]["detections"]
        top = sorted(found, key=lambda d: -d["confidence"])[:circles]
        if any(d["class"] != "circle" for d in top):
            break  # its most confident boxes are not all circles
    else:
        pytest.fail("no sample whose most confident boxes include other shapes")
    text = (
        (CONFIGS / "agro.yaml").read_text().replace("../models/demo/", f"{REPO_ROOT}/models/demo/")
    )
    capped = tmp_path / "agro-circles.yaml"
    capped.write_text(
        text.replace("    imgsz: 416\n", f"    imgsz: 416\n    max_detections: {circles}\n")
        + "  CIRCLES:\n    - detection: {classes: [circle]}\n"
        + "  SLICED_SQUARES:\n    - sliced_detection: {slice_size: 512, classes: [square]}\n"
    )
    detection = run(capped, "CIRCLES", entry)["detection"]
    assert detection["counts"] == {"circle": circles}
    assert detection["detections"] == [d for d in found if d["class"] == "circle"]
    assert detection["max_detections_reached"] is True
    # Sliced detection passes its filter to each tile's NMS too (the cap binds on none).
    sliced = run(CONFIGS / "agro.yaml", "FIELD_ANALYSIS", LARGE)["detection"]["counts"]
    squares = run(capped, "SLICED_SQUARES", LARGE)["detection"]["counts"]
    assert squares == {"square": sliced["square"]} == {"square": LARGE["counts"]["square"]}


def test_a_segmentation_steps_class_filter_reaches_the_models_nms(run, tmp_path):
    """A segmentation step keeping three classes of a segmenter of 80 (the demo's has
    one), capped at 20 segments: its segments are of those classes only, as many as the
    model finds of them under the cap, not what is left of those classes among the 20
    most confident of every class (the filter goes to the model's NMS, before the cap)."""
    weights = segmenter_of_80_classes(tmp_path / "seg80.pt")
    kept = ["1", "5", "42"]  # a model built from a YAML names its classes by index
    config = tmp_path / "seg80.yaml"
    config.write_text(
        "industry: seg80\nversion: 1\nmodels:\n  segmentation:\n"
        f"    path: {weights}\n    confidence_threshold: 0.01\n    imgsz: 320\n"
        "    max_detections: 20\npipelines:\n  EVERY:\n    - segmentation\n"
        "  SOME:\n    - segmentation: {classes: ['1', '5', '42']}\n"
    )
    entry = SCENES[0]
    every = run(config, "EVERY", entry)["segmentation"]["segments"]
    some = run(config, "SOME", entry)["segmentation"]["segments"]
    assert {s["class"] for s in every} - set(kept), "other classes take the cap"
    found_in_every = [s for s in every if s["class"] in kept]
    assert {s["class"] for s in some} <= set(kept)
    assert len(some) > len(found_in_every)


def test_a_segmenters_cap_is_read_before_its_rows_without_a_mask_go():
    """NMS kept as many rows as max_detections allows, then the rows whose mask came
    out empty were dropped (ultralytics' rule): the answer's boxes are fewer than the
    cap, but the cap was reached. Three rows as NMS keeps them (one whose coefficients
    make an empty mask) through the real segments_from_rows; only the predictor is a
    stand-in, for its class names."""
    import torch

    from gannet.config_schema import ModelSpec
    from gannet.split_predictor import segments_from_rows
    from gannet.steps import reached_max

    rows = np.array(
        [
            [10, 10, 60, 60, 0.9, 0, 1, 0],
            [70, 70, 120, 120, 0.8, 0, 1, 0],
            [130, 10, 180, 60, 0.7, 0, -1, 0],  # its mask: sigmoid(-1) < 0.5 everywhere
        ],
        np.float32,
    )
    predictor = SimpleNamespace(model=SimpleNamespace(names={0: "patch"}), photo_hw=None)
    frame = np.zeros((160, 200, 3), np.uint8)
    result = segments_from_rows(predictor, rows, (160, 200), frame, torch.ones(2, 40, 40), True)
    assert len(result.boxes) == 2
    assert reached_max([result], ModelSpec(path="x.pt", max_detections=3))
    assert not reached_max([result], ModelSpec(path="x.pt", max_detections=4))


def test_sliced_detection_finds_every_shape_on_the_large_image_in_batches(run, metrics):
    whole = run("agro.yaml", "DETECTION", LARGE)["detection"]["counts"]
    before_sum = metrics.registry.get_sample_value("gannet_batch_size_sum") or 0
    before_count = metrics.registry.get_sample_value("gannet_batch_size_count") or 0
    result = run("agro.yaml", "FIELD_ANALYSIS", LARGE)
    detection = result["detection"]
    assert detection["counts"] == expected_counts(LARGE)
    assert whole != expected_counts(LARGE), "the whole image shrunk to 416 px misses shapes"
    tiles = len(tile_origins(LARGE["width"], 512, 0.2)) * len(
        tile_origins(LARGE["height"], 512, 0.2)
    )
    assert detection["slices"] == {"count": tiles, "size": 512, "overlap": 0.2}
    images = metrics.registry.get_sample_value("gannet_batch_size_sum") - before_sum
    calls = metrics.registry.get_sample_value("gannet_batch_size_count") - before_count
    assert images == tiles and calls <= -(-tiles // 8) + 1, "the tiles go to the model as batches"
    assert result["estimation"]["counts"] == expected_counts(LARGE)


def test_sliced_detection_refuses_a_thin_image_of_too_many_tiles_before_any_tile(run, tmp_path):
    """A 16x600,000 PNG (within the pixel limit, 20 kB) needs 1,467 tiles of agro's 512 px,
    each mostly padding and each a crop, a forward pass and its post-processing (the
    worst, 47x1,000,000, took 7.5 s of CPU, more than a 49 MP photo): refused as too
    large, saying what to do, before the model sees a tile."""
    path = tmp_path / "thin.png"
    Image.fromarray(np.zeros((16, 600_000, 3), np.uint8)).save(path)
    started = time.process_time()
    with pytest.raises(PermanentError) as err:
        run("agro.yaml", "FIELD_ANALYSIS", {"file": str(path)})
    assert err.value.code is ErrorCode.IMAGE_TOO_LARGE
    assert "600000x16 image needs 1467 tiles" in err.value.message
    assert "max_tiles" in err.value.message
    assert time.process_time() - started < 1.0, "refused before the tiles ran"


def test_sliced_detection_keeps_two_objects_one_tile_sees_as_plain_detection_does(run, tmp_path):
    """A small circle in the empty corner of a triangle's box (most of the circle's box
    inside the triangle's): the model, on one tile, finds both. The merge of tiles once
    took them for one object seen twice and dropped the less confident, so a photo
    within one tile lost a shape that plain detection finds on the same pixels."""
    image = cv2.imread(str(SAMPLES / "scene_02.jpg"))
    slope = np.array([[60, 224], [124, 224], [124, 160]], np.int32)
    cv2.fillPoly(image, [slope], (200, 70, 20), cv2.LINE_AA)  # a blue right triangle
    cv2.circle(image, (73, 173), 12, (30, 40, 220), -1, cv2.LINE_AA)  # a red circle
    path = tmp_path / "beside.png"
    cv2.imwrite(str(path), image)
    config = tmp_path / "one-tile.yaml"
    text = (
        (CONFIGS / "agro.yaml").read_text().replace("../models/demo/", f"{REPO_ROOT}/models/demo/")
    )
    config.write_text(text + "  ONE_TILE:\n    - sliced_detection: {slice_size: 640}\n")
    entry = {"file": str(path)}

    plain = run(config, "DETECTION", entry)["detection"]
    sliced = run(config, "ONE_TILE", entry)["detection"]
    scene = next(e for e in SCENES if e["file"] == "scene_02.jpg")
    want = expected_counts(scene)
    want["circle"] += 1
    want["triangle"] += 1
    assert plain["counts"] == want, "the premise: the model finds both shapes"
    assert sliced["slices"]["count"] == 1
    assert sliced["counts"] == want
    assert sorted(d["box"] for d in sliced["detections"]) == sorted(
        d["box"] for d in plain["detections"]
    )


# --------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("entry", WITH_PATCHES, ids=lambda e: e["file"])
def test_segmentation_detection_and_estimation_agree_with_the_manifest(run, entry):
    result = run("agro.yaml", "FULL_PIPELINE", entry)
    segments = result["segmentation"]["segments"]
    assert len(segments) == len(entry["patches"])
    mapping = _segment_to_patch(entry, segments)
    assert sorted(mapping.values()) == list(range(len(entry["patches"])))
    for seg in segments:
        truth = entry["patches"][mapping[seg["id"]]]
        assert abs(seg["area_px"] / truth["area"] - 1) <= 0.10, (entry["file"], seg)
        assert seg["class"] == "patch" and len(seg["polygon"]) >= 3

    # Segment-aware detection: each shape's segment is the manifest's patch.
    estimation = result["estimation"]
    for per in estimation["per_segment"]:
        patch = mapping[per["segment"]]
        want = {}
        for shape in entry["shapes"]:
            if shape["patch"] == patch:
                want[shape["class"]] = want.get(shape["class"], 0) + 1
        assert per["counts"] == dict(sorted(want.items())), (entry["file"], patch)
        assert per["area_cm2"] == pytest.approx(per["area_px"] / 4.0**2, rel=0.005)
    outside = {}
    for shape in entry["shapes"]:
        if shape["patch"] is None:
            outside[shape["class"]] = outside.get(shape["class"], 0) + 1
    assert estimation["outside_segments"] == dict(sorted(outside.items()))
    assert estimation["counts"] == expected_counts(entry)

    union = np.zeros((entry["height"], entry["width"]), dtype=bool)
    for patch in entry["patches"]:
        union |= _patch_mask(entry, patch)
    truth_percent = 100 * union.sum() / union.size
    assert abs(estimation["coverage_percent"] - truth_percent) <= 0.1 * truth_percent
    for name, size in estimation["sizes"].items():
        assert size["mean_width_cm"] == pytest.approx(size["mean_width_px"] / 4.0, rel=0.005)
        assert 22 <= size["mean_width_px"] <= 72, name


def test_detection_before_segmentation_gets_its_segments_as_after_it(run, tmp_path):
    """A pipeline may run detection first: each detection still gets the segment that
    covers its box, and estimation counts it there. Before, only a detection step after
    segmentation assigned them: run first, every shape was counted outside every patch,
    and each patch's counts were empty, as successes."""
    entry = next(e for e in WITH_PATCHES if any(s["patch"] is not None for s in e["shapes"]))
    config = tmp_path / "detection-first.yaml"
    text = (CONFIGS / "agro.yaml").read_text()
    text = text.replace("../models/demo/", f"{REPO_ROOT}/models/demo/")
    config.write_text(
        text + "  DETECTION_FIRST:\n    - detection\n    - segmentation\n    - estimation\n"
    )
    after = run(config, "FULL_PIPELINE", entry)
    first = run(config, "DETECTION_FIRST", entry)
    assert first["detection"]["detections"] == after["detection"]["detections"]
    assert any(d["segment"] is not None for d in first["detection"]["detections"])
    assert first["estimation"] == after["estimation"]


# --------------------------------------------------------------------------- classification


def test_classification_labels_every_detection_with_its_colour(run):
    for entry in SCENES:
        result = run("vending.yaml", "SHELF_AUDIT", entry)
        assert set(result) >= {"segmentation", "detection", "classification"}
        assert "estimation" not in result
        labels = result["classification"]
        assert labels["counts"] == {k: v for k, v in entry["color_counts"].items() if v}
        assert len(labels["items"]) == len(entry["shapes"]) and labels["unlabelled"] == 0


def test_a_tiny_photo_at_the_lowest_threshold_is_classified_not_crashed(run, tmp_path):
    """A 3x3 photo and a confidence of 0.001: the detector finds boxes under a pixel
    wide, whose crops would round to nothing (the classifier's resize then divided by
    zero, and the task was retried as an unexpected error). Each crop is a pixel at
    least, and every detection gets its label."""
    path = tmp_path / "tiny.png"
    cv2.imwrite(str(path), np.random.default_rng(1).integers(0, 255, (3, 3, 3), np.uint8))
    result = run("vending.yaml", "SHELF_AUDIT", {"file": str(path)}, confidence=0.001)
    detections = result["detection"]["detections"]
    assert detections, "the premise: boxes found on the tiny photo"
    labels = result["classification"]
    assert len(labels["items"]) + labels["unlabelled"] == len(detections)


def test_vending_full_pipeline_has_one_key_per_step(run):
    entry = WITH_PATCHES[0]
    result = run("vending.yaml", "FULL_PIPELINE", entry)
    for key in (
        "segmentation",
        "detection",
        "classification",
        "estimation",
        "duration_ms",
        "processed_at",
    ):
        assert key in result
    assert result["estimation"]["labels"] == result["classification"]["counts"]
    assert "area_cm2" not in result["estimation"]["per_segment"][0], "no px_per_cm: no cm"
