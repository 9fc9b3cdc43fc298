"""The runners' own pre-processing gives the network exactly ultralytics' input.

The runners letterbox with ultralytics' LetterBox but turn the result into a tensor
themselves (OpenCV channel split, uint8; the batcher thread divides by 255). If that ever
differed from ultralytics' own preprocess by one value, answers could drift from the
bare model's; this compares them bit for bit on the shapes photos come in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)
from conftest import segmenter_of_80_classes
from ultralytics.utils.ops import scale_boxes

from gannet.masks import segment_of
from gannet.model_cache import ModelKey, yolo_loader
from gannet.settings import REPO_ROOT
from gannet.split_predictor import SplitPredictor, nms, to_photo

MODELS = REPO_ROOT / "models" / "demo"


@pytest.mark.parametrize(("weights", "task"), [("detect.pt", "detect"), ("segment.pt", "segment")])
def test_runner_inputs_equal_ultralytics_preprocess(weights: str, task: str):
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(MODELS / weights), "v", "cpu", 640, task))
    split = SplitPredictor(model)
    scene = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    for width, height in [(640, 480), (1920, 1080), (1200, 1600), (333, 517)]:
        image = cv2.resize(scene, (width, height))
        ours = split.preprocess(image)
        assert ours.dtype == torch.uint8  # the cheap path was taken
        theirs = model.predictor.preprocess([image])
        assert torch.equal(split._model_input(ours), theirs), (width, height)
    # Sliced detection's tiles are views into the photo (frames.crop), never copies.
    photo = cv2.resize(scene, (1600, 1200))
    for x0, y0, size in [(0, 0, 512), (410, 820, 512), (1230, 820, 370)]:
        tile = photo[y0 : y0 + size, x0 : x0 + size]
        ours = split.preprocess(tile)
        theirs = model.predictor.preprocess([np.ascontiguousarray(tile)])
        assert torch.equal(split._model_input(ours), theirs), (x0, y0, size)


def test_classifier_inputs_and_answers_equal_ultralytics():
    """A classifier's crops: ultralytics' own resize and centre crop (PIL), then the
    runner stops at RGB uint8 and the batcher divides by 255, as a detector's input
    (split_predictor._crop_on_host); the class probabilities are read on the host
    (classes_on_host). Against ultralytics' preprocess and postprocess, bit for bit, on
    crops of a photo as the classification step cuts them (views of the frame, square
    and clipped at its edges, large and small), and the same probabilities in a batch."""
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(MODELS / "classify.pt"), "v", "cpu", 64, "classify"))
    split = SplitPredictor(model)
    assert split._crops is not None and split._normalize is None  # ultralytics' split
    photo = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    crops = [photo[y : y + h, x : x + w] for x, y, w, h in [(190, 80, 80, 80), (0, 400, 90, 80)]]
    crops += [photo[100:131, 600:640], photo[:300, :300], np.full((50, 70, 3), 200, np.uint8)]
    inputs = [split.preprocess(crop) for crop in crops]
    for crop, ours in zip(crops, inputs, strict=True):
        assert ours.dtype == torch.uint8  # the cheap path was taken
        theirs = model.predictor.preprocess([crop])
        assert torch.equal(split._model_input(ours), theirs), crop.shape
    labels = set()
    for crop, ours, output in zip(crops, inputs, split.forward(inputs), strict=True):
        answer = split.postprocess(output, ours, crop, 0.5)
        with torch.inference_mode():
            (want,) = model.predictor.postprocess(output, ours, [crop])
        assert np.array_equal(answer.probs.data, want.probs.data.numpy())
        assert answer.probs.top1 == want.probs.top1 and answer.names == want.names
        labels.add(answer.probs.top1)
    assert len(labels) >= 2  # the crops are of different things


def test_a_classifiers_own_normalisation_is_applied_to_the_batch():
    """A classifier trained with a mean and a standard deviation (the demo classifier's
    are the identity, and skipped): the batcher normalises the batch as ultralytics'
    device transform does, the same values."""
    import torchvision.transforms as T

    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(MODELS / "classify.pt"), "v", "cpu", 64, "classify"))
    model.predictor.device_transform = T.Normalize(mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    split = SplitPredictor(model)
    assert split._normalize is not None
    photo = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    crops = [photo[80:160, 190:270], photo[:300, :300]]
    for crop in crops:
        ours = split._model_input(split.preprocess(crop))
        theirs = model.predictor.preprocess([crop])
        assert torch.equal(ours, theirs)
        assert float(theirs.min()) < 0  # normalised: (0 - 0.1) / 0.5 and below


def same_masks(ours: Any, theirs: Any, where: Any) -> None:
    """A runner's masks are ultralytics' (its retina planes): on a CPU the same planes; on
    a GPU's path (run here on the CPU, forced) each segment the crop of ultralytics'
    plane in its box (segment_of), which the segmentation step reads."""
    crops = getattr(ours, "segment_crops", None)
    if crops is None:
        assert torch.equal(ours.masks.data, theirs.masks.data), where
        return
    assert ours.masks is None and len(crops) == len(theirs.masks.data), where
    height, width = theirs.orig_shape
    for crop, plane, box in zip(crops, theirs.masks.data, theirs.boxes.xyxy, strict=True):
        want = segment_of(plane, box, height, width)
        assert (crop.x0, crop.y0) == (want.x0, want.y0), where
        assert np.array_equal(crop.bits, want.bits), where


@pytest.mark.parametrize(
    ("weights", "task", "masks_in_boxes"),
    [
        ("detect.pt", "detect", False),
        ("segment.pt", "segment", True),
        ("segment.pt", "segment", False),
    ],
)
@pytest.mark.parametrize("conf", [0.01, 0.25])
def test_nms_on_the_host_gives_ultralytics_answer(
    weights: str, task: str, masks_in_boxes: bool, conf: float
):
    """The runners do a detector's and a segmenter's NMS in a few calls on the host
    (split_predictor.nms_on_host) instead of ultralytics' postprocess: the same boxes,
    confidences and classes, in the same order, and a segmenter's masks the same planes,
    on photos that are letterboxed with and without padding, with a few boxes each and
    (at conf 0.01) a few dozen. A segmenter's masks both ways: made inside their boxes
    (a CPU's) and by ultralytics' arithmetic in chunks, only the boxes' bits kept (a
    GPU's: masks.segments_on_device, forced here on a CPU's predictor). With a class
    filter and a cap of 5 too: ultralytics' classes= and max_det."""
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(MODELS / weights), "v", "cpu", 640, task))
    split = SplitPredictor(model)
    assert split._nms_on_host
    split._masks_in_boxes = masks_in_boxes
    reference = copy.copy(split._predictor)  # ultralytics' own postprocess, masks and all
    reference.args = copy.copy(reference.args)
    reference.args.conf = conf
    names = model.names
    kept_names = (names[0],) if task == "segment" else (names[0], names[2])
    filtered = copy.copy(reference)
    filtered.args = copy.copy(reference.args)
    filtered.args.classes = [i for i, n in names.items() if n in kept_names]
    filtered.args.max_det = 5
    compared = compared_filtered = 0
    for name in ("scene_01.jpg", "scene_02.jpg", "scene_03.jpg"):
        scene = cv2.imread(str(REPO_ROOT / "samples" / name))
        for width, height in [(640, 480), (1920, 1080), (1200, 1600)]:
            image = cv2.resize(scene, (width, height))
            inputs = split.preprocess(image)
            (output,) = split.forward([inputs])
            ours = split.postprocess(output, inputs, image, conf)
            with torch.inference_mode():
                (theirs,) = reference.postprocess(output, split._model_input(inputs), [image])
            assert ours.boxes.data.shape == theirs.boxes.data.shape, (name, width, height)
            np.testing.assert_allclose(
                ours.boxes.data.numpy(), theirs.boxes.data.numpy(), rtol=0, atol=1e-3
            )
            assert ours.orig_shape == theirs.orig_shape and ours.names == theirs.names
            if task == "segment" and len(theirs.boxes):
                same_masks(ours, theirs, (name, width, height))
                # An output the runner leaves to ultralytics: its NMS, then the masks of
                # segment_result (the predictor's construct_result, on a CPU and a GPU).
                view = split._own_copy()
                with torch.inference_mode():
                    (fallback,) = view.postprocess(output, split._model_input(inputs), [image])
                same_masks(fallback, theirs, (name, width, height))
                np.testing.assert_allclose(fallback.boxes.data, theirs.boxes.data, atol=1e-3)
            compared += len(theirs.boxes)
            # A step's class filter and a model's cap: ultralytics' classes= and max_det.
            few = split.postprocess(output, inputs, image, conf, None, 5, kept_names)
            with torch.inference_mode():
                (same,) = filtered.postprocess(output, split._model_input(inputs), [image])
            assert few.boxes.data.shape == same.boxes.data.shape, (name, width, height)
            np.testing.assert_allclose(few.boxes.data, same.boxes.data, rtol=0, atol=1e-3)
            compared_filtered += len(same.boxes)
    many = 200 if task == "detect" else 50  # the demo segmenter finds fewer at 0.01
    assert compared >= (many if conf < 0.1 else 20)  # there were boxes to compare
    assert compared_filtered >= 20


