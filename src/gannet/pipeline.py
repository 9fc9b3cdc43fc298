"""Runs one task: fetch the image, then the steps its industry config names.

The pipeline is where a Task becomes a result dict. It raises PermanentError for bad
input and TransientError for dependencies that may come back; it never acks anything.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from gannet.config_schema import ConfigError, ModelKind
from gannet.config_sources import Configs, LoadedConfig
from gannet.device_decode import DeviceDecoder
from gannet.errors import ErrorCode, PermanentError, TransientError
from gannet.frames import Frame, frame_size, upright
from gannet.image_header import Header, pil_open, read_header
from gannet.model_cache import ModelCache, ModelKey
from gannet.model_resolver import ModelResolver
from gannet.stages import Timer
from gannet.step_registry import Plan, StepContext
from gannet.storage import Storage, check_image_url
from gannet.task import Task, utc_now_iso
from gannet.tracing import annotate

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class Run(Protocol):
    """How a decode runs: `here`, or Offload.run."""

    def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...


@dataclass(frozen=True)
class Route:
    """Where a task goes: the config that serves its tenant and its pipeline's steps,
    looked up once by the cheap checks and carried to the runner."""

    loaded: LoadedConfig
    plan: Plan
    decode_floor: int | None = None  # see decode_scaled; None: decode at full size


@dataclass(frozen=True)
class Limits:
    allowed_buckets: list[str]
    max_image_bytes: int
    max_image_pixels: int


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """BGR pixels at full size, upright per EXIF, as ultralytics wants them."""
    return decode_scaled(data, max_pixels, None)[0]


# JPEGs are decoded at 1/8, 1/4 or 1/2 of the size (libjpeg's DCT scaling), OpenCV's
# flag for each when OpenCV decodes; the smallest that keeps the floor is taken.
_REDUCED: dict[int, int] = {
    8: cv2.IMREAD_REDUCED_COLOR_8,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    2: cv2.IMREAD_REDUCED_COLOR_2,
}


def reduced_factor(header: Header, floor: int | None) -> int:
    """1/factor is the scale decode_scaled decodes this image at on the CPU: 2, 4 or 8
    for a JPEG whose longer side stays at least `floor` pixels so, else 1 (other formats
    decode in full, then resize: no gain; a lossless JPEG has no DCT to scale, and
    libjpeg-turbo asked to scale one overflowed simplejpeg's buffer: Header.lossless).

    Only a factor that divides both sides: each pixel libjpeg decodes at 1/f is f x f of
    the photo's, the last row and column too, which reach past a side f does not divide
    (2401 px at 1/8: 301 pixels, 2408 of the photo's). The factors back to the photo's
    pixels, its side over the decoded one's (7.977), then put what lies at x = 2000 at
    1994.2, and a box near that side up to f - 1 px short of it; a detection on a
    5001x3751 photo moved by up to 11 px from the full decode's answer."""
    if not floor or header.format != "JPEG" or header.lossless:
        return 1
    width, height = header.size
    longer = max(width, height)
    fits = (f for f in _REDUCED if longer // f >= floor and width % f == 0 == height % f)
    return next(fits, 1)


# Photos from this size on (phones' 12 MP, drones') are decoded through `decode_run`: their
# decode takes several scheduler ticks, long enough to hold a core that a thread with
# the GIL waits for. A smaller one's (an HD frame: a few ms) stays on its runner, where
# the hand-over would cost more than it saves.
OFFLOAD_MIN_PIXELS = 4_000_000


def here(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Runs a decode on the calling thread: how decode_scaled runs one unless given
    Offload.run, which runs it on a thread of lower priority (offload.py)."""
    return fn(*args, **kwargs)


def decode_scaled(
    data: bytes,
    max_pixels: int,
    floor: int | None,
    header: Header | None = None,
    run: Run = here,
) -> tuple[np.ndarray, tuple[float, float]]:
    """BGR pixels, upright per EXIF, and the (x, y) factors back to the photo's pixels:
    both the reduced scale's denominator, exactly (reduced_factor divides both sides).

    The header is read first (image_header.py) so an oversized image is refused before its
    pixels are decoded. With a `floor` (step_registry.decode_floor: a margin over the
    model input's side, for plans whose steps all report in the photo's pixels), a JPEG
    whose longer side is at least twice the floor is decoded at 1/2, 1/4 or 1/8 scale,
    never below the floor: the model would shrink it that far anyway, and the decoder
    skips most of the work (a 4032x3024 photo: 36 ms of CPU at full size, 17.5 at 1/4).
    `header`: what read_header returned for `data`, when the caller has it.

    A JPEG goes to libjpeg-turbo through simplejpeg (_decode_jpeg); anything else, and
    any JPEG it refuses, to OpenCV, which also decodes about 4x faster than PIL would.
    Either decoder is called through `run`.
    """
    header = header or read_header(data, max_pixels)
    kind = header.format
    factor = reduced_factor(header, floor)
    flags = _REDUCED.get(factor, cv2.IMREAD_COLOR)
    if kind == "JPEG":
        decoded = _decode_jpeg(data, header, factor, run)
        if decoded is not None:
            return decoded
    if kind == "GIF":
        return run(_decode_gif, data), (1.0, 1.0)
    try:
        image = run(cv2.imdecode, np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:  # its checks raise rather than answer None (a side over 2**20)
        reason = str(exc).strip().splitlines()[-1]
        if exc.code == cv2.Error.StsNoMem:  # an allocation that failed: not the image's fault
            raise TransientError(ErrorCode.OUT_OF_MEMORY, f"OpenCV: {reason}") from exc
        raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, f"OpenCV refused it: {reason}") from exc
    if image is None:
        raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, "the image data is corrupt")
    if kind == "AVIF":  # the one format whose turn OpenCV leaves undone
        image = upright(image, header.orientation or 1)
    return image, (float(factor), float(factor))  # factor divides both sides: exact


def _decode_jpeg(
    data: bytes, header: Header, factor: int, run: Run = here
) -> tuple[np.ndarray, tuple[float, float]] | None:
    """A JPEG decoded by libjpeg-turbo straight to BGR at 1/`factor` scale, then turned
    upright as OpenCV would; None when simplejpeg refuses it (corrupt or truncated data:
    strict, so a file libjpeg only warns about is refused too) or its EXIF cannot be
    read, and OpenCV then decodes it, or fails, exactly as before.

    Why not OpenCV for these: the pixels are the same bit for bit (tests/test_decode.py),
    but OpenCV spends about twice the CPU on a large photo at full size (4032x3024: 62
    against 35 ms, what segmentation and sliced detection pay), 1.16 against 1.00 ms on
    a 640x480 one, and about 5 % more at reduced scale (docs/benchmark.md). Both release
    the GIL while they decode.
    """
    orientation = header.orientation
    if orientation is None:
        return None
    width, height = header.size
    try:
        image = run(
            simplejpeg.decode_jpeg,
            data,
            "BGR",
            min_height=-(-height // factor),
            min_width=-(-width // factor),
        )
    except ValueError as exc:
        log.debug("libjpeg-turbo refused a JPEG (%s); decoding with OpenCV", exc)
        return None
    return upright(image, orientation), (float(factor), float(factor))  # as decode_scaled


def _decode_gif(data: bytes) -> np.ndarray:
    """A GIF's first frame by PIL's decoder (C; its walk to the frame is bounded by
    read_header's), as OpenCV would give it: BGR through the palette, a transparent
    pixel in the colour of the logical screen's background.

    Why not OpenCV: its GIF decoder resets its whole string table at each clear code,
    about 5 us each, and a crafted file can be all clear codes (3 bits each): 376 kB of
    a million took 4.9 s of CPU, a 14 MB 5000x5000 GIF of 12.5 million 70.8 s; PIL
    decodes that one in 0.21 s. On plain GIFs PIL is also about 5x faster (a 25 MP
    one of noise: 0.14 against 0.76 s)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size checked
            with pil_open()(io.BytesIO(data), formats=("GIF",)) as image:
                image.load()
                index = np.asarray(image)  # "P" or "L": a byte a pixel
                palette = image.getpalette("RGB") if image.mode == "P" else None
                transparent = image.info.get("transparency")
    except MemoryError as exc:
        raise TransientError(ErrorCode.OUT_OF_MEMORY, "PIL: out of memory") from exc
    except Exception as exc:  # PIL's decoder raises what it likes on a corrupt file
        raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, "the image data is corrupt") from exc
    if palette is None:
        return cv2.cvtColor(index, cv2.COLOR_GRAY2BGR)
    colours = np.zeros((256, 3), np.uint8)
    colours.flat[: min(len(palette), 768)] = palette[:768]
    if isinstance(transparent, int) and transparent < 256 and data[10] & 0x80:
        at = 13 + 3 * data[11]  # the background's colour, in the global palette
        colours[transparent] = np.frombuffer(data[at : at + 3].ljust(3, b"\0"), np.uint8)
    lut = np.ascontiguousarray(colours[:, ::-1]).reshape(1, 256, 3)  # BGR
    return cv2.LUT(cv2.merge([index, index, index]), lut)


class Pipeline:
    def __init__(
        self,
        configs: Configs,
        storage: Storage,
        cache: ModelCache,
        resolver: ModelResolver,
        limits: Limits,
        decoders: Mapping[str, DeviceDecoder] | None = None,
        decode_run: Run = here,
    ) -> None:
        """`decoders`: by runner device, where JPEGs are decoded on the device itself
        (the daemon's CUDA devices, unless GANNET_GPU_DECODE is off); `decode_run`: how
        the CPU's decode of a photo of OFFLOAD_MIN_PIXELS or more runs (Offload.run: on
        threads that yield their core to the GIL's holder)."""
        self.decoders = decoders or {}
        self.decode_run = decode_run
        self.configs = configs
        self.storage = storage
        self.cache = cache
        self.resolver = resolver
        self.limits = limits
        # A tenant's own model, by the config its class filters were checked against: a
        # key per tenant model, generation and device, so emptied now and then over a
        # pod's life (a check again is a lookup of a loaded model's names).
        self._tenant_checked: dict[ModelKey, LoadedConfig] = {}

    def check(self, task: Task) -> Route:
        """The cheap permanent checks, done before any download: tenant, pipeline, image
        URL. Poison never takes a runner."""
        loaded = self.configs.for_tenant(task.tenant_id)
        plan = loaded.plan(task.pipeline)
        check_image_url(task.image_url, task.tenant_id, self.limits.allowed_buckets)
        return Route(loaded, plan, loaded.decode_floors[task.pipeline])

    def run(self, task: Task, route: Route, device: str, timer: Timer) -> dict[str, Any]:
        """Fetch, decode and run the steps; `route` is what check() returned for this task."""
        started = time.perf_counter()
        with timer.stage("fetch"):
            data = self.storage.read(task.image_url, self.limits.max_image_bytes)
        with timer.stage("decode"):
            frame, scale = self.decode(data, route, device)
            if timer.spans is not None:
                height, width = frame_size(frame)
                annotate({"image.bytes": len(data), "image.width": width, "image.height": height})
        return self.run_image(task, route, frame, device, timer, started, scale)

    def decode(self, data: bytes, route: Route, device: str) -> tuple[Frame, tuple[float, float]]:
        """On a device with a decoder, a JPEG becomes a frame in device memory at full
        size (the GPU letterboxes it); anything else, or a JPEG the device refuses, is
        decoded on the CPU (decode_scaled). Where the device has no JPEG engine, so also
        a JPEG the CPU decodes at reduced scale: there nvJPEG would spend as much CPU on
        its Huffman stage, but on one thread (device_decode.py). A CMYK or YCCK JPEG
        too: nvJPEG converts their colours only when asked (nvjpegDecodeParamsSetAllowCMYK,
        which torchvision never calls); unasked, it decodes them without an error, in
        wrong colours (NVIDIA's forum: the CMY channels taken as YCbCr)."""
        header = read_header(data, self.limits.max_image_pixels)
        decoder = self.decoders.get(device)
        if (
            decoder is not None
            and header.format == "JPEG"
            and not header.cmyk
            and (decoder.engine or reduced_factor(header, route.decode_floor) == 1)
        ):
            orientation = header.orientation
            frame = decoder.decode(data, orientation, device) if orientation is not None else None
            if frame is not None:
                return frame, (1.0, 1.0)
        width, height = header.size
        run = self.decode_run if width * height >= OFFLOAD_MIN_PIXELS else here
        return decode_scaled(data, self.limits.max_image_pixels, route.decode_floor, header, run)

    def run_image(
        self,
        task: Task,
        route: Route,
        frame: Frame,
        device: str,
        timer: Timer,
        started: float | None = None,
        scale: tuple[float, float] = (1.0, 1.0),
    ) -> dict[str, Any]:
        """The steps of the task's pipeline on a decoded frame, as the result JSON;
        `scale` maps the frame's pixels to the photo's (see decode_scaled)."""
        started = time.perf_counter() if started is None else started
        loaded = route.loaded

        def predict(
            kind: ModelKind,
            frames: list[Frame],
            conf: float,
            photo_hw: tuple[int, int] | None = None,
            classes: Sequence[str] = (),
        ) -> list[Any]:
            key = self.resolver.key(loaded, kind, task.tenant_id, device)
            if key.tenant is not None and self._tenant_checked.get(key) is not loaded:
                self._check_tenant_model(loaded, kind, key)
            max_det = loaded.config.models[kind].max_detections
            return self.cache.predict(key, frames, conf, timer, photo_hw, max_det, classes)

        ctx = StepContext(
            task=task, frame=frame, config=loaded.config, predict=predict, scale=scale
        )
        for step in route.plan:
            with timer.stage(step.name):
                step.run(ctx)
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
        stream opens (per-tenant models load on first use); and each device's JPEG
        decoder, whose first call sets nvJPEG up."""
        blank = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
        for decoder in set(self.decoders.values()):  # one per process (device_decode.py)
            decoder.decode(blank)
        for loaded in self.configs.served():
            self.load_models(loaded, devices)

    def load_models(self, loaded: LoadedConfig, devices: list[str]) -> None:
        """load_models with this pipeline's cache: at start-up, and before a reloaded
        config is served (ConfigSource.check_models_with), so a config whose models
        cannot serve is refused instead of failing its tasks."""
        load_models(loaded, self.cache, self.resolver, devices)

    def _check_tenant_model(self, loaded: LoadedConfig, kind: ModelKind, key: ModelKey) -> None:
        """A tenant's own model loads on first use, not at start: its class names are
        checked against the config's filters then, as an industry model's are before it
        serves (load_models). One that lacks a class they name (a model trained with
        other names) answered every task without that class, as a success; now its
        tasks are refused (tenant_model_invalid: a failed row and a dead letter naming
        the model and the classes, to replay) until a corrected upload (a new
        generation, a new key) serves them."""
        check_tenant_model(loaded, kind, key, self.cache.get(key, self.cache.load_wait_s).names)
        if len(self._tenant_checked) >= 4096:
            self._tenant_checked.clear()
        self._tenant_checked[key] = loaded


def load_models(
    loaded: LoadedConfig, cache: ModelCache, resolver: ModelResolver, devices: list[str]
) -> None:
    """Load every enabled industry model of `loaded` on every device, or ConfigError
    naming the config, the model and why. A class filter (the
    model's, or a step's) naming a class the model does not have is a ConfigError too:
    it can never match, and a typo in it (`sqaure`) dropped every box of that class from
    every answer, as successes. The daemon's check, and `gannet config check`'s."""
    for device in devices:
        for kind in loaded.config.enabled_models():
            uri = loaded.model_uri(loaded.config.models[kind])
            try:
                model = cache.get(resolver.key(loaded, kind, None, device))
            except TransientError as exc:
                raise ConfigError(
                    f"{loaded.uri}: models.{kind}: {uri} cannot be loaded on {device}: "
                    f"{exc.message}"
                ) from exc
            _check_class_filters(loaded, kind, model.names, uri)


def check_tenant_model(
    loaded: LoadedConfig, kind: ModelKind, key: ModelKey, names: Mapping[int, str]
) -> None:
    """PermanentError(tenant_model_invalid) when a class filter of `loaded` names a class
    the tenant's own model (`key`, whose classes are `names`) does not have."""
    try:
        _check_class_filters(loaded, kind, names, key.uri)
    except ConfigError as exc:
        raise PermanentError(
            ErrorCode.TENANT_MODEL_INVALID,
            f"tenant {key.tenant}'s own model (generation {key.version}): {exc}; "
            "upload a fixed one, then republish",
        ) from exc


def load_tenant_models(
    loaded: LoadedConfig, cache: ModelCache, resolver: ModelResolver, tenant: str, device: str
) -> list[ModelKey]:
    """Each of `tenant`'s own models that `loaded` would serve it, loaded and checked as
    on the tenant's first task (the load's checks, then the class filters); the keys,
    none where it has none. PermanentError(tenant_model_invalid) for one that cannot
    serve, TransientError where GCS or the load fails for now. `gannet config check
    --tenant`'s."""
    keys = []
    for kind in loaded.config.enabled_models():
        key = resolver.key(loaded, kind, tenant, device)
        if key.tenant is not None:
            check_tenant_model(loaded, kind, key, cache.get(key).names)
            keys.append(key)
    return keys


def _check_class_filters(
    loaded: LoadedConfig, kind: ModelKind, model_names: Mapping[int, str], uri: str
) -> None:
    """ConfigError naming the field of a class filter, for `kind`'s model (at `uri`),
    that names a class outside `model_names` (the model's)."""
    config = loaded.config
    names = set(model_names.values())
    filters = [(f"models.{kind}.classes", config.models[kind].classes)]
    for pipeline, plan in loaded.plans.items():
        for i, bound in enumerate(plan):
            classes = getattr(bound.params, "classes", None)
            if kind in bound.step.needs and classes is not None:
                filters.append((f"pipelines.{pipeline}.{i}.params.classes", classes))
    for field, classes in filters:
        unknown = [name for name in classes if name not in names]
        if unknown:
            listed = ", ".join(map(repr, unknown))
            what = "is not a class" if len(unknown) == 1 else "are not classes"
            known = sorted(names)  # an ImageNet classifier's are a thousand: the first 20
            more = f" and {len(known) - 20} more" if len(known) > 20 else ""
            raise ConfigError(
                f"{loaded.uri}: {field}: {listed} {what} of {uri} "
                f"(its classes: {', '.join(known[:20])}{more})"
            )
