"""A decoded photo as the steps see it: BGR pixels on the host, or RGB pixels on the
model's device.

Why two kinds: on a CPU runner a photo decodes to an HxWx3 BGR array (libjpeg-turbo or
OpenCV, pipeline.decode_scaled), which is what ultralytics' own transforms take. On a
GPU, nvJPEG decodes straight into device memory (device_decode.py) as a 3xHxW RGB
tensor; copying it back to the host only for the letterbox to send it to the device
again would cost the CPU time the GPU saved. Steps ask for a frame's size and crops
through this module, so one step works on either, and pixels come to the host only
where a step needs them there (classification's own transforms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

import cv2
import numpy as np
import torch

Frame = np.ndarray | torch.Tensor  # HxWx3 BGR uint8 on the host, or 3xHxW RGB uint8 on a device


def frame_size(frame: Frame) -> tuple[int, int]:
    """(height, width) in pixels."""
    if isinstance(frame, np.ndarray):
        return frame.shape[0], frame.shape[1]
    return int(frame.shape[1]), int(frame.shape[2])


def crop(frame: Frame, x0: int, y0: int, x1: int, y1: int) -> Frame:
    """The pixels of [x0, x1) x [y0, y1), on the frame's side: a view, never a copy
    (sliced detection cuts about 80 tiles from a 12 MP photo, 60 MB of copies, and the
    letterbox makes its own array from a view anyway)."""
    if isinstance(frame, np.ndarray):
        return frame[y0:y1, x0:x1]
    return frame[:, y0:y1, x0:x1]


def to_host(frame: Frame) -> np.ndarray:
    """HxWx3 BGR on the host. A device frame is laid out HxWx3 on its device, then copied
    once: the host only receives bytes (it used to get a strided view and copy it again)."""
    if isinstance(frame, np.ndarray):
        return frame
    return frame.permute(1, 2, 0).flip(2).contiguous().cpu().numpy()


def shape_only(frame: Frame) -> np.ndarray:
    """What ultralytics' Results keep as the original image. Its post-processing reads
    only the shape of it (to scale boxes and masks back), so a device frame stands in as
    an array of its shape that holds no pixels (zero strides, read-only)."""
    if isinstance(frame, np.ndarray):
        return frame
    return blank(*frame_size(frame))


def blank(height: int, width: int) -> np.ndarray:
    """An HxWx3 array that holds no pixels (zero strides, read-only): a shape for
    ultralytics' Results to keep."""
    return np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (height, width, 3))


# EXIF orientation (tag 0x0112) -> how to turn a 3xHxW tensor upright, as OpenCV does
# on the host: (transpose H and W first, then flip these dims).
_UPRIGHT: dict[int, tuple[bool, tuple[int, ...]]] = {
    2: (False, (2,)),  # mirrored left-right
    3: (False, (1, 2)),  # rotated 180
    4: (False, (1,)),  # mirrored top-bottom
    5: (True, ()),  # transposed
    6: (True, (2,)),  # rotated 90 clockwise to be upright
    7: (True, (1, 2)),  # transversed
    8: (True, (1,)),  # rotated 90 counter-clockwise to be upright
}

# The same turns of an HxWx3 array, with OpenCV's own flips and rotations. Not derived
# from the table above: a quarter turn is one pass with cv2.rotate and two as transpose
# then flip (24 against 30 ms of CPU for a 12 MP phone photo).
_UPRIGHT_HOST: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda image: cv2.flip(image, 1),
    3: lambda image: cv2.rotate(image, cv2.ROTATE_180),
    4: lambda image: cv2.flip(image, 0),
    5: cv2.transpose,
    6: lambda image: cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE),
    7: lambda image: cv2.flip(cv2.transpose(image), -1),
    8: lambda image: cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


@overload
def upright(frame: np.ndarray, orientation: int) -> np.ndarray: ...
@overload
def upright(frame: torch.Tensor, orientation: int) -> torch.Tensor: ...
def upright(frame: Frame, orientation: int) -> Frame:
    """A frame turned per its EXIF orientation, as OpenCV's imdecode turns it (neither
    nvJPEG nor the host's libjpeg-turbo decoder applies it)."""
    if isinstance(frame, np.ndarray):
        turn_host = _UPRIGHT_HOST.get(orientation)
        return frame if turn_host is None else turn_host(frame)
    turn = _UPRIGHT.get(orientation)
    if turn is None:
        return frame
    transpose, dims = turn
    if transpose:
        frame = frame.transpose(1, 2)
    return frame.flip(dims).contiguous() if dims else frame.contiguous()
