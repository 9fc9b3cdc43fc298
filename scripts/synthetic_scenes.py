"""Synthetic scenes for Gannet's demo models: one small "world" that serves all three tasks.

A scene is a textured, noisy background with a few large pale irregular polygons
("patches") and a few small saturated shapes (circle / square / triangle, coloured red,
blue or yellow). Because every pixel is generated here, each scene carries its exact
ground truth, so the demo models trained on these scenes can be checked exactly: the
counts, colours and areas in ``samples/manifest.json`` are not estimates.

Shapes never overlap each other (a small gap is kept) and each shape lies either wholly
on one patch or wholly off every patch, so "how many" and "which patch is it on" have
exactly one right answer. Everything is driven by a ``numpy.random.Generator``, so a
seed reproduces a scene bit for bit (before JPEG encoding).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

DETECT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
SEGMENT_CLASSES: tuple[str, ...] = ("patch",)
COLOR_CLASSES: tuple[str, ...] = ("blue", "red", "yellow")

SHAPE_MIN_PX = 24
SHAPE_MAX_PX = 70
SHAPE_GAP_PX = 6
PATCH_MARGIN_PX = 12

# Sub-pixel precision for cv2.fillPoly: vertices are scaled by 2**_SHIFT.
_SHIFT = 4

# (hue in degrees, hue jitter, saturation range, value range): the hues are far apart and
# saturation is high, so colour is unambiguous; the jitter keeps the classifier honest.
_SHAPE_COLORS: dict[str, tuple[float, float, tuple[float, float], tuple[float, float]]] = {
    "red": (0.0, 7.0, (0.75, 1.0), (0.7, 1.0)),
    "blue": (222.0, 12.0, (0.7, 1.0), (0.6, 0.95)),
    "yellow": (53.0, 5.0, (0.75, 1.0), (0.85, 1.0)),
}

# Pale patch tints: (hue range, saturation range, value range).
_PATCH_TINTS: tuple[tuple[tuple[float, float], tuple[float, float], tuple[float, float]], ...] = (
    ((30.0, 45.0), (0.10, 0.25), (0.84, 0.95)),  # beige
    ((0.0, 360.0), (0.00, 0.05), (0.80, 0.93)),  # light grey
    ((85.0, 135.0), (0.10, 0.25), (0.80, 0.93)),  # pale green
)


@dataclass(frozen=True)
class Patch:
    """A pale region; ``polygon`` is in integer pixels so ``area`` is exactly reproducible."""

    polygon: np.ndarray  # (N, 2) int32, x/y pixel coordinates
    area: int  # pixels set by cv2.fillPoly(polygon)


@dataclass(frozen=True)
class Shape:
    """A saturated shape; ``bbox`` is [x1, y1, x2, y2) of its filled pixels (x2/y2 exclusive)."""

    cls: str
    color: str
    polygon: np.ndarray  # (N, 2) float64
    bbox: tuple[int, int, int, int]
    patch: int | None


@dataclass
class Scene:
    """An image (BGR, uint8) with its exact ground truth."""

    image: np.ndarray
    shapes: list[Shape]
    patches: list[Patch]

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def _hsv_to_bgr(h_deg: float, s: float, v: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v)
    return np.array([b, g, r], dtype=np.float32) * 255.0


def _value_noise(
    rng: np.random.Generator, height: int, width: int, cell: int, channels: int = 1
) -> np.ndarray:
    """Smooth noise in [-1, 1]: a coarse random grid upsampled with cubic interpolation."""
    gh, gw = max(2, height // cell + 2), max(2, width // cell + 2)
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw, channels)).astype(np.float32)
    up = cv2.resize(grid, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)
    if up.ndim == 2:
        up = up[:, :, None]
    oy, ox = int(rng.integers(0, cell)), int(rng.integers(0, cell))
    return up[oy : oy + height, ox : ox + width, :]


def _fill_mask(shape: tuple[int, int], polygon: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """Rasterise ``polygon`` (float pixels) into a uint8 mask whose origin is at ``offset``."""
    mask = np.zeros(shape, dtype=np.uint8)
    pts = np.round((polygon - np.asarray(offset, dtype=np.float64)) * (1 << _SHIFT)).astype(
        np.int32
    )
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted, darker, textured background so that pale patches and saturated shapes stand out."""
    base = _hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0.08, 0.4), rng.uniform(0.3, 0.6))
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = base
    img += _value_noise(rng, height, width, int(rng.integers(120, 260)), 3) * rng.uniform(10, 28)
    img += _value_noise(rng, height, width, int(rng.integers(24, 60)), 1) * rng.uniform(6, 16)
    img += _value_noise(rng, height, width, int(rng.integers(4, 10)), 1) * rng.uniform(3, 10)
    # A few faint strokes (cracks, grass, scratches) so edges alone do not mean "object".
    n_strokes = int(rng.integers(0, 8 + (height * width) // 60000))
    for _ in range(n_strokes):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        length, angle = rng.uniform(20, 160), rng.uniform(0, 2 * np.pi)
        p1 = (int(p0[0] + length * np.cos(angle)), int(p0[1] + length * np.sin(angle)))
        delta = float(rng.uniform(-35, 35))
        color = tuple(float(c) for c in np.clip(base + delta, 0, 255))
        cv2.line(img, p0, p1, color, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _random_patch_polygon(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An irregular star-shaped polygon, large relative to the shapes (radius ~50-130 px)."""
    radius = rng.uniform(50, 130)
    n = int(rng.integers(6, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    # Keep vertices from bunching so the polygon stays blob-like rather than spiky.
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False) * 0.6 + angles * 0.4
    angles = np.sort(angles + rng.uniform(0, 2 * np.pi))
    radii = radius * rng.uniform(0.6, 1.0, n)
    sx, sy = rng.uniform(0.75, 1.3), rng.uniform(0.75, 1.3)
    rot = rng.uniform(0, 2 * np.pi)
    x = radii * np.cos(angles) * sx
    y = radii * np.sin(angles) * sy
    xr = x * np.cos(rot) - y * np.sin(rot)
    yr = x * np.sin(rot) + y * np.cos(rot)
    m = PATCH_MARGIN_PX
    cx = rng.uniform(m - xr.min(), max(m - xr.min() + 1, width - m - xr.max()))
    cy = rng.uniform(m - yr.min(), max(m - yr.min() + 1, height - m - yr.max()))
    poly = np.stack([xr + cx, yr + cy], axis=1)
    poly[:, 0] = np.clip(poly[:, 0], 1, width - 2)
    poly[:, 1] = np.clip(poly[:, 1], 1, height - 2)
    return np.round(poly).astype(np.int32)


def _shape_polygon(rng: np.random.Generator, cls: str, size: float) -> np.ndarray:
    """A shape centred on the origin whose bounding box's longer side is ``size`` pixels."""
    if cls == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif cls == "square":
        rot = np.deg2rad(rng.uniform(-30, 30))
        t = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi + rot
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif cls == "triangle":
        rot = rng.uniform(0, 2 * np.pi)
        t = np.array([0.0, 2.0 / 3.0, 4.0 / 3.0]) * np.pi + rot
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    else:
        raise ValueError(f"unknown shape class {cls!r}")
    extent = (pts.max(axis=0) - pts.min(axis=0)).max()
    pts = pts * (size / extent)
    return pts - (pts.max(axis=0) + pts.min(axis=0)) / 2.0


def _paint(
    img: np.ndarray,
    rng: np.random.Generator,
    mask: np.ndarray,
    offset: tuple[int, int],
    color: np.ndarray,
    texture: float,
    edge_sigma: float,
) -> None:
    """Blend a flat-ish colour into ``img`` through a slightly softened mask (anti-aliased edge)."""
    h, w = mask.shape
    x0, y0 = offset
    pad = 3
    ya, yb = max(0, y0 - pad), min(img.shape[0], y0 + h + pad)
    xa, xb = max(0, x0 - pad), min(img.shape[1], x0 + w + pad)
    alpha = np.zeros((yb - ya, xb - xa), dtype=np.float32)
    alpha[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w] = mask.astype(np.float32)
    if edge_sigma > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), edge_sigma)
    region = img[ya:yb, xa:xb]
    fill = np.empty_like(region)
    fill[:] = color
    if texture > 0:
        fill += _value_noise(rng, yb - ya, xb - xa, int(rng.integers(6, 20)), 1) * texture
        shade = np.linspace(rng.uniform(-1, 1), rng.uniform(-1, 1), xb - xa, dtype=np.float32)
        fill += shade[None, :, None] * texture
    region[:] = region * (1.0 - alpha[:, :, None]) + fill * alpha[:, :, None]


def make_scene(
    rng: np.random.Generator,
    width: int = 640,
    height: int = 480,
    n_patches: int | None = None,
    n_shapes: int | None = None,
    small_bias: bool = False,
    on_patch_prob: float = 0.45,
) -> Scene:
    """Draw one scene; ``None`` counts are drawn at random (0-3 patches, 0-8 shapes at 640x480).

    The requested counts are targets: a patch or shape that cannot be placed without breaking
    the non-overlap rules is dropped, and the returned ground truth lists only what was drawn.
    ``small_bias`` draws shape sizes log-uniformly (same range, more small shapes): the
    smallest shapes are the hardest to tell apart, so training sees more of them.
    ``on_patch_prob`` is the chance that a shape is put on a patch (when there is one).
    """
    if n_patches is None:
        n_patches = int(rng.integers(0, 4))
    if n_shapes is None:
        n_shapes = int(rng.integers(0, 9))
    img = _background(rng, height, width)

    patch_occ = np.zeros((height, width), dtype=np.uint8)  # dilated, for spacing patches apart
    patch_ids = np.full((height, width), -1, dtype=np.int16)
    patches: list[Patch] = []
    dilate = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * PATCH_MARGIN_PX + 1,) * 2)
    for _ in range(n_patches):
        for _attempt in range(40):
            poly = _random_patch_polygon(rng, height, width)
            mask = np.zeros((height, width), dtype=np.uint8)
            cv2.fillPoly(mask, [poly], 1, lineType=cv2.LINE_8)
            if (mask & patch_occ).any():
                continue
            idx = len(patches)
            patches.append(Patch(polygon=poly, area=int(mask.sum())))
            patch_ids[mask.astype(bool)] = idx
            patch_occ |= cv2.dilate(mask, dilate)
            hue_r, sat_r, val_r = _PATCH_TINTS[int(rng.integers(0, len(_PATCH_TINTS)))]
            color = _hsv_to_bgr(rng.uniform(*hue_r), rng.uniform(*sat_r), rng.uniform(*val_r))
            _paint(img, rng, mask, (0, 0), color, rng.uniform(3, 9), rng.uniform(0.4, 1.0))
            break
    # Shapes must sit wholly on a patch (eroded, so they do not touch its edge) or wholly off.
    erode = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    inner_ids = np.full_like(patch_ids, -1)
    for idx in range(len(patches)):
        m = cv2.erode((patch_ids == idx).astype(np.uint8), erode).astype(bool)
        inner_ids[m] = idx
    near_patch = cv2.dilate((patch_ids >= 0).astype(np.uint8), erode).astype(bool)

    occupied = np.zeros((height, width), dtype=bool)
    shapes: list[Shape] = []
    for _ in range(n_shapes):
        cls = DETECT_CLASSES[int(rng.integers(0, len(DETECT_CLASSES)))]
        color_name = COLOR_CLASSES[int(rng.integers(0, len(COLOR_CLASSES)))]
        want_patch = bool(patches) and rng.random() < on_patch_prob
        for _attempt in range(80):
            if small_bias:
                size = float(np.exp(rng.uniform(np.log(SHAPE_MIN_PX), np.log(SHAPE_MAX_PX))))
            else:
                size = rng.uniform(SHAPE_MIN_PX, SHAPE_MAX_PX)
            local = _shape_polygon(rng, cls, size)
            if want_patch:
                p = patches[int(rng.integers(0, len(patches)))].polygon
                cx = rng.uniform(p[:, 0].min(), p[:, 0].max())
                cy = rng.uniform(p[:, 1].min(), p[:, 1].max())
            else:
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            poly = local + np.array([cx, cy])
            x0, y0 = int(np.floor(poly[:, 0].min())) - 1, int(np.floor(poly[:, 1].min())) - 1
            x1, y1 = int(np.ceil(poly[:, 0].max())) + 2, int(np.ceil(poly[:, 1].max())) + 2
            if x0 < 2 or y0 < 2 or x1 > width - 2 or y1 > height - 2:
                continue
            mask = _fill_mask((y1 - y0, x1 - x0), poly, (x0, y0)).astype(bool)
            g = SHAPE_GAP_PX
            if occupied[max(0, y0 - g) : y1 + g, max(0, x0 - g) : x1 + g].any() and (
                _dilated_hits(mask, occupied, (x0, y0), g)
            ):
                continue
            ids = inner_ids[y0:y1, x0:x1][mask]
            if want_patch:
                if ids.min() < 0 or ids.min() != ids.max():
                    continue
                patch_idx: int | None = int(ids[0])
            else:
                if near_patch[y0:y1, x0:x1][mask].any():
                    continue
                patch_idx = None
            ys, xs = np.nonzero(mask)
            bbox = (
                x0 + int(xs.min()),
                y0 + int(ys.min()),
                x0 + int(xs.max()) + 1,
                y0 + int(ys.max()) + 1,
            )
            occupied[y0:y1, x0:x1] |= mask
            h_deg, h_jit, s_r, v_r = _SHAPE_COLORS[color_name]
            color = _hsv_to_bgr(
                h_deg + rng.uniform(-h_jit, h_jit), rng.uniform(*s_r), rng.uniform(*v_r)
            )
            _paint(img, rng, mask.astype(np.uint8), (x0, y0), color, rng.uniform(2, 10), 0.6)
            if rng.random() < 0.25:  # a darker outline on some shapes, as drawn markers often have
                pts = np.round(poly * (1 << _SHIFT)).astype(np.int32)
                outline = tuple(float(c) for c in color * rng.uniform(0.4, 0.7))
                cv2.polylines(img, [pts], True, outline, 1, cv2.LINE_AA, shift=_SHIFT)
            shapes.append(Shape(cls, color_name, poly, bbox, patch_idx))
            break

    _finish(img, rng)
    return Scene(image=np.clip(img, 0, 255).astype(np.uint8), shapes=shapes, patches=patches)


