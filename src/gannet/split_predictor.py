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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from ultralytics.data.augment import LetterBox
from ultralytics.engine.results import Results
from ultralytics.models.yolo.detect import DetectionPredictor
from ultralytics.models.yolo.segment import SegmentationPredictor
from ultralytics.utils.ops import xywh2xyxy

from gannet.config_schema import MAX_DETECTIONS
from gannet.frames import Frame, blank, frame_size, shape_only, to_host
from gannet.masks import SegmentMask, planes_in_boxes, segments_on_device


def output_row(out: Any, i: int) -> Any:
    """Image i's part of a batched output, keeping ultralytics' tuple/list nesting."""
    if isinstance(out, torch.Tensor):
        return out[i : i + 1]
    if isinstance(out, (tuple, list)):
        return type(out)(output_row(item, i) for item in out)
    if isinstance(out, dict):
        return {k: output_row(v, i) for k, v in out.items()}
    return out


def rgb_planes(image: np.ndarray) -> torch.Tensor:
    """A BGR image (H, W, 3) as the (1, 3, H, W) RGB uint8 input tensor: OpenCV splits
    the channels straight into the tensor's memory (no transposes, no intermediate
    tensors, each of which would let go of the GIL when freed)."""
    planes = np.empty((1, 3, *image.shape[:2]), np.uint8)
    cv2.split(image, [planes[0, 2], planes[0, 1], planes[0, 0]])  # B, G, R in place
    return torch.from_numpy(planes)


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
        self._filters: dict[tuple[str, ...], ClassFilter | None] = {}  # by class names
        # A plain detector or segmenter (not pose or obb, which subclass the detector;
        # not end-to-end): its NMS runs on the host in a few calls (nms_on_host).
        self._segments = type(self._predictor) is SegmentationPredictor
        self._end2end = bool(getattr(self._predictor.model, "end2end", False))
        self._nms_on_host = (
            (self._segments or type(self._predictor) is DetectionPredictor)
            and not self._end2end
            and self._predictor.args.classes is None
        )
        # A classifier whose transforms ultralytics splits (PIL's resize and centre crop
        # on the host, the normalisation on the model's device): the runner stops at RGB
        # uint8 too, and the batcher normalises the batch (an identity: not at all).
        self._crops = getattr(self._predictor, "host_transforms", None)
        normalize = getattr(self._predictor, "device_transform", None)
        identity = normalize is None or bool(
            (torch.as_tensor(normalize.mean) == 0).all()
            and (torch.as_tensor(normalize.std) == 1).all()
        )
        self._normalize = None if identity else normalize
        # A segmenter's retina masks (segments_from_rows): on the host upsampled inside
        # their boxes only; on a GPU by ultralytics' arithmetic, a few segments at a time,
        # each box's bits alone copied to the host.
        self._retina = (
            bool(self._predictor.args.retina_masks)
            and type(self._predictor) is SegmentationPredictor
        )
        self._masks_in_boxes = self._retina and self._predictor.device.type == "cpu"

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

    def _filter(self, names: tuple[str, ...]) -> ClassFilter | None:
        """The filter keeping these class names, None for all of the model's (no filter
        to apply: the shipped configs name every class); a name the model lacks is
        left out (configs are checked against their models)."""
        try:
            return self._filters[names]
        except KeyError:  # not yet known (the runners share the dict)
            pass
        if len(self._filters) >= 256:  # filters come from configs: a few
            self._filters.clear()
        model_names = self._predictor.model.names
        wanted = set(names)
        ids = [i for i, name in model_names.items() if name in wanted]
        chosen = None
        if len(ids) < len(model_names):
            kept = np.zeros(max(model_names) + 1, bool)
            kept[ids] = True
            chosen = ClassFilter(ids, kept)
        self._filters[names] = chosen
        return chosen

    def _own_copy(self) -> Any:
        view = getattr(self._local, "predictor", None)
        if view is None:
            view = copy.copy(self._predictor)
            view.args = copy.copy(self._predictor.args)
            view.batch = ([""], None, None)  # Results take their path from batch[0]
            if self._retina:
                view.construct_result = functools.partial(
                    segment_result, view, in_boxes=self._masks_in_boxes
                )
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
        A classifier's crop likewise, after ultralytics' own resize and centre crop
        (_crop_on_host). Others keep ultralytics' preprocess."""
        if isinstance(frame, torch.Tensor):
            if self._geometry is not None:
                return self._letterbox_on_device(frame, self._geometry)
            frame = to_host(frame)
        image = frame
        if image.ndim == 3 and image.shape[2] == 3:
            if self._geometry is not None:
                return self._letterbox_on_host(image, self._geometry)
            if self._crops is not None:
                return self._crop_on_host(image, self._crops)
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
        return rgb_planes(boxed)

    @staticmethod
    def _crop_on_host(image: np.ndarray, crops: Any) -> torch.Tensor:
        """ultralytics' classify preprocess where it splits the transforms: its host
        transforms (PIL's resize and centre crop) on the BGR image, as its pre_transform,
        then the channels split to RGB planes with OpenCV, uint8, as a detector's input.
        ultralytics' torch calls (a tensor, permute, flip, divide, normalise) let go of
        the GIL 47 times per crop (scripts/count_gil_releases.py)."""
        return rgb_planes(np.asarray(crops(Image.fromarray(image))))

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
        as ultralytics computes it (x / 255, FP16 when the model is; a classifier's
        normalisation after)."""
        if x.dtype != torch.uint8:
            return x
        fp16 = self._predictor.model.fp16
        if x.device.type == "cpu" and self._predictor.device.type == "cpu" and not fp16:
            # One NumPy pass, uint8 to float32 divided by 255: the same values as torch's
            # float() then div_(255), at two thirds of its CPU (docs/benchmark.md).
            x = torch.from_numpy(np.divide(x.numpy(), np.float32(255), dtype=np.float32))
        else:
            if x.device != self._predictor.device:
                x = x.to(self._predictor.device)
            # In place: out of place (one GIL release fewer) cost the batcher thread more
            # CPU than it saved, a second float copy of the batch (docs/benchmark.md).
            x = (x.half() if fp16 else x.float()).div_(255)
        return x if self._normalize is None else self._normalize(x)

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
        max_det: int = MAX_DETECTIONS,
        classes: Sequence[str] = (),
    ) -> Any:
        """Runner thread: NMS, masks and the Results object for one image. `photo_hw`:
        the photo's (height, width) when `frame` is a reduced decode of it; a segmenter's
        masks on the host are then made at the photo's size, and its boxes given in the
        photo's pixels (segments_from_rows). Any other answer is in the frame's pixels.
        `max_det`: the most rows NMS keeps, the most confident first; `classes`: the
        names of the classes it keeps, before it counts them (empty: all), so that a
        step keeping some classes does not spend the cap on others, nor a segmenter make
        their masks."""
        view = self._own_copy()
        view.args.conf = conf
        view.args.max_det = max_det
        chosen = self._filter(tuple(classes)) if classes else None
        view.args.classes = None if chosen is None else chosen.ids  # ultralytics' own paths
        view.photo_hw = photo_hw
        if self._crops is not None:
            probs = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(probs, torch.Tensor) and probs.ndim == 2:
                return classes_on_host(view, probs, frame)
        parts = _prediction_and_protos(output, self._segments) if self._nms_on_host else None
        if parts is not None:
            prediction, protos = parts
            nc = len(view.model.names) if self._segments else 0
            rows = nms_on_host(prediction, view.args, nc, None if chosen is None else chosen.kept)
            if protos is None:
                rows[:, :4] = to_photo(rows[:, :4], inputs.shape[2:], frame_size(frame))
                names = view.model.names
                return Results(
                    shape_only(frame), path="", names=names, boxes=torch.from_numpy(rows)
                )
            with torch.inference_mode():
                return segments_from_rows(
                    view, rows, inputs.shape[2:], frame, protos[0], self._masks_in_boxes
                )
        with torch.inference_mode():
            (result,) = view.postprocess(output, inputs, [shape_only(frame)])
        if self._end2end:
            # The network kept its own top rows over every class (as many as its
            # export allows, maybe fewer than max_det), and a class filter came after
            # (ultralytics' order too): the cap was reached if its rows above the
            # threshold, of any class, filled it.
            head = output[0] if isinstance(output, (tuple, list)) else output
            above = int((head[0, :, 4] > conf).sum())
            full = above >= min(head.shape[1], max_det)
            result.nms_rows = max_det if full else above  # steps.reached_max reads it
        return result


@dataclass(frozen=True)
class ClassFilter:
    """A step's class filter for one model: its ids, for ultralytics' `classes`, and by
    class id whether it keeps the class, for nms_on_host."""

    ids: list[int]
    kept: np.ndarray


class SegmentCrops(Results):
    """A GPU's segmenter's answer: no masks, but each row's segment as the crop of its
    box on the host (`segment_crops`, masks.segments_on_device), which the segmentation
    step reads instead of full-size planes: those never leave the GPU, nor stay on it."""

    segment_crops: list[SegmentMask]


def segment_result(
    predictor: Any,
    pred: torch.Tensor,
    img: torch.Tensor,
    orig_img: Any,
    path: str,
    proto: Any,
    in_boxes: bool = True,
) -> Results:
    """SegmentationPredictor.construct_result with retina masks (the ModelCache always
    asks a segmenter for them), its masks made by segments_from_rows (on a CPU inside
    their boxes, on a GPU in chunks: never ultralytics' full-size plane per segment): for
    the rows of ultralytics' own NMS, when the runner's postprocess leaves an output to
    it. Its rows as float32 on the host, as nms_on_host's (an FP16 model's, made float32)."""
    on_host = pred.device.type == "cpu" and pred.dtype == torch.float32
    rows = pred.numpy() if on_host else pred.float().cpu().numpy()
    return segments_from_rows(predictor, rows, img.shape[2:], orig_img, proto, in_boxes)


def segments_from_rows(
    predictor: Any,
    rows: np.ndarray,
    input_hw: tuple[int, ...],
    frame: Frame,
    proto: torch.Tensor,
    in_boxes: bool,
) -> Results:
    """ultralytics' SegmentationPredictor.construct_result with retina masks, from the
    rows its NMS keeps (nms_on_host's, float32 on the host): the boxes in the photo's
    pixels (to_photo, in NumPy, where ultralytics' scale_boxes let go of the GIL about
    55 times for five boxes), then the masks, and only the rows with a mask.

    The masks: on a CPU (`in_boxes`) made inside their boxes (masks.planes_in_boxes,
    the same planes at a fraction of the CPU on a large photo), the Results' masks; on a
    GPU by ultralytics' arithmetic (process_mask_native's) where the prototypes are, a
    chunk of segments at a time, and only each box's bits copied to the host
    (masks.segments_on_device): the answer carries no masks, but a SegmentMask per row
    (SegmentCrops), which the segmentation step reads instead. ultralytics' own
    kept every segment's full-size plane on the GPU, gigabytes on a large photo with
    hundreds of segments. With `predictor.photo_hw` set (postprocess) and unlike the
    frame's size, the frame is a reduced decode of the photo: boxes are scaled from the
    frame's pixels to the photo's, as a detector's are (steps.boxes_to_detections), and
    the masks made at the photo's size, so that areas and outlines stay in the photo's
    own pixels."""
    frame_hw = frame_size(frame)
    photo_hw = getattr(predictor, "photo_hw", None) or frame_hw
    masks = crops = None
    nms_rows = len(rows)  # before the rows without a mask go: what max_det capped
    if len(rows):
        rows[:, :4] = to_photo(rows[:, :4], input_hw, frame_hw)
        if photo_hw != frame_hw:
            sx, sy = photo_hw[1] / frame_hw[1], photo_hw[0] / frame_hw[0]
            rows[:, :4] *= np.array([sx, sy, sx, sy], np.float32)
        if in_boxes:
            coeffs = torch.from_numpy(rows[:, 6:])
            masks, nonempty = planes_in_boxes(proto, coeffs, rows[:, :4], frame_hw, photo_hw)
        else:
            # The coefficients as ultralytics is given them (a view of the rows, there).
            kept = torch.from_numpy(rows).to(proto.device)
            xyxy = rows[:, :4]
            crops, nonempty = segments_on_device(proto, kept[:, 6:], xyxy, frame_hw, photo_hw)
        if getattr(predictor, "_feats", None) is None and not nonempty.all():
            rows = rows[nonempty]  # only predictions with a mask
            if masks is not None:
                masks = masks[torch.from_numpy(nonempty)]
            if crops is not None:
                crops = [crop for crop, has in zip(crops, nonempty, strict=True) if has]
    photo = shape_only(frame) if photo_hw == frame_hw else blank(*photo_hw)
    names = predictor.model.names
    boxes = torch.from_numpy(rows[:, :6])
    if in_boxes:
        result = Results(photo, path="", names=names, boxes=boxes, masks=masks)
    else:
        result = SegmentCrops(photo, path="", names=names, boxes=boxes)
        result.segment_crops = crops or []
    result.nms_rows = nms_rows  # type: ignore[attr-defined]  # steps.reached_max reads it
    return result


def classes_on_host(predictor: Any, probs: torch.Tensor, frame: Frame) -> Results:
    """ultralytics' ClassificationPredictor.postprocess for one image: its class
    probabilities (1, classes) as the Results' probs, copied (CUDA graphs and exported
    models reuse their output's memory for the next pass), on the host, where the steps
    read them (top1, top1conf: in NumPy, no torch call)."""
    row = probs.numpy()[0].copy() if probs.device.type == "cpu" else probs[0].cpu().numpy()
    names = predictor.model.names
    return Results(shape_only(frame), path="", names=names, probs=cast(Any, row))  # Probs takes it


def _prediction_and_protos(
    output: Any, segments: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The candidates (1, 4 + classes + extra, anchors) and a segmenter's prototypes
    (1, 32, h, w) in one image's output, picked as ultralytics' postprocess picks them;
    None for an output of another form (ultralytics' own postprocess then takes it)."""
    protos = None
    if segments:
        if not isinstance(output, (tuple, list)) or len(output) < 2:
            return None
        protos = output[0][1] if isinstance(output[0], tuple) else output[1]
        output = output[0]
        if not isinstance(protos, torch.Tensor) or protos.ndim != 4:
            return None
    prediction = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(prediction, torch.Tensor) or prediction.ndim != 3:
        return None
    return prediction, protos


