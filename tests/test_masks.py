"""Segments worked out from their boxes' pixels give the full mask planes' answers.

ultralytics upsamples each segment's mask to the whole photo and zeroes it outside the
segment's box; the segmentation step then took every segment's area, box and outline,
the photo's coverage and each detection's segment from those full planes (12 million
pixels each on a 12 MP photo). Now both look at each segment's box only (masks.py). The
references here are ultralytics' own planes and the old arithmetic on full planes, and
the answers must be the same exactly.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from conftest import SAMPLES, SCENES, local_pipeline
from ultralytics.utils.ops import process_mask_native as native_planes  # before any patch

from gannet.dev.publish import make_task
from gannet.masks import (
    DEVICE_CHUNK_BYTES,
    SegmentMask,
    covered,
    outline,
    planes_in_boxes,
    segment_of,
    segments_on_device,
    tight,
)
from gannet.settings import REPO_ROOT
from gannet.stages import Timer

TOLERANCE = 1.5  # the segmentation step's default polygon tolerance


def _script() -> ModuleType:
    """scripts/measure_device_masks.py: the GPU path's old arithmetic, synthetic
    segments, and its trackers of live tensors and torch calls."""
    path = REPO_ROOT / "scripts" / "measure_device_masks.py"
    spec = importlib.util.spec_from_file_location("measure_device_masks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


measure = _script()


def full_plane_segment(binary: np.ndarray) -> dict[str, Any]:
    """Area, box and outline of one full-size bool plane, as the step computed them."""
    ys, xs = np.nonzero(binary)
    contours, _ = cv2.findContours(
        binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    largest = cv2.approxPolyDP(max(contours, key=cv2.contourArea), TOLERANCE, True)
    return {
        "area_px": int(binary.sum()),
        "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
        "polygon": [[int(x), int(y)] for x, y in largest.reshape(-1, 2)],
    }


def from_box(plane: np.ndarray, box: tuple[float, ...]) -> dict[str, Any]:
    segment = tight(segment_of(plane, box, *plane.shape))
    assert segment is not None
    x0, y0 = segment.x0, segment.y0
    rows, cols = segment.bits.shape
    return {
        "area_px": segment.area,
        "box": [x0, y0, x0 + cols, y0 + rows],
        "polygon": outline(segment, TOLERANCE),
    }


def mask_inputs(
    monkeypatch: pytest.MonkeyPatch, images: list[np.ndarray], confs: tuple[float, ...]
) -> list[tuple[Any, ...]]:
    """What ultralytics' process_mask_native is given (prototypes, coefficients, boxes,
    the image's shape) when the demo segmenter predicts `images` at imgsz 320 with
    retina masks, at each threshold in `confs`."""
    from ultralytics import YOLO
    from ultralytics.models.yolo.segment import predict as segment_predict

    calls: list[tuple[Any, ...]] = []

    def recording(protos, coeffs, boxes, shape):  # type: ignore[no-untyped-def]
        calls.append((protos.clone(), coeffs.clone(), boxes.clone(), shape))
        return native_planes(protos, coeffs, boxes, shape)

    monkeypatch.setattr(segment_predict.ops, "process_mask_native", recording)
    model = YOLO(str(REPO_ROOT / "models" / "demo" / "segment.pt"), task="segment")
    for image in images:
        for conf in confs:
            model.predict(image, imgsz=320, conf=conf, retina_masks=True, verbose=False)
    return calls


def scenes_in_photo_shapes() -> list[np.ndarray]:
    """The first four demo scenes as they are and resized to shapes that letterbox with
    and without padding (12 MP, portrait, odd sizes, 1080p)."""
    images = []
    for entry in SCENES[:4]:
        scene = cv2.imread(str(SAMPLES / entry["file"]))
        for size in [None, (4032, 3024), (1200, 1600), (333, 517), (1920, 1080)]:
            images.append(scene if size is None else cv2.resize(scene, size))
    return images


def test_planes_upsampled_in_their_boxes_are_ultralytics_own(monkeypatch: pytest.MonkeyPatch):
    """planes_in_boxes against ultralytics' process_mask_native, on the inputs the demo
    segmenter gives it for the demo scenes in photo shapes that letterbox with and
    without padding (12 MP, portrait, odd sizes), and at a low threshold (many
    overlapping segments): the same uint8 planes, bit for bit."""
    images = scenes_in_photo_shapes()
    segments = 0
    for protos, coeffs, boxes, shape in mask_inputs(monkeypatch, images, (0.5, 0.01)):
        theirs = native_planes(protos, coeffs, boxes.clone(), shape)
        ours, nonempty = planes_in_boxes(protos, coeffs, boxes.numpy(), shape)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), shape
        assert nonempty.tolist() == (theirs.amax((-2, -1)) > 0).tolist()
        segments += len(coeffs)
    assert segments >= 50  # many segments, of many shapes, were compared


def test_planes_of_a_reduced_decode_are_made_at_the_photos_size(monkeypatch: pytest.MonkeyPatch):
    """A 12 MP photo decoded at 1/4 or 1/8 scale: the model sees the reduced frame, and
    its masks are made at the photo's size (planes_in_boxes with `out`), from the same
    prototypes. Where the frame letterboxes as the photo would, they are the planes
    ultralytics makes at the photo's size from that answer: a reduced decode loses none
    of the masks' detail, and areas stay in the photo's pixels. Bit for bit but where
    ultralytics' own logit is within 1e-4 of the threshold: a sum of terms of about ten
    rounds differently in the last place (one pixel in these 12 MP planes)."""
    from ultralytics.utils.ops import scale_masks

    photos = {(4032, 3024): [(1008, 756), (504, 378)], (3024, 4032): [(756, 1008)]}
    images = []
    for entry in SCENES[:8]:
        scene = cv2.imread(str(SAMPLES / entry["file"]))
        for photo, frames in photos.items():
            upright = scene if photo[0] > photo[1] else cv2.transpose(scene)
            images += [cv2.resize(upright, frame) for frame in frames]
    segments = 0
    for protos, coeffs, boxes, shape in mask_inputs(monkeypatch, images, (0.1,)):
        frame_h, frame_w = shape
        photo_hw = (frame_h * 4032 // max(shape), frame_w * 4032 // max(shape))
        factor = photo_hw[0] / frame_h
        in_photo = boxes * factor
        theirs = native_planes(protos, coeffs, in_photo.clone(), photo_hw)
        ours, nonempty = planes_in_boxes(protos, coeffs, in_photo.numpy(), shape, photo_hw)
        assert ours.shape[1:] == photo_hw
        differ = (ours != theirs).nonzero()
        if len(differ):
            c, mh, mw = protos.shape
            logits = (coeffs @ protos.float().view(c, -1)).view(1, -1, mh, mw)
            ties = scale_masks(logits, photo_hw)[0][tuple(differ.T)]
            assert len(differ) <= 10 and bool((ties.abs() < 1e-4).all()), (shape, ties)
        assert nonempty.tolist() == (theirs.amax((-2, -1)) > 0).tolist()
        segments += len(coeffs)
    assert segments >= 20


def test_segments_at_the_photo_edges_and_in_pieces_are_the_full_planes():
    """Shapes a model's output rarely shows: a segment cut by the photo's edge on every
    side, one in two pieces (the larger piece is the outline), boxes with fractional
    edges; and the photo's coverage and a box's share of each."""
    height, width = 300, 400
    planes, boxes = [], []
    for x1, y1, x2, y2 in [(0, 0, 90, 70), (330, 240, 400, 300), (150.4, 100.6, 260.2, 190.9)]:
        plane = np.zeros((height, width), np.uint8)
        cols = np.arange(width)
        rows = np.arange(height)[:, None]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        inside = ((cols - cx) / ((x2 - x1) / 1.8)) ** 2 + ((rows - cy) / ((y2 - y1) / 1.8)) ** 2
        plane[inside <= 1] = 1
        plane[:, (cols < x1) | (cols >= x2)] = 0  # as ultralytics' crop_mask leaves it
        plane[(rows[:, 0] < y1) | (rows[:, 0] >= y2)] = 0
        planes.append(plane)
        boxes.append((x1, y1, x2, y2))
    pieces = planes[2].copy()
    pieces[:, 200:203] = 0  # one segment in two pieces
    planes.append(pieces)
    boxes.append(boxes[2])
    segments = []
    for plane, box in zip(planes, boxes, strict=True):
        assert from_box(plane, box) == full_plane_segment(plane > 0.5)
        segment = tight(segment_of(plane, box, height, width))
        assert segment is not None
        segments.append(segment)
    union = np.logical_or.reduce([p > 0.5 for p in planes])
    assert covered(segments) == int(union.sum())
    for x1, y1, x2, y2 in [(0, 0, 400, 300), (50, 40, 170, 130), (390, 290, 420, 330)]:
        for segment, plane in zip(segments, planes, strict=True):
            assert segment.covered_in(x1, y1, x2, y2) == int((plane[y1:y2, x1:x2] > 0.5).sum())


@pytest.mark.parametrize("gpu_path", [False, True])
def test_the_pipeline_answers_as_the_full_planes_on_small_and_large_photos(gpu_path: bool):
    """agro's FULL_PIPELINE (segmentation, detection, estimation) on the demo scenes as
    they are and enlarged to 12 MP and to a portrait shape: segments, coverage and each
    detection's segment are what the full planes of the same model answer give. Its
    segmenter's masks as a CPU makes them (planes in boxes), and as a GPU does (crops of
    each box, which the step reads instead of planes: forced on the CPU's predictor)."""
    pipeline = local_pipeline(str(REPO_ROOT / "configs" / "agro.yaml"), max_batch=1)
    task = make_task("tenant-a", "gs://gannet-images/tenant-a/x.jpg", "FULL_PIPELINE", "t")
    route = pipeline.check(task)
    key = pipeline.resolver.key(route.loaded, "segmentation", task.tenant_id, "cpu")
    conf = route.loaded.config.models["segmentation"].confidence_threshold
    split = pipeline.cache.get(key).predictor
    compared = 0
    try:
        for entry in SCENES:
            scene = cv2.imread(str(SAMPLES / entry["file"]))
            for size in [None, (4032, 3024), (1200, 1600)]:
                image = scene if size is None else cv2.resize(scene, size)
                split._masks_in_boxes = not gpu_path
                answer = pipeline.run_image(task, route, image, "cpu", Timer(lambda s, v: None))
                split._masks_in_boxes = True  # the planes, to compare with
                (result,) = pipeline.cache.predict(key, [image], conf)
                planes = [] if result.masks is None else list(result.masks.data.numpy() > 0.5)
                want = [full_plane_segment(p) for p in planes if p.any()]
                got = answer["segmentation"]["segments"]
                assert [{k: s[k] for k in ("area_px", "box", "polygon")} for s in got] == want
                union = np.logical_or.reduce(planes) if planes else np.zeros(1, bool)
                assert answer["estimation"]["covered_px"] == int(union.sum())
                for det in answer["detection"]["detections"]:
                    x1, y1, x2, y2 = (round(v) for v in det["box"])
                    area = max(1, (x2 - x1) * (y2 - y1))
                    shares = [(p[max(0, y1) : y2, max(0, x1) : x2]).sum() / area for p in planes]
                    best = int(np.argmax(shares)) if shares else None
                    assert det["segment"] == (best if shares and shares[best] >= 0.5 else None)
                compared += len(want)
    finally:
        pipeline.cache.close()
    assert compared >= 20  # there were segments to compare


