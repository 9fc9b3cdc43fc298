"""Segment masks at the photo's resolution, computed and read inside their boxes only.

Why: with retina masks ultralytics makes one full-size plane per segment, upsampling the
segment's mask over the whole photo and then zeroing all of it but the segment's box
(crop_mask); the segmentation step then took areas, outlines, the photo's coverage and
each detection's segment from the full planes. On a 12 MP field or shelf photo a box is
a few percent of the photo, and that cost about 70 ms of CPU per segment to make the
planes and 70 ms per photo to read them, every pass over 12 million pixels; on a GPU,
12 MB per segment crossed to the host. Here the upsampling runs inside each box
(planes_in_boxes, on the host), a segment is kept as the crop of its box (SegmentMask),
and only a box's pixels leave the device. The planes are ultralytics' and the answers
the full planes', bit for bit (tests/test_masks.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SegmentMask:
    """One segment's pixels: `bits` (bool) is the photo's [y0, y0 + h) x [x0, x0 + w)."""

    x0: int
    y0: int
    bits: np.ndarray

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.bits))

    def covered_in(self, x1: int, y1: int, x2: int, y2: int) -> int:
        """How many of the segment's pixels lie in the box [x1, x2) x [y1, y2)."""
        height, width = self.bits.shape
        left, top = max(x1, self.x0) - self.x0, max(y1, self.y0) - self.y0
        right, bottom = min(x2, self.x0 + width) - self.x0, min(y2, self.y0 + height) - self.y0
        if right <= left or bottom <= top:
            return 0
        return int(np.count_nonzero(self.bits[top:bottom, left:right]))