@pytest.mark.parametrize("agnostic", [False, True])
def test_nms_keeps_the_boxes_torchvision_keeps_for_ultralytics(agnostic: bool):
    """split_predictor.nms (OpenCV's NMSBoxes, one GIL release) keeps the boxes, in the
    order, that ultralytics' non_max_suppression keeps with torchvision's nms: 400 sets
    of up to 300 crowded boxes of up to 80 classes, as a detector's candidates come,
    over three IoU thresholds. Distinct scores: with two equal ones the order of ties is
    torchvision's sort's to choose."""
    rng = np.random.default_rng(7)
    kept_in_all = 0
    for trial in range(400):
        n = int(rng.integers(1, 300))
        centres = rng.uniform(0, 640, (n, 2)).astype(np.float32)
        sizes = rng.uniform(4, 160, (n, 2)).astype(np.float32)
        # Crowds: many boxes around a few places, as a detector proposes them.
        centres[: n // 2] = centres[rng.integers(0, 5, n // 2)] + rng.normal(0, 6, (n // 2, 2))
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
        scores = rng.permutation(np.linspace(0.26, 0.99, n, dtype=np.float32))
        classes = rng.integers(0, 80 if trial % 2 else 3, n)
        iou = (0.45, 0.7, 0.9)[trial % 3]
        offset = 0 if agnostic else classes.astype(np.float32)[:, None] * 7680
        theirs = torch.ops.torchvision.nms(
            torch.from_numpy(boxes + offset), torch.from_numpy(scores), iou
        ).numpy()
        ours = nms(boxes, scores, None if agnostic else classes, iou)
        assert ours.tolist() == theirs.tolist(), trial
        kept_in_all += len(theirs)
    assert kept_in_all > 10_000  # many boxes kept, and many suppressed
    # A photo without candidates: nothing to keep, and no error.
    none = np.zeros((0, 4), np.float32)
    assert nms(none, np.zeros(0, np.float32), np.zeros(0, np.int64), 0.7).tolist() == []


def test_boxes_go_back_to_the_photo_exactly_as_ultralytics_puts_them():
    """to_photo is ultralytics' scale_boxes and clip_boxes in fewer NumPy calls: the
    same float32 values, bit for bit, for boxes inside, across and outside the padding,
    on the letterbox shapes photos of every orientation get."""
    rng = np.random.default_rng(7)
    shapes = [((640, 640), (480, 640)), ((640, 640), (1080, 1920)), ((640, 640), (1600, 1200))]
    shapes += [((640, 640), (517, 333)), ((384, 640), (540, 960)), ((480, 640), (3024, 4032))]
    for input_hw, photo_hw in shapes:
        boxes = rng.uniform(-40, 700, (200, 4)).astype(np.float32)
        boxes[:, 2:] = boxes[:, :2] + rng.uniform(0, 200, (200, 2)).astype(np.float32)
        theirs = scale_boxes(input_hw, boxes.copy(), photo_hw)
        assert np.array_equal(to_photo(boxes, input_hw, photo_hw), theirs), (input_hw, photo_hw)


def test_a_gpus_masks_of_a_reduced_decode_are_a_cpus():
    """A 12 MP photo decoded at 1/4 scale (a GPU pod's CPU decode fallback): on a GPU's
    path (forced here on a CPU's predictor) the boxes come in the photo's pixels and each
    segment is made at the photo's size, as on a CPU: the same boxes and bits. Before,
    the GPU's planes at the frame's size were copied whole to the host and resized."""
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(MODELS / "segment.pt"), "v", "cpu", 320, "segment"))
    cpu, gpu = SplitPredictor(model), SplitPredictor(model)
    gpu._masks_in_boxes = False
    photo_hw = (3024, 4032)
    compared = 0
    for name in ("scene_01.jpg", "scene_02.jpg", "scene_03.jpg"):
        frame = cv2.resize(cv2.imread(str(REPO_ROOT / "samples" / name)), (1008, 756))
        inputs = cpu.preprocess(frame)
        (output,) = cpu.forward([inputs])
        ours = gpu.postprocess(output, inputs, frame, 0.1, photo_hw)
        theirs = cpu.postprocess(output, inputs, frame, 0.1, photo_hw)
        assert ours.orig_shape == theirs.orig_shape == photo_hw
        assert torch.equal(ours.boxes.data, theirs.boxes.data)
        if len(theirs.boxes):
            same_masks(ours, theirs, name)
        compared += len(theirs.boxes)
    assert compared >= 5