def same_segments(ours: list[SegmentMask], theirs: list[SegmentMask]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert (a.x0, a.y0) == (b.x0, b.y0), i
        assert a.bits.dtype == b.bits.dtype == bool and np.array_equal(a.bits, b.bits), i


# The GPU's path (segments_from_rows when the predictor's device is not the CPU) is run
# below with CPU tensors: this host has no GPU. The calls and values are the same.


def test_the_gpus_segments_are_ultralytics_planes_read_in_their_boxes(
    monkeypatch: pytest.MonkeyPatch,
):
    """segments_on_device against what the GPU's path did before it: ultralytics'
    process_mask_native, the planes without a pixel dropped, each plane read in its box
    (segment_of). On the demo segmenter's outputs for photos that letterbox with and
    without padding (its first upsampling by 1, 2 and 4), at a low threshold too (many
    segments); in chunks of every size (the default budget; one segment, three); with
    FP16 prototypes, as a GPU's model gives them: the same bits."""
    images = scenes_in_photo_shapes()
    compared = 0
    for protos, coeffs, boxes, shape in mask_inputs(monkeypatch, images, (0.5, 0.01)):
        theirs = measure.old_device_path(protos, coeffs, boxes.numpy(), shape)
        plane = 5 * shape[0] * shape[1]  # a plane's bytes in a chunk (float and bool)
        budgets = [DEVICE_CHUNK_BYTES] if max(shape) > 2000 else [DEVICE_CHUNK_BYTES, 1, 3 * plane]
        for budget in budgets:
            found, nonempty = segments_on_device(protos, coeffs, boxes.numpy(), shape, None, budget)
            assert len(found) == len(nonempty) == len(coeffs)
            same_segments([s for s, kept in zip(found, nonempty, strict=True) if kept], theirs)
        half = protos.half()
        theirs = measure.old_device_path(half, coeffs, boxes.numpy(), shape)
        same_segments(measure.new_device_path(half, coeffs, boxes.numpy(), shape), theirs)
        compared += len(theirs)
    assert compared >= 40


def test_the_gpus_segments_of_a_reduced_decode_are_made_at_the_photos_size(
    monkeypatch: pytest.MonkeyPatch,
):
    """A 12 MP photo decoded at 1/4 scale on a GPU pod (the CPU decode fallback): its
    segments are made at the photo's size from the frame's prototypes, as a CPU's are
    (planes_in_boxes with `out`), read in their boxes: the same bits. (Before, the
    GPU's planes at the frame's size were copied whole to the host and resized there.)"""
    images = []
    for entry in SCENES[:3]:
        scene = cv2.imread(str(SAMPLES / entry["file"]))
        images += [cv2.resize(scene, (1008, 756)), cv2.resize(cv2.transpose(scene), (756, 1008))]
    compared = 0
    for protos, coeffs, boxes, shape in mask_inputs(monkeypatch, images, (0.1,)):
        photo_hw = (shape[0] * 4, shape[1] * 4)
        in_photo = (boxes * 4).numpy()
        planes, nonempty = planes_in_boxes(protos, coeffs, in_photo, shape, photo_hw)
        cpus = [segment_of(p, b, *photo_hw) for p, b in zip(planes.numpy(), in_photo, strict=True)]
        found, on_gpu = segments_on_device(protos, coeffs, in_photo, shape, photo_hw)
        assert on_gpu.tolist() == nonempty.tolist()
        same_segments(found, cpus)
        compared += int(nonempty.sum())
    assert compared >= 10


def test_the_gpus_masks_of_many_segments_on_12_mp_take_one_chunk_of_memory():
    """60 segments of a 4032x3024 photo: the tensors alive at once while
    segments_on_device makes them stay under its chunk budget and the logits of all,
    whatever their number (the chunk holds one 12 MP segment), where ultralytics' planes
    took a byte per pixel per segment (0.7 GB here; 3.7 GB at 300, the most a segmenter
    keeps, and as much again for the copy without the empty ones; 441 MB at 20
    segments, checked here). The same bits as planes_in_boxes (ultralytics' planes, bit
    for bit: above; the real segmenter's against process_mask_native: above). (60, not
    300: each segment is an upsampling of 12 MP on these CPUs; scripts/
    measure_device_masks.py 300 measures that many.)"""
    n = 60
    protos, coeffs, boxes = measure.synthetic(n)
    with torch.inference_mode(), measure.LiveBytes() as live:
        found, nonempty = segments_on_device(protos, coeffs, boxes, measure.PHOTO)
    logits = n * protos[0].numel() * 4
    assert live.peak < DEVICE_CHUNK_BYTES + logits + (1 << 20), live.peak
    assert n - 10 < nonempty.sum() < n  # one empty box; most segments have pixels
    planes, theirs = planes_in_boxes(protos, coeffs, boxes, measure.PHOTO)
    assert nonempty.tolist() == theirs.tolist()
    cpus = [segment_of(p, b, *measure.PHOTO) for p, b in zip(planes, boxes, strict=True)]
    same_segments(found, cpus)
    # The old path's peak with 20 segments alone is over the budget many times.
    protos, coeffs, boxes = measure.synthetic(20)
    with torch.inference_mode(), measure.LiveBytes() as old:
        measure.old_device_path(protos, coeffs, boxes, measure.PHOTO)
    assert old.peak > 5 * DEVICE_CHUNK_BYTES


def test_the_gpus_segments_take_fewer_torch_calls_than_ultralytics_planes():
    """Every torch call lets go of the GIL (scripts/count_gil_releases.py): the GPU's
    path makes at most the calls per segment it made before (process_mask_native, then
    segment_of's slice, threshold and copy per plane), on a 640x480 photo (one chunk)
    and a 12 MP one (a chunk per segment): three per segment (the box's slice, its copy
    to the host, NumPy's view of it) and a few per chunk."""
    for n, photo in [(40, (480, 640)), (6, measure.PHOTO)]:
        protos, coeffs, boxes = measure.synthetic(n, photo)
        counts = []
        for path in (measure.old_device_path, measure.new_device_path):
            with torch.inference_mode(), measure.TorchCalls() as calls:
                path(protos, coeffs, boxes, photo)
            counts.append(calls.calls)
        old, new = counts
        assert new <= old, (photo, counts)
        chunks = n if photo == measure.PHOTO else 1
        assert new <= 3 * n + 6 * chunks + 10, (photo, counts)
