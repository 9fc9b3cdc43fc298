"""The processors a pipeline is made of, registered by name for the industry config.

Each step is a function of a StepContext and its own typed params: it reads the image
and earlier steps' output, asks for model predictions through the context (which knows
tenant and device), and writes its own key of the result. Steps know nothing about Pub/Sub or SQL.

A step's params are a pydantic model registered with it, so a config that misspells a
param is refused when it is loaded, not when a task reaches the step. The result has one
key per kind of step (segmentation, detection, classification, estimation); sliced
detection writes `detection` too, so later steps need not care how boxes were found.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from gannet.config_schema import ModelSpec
from gannet.errors import ErrorCode, PermanentError
from gannet.frames import Frame, crop, frame_size
from gannet.masks import SegmentMask, outline, segment_of, tight
from gannet.masks import covered as covered_pixels
from gannet.step_registry import ModelStepParams, Registry, StepContext, StepParams


class SegmentationParams(ModelStepParams):
    polygon_tolerance_px: float = Field(
        1.5, ge=0.0, description="Douglas-Peucker tolerance that simplifies polygons."
    )
    min_area_px: int = Field(0, ge=0, description="Drop segments smaller than this.")


class DetectionParams(ModelStepParams):
    assign_to_segments: bool = Field(
        True, description="When segmentation ran first, give each detection its segment."
    )
    min_segment_overlap: float = Field(
        0.5, gt=0.0, le=1.0, description="Share of a box a mask must cover to own it."
    )


class SlicedDetectionParams(DetectionParams):
    slice_size: int = Field(640, ge=64, le=4096, description="Tile side in pixels.")
    overlap: float = Field(0.2, ge=0.0, lt=0.9, description="Overlap of adjacent tiles.")
    merge_threshold: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Same-class boxes whose intersection over the smaller box is above "
        "this are one object seen by two tiles.",
    )
    max_tiles: int = Field(
        1024,
        ge=1,
        description="An image that needs more tiles is refused (image_too_large), as a "
        "thin image does: a 47x1,000,000 PNG needs 1,955 tiles of 640 px; a 50 MP photo "
        "196.",
    )


class ClassificationParams(ModelStepParams):
    crop_padding: float = Field(
        0.2, ge=0.0, le=2.0, description="Square crop grown by this share of the box side."
    )


class EstimationParams(StepParams):
    px_per_cm: float | None = Field(None, gt=0, description="Overrides the config's px_per_cm.")


STEPS = Registry()


def on_host(data: Any) -> np.ndarray:
    """A result's tensor (boxes, masks) as an array: on the host already, no torch call
    (each one lets go of the GIL, and ultralytics' Boxes properties make one per column);
    else one copy."""
    if isinstance(data, np.ndarray):
        return data
    array: np.ndarray = data.numpy() if data.device.type == "cpu" else data.cpu().numpy()
    return array


def box_columns(data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xyxy, confidences and classes (int) of a result's boxes (x0, y0, x1, y1, (a track
    id), conf, class)."""
    rows = on_host(data)
    return rows[:, :4], rows[:, -2], rows[:, -1].astype(int)


def boxes_to_detections(
    result: Any,
    conf: float,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: tuple[float, float] = (1.0, 1.0),
) -> list[dict[str, Any]]:
    """Plain-JSON detections from one ultralytics result (its classes filtered by the
    model's NMS: ctx.predict's `classes`), filtered by threshold; boxes scaled by `scale`,
    then moved by `offset`, into the photo's pixels."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    xyxy, confs, classes = box_columns(boxes.data)
    dx, dy = offset
    sx, sy = scale
    out = []
    for (x1, y1, x2, y2), score, cls in zip(xyxy, confs, classes, strict=True):
        if score < conf:
            continue
        out.append(
            {
                "class": result.names[int(cls)],
                "confidence": round(float(score), 4),
                "box": [
                    round(float(v), 1)
                    for v in (x1 * sx + dx, y1 * sy + dy, x2 * sx + dx, y2 * sy + dy)
                ],
            }
        )
    return out


def count_by_class(items: list[dict[str, Any]], key: str = "class") -> dict[str, int]:
    return dict(sorted(Counter(item[key] for item in items if item[key] is not None).items()))


# --------------------------------------------------------------------------- segmentation


@STEPS.register("segmentation", SegmentationParams, needs=("segmentation",), scalable=True)
def segmentation(ctx: StepContext, params: SegmentationParams) -> None:
    """Instance masks -> segments with class, area and polygon; masks kept for later
    steps, each as the crop of its box (masks.py). Masks, areas and outlines are in the
    photo's pixels even when it was decoded at a reduced scale: the masks are made at
    its size (split_predictor.segments_from_rows). A GPU's answer carries each segment's
    crop already (`segment_crops`: its full-size planes never leave the GPU, nor stay on
    it), a CPU's its full-size planes, read inside each box."""
    spec = ctx.model_spec("segmentation")
    conf = ctx.threshold(spec, params)
    height, width = ctx.photo_hw
    keep = ctx.classes(spec, params)
    (result,) = ctx.predict("segmentation", [ctx.frame], conf, (height, width), keep)
    segments: list[dict[str, Any]] = []
    kept: list[SegmentMask] = []
    planes = getattr(result, "segment_crops", None)
    if planes is None and result.masks is not None:
        planes = result.masks.data  # one full-size plane per segment, where the model ran
        if planes.device.type == "cpu":
            planes = planes.numpy()  # read in NumPy: no torch call per plane
    if planes is not None and result.boxes is not None:
        boxes, confs, classes = box_columns(result.boxes.data)
        for plane, box, score, cls in zip(planes, boxes, confs, classes, strict=True):
            if score < conf:
                continue
            if isinstance(plane, SegmentMask):
                segment = tight(plane)
            elif plane.shape != (height, width):
                # Not at the photo's size: not retina masks (the ModelCache always asks
                # for them). Scale the whole plane to the photo.
                full = cv2.resize(on_host(plane), (width, height))
                segment = tight(segment_of(full, (0, 0, width, height), height, width))
            else:
                segment = tight(segment_of(plane, box, height, width))
            area = 0 if segment is None else segment.area
            if segment is None or area < params.min_area_px:
                continue
            x0, y0 = segment.x0, segment.y0
            rows, cols = segment.bits.shape
            segments.append(
                {
                    "id": len(segments),
                    "class": result.names[int(cls)],
                    "confidence": round(float(score), 4),
                    "area_px": area,
                    "box": [x0, y0, x0 + cols, y0 + rows],
                    "polygon": outline(segment, params.polygon_tolerance_px),
                }
            )
            kept.append(segment)
    ctx.segment_masks = kept
    detection = ctx.result.get("detection")
    if detection is not None and ctx.segment_overlap is not None:
        # Detection ran first: its detections get their segments now, as they would
        # have after segmentation (else estimation counted them all outside).
        _assign_segments(detection["detections"], kept, ctx.segment_overlap)
    ctx.result["segmentation"] = {
        "segments": segments,
        "counts": count_by_class(segments),
        "confidence_threshold": conf,
        "image_size": ctx.image_size,
        "max_detections_reached": reached_max([result], spec),
    }


def _assign_segments(
    detections: list[dict[str, Any]], masks: Sequence[SegmentMask], min_overlap: float
) -> None:
    """Each detection belongs to the segment that covers most of its box, if enough."""
    for det in detections:
        x1, y1, x2, y2 = (round(v) for v in det["box"])
        best, best_share = None, 0.0
        box_area = max(1, (x2 - x1) * (y2 - y1))
        for i, mask in enumerate(masks):
            share = mask.covered_in(max(0, x1), max(0, y1), x2, y2) / box_area
            if share > best_share:
                best, best_share = i, share
        det["segment"] = best if best_share >= min_overlap else None


# --------------------------------------------------------------------------- detection


def _detection_result(
    ctx: StepContext,
    params: DetectionParams,
    found: list[dict[str, Any]],
    conf: float,
    extra: dict[str, Any],
) -> None:
    masks = ctx.segment_masks
    if params.assign_to_segments:
        ctx.segment_overlap = params.min_segment_overlap
        if masks is not None:
            _assign_segments(found, masks, params.min_segment_overlap)
    ctx.result["detection"] = {
        "detections": found,
        "counts": count_by_class(found),
        "confidence_threshold": conf,
        "image_size": ctx.image_size,
        **extra,
    }


@STEPS.register("detection", DetectionParams, needs=("detection",), scalable=True)
def detection(ctx: StepContext, params: DetectionParams) -> None:
    """Boxes on the whole image; segment-aware when the pipeline segments (before it,
    or after it: the segmentation step then assigns them, _detection_result)."""
    spec = ctx.model_spec("detection")
    conf = ctx.threshold(spec, params)
    (result,) = ctx.predict("detection", [ctx.frame], conf, classes=ctx.classes(spec, params))
    found = boxes_to_detections(result, conf, scale=ctx.scale)
    reached = reached_max([result], spec)
    _detection_result(ctx, params, found, conf, {"max_detections_reached": reached})


def reached_max(results: Sequence[Any], spec: ModelSpec) -> bool:
    """Whether the model's NMS kept all the boxes it may (its max_detections) in any of
    these answers, the most confident of the step's classes: the image may hold more of
    them. ultralytics' 300 capped a dense photo's count without a word (900 shapes
    drawn: 300 boxes)."""
    return any(_nms_rows(r) >= spec.max_detections for r in results)


def _nms_rows(result: Any) -> int:
    """The rows the model's NMS kept: a segmenter's answer says (segments_from_rows: the
    rows without a mask are gone from its boxes); any other's are its boxes."""
    kept = getattr(result, "nms_rows", None)
    if kept is not None:
        return int(kept)
    return 0 if result.boxes is None else len(result.boxes)


def tile_origins(length: int, size: int, overlap: float) -> list[int]:
    """Tile starts covering [0, length): equal strides, the last tile flush with the end."""
    if length <= size:
        return [0]
    stride = max(1, int(size * (1.0 - overlap)))
    starts = list(range(0, length - size, stride))
    starts.append(length - size)
    return sorted(set(starts))


def merge_tiles(candidates: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """One box per object seen by several tiles (SAHI-style greedy merge).

    Overlap is measured as intersection over the smaller box, not IoU: a shape cut by a
    tile edge yields a partial box that lies inside the whole one but has a low IoU with
    it. Whole boxes (not touching an inner tile edge) win over cut ones, then confidence.
    The merge ignores the class: a shape cut by a tile edge is often mistaken for another
    class (a cut square looks like a rectangle), and the whole view's class is the one to
    keep.

    Only boxes of different tiles (`_tile`) are merged: two boxes of one tile are two
    objects, as the model's own NMS on that tile decided. When those were merged too, a
    small object in the empty corner of a larger one's box (a circle beside a triangle's
    slope: most of its box inside the triangle's) was dropped, and a photo of one tile
    lost objects that plain detection finds on the same pixels.
    """
    ordered = sorted(candidates, key=lambda d: (d["_cut"], -d["confidence"]))
    # Each candidate against every box kept so far, in NumPy: in Python that was a call
    # per pair, seconds with the GIL held for the thousands a low threshold finds.
    boxes = np.array([d["box"] for d in ordered], np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    tiles = np.array([d["_tile"] for d in ordered], np.int64)
    kept_boxes, kept_areas = np.empty_like(boxes), np.empty_like(areas)
    kept_tiles = np.empty_like(tiles)
    kept: list[dict[str, Any]] = []
    for det, box, area, tile in zip(ordered, boxes, areas, tiles, strict=True):
        n = len(kept)
        if n:
            others = kept_boxes[:n]
            iw = np.minimum(others[:, 2], box[2]) - np.maximum(others[:, 0], box[0])
            ih = np.minimum(others[:, 3], box[3]) - np.maximum(others[:, 1], box[1])
            inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
            smaller = np.maximum(np.minimum(kept_areas[:n], area), 1e-6)
            same = (inter / smaller > threshold) & (kept_tiles[:n] != tile)
            if same.any():
                continue  # intersection over the smaller box, with another tile's
        kept_boxes[n], kept_areas[n], kept_tiles[n] = box, area, tile
        kept.append(det)
    for det in kept:
        del det["_cut"], det["_tile"]
    return sorted(kept, key=lambda d: (d["box"][1], d["box"][0]))


@STEPS.register("sliced_detection", SlicedDetectionParams, needs=("detection",))
def sliced_detection(ctx: StepContext, params: SlicedDetectionParams) -> None:
    """Detection on overlapping tiles, for images much larger than the model's input:
    small objects keep their pixels instead of being shrunk away. All tiles go to the
    model in one call, so its batcher runs them as batches."""
    spec = ctx.model_spec("detection")
    conf = ctx.threshold(spec, params)
    keep = ctx.classes(spec, params)
    height, width = ctx.size
    size = params.slice_size
    rows = tile_origins(height, size, params.overlap)
    columns = tile_origins(width, size, params.overlap)
    if len(rows) * len(columns) > params.max_tiles:
        # Refused before any crop: a thin image's tiles are mostly padding, yet each costs
        # a crop, a letterbox, a forward pass and its post-processing: agro's 2,445 tiles
        # of 512 px for a 137 kB 47x1,000,000 PNG took 7.5 s of CPU here, a 49 MP photo's
        # 289 tiles 5.3 s; on a GPU, where the passes are cheap and the rest binds, near
        # eight times as much.
        raise PermanentError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"a {width}x{height} image needs {len(rows) * len(columns)} tiles of {size} px "
            f"for sliced detection; the step's limit is {params.max_tiles} (max_tiles): "
            "crop or scale the image, or raise max_tiles in the pipeline's config",
        )
    tiles = [(x, y, min(x + size, width), min(y + size, height)) for y in rows for x in columns]
    crops = [crop(ctx.frame, *tile) for tile in tiles]
    results = ctx.predict("detection", crops, conf, classes=keep)
    candidates: list[dict[str, Any]] = []
    edge = 2.0  # px: a box this close to an inner tile edge was cut by it
    for index, ((x0, y0, x1, y1), result) in enumerate(zip(tiles, results, strict=True)):
        for det in boxes_to_detections(result, conf, offset=(x0, y0)):
            det["_tile"] = index
            bx1, by1, bx2, by2 = det["box"]
            det["_cut"] = (
                (x0 > 0 and bx1 <= x0 + edge)
                or (y0 > 0 and by1 <= y0 + edge)
                or (x1 < width and bx2 >= x1 - edge)
                or (y1 < height and by2 >= y1 - edge)
            )
            candidates.append(det)
    found = merge_tiles(candidates, params.merge_threshold)
    _detection_result(
        ctx,
        params,
        found,
        conf,
        {
            "slices": {"count": len(tiles), "size": size, "overlap": params.overlap},
            "max_detections_reached": reached_max(results, spec),
        },
    )


# --------------------------------------------------------------------------- classification


def square_crop(frame: Frame, box: Sequence[float], padding: float) -> Frame:
    """The framing the demo classifier is trained on: a square around the box, grown by
    `padding` of its longer side on each side, clipped to the image; at least a pixel
    (a box under a pixel wide, which a low threshold on a tiny image finds, would round
    to an empty crop, and the classifier's resize divides by its size)."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * padding)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = frame_size(frame)
    xa, ya = min(max(0, round(cx - side / 2)), w - 1), min(max(0, round(cy - side / 2)), h - 1)
    xb, yb = max(min(w, round(cx + side / 2)), xa + 1), max(min(h, round(cy + side / 2)), ya + 1)
    return crop(frame, xa, ya, xb, yb)


@STEPS.register(
    "classification",
    ClassificationParams,
    needs=("classification",),
    after=("detection", "sliced_detection"),
)
def classification(ctx: StepContext, params: ClassificationParams) -> None:
    """A label per detection from its crop; all crops in one (batched) model call."""
    spec = ctx.model_spec("classification")
    conf = ctx.threshold(spec, params)
    keep = ctx.classes(spec, params)
    detections = ctx.result["detection"]["detections"]
    crops = [square_crop(ctx.frame, d["box"], params.crop_padding) for d in detections]
    results = ctx.predict("classification", crops, conf) if crops else []
    items = []
    for i, (det, result) in enumerate(zip(detections, results, strict=True)):
        top1 = int(result.probs.top1)
        score = float(result.probs.top1conf)
        name = result.names[top1]
        accepted = score >= conf and (not keep or name in keep)
        items.append(
            {
                "detection": i,
                "detected_class": det["class"],
                "box": det["box"],
                "class": name if accepted else None,
                "confidence": round(score, 4),
            }
        )
    ctx.result["classification"] = {
        "items": items,
        "counts": count_by_class(items),
        "unlabelled": sum(1 for item in items if item["class"] is None),
        "confidence_threshold": conf,
    }


# --------------------------------------------------------------------------- estimation


@STEPS.register(
    "estimation",
    EstimationParams,
    after=("detection", "sliced_detection", "segmentation"),
    scalable=True,  # boxes and masks come in the photo's pixels
)
def estimation(ctx: StepContext, params: EstimationParams) -> None:
    """Counts per class and per segment, mask coverage, and sizes (cm with px_per_cm)."""
    px_per_cm = params.px_per_cm or ctx.config.px_per_cm
    detections = (ctx.result.get("detection") or {}).get("detections", [])
    height, width = ctx.photo_hw
    out: dict[str, Any] = {
        "counts": count_by_class(detections),
        "total": len(detections),
        "px_per_cm": px_per_cm,
        "sizes": _sizes(detections, px_per_cm),
    }
    segmentation_result = ctx.result.get("segmentation")
    if segmentation_result is not None:
        covered = covered_pixels(ctx.segment_masks or [])
        out["coverage_percent"] = round(100.0 * covered / (height * width), 2)
        out["covered_px"] = covered
        if px_per_cm:
            out["covered_cm2"] = round(covered / px_per_cm**2, 2)
        per_segment = []
        for segment in segmentation_result["segments"]:
            inside = [d for d in detections if d.get("segment") == segment["id"]]
            entry = {
                "segment": segment["id"],
                "class": segment["class"],
                "area_px": segment["area_px"],
                "coverage_percent": round(100.0 * segment["area_px"] / (height * width), 2),
                "counts": count_by_class(inside),
            }
            if px_per_cm:
                entry["area_cm2"] = round(segment["area_px"] / px_per_cm**2, 2)
            per_segment.append(entry)
        out["per_segment"] = per_segment
        out["outside_segments"] = count_by_class(
            [d for d in detections if d.get("segment") is None]
        )
    labels = ctx.result.get("classification")
    if labels is not None:
        out["labels"] = labels["counts"]
    ctx.result["estimation"] = out


def _sizes(detections: list[dict[str, Any]], px_per_cm: float | None) -> dict[str, Any]:
    """Mean box width and height per class, in pixels and, when calibrated, cm."""
    by_class: dict[str, list[tuple[float, float]]] = {}
    for det in detections:
        x1, y1, x2, y2 = det["box"]
        by_class.setdefault(det["class"], []).append((x2 - x1, y2 - y1))
    sizes: dict[str, Any] = {}
    for name, dims in sorted(by_class.items()):
        w = float(np.mean([d[0] for d in dims]))
        h = float(np.mean([d[1] for d in dims]))
        entry: dict[str, Any] = {"mean_width_px": round(w, 1), "mean_height_px": round(h, 1)}
        if px_per_cm:
            entry["mean_width_cm"] = round(w / px_per_cm, 2)
            entry["mean_height_cm"] = round(h / px_per_cm, 2)
        sizes[name] = entry
    return sizes
