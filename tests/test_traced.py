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
