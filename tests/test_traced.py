"""The traced forward pass gives the same answers as ultralytics' eager model.

Real demo models, real sample images; each model is compared with itself before and
after the swap, on batches and on an image of another aspect ratio than the trace's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ultralytics import YOLO

from gannet.pipeline import decode_image
from gannet.settings import REPO_ROOT
from gannet.traced import trace_forward, verified_trace

MODELS = REPO_ROOT / "models" / "demo"
SAMPLES = REPO_ROOT / "samples"


def _images() -> list[np.ndarray]:
    files = [SAMPLES / "scene_01.jpg", SAMPLES / "scene_02.jpg", SAMPLES / "large_01.jpg"]
    return [decode_image(f.read_bytes(), 100_000_000) for f in files]


def _predict(model: YOLO, images: list[np.ndarray], imgsz: int, **extra) -> list:
    batch = model.predict(images[:2], imgsz=imgsz, device="cpu", verbose=False, **extra)
    single = model.predict(images[2], imgsz=imgsz, device="cpu", verbose=False, **extra)
    return [*batch, *single]


@pytest.mark.parametrize(
    ("weights", "task", "imgsz", "extra"),
    [
        ("detect.pt", "detect", 416, {}),
        ("segment.pt", "segment", 320, {"retina_masks": True}),
        ("classify.pt", "classify", 64, {}),
    ],
)
def test_traced_model_answers_like_the_eager_model(weights, task, imgsz, extra):
    model = YOLO(str(MODELS / weights), task=task)
    images = _images()
    eager = _predict(model, images, imgsz, **extra)

    assert trace_forward(model, imgsz, "cpu", half=False)
    assert isinstance(model.predictor.model.backend.model, torch.jit.ScriptModule)
    traced = _predict(model, images, imgsz, **extra)

    if task != "classify":  # a comparison of empty answers only would prove nothing
        assert sum(len(r.boxes) for r in eager) > 0
    for want, got in zip(eager, traced, strict=True):
        if task == "classify":
            assert got.probs.top1 == want.probs.top1
            assert float(got.probs.top1conf) == pytest.approx(float(want.probs.top1conf), 1e-4)
            continue
        assert got.boxes.cls.tolist() == want.boxes.cls.tolist()
        assert torch.allclose(got.boxes.xyxy, want.boxes.xyxy, atol=0.05)
        if task == "segment" and len(want.boxes):
            agree = (got.masks.data == want.masks.data).float().mean()
            assert agree > 0.999


class _BatchOfOneShortcut(torch.nn.Module):
    """Takes a Python branch on the batch size: a trace records only one side of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x * 2
        return x * 3


def test_a_trace_that_disagrees_with_the_eager_module_is_refused():
    example, check = torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert verified_trace(_BatchOfOneShortcut(), example, check, atol=1e-4) is None
    assert verified_trace(torch.nn.Identity(), example, check, atol=1e-4) is not None


def test_a_model_traced_apart_answers_as_one_traced_here_and_leaves_nothing_behind(caplog):
    """Each trace made in a process keeps its module types in torch's global compilation
    unit for good (about 18 MB for this detector): a review's daemon grew from 1.3 to
    2.1 GB over 46 model loads. Once start-up's loads are done the trace is made in a
    child process and loaded here: the unit does not grow, and the model answers as one
    traced in this process. A child that fails is said, and the trace is made here."""
    import sys
    import threading
    from pathlib import Path

    from gannet.model_cache import ModelKey, yolo_loader
    from gannet.traced import trace_apart

    apart = threading.Event()
    load = yolo_loader(lambda uri, version: Path(uri), trace_apart=apart)
    key = ModelKey(str(MODELS / "detect.pt"), "1", "cpu", 416, "detect", tenant="acme")
    here, _ = load(key)
    images = _images()
    want = _predict(here, images, 416)
    apart.set()
    held = len(torch.jit._state._python_cu.get_functions())
    for version in ("2", "3"):
        model, _ = load(ModelKey(key.uri, version, "cpu", 416, "detect", tenant="acme"))
        traced = model.predictor.model.backend.model
        assert isinstance(traced, torch.jit.ScriptModule)
        assert len(torch.jit._state._python_cu.get_functions()) == held, "left behind"
    got = _predict(model, images, 416)
    assert sum(len(r.boxes) for r in want) > 0
    for a, b in zip(want, got, strict=True):
        assert b.boxes.cls.tolist() == a.boxes.cls.tolist()
        assert torch.allclose(b.boxes.xyxy, a.boxes.xyxy, atol=0.05)

    # One copy of the weights: the eager network, which CUDA graphs keep behind the
    # trace, is given the loaded trace's tensors (it held a copy of its own).
    shared = YOLO(str(MODELS / "detect.pt"), task="detect")
    shared.predict(images[0], imgsz=416, device="cpu", verbose=False)
    eager = shared.predictor.model.model
    child = [sys.executable, "-m", "gannet.trace_child", str(MODELS / "detect.pt"), "detect"]
    assert trace_apart(shared, [*child, "416", "cpu", "safe"], "cpu", 416, half=False)
    traced = shared.predictor.model.backend.model
    mine = {t.untyped_storage().data_ptr() for t in eager.parameters()}
    assert {t.untyped_storage().data_ptr() for t in traced.parameters()} == mine

    fresh = YOLO(str(MODELS / "detect.pt"), task="detect")
    fresh.predict(images[0], imgsz=416, device="cpu", verbose=False)
    failing = [sys.executable, "-c", "import sys; sys.exit('no GPU here')"]
    assert trace_apart(fresh, failing, "cpu", 416, half=False)
    assert isinstance(fresh.predictor.model.backend.model, torch.jit.ScriptModule)
    (said,) = [r for r in caplog.records if "traced here" in r.getMessage()]
    assert "no GPU here" in said.fields["error"]
