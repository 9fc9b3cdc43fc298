"""The processors a pipeline is made of, registered by name for the industry config.

Each step is a function of a StepContext: it reads the image and earlier steps' output,
asks for model predictions through the context (which knows tenant and device), and
writes its own key of the result. Steps know nothing about Pub/Sub or SQL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gannet.pipeline_config import IndustryConfig, ModelKind, ModelSpec
from gannet.task import Task

Predict = Callable[[ModelKind, list[np.ndarray], float], list[Any]]


@dataclass
class StepContext:
    task: Task
    image: np.ndarray  # HxWx3 BGR, as ultralytics expects
    config: IndustryConfig
    predict: Predict
    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    def threshold(self, spec: ModelSpec) -> float:
        """The task's confidence_override wins over the config's threshold."""
        override = self.task.options.confidence_override
        return spec.confidence_threshold if override is None else override

    def model_spec(self, kind: ModelKind) -> ModelSpec:
        return self.config.models[kind]


StepFn = Callable[[StepContext], None]


@dataclass(frozen=True)
class Step:
    name: str
    fn: StepFn
    needs: tuple[ModelKind, ...]


STEPS: dict[str, Step] = {}


def register(name: str, needs: tuple[ModelKind, ...] = ()) -> Callable[[StepFn], StepFn]:
    def add(fn: StepFn) -> StepFn:
        STEPS[name] = Step(name, fn, needs)
        return fn

    return add


def boxes_to_detections(
    result: Any, conf: float, keep: list[str], offset: tuple[float, float] = (0.0, 0.0)
) -> list[dict[str, Any]]:
    """Plain-JSON detections from one ultralytics result, filtered by threshold and class."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    xyxy = boxes.xyxy.cpu().numpy()
    confs = boxes.conf.cpu().numpy()
    classes = boxes.cls.cpu().numpy().astype(int)
    dx, dy = offset
    out = []
    for (x1, y1, x2, y2), score, cls in zip(xyxy, confs, classes, strict=True):
        name = result.names[int(cls)]
        if score < conf or (keep and name not in keep):
            continue
        out.append(
            {
                "class": name,
                "confidence": round(float(score), 4),
                "box": [round(float(v), 1) for v in (x1 + dx, y1 + dy, x2 + dx, y2 + dy)],
            }
        )
    return out


def count_by_class(items: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(item["class"] for item in items).items()))


@register("detection", needs=("detection",))
def detection(ctx: StepContext) -> None:
    spec = ctx.model_spec("detection")
    conf = ctx.threshold(spec)
    (result,) = ctx.predict("detection", [ctx.image], conf)
    found = boxes_to_detections(result, conf, spec.classes)
    ctx.result["detection"] = {
        "detections": found,
        "counts": count_by_class(found),
        "confidence_threshold": conf,
        "image_size": [int(ctx.image.shape[1]), int(ctx.image.shape[0])],
    }