def _dilated_hits(
    mask: np.ndarray, occupied: np.ndarray, origin: tuple[int, int], gap: int
) -> bool:
    """Whether ``mask`` grown by ``gap`` pixels touches any already-occupied pixel."""
    x0, y0 = origin
    h, w = mask.shape
    ya, xa = max(0, y0 - gap), max(0, x0 - gap)
    yb, xb = min(occupied.shape[0], y0 + h + gap), min(occupied.shape[1], x0 + w + gap)
    grown = np.zeros((yb - ya, xb - xa), dtype=np.uint8)
    grown[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w] = mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1, 2 * gap + 1))
    grown = cv2.dilate(grown, kernel).astype(bool)
    return bool((grown & occupied[ya:yb, xa:xb]).any())


def _finish(img: np.ndarray, rng: np.random.Generator) -> None:
    """Camera-ish effects: uneven lighting, sensor noise and sometimes a little blur."""
    h, w = img.shape[:2]
    light = 1.0 + _value_noise(rng, h, w, max(h, w) // 2, 1) * rng.uniform(0.03, 0.12)
    img *= light
    img += rng.normal(0.0, rng.uniform(2.0, 7.0), size=img.shape).astype(np.float32)
    if rng.random() < 0.3:
        img[:] = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 0.9))