def nms_on_host(
    prediction: torch.Tensor, args: Any, nc: int, kept: np.ndarray | None = None
) -> np.ndarray:
    """The rows ultralytics' non_max_suppression keeps for one image, as a float32 array
    (kept, 6 + extra): x1, y1, x2, y2 in the model's input, confidence, class, then the
    extra columns (a segmenter's mask coefficients). `nc`: the number of classes, 0 for
    all the columns after the box (ultralytics' own argument: a detector's 0). `kept`:
    by class id, whether a step keeps the class (ClassFilter; None: all).

    Why: ultralytics' NMS and postprocess take about ninety torch calls per image (a
    segmenter's NMS alone, 73 releases of the GIL), and every torch call releases the
    GIL: a thread that lets go of it waits to get it back while the daemon's other
    threads run. With a second core that wait is paid per call: a detector's
    post-processing of a 640x480 image cost 0.5-0.8 ms of CPU alone and 7-9 ms with one
    busy Python thread on the other core; on the host, the same answer, 0.3 and 1.6-2.3
    ms (scripts/measure_gil_convoy.py, docs/benchmark.md). Creating and freeing a tensor
    lets go of the GIL too, so on the CPU the candidates above the threshold are picked
    in NumPy, on the prediction's own memory (on a GPU, with torch there, and only they
    are copied to the host). The rest runs in NumPy on a few dozen rows: the same
    float32 arithmetic, ultralytics' own xywh2xyxy, its NMS (nms, through OpenCV). (An
    FP16 model's candidates are made float32 first, where ultralytics stays in FP16:
    boxes then differ in the fourth significant digit.)"""
    end = 4 + nc if nc else prediction.shape[1]  # the class scores' columns end here
    if prediction.device.type == "cpu" and prediction.dtype == torch.float32:
        p = prediction.numpy()[0]  # (4 + classes + extra, anchors): no torch call, no copy
        x = p[:, p[4:end].max(0) > args.conf].T  # (candidates, 4 + classes + extra)
    else:  # on a GPU: the candidates are picked there, and only they are copied
        scores = prediction[0, 4:end]
        picked = prediction[0][:, scores.amax(0) > args.conf]
        x = picked.T.float().cpu().numpy()
    classes = x[:, 4:end].argmax(1)
    confidence = x[:, 4:end].max(1)  # the same values as indexing at classes, no GIL release
    if kept is not None:  # ultralytics' order: the filter, then max_nms and max_det
        wanted = kept[classes]  # a lookup: np.isin took 13 us
        x, classes, confidence = x[wanted], classes[wanted], confidence[wanted]
    if len(x) > 30000:  # ultralytics' max_nms: the most confident first
        order = torch.from_numpy(confidence).argsort(descending=True)[:30000].numpy()
        x, classes, confidence = x[order], classes[order], confidence[order]
    boxes = xywh2xyxy(x[:, :4])  # type: ignore[no-untyped-call]
    kept = nms(boxes, confidence, None if args.agnostic_nms else classes, args.iou)
    kept = kept[: args.max_det]
    rows = np.empty((len(kept), 6 + x.shape[1] - end), np.float32)
    rows[:, :4] = boxes[kept]
    rows[:, 4] = confidence[kept]
    rows[:, 5] = classes[kept]
    if x.shape[1] > end:  # each NumPy gather lets go of the GIL: none for nothing
        rows[:, 6:] = x[kept, end:]
    return rows


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
