"""The step registry: what a step is, and the check that turns a config's pipelines into
plans of typed, bound steps.

A config names steps by string; the registry is the one place that knows which names
exist, which models they need, which steps must come before them and what params they
take. It compiles every pipeline once, when the config loads, into a Plan: each step
bound to its own validated params model. A typo in a param is then a config error naming
the file and field, never a task failing at 3 a.m., and a step at run time receives its
typed params and never re-validates or defaults them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gannet.config_schema import IndustryConfig, ModelKind, ModelSpec
from gannet.frames import Frame, frame_size
from gannet.masks import SegmentMask
from gannet.task import MIN_CONFIDENCE, Task


class Predict(Protocol):
    """Predictions of the tenant's model of `kind` on its device, one per frame.
    `photo_hw`, `classes`: see ModelCache.predict."""

    def __call__(
        self,
        kind: ModelKind,
        frames: list[Frame],
        conf: float,
        photo_hw: tuple[int, int] | None = None,
        classes: Sequence[str] = (),
    ) -> list[Any]: ...


class StepParams(BaseModel):
    """Params every step accepts: none. Subclasses add their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelStepParams(StepParams):
    """A step's own threshold and class filter win over its model's (the task's
    options.confidence_override still wins over both)."""

    confidence_threshold: float | None = Field(None, ge=MIN_CONFIDENCE, le=1.0)
    classes: list[str] | None = None


@dataclass
class StepContext:
    """One task's image and what its steps have produced so far."""

    task: Task
    frame: Frame  # the decoded photo, on the host or the model's device (frames.py)
    config: IndustryConfig
    predict: Predict
    result: dict[str, Any] = field(default_factory=dict)
    # Between steps, never serialised: segment masks at the photo's resolution, each the
    # crop of its box.
    segment_masks: list[SegmentMask] | None = None
    # A detection step's min_segment_overlap, where it gives its detections segments: a
    # segmentation step after it assigns them (steps._assign_segments) with this.
    segment_overlap: float | None = None
    # (x, y) from the frame's pixels to the photo's: not 1 when the photo was decoded at
    # a reduced scale (only for plans of scalable steps; pipeline.decode_scaled).
    scale: tuple[float, float] = (1.0, 1.0)

    @property
    def size(self) -> tuple[int, int]:
        """The frame's (height, width) in pixels."""
        return frame_size(self.frame)

    @property
    def image_size(self) -> list[int]:
        """The photo's [width, height], whatever scale it was decoded at."""
        height, width = self.photo_hw
        return [width, height]

    @property
    def photo_hw(self) -> tuple[int, int]:
        """The photo's (height, width), whatever scale it was decoded at."""
        height, width = self.size
        return round(height * self.scale[1]), round(width * self.scale[0])

    def threshold(self, spec: ModelSpec, params: ModelStepParams) -> float:
        """confidence_override (task) > the step's threshold > the model's threshold."""
        override = self.task.options.confidence_override
        if override is not None:
            return override
        step = params.confidence_threshold
        return spec.confidence_threshold if step is None else step

    def classes(self, spec: ModelSpec, params: ModelStepParams) -> list[str]:
        """The step's class filter if it has one, else the model's; empty keeps all."""
        return spec.classes if params.classes is None else params.classes

    def model_spec(self, kind: ModelKind) -> ModelSpec:
        return self.config.models[kind]


P = TypeVar("P", bound=StepParams)
StepFn = Callable[[StepContext, P], None]


@dataclass(frozen=True)
class Step(Generic[P]):
    name: str
    fn: Callable[[StepContext, P], None]
    params: type[P]
    needs: tuple[ModelKind, ...] = ()
    after: tuple[str, ...] = ()  # at least one of these must run earlier in the pipeline
    # Right on an image decoded at a reduced scale: it reports pixels through ctx.scale
    # and its models would shrink the photo to their input anyway.
    scalable: bool = False


@dataclass(frozen=True)
class BoundStep(Generic[P]):
    """A step of one pipeline with the params the config gave it, validated."""

    step: Step[P]
    params: P

    @property
    def name(self) -> str:
        return self.step.name

    def run(self, ctx: StepContext) -> None:
        self.step.fn(ctx, self.params)


Plan = tuple[BoundStep[Any], ...]


# How much larger than the model's input a reduced decode stays. Against the full
# decode's answers on 40 scenes of 12 MP (docs/benchmark.md): a frame 1.6 times a 640
# input (1/4 scale) kept 97 % of boxes within 2 px; a frame 1.2 times a 416 input (1/8)
# only 77 %, and 2.4 times it (1/4) 97 % again, for 3 ms more of decode.
DECODE_MARGIN = 1.5


def decode_floor(config: IndustryConfig, plan: Plan) -> int | None:
    """The smallest longer side a photo may be decoded at for this plan: 1.5 times the
    largest input of the models it uses, when every step reports in the photo's pixels
    from a reduced image (detection, segmentation, estimation); None (full size) when a
    step needs every pixel (sliced detection's tiles, classification's crops)."""
    if not all(bound.step.scalable for bound in plan):
        return None
    sizes = [config.models[kind].imgsz for bound in plan for kind in bound.step.needs]
    return math.ceil(DECODE_MARGIN * max(sizes)) if sizes else None


class Registry:
    def __init__(self) -> None:
        self._steps: dict[str, Step[Any]] = {}

    def register(
        self,
        name: str,
        params: type[P],
        needs: tuple[ModelKind, ...] = (),
        after: tuple[str, ...] = (),
        scalable: bool = False,
    ) -> Callable[[StepFn[P]], StepFn[P]]:
        def add(fn: StepFn[P]) -> StepFn[P]:
            self._steps[name] = Step(name, fn, params, needs, after, scalable)
            return fn

        return add

    def __contains__(self, name: object) -> bool:
        return name in self._steps

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._steps))

    def compile(self, config: IndustryConfig) -> Mapping[str, Plan]:
        """Every pipeline of `config` as a plan, or ValueError naming the pipeline, the
        step and (for params) the field."""
        return {name: self._plan(config, name) for name in config.pipelines}

    def _plan(self, config: IndustryConfig, pipeline: str) -> Plan:
        specs = config.pipelines[pipeline]
        if not specs:
            raise ValueError(f"pipeline {pipeline!r} has no steps")
        plan: list[BoundStep[Any]] = []
        for i, spec in enumerate(specs):
            step = self._steps.get(spec.name)
            if step is None:
                known = ", ".join(self)
                raise ValueError(
                    f"pipeline {pipeline!r}: unknown step {spec.name!r} (known: {known})"
                )
            for kind in step.needs:
                model = config.models.get(kind)
                if model is None or not model.enabled:
                    raise ValueError(
                        f"pipeline {pipeline!r}: step {spec.name!r} needs an enabled models.{kind}"
                    )
            if step.after and not any(b.name in step.after for b in plan):
                raise ValueError(
                    f"pipeline {pipeline!r}: step {spec.name!r} must come after one of "
                    f"{', '.join(step.after)}"
                )
            try:
                params = step.params.model_validate(spec.params)
            except ValidationError as exc:
                raise ValueError(
                    "; ".join(
                        f"pipelines.{pipeline}.{i}.params."
                        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                        for err in exc.errors()
                    )
                ) from None
            plan.append(BoundStep(step, params))
        return tuple(plan)
