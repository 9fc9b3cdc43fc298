#!/usr/bin/env python3
"""A segmenter's masks on the GPU's path, before and after segments_on_device: the peak of
the tensors alive at once, the CPU and the torch calls per photo, on CPU tensors.

The GPU's path (split_predictor.segments_from_rows with in_boxes False) used to be
ultralytics' process_mask_native, which keeps one full-size uint8 plane per segment, then
the segmentation step's segment_of on each plane (its box's slice, threshold, copy to the
host); now masks.segments_on_device runs the same arithmetic on a chunk of segments at a
time and copies only each box's bits. Both run here on the CPU (this host has no GPU):
the peak is of torch's own allocations, the same sizes a GPU would hold; the CPU time
includes the upsampling arithmetic, which a GPU would do instead of the host, so the
torch calls (each lets go of the GIL) are the better figure of the host's work there.

    YOLO_OFFLINE=1 PYTHONPATH=src .venv/bin/python scripts/measure_device_masks.py
    YOLO_OFFLINE=1 PYTHONPATH=src .venv/bin/python scripts/measure_device_masks.py 20 300

Synthetic prototypes and coefficients (the demo segmenter's shapes at imgsz 640: 32 x
120 x 160 for a 4:3 photo) and boxes of 60-600 px on a 4032x3024 photo; the medians of
3 rounds, torch on one thread. tests/test_masks.py imports this file for its
references and its tracker of live tensors.
"""

from __future__ import annotations

import statistics
import sys
import time
import weakref
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from ultralytics.utils.ops import process_mask_native

from gannet.masks import SegmentMask, segment_of, segments_on_device

PHOTO = (3024, 4032)


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors' storages alive at once while it is on, and their peak:
    each storage an operator makes is counted until it is freed (a view counts with its
    storage). Tensors made before it was on (the inputs) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = self.largest = 0
        self._live: set[tuple[int, int]] = set()

    def _freed(self, key: tuple[int, int], size: int) -> None:
        self._live.discard(key)
        self.now -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = (storage.data_ptr(), id(storage)), storage.nbytes()
            if size and key not in self._live:
                self._live.add(key)
                self.now += size
                self.peak = max(self.peak, self.now)
                self.largest = max(self.largest, size)
                weakref.finalize(storage, self._freed, key, size)
        return out


class TorchCalls(TorchFunctionMode):
    """How many torch functions and tensor methods are called while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def synthetic(n: int, photo: tuple[int, int] = PHOTO, seed: int = 0) -> tuple[Any, ...]:
    """Prototypes (32, 120, 160), a segmenter's kept rows' coefficients (a view of the
    rows, as segments_from_rows gives them) and boxes (xyxy float32 in the photo's
    pixels, fractional edges, some cut by the photo's edges, one empty) for n segments."""
    rng = np.random.default_rng(seed)
    # Smooth prototypes, as a network's are: blobs of a few prototype pixels.
    coarse = torch.from_numpy(rng.normal(0, 1, (1, 32, 15, 20)).astype(np.float32))
    protos = torch.nn.functional.interpolate(coarse, (120, 160), mode="bilinear")[0]
    rows = np.zeros((n, 38), np.float32)
    height, width = photo
    size = rng.uniform(60, 600, (n, 2))
    corner = rng.uniform(0, 1, (n, 2)) * (np.array([width, height]) + 100 - size / 2) - 50
    boxes = np.concatenate([corner, corner + size], 1)
    rows[:, :4] = np.clip(boxes, 0, [width, height, width, height])
    if n > 1:
        rows[1, 2] = rows[1, 0]  # an empty box: no mask, dropped
    rows[:, 6:] = rng.normal(0, 1, (n, 32))
    kept = torch.from_numpy(rows)
    return protos, kept[:, 6:], rows[:, :4]


def old_device_path(
    protos: torch.Tensor, coeffs: torch.Tensor, boxes: np.ndarray, shape: tuple[int, int]
) -> list[SegmentMask]:
    """The GPU's path before segments_on_device: ultralytics' planes, the empty ones
    dropped (segments_from_rows), each read in its box (steps.segmentation, segment_of)."""
    planes = process_mask_native(protos, coeffs, torch.from_numpy(boxes), shape)  # type: ignore[no-untyped-call]
    nonempty = (planes.amax((-2, -1)) > 0).cpu().numpy()
    if not nonempty.all():
        planes, boxes = planes[torch.from_numpy(nonempty)], boxes[nonempty]
    height, width = shape
    return [segment_of(p, b, height, width) for p, b in zip(planes, boxes, strict=True)]


def new_device_path(
    protos: torch.Tensor, coeffs: torch.Tensor, boxes: np.ndarray, shape: tuple[int, int]
) -> list[SegmentMask]:
    """segments_on_device, the empty ones dropped, as segments_from_rows does."""
    segments, nonempty = segments_on_device(protos, coeffs, boxes, shape)
    return [s for s, kept in zip(segments, nonempty, strict=True) if kept]


def measure(path: Any, n: int, rounds: int = 3) -> dict[str, float]:
    protos, coeffs, boxes = synthetic(n)
    with torch.inference_mode():
        with LiveBytes() as live:
            path(protos, coeffs, boxes, PHOTO)
        with TorchCalls() as counted:
            path(protos, coeffs, boxes, PHOTO)
        cpu = []
        for _ in range(rounds):
            start = time.process_time()
            path(protos, coeffs, boxes, PHOTO)
            cpu.append(time.process_time() - start)
    return {
        "peak_mb": live.peak / 1e6,
        "largest_mb": live.largest / 1e6,
        "cpu_ms": 1000 * statistics.median(cpu),
        "torch_calls": counted.calls,
    }


def main() -> None:
    torch.set_num_threads(1)
    counts = [int(a) for a in sys.argv[1:]] or [20, 300]
    print("segments path                         peak MB  largest MB    CPU ms  torch calls")
    for n in counts:
        for name, path in [
            ("old (process_mask_native)", old_device_path),
            ("new", new_device_path),
        ]:
            m = measure(path, n)
            print(
                f"{n:8} {name:28} {m['peak_mb']:8.0f} {m['largest_mb']:11.0f} "
                f"{m['cpu_ms']:9.0f} {m['torch_calls']:12}"
            )


if __name__ == "__main__":
    main()