def yolo_detect_labels(scene: Scene) -> str:
    """YOLO detect label text: ``cls cx cy w h`` normalised to the image size."""
    lines = []
    for s in scene.shapes:
        x1, y1, x2, y2 = s.bbox
        cx, cy = (x1 + x2) / 2 / scene.width, (y1 + y2) / 2 / scene.height
        bw, bh = (x2 - x1) / scene.width, (y2 - y1) / scene.height
        lines.append(f"{DETECT_CLASSES.index(s.cls)} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def yolo_segment_labels(scene: Scene) -> str:
    """YOLO segment label text: ``0 x1 y1 x2 y2 ...`` (patch polygon, normalised)."""
    lines = []
    for p in scene.patches:
        xy = p.polygon.astype(np.float64) / np.array([scene.width, scene.height])
        lines.append("0 " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)))
    return "\n".join(lines) + ("\n" if lines else "")


def shape_crop(
    image: np.ndarray,
    bbox: tuple[int, int, int, int] | list[int],
    pad: float = 0.2,
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """A square crop around ``bbox`` grown by ``pad`` (fraction of its longer side).

    This is the crop the colour classifier is trained on and the crop a pipeline is
    expected to feed it (a detector box plus some context), so train and use agree.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox)
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * pad)
    cx = (x1 + x2) / 2 + shift[0] * side
    cy = (y1 + y2) / 2 + shift[1] * side
    h, w = image.shape[:2]
    xa, ya = round(cx - side / 2), round(cy - side / 2)
    xb, yb = round(cx + side / 2), round(cy + side / 2)
    xa, ya, xb, yb = max(0, xa), max(0, ya), min(w, xb), min(h, yb)
    return image[ya:yb, xa:xb].copy()


def manifest_entry(scene: Scene, file_name: str) -> dict[str, Any]:
    """Ground truth for one saved image, in the JSON shape ``samples/manifest.json`` uses."""
    counts = {c: 0 for c in DETECT_CLASSES}
    color_counts = {c: 0 for c in COLOR_CLASSES}
    for s in scene.shapes:
        counts[s.cls] += 1
        color_counts[s.color] += 1
    return {
        "file": file_name,
        "width": scene.width,
        "height": scene.height,
        "counts": counts,
        "color_counts": color_counts,
        "patch_count": len(scene.patches),
        "shapes": [
            {"class": s.cls, "color": s.color, "bbox": list(s.bbox), "patch": s.patch}
            for s in scene.shapes
        ],
        "patches": [{"polygon": p.polygon.tolist(), "area": p.area} for p in scene.patches],
    }