def box_region(box: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """The whole pixels of the photo a box in photo pixels (float x1, y1, x2, y2) keeps
    of its mask: (x0, y0, x1, y1), possibly empty. ultralytics keeps the columns c with
    x1 <= c < x2 (rows alike: crop_mask), which are [ceil(x1), ceil(x2))."""
    bx1, by1, bx2, by2 = (float(v) for v in box)
    x0, y0 = max(0, math.ceil(bx1)), max(0, math.ceil(by1))
    x1, y1 = min(width, math.ceil(bx2)), min(height, math.ceil(by2))
    return x0, y0, max(x0, x1), max(y0, y1)


def segment_of(plane: Any, box: Any, height: int, width: int) -> SegmentMask:
    """The segment in one full-size mask plane (a torch tensor, on any device, or an
    array), from its box's pixels only: those are thresholded where the plane is and
    are all that is copied to the host."""
    x0, y0, x1, y1 = box_region(box, height, width)
    bits = plane[y0:y1, x0:x1] > 0.5
    if not isinstance(bits, np.ndarray):
        bits = bits.cpu().numpy()
    return SegmentMask(x0, y0, bits)


def tight(segment: SegmentMask) -> SegmentMask | None:
    """The segment cropped to its own pixels' bounding box; None when it has none."""
    rows = np.flatnonzero(segment.bits.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(segment.bits.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    bits = segment.bits[top:bottom, left:right]
    return SegmentMask(segment.x0 + int(left), segment.y0 + int(top), bits)


def outline(segment: SegmentMask, tolerance: float) -> list[list[int]]:
    """The outline of the segment's largest region in photo pixels, simplified
    (Douglas-Peucker) so the JSON stays small. Traced on a crop with a zero border, at
    its offset: the same points as on the full plane."""
    padded = cv2.copyMakeBorder(
        segment.bits.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0
    )
    contours, _ = cv2.findContours(
        padded,
        cv2.RETR_EXTERNAL,
        cv2.CHAIN_APPROX_SIMPLE,
        offset=(segment.x0 - 1, segment.y0 - 1),
    )
    if not contours:
        return []
    largest = max(contours, key=cv2.contourArea)
    if tolerance > 0:
        largest = cv2.approxPolyDP(largest, tolerance, True)
    return [[int(x), int(y)] for x, y in largest.reshape(-1, 2)]


def covered(segments: list[SegmentMask]) -> int:
    """How many pixels of the photo at least one segment covers."""
    if not segments:
        return 0
    left = min(s.x0 for s in segments)
    top = min(s.y0 for s in segments)
    right = max(s.x0 + s.bits.shape[1] for s in segments)
    bottom = max(s.y0 + s.bits.shape[0] for s in segments)
    union = np.zeros((bottom - top, right - left), bool)
    for s in segments:
        height, width = s.bits.shape
        union[s.y0 - top : s.y0 - top + height, s.x0 - left : s.x0 - left + width] |= s.bits
    return int(np.count_nonzero(union))


def planes_in_boxes(
    protos: torch.Tensor,
    coeffs: torch.Tensor,
    boxes: np.ndarray,
    shape: tuple[int, int],
    out: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """ultralytics' process_mask_native (retina masks: uint8 planes at the photo's size,
    zero outside each box), with the bilinear upsampling done inside each box only, on
    the CPU.

    ultralytics upsamples every segment's logits to the whole photo, then zeroes all but
    its box: 12 million interpolated values per segment on a 12 MP photo, about 80 ms of
    CPU for a photo with one segment. Here the same arithmetic (its matmul, its small
    upsampling and crop of the letterbox padding, then PyTorch's bilinear source indices
    and weights, align_corners=False) runs on the box's pixels alone, and the planes are
    ultralytics' (tests/test_masks.py). Also which planes have a pixel set (ultralytics
    drops the others), found in the boxes too rather than in the planes. The work per
    box is NumPy's, on the same float32 values: in torch it took about 80 calls per
    segment, each of which lets go of the GIL (scripts/count_gil_releases.py segment).

    `shape` is the (height, width) of the image the model was given, letterboxed: it says
    which part of the masks is padding. `out` (default `shape`) is the planes' size, and
    `boxes` (xyxy float32) are in its pixels: the photo's, when the image is a reduced
    decode of it. The masks are the model's prototypes (a quarter of its input's side),
    upsampled; a photo decoded at a reduced scale, still larger than the model's input,
    gives them no less detail than at full size."""
    c, mh, mw = protos.shape
    h, w = shape
    out_h, out_w = out or shape
    # Zeroed pages from the OS (calloc): only those inside the boxes are ever written.
    zeros = np.zeros((len(coeffs), out_h, out_w), np.uint8)
    planes = torch.from_numpy(zeros)
    nonempty = np.zeros(len(coeffs), bool)
    if len(coeffs) == 0:
        return planes, nonempty
    # (Each torch call lets go of the GIL, a tensor's view and its freeing too: no more
    # of them than ultralytics' arithmetic needs, and NumPy from there on.)
    protos = protos if protos.dtype == torch.float32 else protos.float()
    logits = coeffs @ protos.view(c, -1)
    # ultralytics first upsamples by 1, 2 or 4, so that the padding falls on whole pixels,
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    if f > 1:
        logits = F.interpolate(logits.view(1, -1, mh, mw), scale_factor=f, mode="bilinear")
    upsampled = logits.numpy().reshape(len(coeffs), mh * f, mw * f)
    # then crops the padding off (scale_masks) and upsamples that to the photo's size.
    in_h, in_w = upsampled.shape[1:]
    gain = min(in_h / h, in_w / w)
    content_h, content_w = max(round(h * gain), 1), max(round(w * gain), 1)
    top, left = round((in_h - content_h) / 2 - 0.1), round((in_w - content_w) / 2 - 0.1)
    content = upsampled[:, top : top + content_h, left : left + content_w]
    rows, cols = _bilinear(content_h, out_h), _bilinear(content_w, out_w)
    bits = zeros.view(bool)  # the planes' memory, written through: 0 and 1
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = box_region(box, out_h, out_w)
        if x1 == x0 or y1 == y0:
            continue
        r0, r1, u0, u1 = (a[y0:y1] for a in rows)
        c0, c1, v0, v1 = (a[x0:x1] for a in cols)
        first, last = r0[0], r1[-1] + 1  # the source rows the box reads
        source = content[i, first:last]
        # Each source row along x, then the box's rows from them; in place, on the
        # copies that indexing makes: the same float32 operations, no temporaries.
        across, right = source[:, c0], source[:, c1]
        across *= v0
        across += np.multiply(right, v1, out=right)
        upper, lower = across[r0 - first], across[r1 - first]
        upper *= u0[:, None]
        upper += np.multiply(lower, u1[:, None], out=lower)
        inside = bits[i, y0:y1, x0:x1]
        np.greater(upper, 0, out=inside)
        nonempty[i] = inside.any()
    return planes, nonempty


@functools.lru_cache(maxsize=64)
def _bilinear(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
    """PyTorch's bilinear (align_corners=False) source indices and weights along one
    axis, as its CPU kernel computes them (UpSample.h: area_pixel_compute_source_index,
    guard_index_and_lambda), in float32: (index0, index1, weight0, weight1), one entry
    per output pixel. Kept per size: photos come in a few shapes."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    out = torch.arange(out_size, dtype=torch.float32)
    source = (scale * (out + 0.5) - 0.5).clamp_(min=0)
    index0 = source.floor().clamp_(max=in_size - 1)
    weight1 = (source - index0).clamp_(0, 1)
    weight0 = 1 - weight1
    index1 = torch.where(index0 < in_size - 1, index0 + 1, index0)
    arrays = tuple(a.numpy() for a in (index0.long(), index1.long(), weight0, weight1))
    for a in arrays:
        a.flags.writeable = False  # shared by every call of this size
    return arrays
