"""Loaded models, one copy per (model, version, device), shared by every runner.

Why a cache and not a model per runner: a T4 has 16 GB, and N copies of the same weights
waste it and load N times. Loads are single-flight (the second runner waits for the
first load instead of starting its own), every model is driven by its own batcher
thread, and device memory stays under a budget by evicting the least recently used model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gannet.batcher import Batcher, BatcherClosed
from gannet.errors import ErrorCode, TransientError
from gannet.metrics import Metrics
from gannet.pipeline_config import LoadedConfig, ModelKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelKey:
    """Identity of one loaded copy. `version` (file mtime or object generation) makes an
    uploaded new model a new key, so it is used without a restart."""

    uri: str
    version: str
    device: str
    imgsz: int
    task: str = "detect"  # ultralytics task; needed to load .onnx files
    tenant: str | None = None  # set for per-tenant models, so they are never shared

    def label(self) -> str:
        name = self.uri.rsplit("/", 1)[-1]
        return f"{self.tenant + '/' if self.tenant else ''}{name}"


@dataclass
class LoadedModel:
    key: ModelKey
    model: Any  # an ultralytics YOLO; only the batcher thread calls it
    batcher: Batcher
    nbytes: int
    names: dict[int, str]
    task: str
    last_used: float = 0.0


Loader = Callable[[ModelKey], tuple[Any, int]]  # key -> (warm model, bytes it holds)


class ModelCache:
    def __init__(
        self,
        load: Loader,
        metrics: Metrics,
        max_batch: int = 8,
        window_s: float = 0.005,
        budget_bytes: int | None = None,
    ) -> None:
        self._load = load
        self._metrics = metrics
        self._max_batch = max_batch
        self._window_s = window_s
        self._budget = budget_bytes
        self._lock = threading.Lock()
        self._loaded: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._loading: dict[ModelKey, Future[LoadedModel]] = {}

    def get(self, key: ModelKey) -> LoadedModel:
        with self._lock:
            entry = self._loaded.get(key)
            if entry is not None:
                self._loaded.move_to_end(key)
                entry.last_used = time.monotonic()
                return entry
            future = self._loading.get(key)
            leader = future is None
            if leader:
                future = Future()
                self._loading[key] = future
        assert future is not None
        if not leader:
            return future.result()
        try:
            entry = self._load_entry(key)
        except Exception as exc:
            with self._lock:
                del self._loading[key]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            self._loaded[key] = entry
            evicted = self._evict_over_budget(key)
        future.set_result(entry)
        for old in evicted:
            old.batcher.close()
            self._metrics.model_evictions.labels(old.key.label(), old.key.device).inc()
            log.info("model evicted", extra={"model": old.key.label(), "device": old.key.device})
        return entry

    def _load_entry(self, key: ModelKey) -> LoadedModel:
        started = time.perf_counter()
        try:
            model, nbytes = self._load(key)
        except TransientError:
            raise
        except Exception as exc:
            raise TransientError(
                ErrorCode.MODEL_UNAVAILABLE, f"cannot load model {key.uri}: {exc}"
            ) from exc
        predict = _predict_fn(model, key)
        batcher = Batcher(
            f"{key.label()}@{key.device}",
            predict,
            self._max_batch,
            self._window_s,
            on_batch=lambda size, seconds: self._metrics.batch_size.observe(size),
        )
        self._metrics.model_loads.labels(key.label(), key.device).inc()
        log.info(
            "model loaded",
            extra={
                "model": key.label(),
                "device": key.device,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "fields": {"bytes": nbytes, "version": key.version},
            },
        )
        return LoadedModel(
            key=key,
            model=model,
            batcher=batcher,
            nbytes=nbytes,
            names=dict(model.names),
            task=str(model.task),
            last_used=time.monotonic(),
        )

    def _evict_over_budget(self, keep: ModelKey) -> list[LoadedModel]:
        if self._budget is None:
            return []
        evicted: list[LoadedModel] = []

        def used() -> int:
            return sum(e.nbytes for k, e in self._loaded.items() if k.device == keep.device)

        for key in list(self._loaded):
            if used() <= self._budget:
                break
            if key != keep and key.device == keep.device:
                evicted.append(self._loaded.pop(key))
        return evicted

    def predict(self, key: ModelKey, images: Sequence[Any], conf: float) -> list[Any]:
        """Run images through the model on its device; blocks the calling runner only."""
        for _ in range(3):
            entry = self.get(key)
            try:
                futures = entry.batcher.submit(images, conf)
            except BatcherClosed:
                continue  # evicted between get() and submit(): load it again
            return [f.result() for f in futures]
        raise TransientError(ErrorCode.MODEL_UNAVAILABLE, f"model {key.uri} keeps being evicted")

    def loaded(self) -> list[ModelKey]:
        with self._lock:
            return list(self._loaded)

    def close(self) -> None:
        with self._lock:
            entries = list(self._loaded.values())
            self._loaded.clear()
        for entry in entries:
            entry.batcher.close()
        for entry in entries:
            entry.batcher.join(timeout=30)


def _predict_fn(model: Any, key: ModelKey) -> Callable[[list[Any], float], Sequence[Any]]:
    precision = _precision(key.device)

    def predict(images: list[Any], conf: float) -> Sequence[Any]:
        return model.predict(
            images, imgsz=key.imgsz, conf=conf, device=key.device, verbose=False, **precision
        )

    return predict


def _precision(device: str) -> dict[str, Any]:
    """FP16 on GPUs (T4 tensor cores); CPUs stay FP32."""
    return {"quantize": 16} if device.startswith("cuda") else {}


ULTRALYTICS_TASK: dict[ModelKind, str] = {
    "detection": "detect",
    "segmentation": "segment",
    "classification": "classify",
}


class ModelResolver:
    """Which weights serve (model kind, tenant) on a device, as a cache key.

    Versions are looked up at most every `ttl_s` per URI, so a new upload is noticed
    within that time without a metadata call per task.
    """

    def __init__(self, version_of: Callable[[str], str], ttl_s: float = 30.0) -> None:
        self._version_of = version_of
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._versions: dict[str, tuple[float, str]] = {}

    def version(self, uri: str) -> str:
        now = time.monotonic()
        with self._lock:
            cached = self._versions.get(uri)
            if cached and now - cached[0] < self._ttl_s:
                return cached[1]
        try:
            version = self._version_of(uri)
        except FileNotFoundError as exc:
            raise TransientError(ErrorCode.MODEL_UNAVAILABLE, f"model {uri} is missing") from exc
        with self._lock:
            self._versions[uri] = (now, version)
        return version

    def key(
        self, loaded: LoadedConfig, kind: ModelKind, tenant: str | None, device: str
    ) -> ModelKey:
        spec = loaded.config.models[kind]
        uri = loaded.model_uri(spec)
        return ModelKey(uri, self.version(uri), device, spec.imgsz, ULTRALYTICS_TASK[kind])


def yolo_loader(local_path: Callable[[str, str], Path]) -> Loader:
    """Loads weights with ultralytics and runs one warm-up prediction on the device."""

    def load(key: ModelKey) -> tuple[Any, int]:
        import torch
        from ultralytics import YOLO

        path = local_path(key.uri, key.version)
        cuda = key.device.startswith("cuda")
        before = torch.cuda.memory_allocated(key.device) if cuda else 0
        model = YOLO(str(path), task=key.task)
        blank = np.zeros((key.imgsz, key.imgsz, 3), dtype=np.uint8)
        model.predict(
            blank, imgsz=key.imgsz, device=key.device, verbose=False, **_precision(key.device)
        )
        if cuda:
            nbytes = torch.cuda.memory_allocated(key.device) - before
        elif isinstance(model.model, torch.nn.Module):
            nbytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
        else:
            nbytes = path.stat().st_size
        return model, int(nbytes)

    return load
