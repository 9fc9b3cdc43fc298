"""Ultralytics' predict split at the forward pass: runners pre- and post-process, the
model's batcher thread only runs the network.

Why: `model.predict` letterboxes, runs the network, then does NMS, masks and Results,
all in the thread that calls it. With one batcher thread per model that thread did all
of it for every image, and the runners waited on it (docs/architecture.md: runners overlap
pre/post-processing with inference). Here each runner prepares its own images and turns
its own raw outputs into Results, with ultralytics' own predictor code, while the batcher
thread concatenates same-shaped inputs and runs one forward pass.

The predictor holds per-call state (the confidence threshold, the batch's paths), so
each runner thread works on its own shallow copy of it; the copies share the network,
and only the batcher thread ever calls the network.
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import Any, cast

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from ultralytics.data.augment import LetterBox
from ultralytics.engine.results import Results
from ultralytics.models.yolo.detect import DetectionPredictor
from ultralytics.models.yolo.segment import SegmentationPredictor
from ultralytics.utils.ops import scale_boxes, xywh2xyxy

from gannet.frames import Frame, blank, frame_size, shape_only, to_host
from gannet.masks import planes_in_boxes


def output_row(out: Any, i: int) -> Any:
    """Image i's part of a batched output, keeping ultralytics' tuple/list nesting."""
    if isinstance(out, torch.Tensor):
        return out[i : i + 1]
    if isinstance(out, (tuple, list)):
        return type(out)(output_row(item, i) for item in out)
    if isinstance(out, dict):
        return {k: output_row(v, i) for k, v in out.items()}
    return out


class SplitPredictor:
    def __init__(
        self, model: Any, fixed_batch_one: bool = False, cpu_threads: int | None = None
    ) -> None:
        """`model` is an ultralytics YOLO that has predicted once with the options every
        later answer should use (imgsz, device, precision, retina_masks), so its
        predictor is set up; `fixed_batch_one` for exports that take one image per call;
        `cpu_threads` for the forward pass (None: leave torch's setting alone)."""
        self._predictor = model.predictor
        self._one_by_one = fixed_batch_one
        self._cpu_threads = cpu_threads
        self._local = threading.local()
        # Detect and segment predictors letterbox in BasePredictor.preprocess; classify
        # has its own transforms.
        preprocess = type(self._predictor).preprocess
        self._letterboxes = preprocess.__qualname__ == "BasePredictor.preprocess"
        self._geometry = self._letterbox_geometry() if self._letterboxes else None
        self._boxes: dict[tuple[int, int], dict[str, Any]] = {}  # the geometry per shape
        # A plain detector (not segment, pose or obb, which subclass it; not end-to-end):
        # its NMS runs on the host in a few calls (detect_on_host).
        self._nms_on_host = (
            type(self._predictor) is DetectionPredictor
            and not getattr(self._predictor.model, "end2end", False)
            and self._predictor.args.classes is None
        )
        # A segmenter's retina masks on the host: upsampled inside their boxes only
        # (segment_result; on a GPU ultralytics' own upsampling is cheap for the CPU).
        on_host = self._predictor.device.type == "cpu"
        self._masks_in_boxes = (
            on_host
            and bool(self._predictor.args.retina_masks)
            and type(self._predictor) is SegmentationPredictor
        )

    def _letterbox_geometry(self) -> LetterBox:
        """The LetterBox a one-image predict builds, for frames on a device: its sizes
        and padding, applied there with torch. Whether it pads to a minimal rectangle
        ("auto") depends on the model's format; ultralytics' own pre_transform says so on
        a blank 2:1 image (a square result: no)."""
        predictor = self._predictor
        (boxed,) = predictor.pre_transform([np.zeros((32, 64, 3), np.uint8)])
        square = boxed.shape[0] == boxed.shape[1]
        return LetterBox(
            predictor.imgsz,
            auto=not square and not predictor.scale_fill,
            scale_fill=predictor.scale_fill,
            stride=predictor.model.stride,
        )

    def start_forward_thread(self) -> None:
        """Called once by the batcher thread. torch's CPU thread count is per OS thread,
        and ultralytics sets it to cores - 1 in whichever thread loads a model, so the
        thread that runs the forward passes sets its own."""
        if self._cpu_threads:
            torch.set_num_threads(self._cpu_threads)

    def _own_copy(self) -> Any:
        view = getattr(self._local, "predictor", None)
        if view is None:
            view = copy.copy(self._predictor)
            view.args = copy.copy(self._predictor.args)
            view.batch = ([""], None, None)  # Results take their path from batch[0]
            if self._masks_in_boxes:
                view.construct_result = functools.partial(segment_result, view)
            self._local.predictor = view
        return view

    def preprocess(self, frame: Frame) -> torch.Tensor:
        """Runner thread: one frame to a (1, 3, H, W) input, letterboxed exactly as a
        one-image `model.predict` would (ultralytics' own LetterBox).

        A frame on a device (nvJPEG's) is letterboxed there, with torch: the same sizes
        and padding, bilinear resizing as OpenCV's INTER_LINEAR (values within a grey
        level or two of OpenCV's fixed-point arithmetic).

        For the predictors that letterbox (detect, segment), the runner stops at RGB
        uint8: OpenCV splits the channels (2.9 ms down to 0.4 ms per 640x480 image against
        ultralytics' torch permute, flip and divide, the same values), and the batcher
        thread makes the batch float on the model's device (4x fewer bytes to a GPU).
        Others (classify's own transforms) keep ultralytics' preprocess."""
        if isinstance(frame, torch.Tensor):
            if self._geometry is not None:
                return self._letterbox_on_device(frame, self._geometry)
            frame = to_host(frame)
        image = frame
        if self._geometry is not None and image.ndim == 3 and image.shape[2] == 3:
            return self._letterbox_on_host(image, self._geometry)
        with torch.inference_mode():
            inputs: torch.Tensor = self._own_copy().preprocess([image])
        return inputs

    def _letterbox_on_host(self, image: np.ndarray, geometry: LetterBox) -> torch.Tensor:
        """ultralytics' LetterBox.apply_image (cv2.resize, then copyMakeBorder), its
        sizes and padding worked out once per photo shape, then the channels split to
        RGB planes (OpenCV, straight into the tensor's memory), as a (1, 3, H, W) uint8
        tensor."""
        height, width = image.shape[:2]
        box = self._boxes.get((height, width))
        if box is None:
            if len(self._boxes) >= 1024:  # crops come in any shape: keep it bounded
                self._boxes.clear()
            box = self._boxes.setdefault((height, width), geometry.get_params({"img": image}))
        if (width, height) != box["new_unpad"]:
            image = cv2.resize(image, box["new_unpad"], interpolation=geometry.interpolation)
        padding = (box["top"], box["bottom"], box["left"], box["right"])
        value = (geometry.padding_value,) * 3
        boxed = image  # a 4:3 photo at a 640 input, a square tile: nothing to pad
        if any(padding):
            boxed = cv2.copyMakeBorder(image, *padding, cv2.BORDER_CONSTANT, value=value)
        planes = np.empty((1, 3, *boxed.shape[:2]), np.uint8)
        cv2.split(boxed, [planes[0, 2], planes[0, 1], planes[0, 0]])  # B, G, R in place
        return torch.from_numpy(planes)

    @staticmethod
    def _letterbox_on_device(frame: torch.Tensor, geometry: LetterBox) -> torch.Tensor:
        box = geometry.get_params({"img": shape_only(frame)})
        width, height = box["new_unpad"]
        x = frame.unsqueeze(0)
        if (x.shape[2], x.shape[3]) != (height, width):
            resized = F.interpolate(x.float(), size=(height, width), mode="bilinear")
            x = resized.round_().clamp_(0, 255).to(torch.uint8)
        padding = (box["left"], box["right"], box["top"], box["bottom"])
        return F.pad(x, padding, value=float(geometry.padding_value))

    def _model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Batcher thread: a uint8 batch from `preprocess` as the network's float input,
        as ultralytics computes it (x / 255, FP16 when the model is)."""
        if x.dtype != torch.uint8:
            return x
        fp16 = self._predictor.model.fp16
        if x.device.type == "cpu" and self._predictor.device.type == "cpu" and not fp16:
            # One NumPy pass, uint8 to float32 divided by 255: the same values as torch's
            # float() then div_(255), at two thirds of its CPU (docs/benchmark.md).
            return torch.from_numpy(np.divide(x.numpy(), np.float32(255), dtype=np.float32))
        if x.device != self._predictor.device:
            x = x.to(self._predictor.device)
        # In place: out of place (one GIL release fewer) cost the batcher thread more
        # CPU than it saved, a second float copy of the batch (docs/benchmark.md).
        return (x.half() if fp16 else x.float()).div_(255)

    @staticmethod
    def shape(inputs: torch.Tensor) -> tuple[tuple[int, ...], torch.device]:
        """Inputs of one shape can share a forward pass (on a GPU, those letterboxed
        there and those from the CPU decode fallback are concatenated apart)."""
        return tuple(inputs.shape), inputs.device

    def forward(self, inputs: list[torch.Tensor]) -> list[Any]:
        """Batcher thread only: one forward pass over same-shaped inputs, answered per input."""
        with torch.inference_mode():
            if self._one_by_one:
                return [self._predictor.inference(self._model_input(x)) for x in inputs]
            if len(inputs) == 1:  # its output is already one row: no views to make
                return [self._predictor.inference(self._model_input(inputs[0]))]
            out = self._predictor.inference(self._model_input(torch.cat(inputs)))
            return [output_row(out, i) for i in range(len(inputs))]

    def postprocess(
        self,
        output: Any,
        inputs: torch.Tensor,
        frame: Frame,
        conf: float,
        photo_hw: tuple[int, int] | None = None,
    ) -> Any:
        """Runner thread: NMS, masks and the Results object for one image. `photo_hw`:
        the photo's (height, width) when `frame` is a reduced decode of it; a segmenter's
        masks on the host are then made at the photo's size, and its boxes given in the
        photo's pixels (segment_result). Any other answer is in the frame's pixels."""
        view = self._own_copy()
        view.args.conf = conf
        view.photo_hw = photo_hw
        prediction = output[0] if isinstance(output, (tuple, list)) else output
        if self._nms_on_host and isinstance(prediction, torch.Tensor) and prediction.ndim == 3:
            return detect_on_host(view, prediction, inputs, frame)
        with torch.inference_mode():
            (result,) = view.postprocess(output, inputs, [shape_only(frame)])
        return result


def segment_result(
    predictor: Any, pred: torch.Tensor, img: torch.Tensor, orig_img: Any, path: str, proto: Any
) -> Results:
    """SegmentationPredictor.construct_result with retina masks (the ModelCache always
    asks a segmenter for them), its masks from masks.planes_in_boxes: the same planes,
    at a fraction of the CPU on a large photo.

    With `predictor.photo_hw` set (postprocess) and unlike the frame's size, the frame is
    a reduced decode of the photo: boxes are scaled from the frame's pixels to the
    photo's, as a detector's are (steps.boxes_to_detections), and the masks are made at
    the photo's size, so that areas and outlines stay in the photo's own pixels."""
    frame_hw = (int(orig_img.shape[0]), int(orig_img.shape[1]))
    photo_hw = getattr(predictor, "photo_hw", None) or frame_hw
    masks = None
    if pred.shape[0]:
        input_hw = (int(img.shape[2]), int(img.shape[3]))
        boxes = cast(torch.Tensor, scale_boxes(input_hw, pred[:, :4], orig_img.shape))
        if photo_hw != frame_hw:
            sx, sy = photo_hw[1] / frame_hw[1], photo_hw[0] / frame_hw[0]
            boxes *= boxes.new_tensor([sx, sy, sx, sy])
        pred[:, :4] = boxes
        masks, nonempty = planes_in_boxes(proto, pred[:, 6:], boxes, frame_hw, photo_hw)
        if getattr(predictor, "_feats", None) is None and not nonempty.all():
            pred, masks = pred[nonempty], masks[nonempty]  # only predictions with a mask
    photo = orig_img if photo_hw == frame_hw else blank(*photo_hw)
    names = predictor.model.names
    return Results(photo, path=path, names=names, boxes=pred[:, :6], masks=masks)


def detect_on_host(predictor: Any, prediction: torch.Tensor, inputs: Any, frame: Frame) -> Results:
    """A detector's NMS and Results as ultralytics' DetectionPredictor.postprocess makes
    them (non_max_suppression, then scale_boxes), in a few torch calls instead of about
    ninety.

    Why: every torch call releases the GIL, and a thread that lets go of it waits to get
    it back while the daemon's other threads run. With a second core that wait is paid
    per call: ultralytics' post-processing of a 640x480 image cost 0.5-0.8 ms of CPU alone
    and 7-9 ms with one busy Python thread on the other core; this, the same answer, 0.3
    and 1.6-2.3 ms (scripts/measure_gil_convoy.py, docs/benchmark.md). Creating and
    freeing a tensor lets go of the GIL too, so on the CPU the candidates above the
    threshold are picked in NumPy, on the prediction's own memory (on a GPU, with torch
    there, and only they are copied to the host). The rest runs in NumPy on a few dozen
    rows: the same float32 arithmetic, ultralytics' own xywh2xyxy, its scale_boxes
    (to_photo), its NMS (nms, through OpenCV). With boxes_to_detections: 44 releases of
    the GIL per image with ultralytics' code, 13 now (scripts/count_gil_releases.py).
    (An FP16 model's candidates are made float32 first, where ultralytics stays in
    FP16: boxes then differ in the fourth significant digit.)"""
    args = predictor.args
    if prediction.device.type == "cpu" and prediction.dtype == torch.float32:
        p = prediction.numpy()[0]  # (4 + classes, anchors): no torch call, no copy
        x = p[:, p[4:].max(0) > args.conf].T  # (candidates, 4 + classes)
    else:  # on a GPU: the candidates are picked there, and only they are copied
        scores = prediction[0, 4:]
        picked = prediction[0][:, scores.amax(0) > args.conf]
        x = picked.T.float().cpu().numpy()
    classes = x[:, 4:].argmax(1)
    confidence = x[:, 4:].max(1)  # the same values as indexing at classes, no GIL release
    if len(x) > 30000:  # ultralytics' max_nms: the most confident first
        order = torch.from_numpy(confidence).argsort(descending=True)[:30000].numpy()
        x, classes, confidence = x[order], classes[order], confidence[order]
    boxes = xywh2xyxy(x[:, :4])  # type: ignore[no-untyped-call]
    kept = nms(boxes, confidence, None if args.agnostic_nms else classes, args.iou)
    kept = kept[: args.max_det]
    found = np.empty((len(kept), 6), np.float32)
    found[:, :4] = to_photo(boxes[kept], inputs.shape[2:], frame_size(frame))
    found[:, 4] = confidence[kept]
    found[:, 5] = classes[kept]
    names = predictor.model.names
    return Results(shape_only(frame), path="", names=names, boxes=torch.from_numpy(found))


def nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray | None, iou: float
) -> np.ndarray:
    """Indices of the boxes (xyxy float32) that ultralytics' non_max_suppression keeps,
    most confident first: its boxes shifted by class times 7680 (float32), so boxes of two
    classes never overlap, then greedy NMS over the IoU threshold, as torchvision's
    `nms`.

    OpenCV's NMSBoxes does it in one call, where torchvision's takes three tensors, and
    each tensor freed lets go of the GIL: 9 releases per image, 1 with OpenCV. OpenCV
    works out the overlaps in double precision from the same float32 boxes, torchvision
    in float32: a pair whose overlap is within about 1e-7 of the threshold could go the
    other way (tests/test_split_predictor.py compares the two on thousands of boxes).
    `scores` must be above 0, as the candidates of a confidence threshold are."""
    shifted = boxes + (0 if classes is None else classes.astype(np.float32)[:, None] * 7680)
    shifted[:, 2:] -= shifted[:, :2]  # x, y, w, h, as OpenCV takes them
    kept = cv2.dnn.NMSBoxes(cast(Any, shifted), cast(Any, scores), 0.0, iou)
    return np.asarray(kept, np.int64).reshape(-1)


def to_photo(boxes: np.ndarray, input_hw: tuple[int, ...], photo_hw: tuple[int, int]) -> np.ndarray:
    """xyxy float32 boxes in the letterboxed input to the photo's pixels, clipped to it:
    ultralytics' scale_boxes and clip_boxes (the same float32 arithmetic, so the same
    values) in three NumPy calls instead of ten, each of which lets go of the GIL."""
    height, width = photo_hw
    gain = min(input_hw[0] / height, input_hw[1] / width)
    new_h, new_w = max(round(height * gain), 1), max(round(width * gain), 1)
    pad_x = round((input_hw[1] - new_w) / 2 - 0.1)
    pad_y = round((input_hw[0] - new_h) / 2 - 0.1)
    gain_x, gain_y = new_w / width, new_h / height
    pad = np.array([pad_x, pad_y, pad_x, pad_y], np.float32)
    gains = np.array([gain_x, gain_y, gain_x, gain_y], np.float32)
    limits = np.array([width, height, width, height], np.float32)
    clipped: np.ndarray = np.clip((boxes - pad) / gains, 0, limits)
    return clipped