def test_an_end_to_end_models_cap_is_reported_whatever_the_class_filter(tmp_path, monkeypatch):
    """An end-to-end export (YOLO26 to ONNX, NMS inside the network) keeps its own top
    rows over every class before any class filter can apply: there a step's filter
    comes after the cap, as in ultralytics' own predict with classes=, and the
    answer's max_detections_reached must say the network was full even when the kept
    class has few of its rows (with the filter applied inside the runner's NMS, it
    said false), or when the config's cap is above the network's own. Random
    weights, so every row scores above a tiny threshold; the export runs offline (no
    simplifier, nothing downloaded)."""
    import warnings

    from ultralytics import YOLO

    from gannet.config_schema import ModelSpec
    from gannet.steps import reached_max

    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)  # a model built from its YAML is exported to the cwd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy ONNX exporter's own deprecations
        exported = YOLO("yolo26n.yaml", task="detect").export(
            format="onnx", imgsz=320, nms=False, simplify=False, dynamic=False
        )
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(exported), "v", "cpu", 320, "detect"))
    split = SplitPredictor(model)
    assert not split._nms_on_host  # ultralytics' own postprocess answers
    image = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    inputs = split.preprocess(image)
    (output,) = split.forward([inputs])
    every = split.postprocess(output, inputs, image, 1e-9, None, 300)
    classes = every.boxes.cls.numpy().astype(int)
    rare = min(set(classes.tolist()), key=lambda c: (classes == c).sum())
    assert len(every.boxes) == 300 and (classes == rare).sum() < 300
    few = split.postprocess(output, inputs, image, 1e-9, None, 300, (model.names[rare],))
    assert few.boxes.data.tolist() == every.boxes.data[classes == rare].tolist()
    spec = ModelSpec(path="x.onnx", max_detections=300)
    assert reached_max([every], spec) and reached_max([few], spec)
    # A cap above the network's own 300 rows: the network's is the one reached.
    more = ModelSpec(path="x.onnx", max_detections=500)
    every = split.postprocess(output, inputs, image, 1e-9, None, 500)
    few = split.postprocess(output, inputs, image, 1e-9, None, 500, (model.names[rare],))
    assert reached_max([every], more) and reached_max([few], more)


