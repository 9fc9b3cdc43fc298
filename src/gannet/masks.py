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

On a GPU ultralytics' own upsampling runs where the prototypes are (segments_on_device),
but a few segments at a time: its stack of full-size planes (one byte per pixel per
segment, 3.7 GB for 300 segments of a 12 MP photo, then a copy of it to drop the empty
ones) was a CUDA out-of-memory on a 16 GB T4 that other runners share. Each chunk's
planes are thresholded there and only each box's bits copied to the host, as SegmentMasks.
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

# The most bytes one chunk of segments_on_device's full-size planes may take on the device
# (float32 logits and their bool threshold, 5 bytes a pixel): one segment of a 12 MP photo
# (61 MB), six of a 1080p frame. ultralytics' own chunks are 16 M float32 pixels, 64 MB.
DEVICE_CHUNK_BYTES = 64 << 20


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
    f, (top, left, content_h, content_w) = _prototype_window(mh, mw, shape)
    if f > 1:
        logits = F.interpolate(logits.view(1, -1, mh, mw), scale_factor=f, mode="bilinear")
    upsampled = logits.numpy().reshape(len(coeffs), mh * f, mw * f)
    # then crops the padding off (scale_masks) and upsamples that to the photo's size.
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


def segments_on_device(
    protos: torch.Tensor,
    coeffs: torch.Tensor,
    boxes: np.ndarray,
    shape: tuple[int, int],
    out: tuple[int, int] | None = None,
    budget: int = DEVICE_CHUNK_BYTES,
) -> tuple[list[SegmentMask], np.ndarray]:
    """ultralytics' process_mask_native then segment_of on each plane, where the prototypes
    are (a GPU), a chunk of segments at a time: each segment's box crop of its retina mask
    (SegmentMask, on the host, not yet tight), and which have a pixel set.

    Why: process_mask_native keeps every segment's full-size uint8 plane (N x H x W: 3.7
    GB for 300 segments of a 12 MP photo; segments_from_rows then copied it to drop the
    empty ones): a CUDA out-of-memory on a T4, failing the task and the other runners'
    batches on that GPU. Here its own calls, on the same values (the matmul of all the
    coefficients, F.interpolate by 1, 2 or 4, the crop of the letterbox padding, F.interpolate
    to the photo's size, greater than 0), run on chunks of segments whose planes take at
    most `budget` bytes (float32 and bool: 5 a pixel), and only each box's pixels (crop_mask
    keeps [ceil(x1), ceil(x2)): box_region) cross to the host: the device holds the logits
    (at most 300 x 32 KB-100 KB) and one chunk, whatever the number of segments, or one
    plane where a single one is over the budget. A pixel's value depends on its own
    sources only, not on the other planes of its chunk, so the bits are ultralytics', bit
    for bit (tests/test_masks.py, with CPU tensors: no GPU runs the tests).

    Torch calls (most let go of the GIL): five per chunk and three per segment (the box's
    slice of the thresholded chunk, its copy to the host, NumPy's view of that): at 12 MP,
    where a chunk is one segment, 8 per segment where process_mask_native and segment_of
    made 12 (scripts/measure_device_masks.py).

    `shape` is the letterboxed image's (the frame's) size, `out` (default `shape`) the
    masks' and `boxes`' (xyxy float32 on the host): the photo's, when the frame is a
    reduced decode of it, as planes_in_boxes makes them (its `out`), so that no plane at
    the frame's size is scaled to the photo's on the host."""
    c, mh, mw = protos.shape
    h, w = shape
    out_h, out_w = out or shape
    nonempty = np.zeros(len(coeffs), bool)
    if len(coeffs) == 0:
        return [], nonempty
    logits = (coeffs @ protos.float().view(c, -1)).view(1, -1, mh, mw)
    # process_mask_native's first upsampling (1, 2 or 4: the padding on whole pixels),
    f, (top, left, content_h, content_w) = _prototype_window(mh, mw, shape)
    in_h, in_w = mh * f, mw * f
    # then scale_masks' crop of the padding and upsampling to the photo's size (none where
    # the upsampled prototypes are the photo's size already).
    crop = None
    if (in_h, in_w) != (h, w) or (out_h, out_w) != (h, w):
        crop = (slice(top, top + content_h), slice(left, left + content_w))
    step = max(1, budget // (4 * in_h * in_w + 5 * out_h * out_w))
    copy = protos.device.type == "cpu"  # a crop of the chunk's memory: not to keep it alive
    segments = []
    for start in range(0, len(coeffs), step):
        above = _above_zero(logits[:, start : start + step], f, crop, (out_h, out_w))
        for j, box in enumerate(boxes[start : start + step]):
            x0, y0, x1, y1 = box_region(box, out_h, out_w)
            bits = above[j, y0:y1, x0:x1].cpu().numpy()
            bits = bits.copy() if copy else bits
            nonempty[start + j] = bits.any()
            segments.append(SegmentMask(x0, y0, bits))
        del above  # before the next chunk's planes are made, not after
    return segments, nonempty


def _above_zero(
    logits: torch.Tensor,
    f: int,
    crop: tuple[slice, slice] | None,
    out: tuple[int, int],
) -> torch.Tensor:
    """A chunk's (1, k, mh, mw) logits as process_mask_native makes its planes (upsampled
    by `f`, the padding cropped off, upsampled to `out`, greater than 0), bool (k, H, W).
    A function of its own so that the float planes are freed at its return, before the
    next chunk's are made."""
    if f > 1:
        logits = F.interpolate(logits, scale_factor=f, mode="bilinear")
    if crop is not None:
        logits = F.interpolate(logits[(..., *crop)], out, mode="bilinear")
    return logits[0] > 0


def _prototype_window(
    mh: int, mw: int, shape: tuple[int, int]
) -> tuple[int, tuple[int, int, int, int]]:
    """How process_mask_native brings (mh, mw) prototypes to the letterboxed image of
    `shape` (height, width): first upsampled by f (1, 2 or 4, so that the padding falls
    on whole pixels), then the window (top, left, height, width) of those upsampled
    prototypes that is the image without its padding (scale_masks' crop). The host's
    path (planes_in_boxes) and the device's (segments_on_device) share it."""
    h, w = shape
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    in_h, in_w = mh * f, mw * f
    gain = min(in_h / h, in_w / w)
    content_h, content_w = max(round(h * gain), 1), max(round(w * gain), 1)
    top, left = round((in_h - content_h) / 2 - 0.1), round((in_w - content_w) / 2 - 0.1)
    return f, (top, left, content_h, content_w)


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
