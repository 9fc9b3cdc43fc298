"""Runs one task: fetch the image, then the steps its industry config names.

The pipeline is where a Task becomes a result dict. It raises PermanentError for bad
input and TransientError for dependencies that may come back; it never acks anything.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from gannet.errors import ErrorCode, PermanentError
from gannet.model_cache import ModelCache, ModelResolver
from gannet.pipeline_config import ConfigSource, LoadedConfig, ModelKind
from gannet.steps import STEPS, StepContext
from gannet.storage import Storage, check_image_url
from gannet.task import Task, utc_now_iso

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    allowed_buckets: list[str]
    max_image_bytes: int
    max_image_pixels: int


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """BGR pixels, upright per EXIF, as ultralytics wants them.

    The header is read first (PIL, lazy) so an oversized image is refused before its
    pixels are decoded; OpenCV then decodes about 4x faster than PIL would, straight to
    BGR, and applies the EXIF orientation itself.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PermanentError(ErrorCode.IMAGE_TOO_LARGE, str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE, f"not a decodable image ({exc.__class__.__name__})"
        ) from exc
    if width * height > max_pixels:
        raise PermanentError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} pixels; the limit is {max_pixels} pixels",
        )
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, "the image data is corrupt")
    return image


class Timer:
    def __init__(self, observe: Callable[[str, float], None]) -> None:
        self.timings: dict[str, float] = {}
        self._observe = observe

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.started
        self.timer.timings[f"{self.name}_ms"] = round(seconds * 1000, 2)
        self.timer._observe(self.name, seconds)


class Pipeline:
    def __init__(
        self,
        configs: ConfigSource,
        storage: Storage,
        cache: ModelCache,
        resolver: ModelResolver,
        limits: Limits,
    ) -> None:
        self.configs = configs
        self.storage = storage
        self.cache = cache
        self.resolver = resolver
        self.limits = limits

    def check(self, task: Task) -> LoadedConfig:
        """The cheap permanent checks, done before any download."""
        loaded = self.configs.current()
        loaded.config.check_tenant(task.tenant_id)
        loaded.config.steps_for(task.pipeline)
        check_image_url(task.image_url, task.tenant_id, self.limits.allowed_buckets)
        return loaded

    def run(self, task: Task, loaded: LoadedConfig, device: str, timer: Timer) -> dict[str, Any]:
        """Fetch and run the steps; `loaded` is what check() returned for this task."""
        started = time.perf_counter()
        bucket, name = check_image_url(task.image_url, task.tenant_id, self.limits.allowed_buckets)
        with timer.stage("fetch"):
            data = self.storage.read(bucket, name, self.limits.max_image_bytes)
        with timer.stage("decode"):
            image = decode_image(data, self.limits.max_image_pixels)

        def predict(kind: ModelKind, images: list[np.ndarray], conf: float) -> list[Any]:
            key = self.resolver.key(loaded, kind, task.tenant_id, device)
            return self.cache.predict(key, images, conf)

        ctx = StepContext(task=task, image=image, config=loaded.config, predict=predict)
        for spec in loaded.config.steps_for(task.pipeline):
            ctx.params = spec.params
            with timer.stage(spec.name):
                STEPS[spec.name].fn(ctx)
        return {
            "task_id": task.task_id,
            "tenant_id": task.tenant_id,
            "pipeline": task.pipeline,
            "image_url": task.image_url,
            "session_id": task.session_id,
            "image_id": task.image_id,
            "industry": loaded.config.industry,
            "config_version": str(loaded.config.version),
            **ctx.result,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "processed_at": utc_now_iso(),
        }

    def warm(self, devices: list[str]) -> None:
        """Load every enabled model on every device before the stream opens."""
        loaded = self.configs.current()
        for device in devices:
            for kind in loaded.config.enabled_models():
                self.cache.get(self.resolver.key(loaded, kind, None, device))