@pytest.mark.parametrize("masks_in_boxes", [True, False])
def test_a_segmenters_class_filter_keeps_ultralytics_rows_and_masks(tmp_path, masks_in_boxes):
    """A step's class filter on a segmenter of many classes (the demo's has one): the
    runner's NMS on the host keeps the rows and masks ultralytics' predict keeps with
    classes= and a cap, and makes no mask for the classes it drops (several of the
    random segmenter's 80 classes compete for the cap)."""
    weights = segmenter_of_80_classes(tmp_path / "seg80.pt")
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)
    model, _ = load(ModelKey(str(weights), "v", "cpu", 320, "segment"))
    split = SplitPredictor(model)
    assert split._nms_on_host
    split._masks_in_boxes = masks_in_boxes
    kept = (model.names[1], model.names[5], model.names[42])
    reference = copy.copy(split._predictor)
    reference.args = copy.copy(reference.args)
    reference.args.conf, reference.args.max_det = 0.01, 20
    reference.args.classes = [1, 5, 42]
    image = cv2.imread(str(REPO_ROOT / "samples" / "scene_01.jpg"))
    inputs = split.preprocess(image)
    (output,) = split.forward([inputs])
    ours = split.postprocess(output, inputs, image, 0.01, None, 20, kept)
    with torch.inference_mode():
        (theirs,) = reference.postprocess(output, split._model_input(inputs), [image])
    unfiltered = copy.copy(reference)
    unfiltered.args = copy.copy(reference.args)
    unfiltered.args.classes = None
    with torch.inference_mode():
        (every,) = unfiltered.postprocess(output, split._model_input(inputs), [image])
    assert set(every.boxes.cls.tolist()) - {1.0, 5.0, 42.0}, "the filter drops some rows"
    assert len(theirs.boxes) >= 3 and set(theirs.boxes.cls.tolist()) <= {1.0, 5.0, 42.0}
    np.testing.assert_allclose(ours.boxes.data, theirs.boxes.data, rtol=0, atol=1e-3)
    same_masks(ours, theirs, "seg80")
    assert ours.nms_rows == 20  # NMS filled the cap; rows whose mask is empty went after
