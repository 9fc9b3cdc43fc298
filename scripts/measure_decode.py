#!/usr/bin/env python3
"""What decoding a JPEG costs on the host: OpenCV's imdecode against the daemon's decode
(libjpeg-turbo through simplejpeg, pipeline.decode_scaled), on the plumbing bench's own
images, at full size (what 640x480 photos, segmentation and sliced detection get) and
at the reduced scale a detection-only plan at imgsz 640 decodes a large photo at
("reduced": 1/2 for 1920x1080, 1/4 for 4032x3024).

It prints thread CPU ms per image, the median of interleaved rounds (this VM drifts from
minute to minute; both decoders run in every round), and checks first that both give
the same pixels, bit for bit.

    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_decode.py [rounds]

The large images are made on first use by `gannet bench --plumbing` (or here, the
same way) under .state/bench/images.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import cv2
import numpy as np

from gannet.dev.bench_plumbing import images_for
from gannet.image_header import read_header
from gannet.pipeline import _REDUCED, decode_scaled
from gannet.settings import REPO_ROOT

FLOOR = 640  # the plumbing bench's detector input
IMAGES = REPO_ROOT / ".state" / "bench" / "images"


def cpu_ms(decode: Callable[[bytes], object], photos: list[bytes], repeat: int) -> float:
    started = time.thread_time()
    for _ in range(repeat):
        for data in photos:
            decode(data)
    return (time.thread_time() - started) * 1000 / (repeat * len(photos))


def opencv(floor: int | None) -> Callable[[bytes], np.ndarray]:
    """The daemon's decode before simplejpeg: PIL reads the header, OpenCV decodes (at
    the same reduced scale for a floor)."""

    def decode(data: bytes) -> np.ndarray:
        longer = max(read_header(data, 10**9).size)
        reduced = (m for f, m in _REDUCED if floor and longer // f >= floor)
        return cv2.imdecode(np.frombuffer(data, np.uint8), next(reduced, cv2.IMREAD_COLOR))

    return decode


def daemon(floor: int | None) -> Callable[[bytes], np.ndarray]:
    return lambda data: decode_scaled(data, 10**9, floor)[0]


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    cv2.setNumThreads(1)  # the daemon's runners decode one photo each
    print(f"{'image set':<11} {'scale':<8} {'OpenCV ms':>9} {'daemon ms':>9} {'ratio':>6}")
    for size in ("640x480", "1920x1080", "4032x3024", "mix"):
        photos = [path.read_bytes() for path in images_for(size, IMAGES)]
        repeat = max(1, (40 if size == "4032x3024" else 200) // len(photos))
        for floor in (None, FLOOR):
            before, after = opencv(floor), daemon(floor)
            if any(not np.array_equal(before(data), after(data)) for data in photos):
                print(f"{size}: the pixels differ from OpenCV's")
                return 1
            if floor and all(decode_scaled(d, 10**9, floor)[1] == (1.0, 1.0) for d in photos):
                continue  # none is large enough to decode reduced: the full row says it all
            pairs = [
                (cpu_ms(before, photos, repeat), cpu_ms(after, photos, repeat))
                for _ in range(rounds)
            ]
            old = statistics.median(p[0] for p in pairs)
            new = statistics.median(p[1] for p in pairs)
            ratio = statistics.median(p[1] / p[0] for p in pairs)
            scale = "reduced" if floor else "full"
            print(f"{size:<11} {scale:<8} {old:9.2f} {new:9.2f} {ratio:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
