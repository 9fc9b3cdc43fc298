"""Runs one task: fetch the image, then the steps its industry config names.

The pipeline is where a Task becomes a result dict. It raises PermanentError for bad
input and TransientError for dependencies that may come back; it never acks anything.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from gannet.errors import ErrorCode, PermanentError
from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, ModelResolver
from gannet.pipeline_config import Configs, LoadedConfig, ModelKind, open_configs
from gannet.settings import Settings
from gannet.steps import STEPS, StepContext
from gannet.storage import Storage, check_image_url, local_version, read_local
from gannet.task import Task, utc_now_iso

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    allowed_buckets: list[str]
    max_image_bytes: int
    max_image_pixels: int


def _pil_open() -> Callable[..., Image.Image]:
    """PIL's own Image.open. Importing ultralytics replaces it with a version that, on
    bytes PIL cannot identify, tries to install and import pi-heif: decoding untrusted
    uploads must fail as undecodable instead, and must never install anything."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """BGR pixels, upright per EXIF, as ultralytics wants them.

    The header is read first (PIL, lazy) so an oversized image is refused before its
    pixels are decoded; OpenCV then decodes about 4x faster than PIL would, straight to
    BGR, and applies the EXIF orientation itself.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = _pil_open()(io.BytesIO(data)).size
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
        configs: Configs,
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
        loaded = self.configs.for_tenant(task.tenant_id)
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
        return self.run_image(task, loaded, image, device, timer, started)

    def run_image(
        self,
        task: Task,
        loaded: LoadedConfig,
        image: np.ndarray,
        device: str,
        timer: Timer,
        started: float | None = None,
    ) -> dict[str, Any]:
        """The steps of task.pipeline on a decoded image, as the result JSON."""
        started = time.perf_counter() if started is None else started

        def predict(kind: ModelKind, images: list[np.ndarray], conf: float) -> list[Any]:
            key = self.resolver.key(loaded, kind, task.tenant_id, device)
            return self.cache.predict(key, images, conf)

        ctx = StepContext(task=task, image=image, config=loaded.config, predict=predict)
        for spec in loaded.config.steps_for(task.pipeline):
            step = STEPS[spec.name]
            ctx.params = spec.parsed or step.params.model_validate(spec.params)
            with timer.stage(spec.name):
                step.fn(ctx)
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
        """Load every enabled model of every served industry on every device before the
        stream opens (per-tenant models load on first use)."""
        for loaded in self.configs.served():
            for device in devices:
                for kind in loaded.config.enabled_models():
                    self.cache.get(self.resolver.key(loaded, kind, None, device))


def config_uri(settings: Settings) -> str:
    """GANNET_CONFIG_URI, or gs://MODELS_BUCKET/INDUSTRY/config.yaml when only the
    industry and the models bucket are given (the usual single-industry deployment)."""
    explicit = "config_uri" in settings.model_fields_set
    if not explicit and settings.industry and settings.models_bucket:
        return f"gs://{settings.models_bucket}/{settings.industry}/config.yaml"
    return settings.config_uri


def build_configs(settings: Settings, storage: Storage, metrics: Metrics) -> Configs:
    """The daemon's config source: one industry, or a deployment naming several, from a
    local path (checked every 5 s) or gs:// (checked every 30 s, by generation)."""
    uri = config_uri(settings)
    on_reload = lambda result: metrics.config_reloads.labels(result).inc()  # noqa: E731
    if uri.startswith("gs://"):
        read, version_of, every = storage.read_url, storage.generation, 30.0
    else:
        read, version_of, every = read_local, local_version, 5.0
    return open_configs(uri, read, version_of, settings.industry, every, on_reload)
