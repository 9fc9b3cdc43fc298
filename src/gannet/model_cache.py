"""Loaded models, one copy per (model, version, device), shared by every runner.

Why a cache and not a model per runner: a T4 has 16 GB, and N copies of the same weights
waste it and load N times. Loads are single-flight (the second runner waits for the
first load instead of starting its own), every model is driven by its own batcher
thread, and device memory stays under a budget by evicting the least recently used model.

A load runs on a thread of the cache's own (`gannet-model-load`, `load_threads` of them:
as many loads at once as there were runners to run them before), and a runner waits for
it `load_wait_s` at most: one tenant's model downloading slowly (its deadline grows with
the file, 95 s for 130 MB) held every runner that took one of its tasks, and with them
every other tenant's tasks; now those tasks are nacked, retried after the subscription's
backoff, and the load goes on.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future
from concurrent.futures import TimeoutError as StillLoading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Histogram

from gannet.batcher import Batcher, BatcherClosed
from gannet.config_schema import MAX_DETECTIONS
from gannet.errors import BadModelFile, ErrorCode, GannetError, PermanentError, TransientError
from gannet.frames import Frame
from gannet.lanes import URGENCY
from gannet.metrics import Metrics
from gannet.split_predictor import SplitPredictor
from gannet.stages import Timer, ignore
from gannet.traced import graph_bytes, trace_apart, trace_forward
from gannet.tracing import current_link

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
        """The model in logs and errors: its file, a tenant's prefixed with the tenant."""
        name = self.uri.rsplit("/", 1)[-1]
        return f"{self.tenant + '/' if self.tenant else ''}{name}"

    def metric_label(self) -> str:
        """The model in metrics: tenants' own models under one label per file name
        (`tenants/detect.pt`), so that the series stay as many as the kinds of model, not
        the tenants (a review: four series per tenant model and device, kept for the
        life of the pod); the logs name the tenant."""
        name = self.uri.rsplit("/", 1)[-1]
        return f"tenants/{name}" if self.tenant else name


@dataclass
class LoadedModel:
    key: ModelKey
    model: Any  # an ultralytics YOLO; only the batcher thread runs its network
    predictor: SplitPredictor
    batcher: Batcher
    nbytes: int
    names: dict[int, str]
    task: str


Loader = Callable[[ModelKey], tuple[Any, int]]  # key -> (warm model, bytes it holds)
Held = Callable[[Any], int]  # a loaded model -> device bytes it took since (its CUDA graphs)


class ModelCache:
    def __init__(
        self,
        load: Loader,
        metrics: Metrics,
        max_batch: int = 8,
        window_s: float = 0.005,
        budget_bytes: int | None = None,
        cpu_threads: int | None = None,
        stage_cpu: bool = False,
        held: Held = graph_bytes,
        retry_failed_after_s: float = 30.0,
        idle_evict_s: float = 0.0,
        load_wait_s: float | None = None,
        load_threads: int = 4,
        discard: Callable[[ModelKey], None] | None = None,
    ) -> None:
        """`cpu_threads`: torch CPU threads for each model's forward passes; `stage_cpu`:
        charge their thread CPU to the stage counter (GANNET_STAGE_CPU); `held`: what a
        model holds on its device beyond its load's bytes, counted against the budget
        (its CUDA graphs, recorded per input shape as batches come: at the next load; the
        load's warm-up graph is in both figures, a few MB counted twice, on the safe side);
        `retry_failed_after_s`: how long a failed load's error is given to every caller of
        that key instead of loading again (each task would otherwise run the whole load:
        a storm on the device, for a file that is no better a second later);
        `idle_evict_s` (GANNET_MODEL_IDLE_EVICT_S; 0: never): a model nobody asked for in
        that long is evicted, its thread and memory freed. Why: a long-running pod meets
        every generation of every model its configs and tenants ever named, and with no
        memory budget (the default) each stayed loaded, with its batcher thread, for good,
        though a generation no config names any more is never asked for again;
        `load_wait_s` (GANNET_MODEL_LOAD_WAIT_S; None: as long as the load takes): how
        long a runner's task waits for a model still loading (predict); `load_threads`:
        how many models load at once (each download is held in memory whole), the rest
        queued; `discard`: called with a tenant's model key once its load has ended, loaded
        or failed, and no other load of that file is under way (daemon.drop_download
        deletes the downloaded file: each tenant's stayed on the pod's disk for good)."""
        self._load = load
        self._discard = discard
        self.load_wait_s = load_wait_s
        self._load_threads = load_threads
        self._load_queue: queue.SimpleQueue[tuple[ModelKey, Future[LoadedModel]]] = (
            queue.SimpleQueue()
        )
        self._loaders = 0  # threads started
        self._closing = False  # close() called: queued loads are not started
        self._held = held
        self._cpu_threads = cpu_threads
        self._stage_cpu = stage_cpu
        self._metrics = metrics
        self._max_batch = max_batch
        self._window_s = window_s
        self._budget = budget_bytes
        self._lock = threading.Lock()
        self._loaded: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._loading: dict[ModelKey, Future[LoadedModel]] = {}
        self._retry_failed_after_s = retry_failed_after_s
        self._failed: dict[ModelKey, tuple[float, GannetError]] = {}  # key -> (when, why)
        self._idle_evict_s = idle_evict_s
        self._asked: dict[ModelKey, float] = {}  # each loaded model's last get
        # Idle models are looked for on a get, at most this often.
        self._sweep_every_s = min(idle_evict_s / 4, 60.0)
        self._sweep_at = time.monotonic() + self._sweep_every_s

    def get(self, key: ModelKey, wait_s: float | None = None) -> LoadedModel:
        """The loaded model, loading it (once, whoever asks meanwhile) if it is not;
        TransientError(model_unavailable) if it cannot load, failed to lately, or is
        still loading `wait_s` later (None: no bound, for start-up's and a config
        check's loads); PermanentError(tenant_model_invalid) for a tenant's own model
        whose file can never serve (BadModelFile)."""
        with self._lock:
            entry = self._loaded.get(key)
            if entry is not None:
                self._loaded.move_to_end(key)
                idle = self._asked_now(key)
            else:
                self._raise_if_failed_lately(key)
                future = self._loading.get(key)
                if future is None:
                    future = self._loading[key] = Future()
                    self._load_queue.put((key, future))
                    if self._loaders < self._load_threads:
                        self._loaders += 1
                        threading.Thread(
                            target=self._loader,
                            name="gannet-model-load",
                            daemon=True,  # a load in flight at exit: close() waits for it
                        ).start()
        if entry is not None:
            self._retire(idle, "idle")
            return entry
        assert future is not None
        try:
            return future.result(timeout=wait_s)
        except StillLoading:
            raise TransientError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {key.label()} on {key.device} is still loading after {wait_s:g} s "
                "(GANNET_MODEL_LOAD_WAIT_S); the task is retried",
            ) from None

    def _loader(self) -> None:
        """A load thread: it outlives any error, and no waiter is left without an
        answer (a start-up's or a config check's wait has no bound)."""
        while True:
            key, future = self._load_queue.get()
            try:
                self._load_into(key, future)
            except Exception as exc:  # a bug around the load: logged, handed to the waiters
                log.exception("model load failed unexpectedly", extra={"model": key.label()})
                with self._lock:
                    if self._loading.get(key) is future:
                        del self._loading[key]
                if not future.done():
                    future.set_exception(exc)

    def _load_into(self, key: ModelKey, future: Future[LoadedModel]) -> None:
        """The load, on its own thread: its result or error goes to every waiter. None
        starts once the cache is closing (a load begun after close() returned would be
        inside torch at the interpreter's exit)."""
        with self._lock:
            closing = self._closing
            if closing:
                del self._loading[key]
        if closing:
            future.set_exception(
                TransientError(ErrorCode.MODEL_UNAVAILABLE, f"model {key.label()}: shutting down")
            )
            return
        try:
            entry = self._load_entry(key)
        except Exception as exc:  # noqa: BLE001 - handed to the waiters, who raise it
            with self._lock:
                del self._loading[key]
                self._discard_file(key)
                if isinstance(exc, GannetError):
                    now = time.monotonic()
                    self._failed = {  # old versions' failures are never asked for again
                        k: v
                        for k, v in self._failed.items()
                        if now - v[0] < self._retry_failed_after_s
                    }
                    self._failed[key] = (now, exc)
            self._metrics.model_load_failures.labels(key.metric_label(), key.device).inc()
            if isinstance(exc, GannetError):  # anything else is a bug, logged by a waiter
                log.warning(
                    "model load failed; not retried for a while",
                    extra={
                        "model": key.label(),
                        "device": key.device,
                        "fields": {"error": str(exc), "retry_after_s": self._retry_failed_after_s},
                    },
                )
            future.set_exception(exc)
            return
        with self._lock:
            del self._loading[key]
            self._discard_file(key)
            self._failed.pop(key, None)
            self._loaded[key] = entry
            idle = self._asked_now(key)
            evicted = self._evict_over_budget(key)
        self._retire(idle, "idle")
        self._retire(evicted, "over the memory budget")
        self._show_bytes(key.device)
        future.set_result(entry)  # after: a waiter finds the evicted ones gone

    def _discard_file(self, key: ModelKey) -> None:
        """Under the lock, as a tenant's model's load ends: its file goes unless another
        load of it (another device or imgsz) is under way; a load that starts after this
        downloads the file again. Under the lock, so none starts in between."""
        if self._discard is None or key.tenant is None:
            return
        if not any(k.uri == key.uri and k.version == key.version for k in self._loading):
            self._discard(key)

    def _asked_now(self, key: ModelKey) -> list[LoadedModel]:
        """Under the lock: notes that `key` was asked for, and every so often takes out
        the models nobody asked for in `idle_evict_s` (the caller retires them)."""
        if not self._idle_evict_s:
            return []
        now = self._asked[key] = time.monotonic()
        if now < self._sweep_at:
            return []
        self._sweep_at = now + self._sweep_every_s
        idle = [k for k, at in self._asked.items() if now - at >= self._idle_evict_s]
        return [self._take_out(k) for k in idle]

    def _take_out(self, key: ModelKey) -> LoadedModel:
        """Under the lock: the model out of the cache (its thread still to be closed)."""
        self._asked.pop(key, None)
        return self._loaded.pop(key)

    def _retire(self, entries: list[LoadedModel], why: str) -> None:
        """Outside the lock: evicted models' threads finish what they were given and end;
        a runner that asks after that loads the model again."""
        for old in entries:
            old.batcher.close()
            device = old.key.device
            self._metrics.model_evictions.labels(old.key.metric_label(), device).inc()
            log.info(f"model evicted: {why}", extra={"model": old.key.label(), "device": device})
        for device in {old.key.device for old in entries}:
            self._show_bytes(device)

    def _show_bytes(self, device: str) -> None:
        with self._lock:
            held = sum(self._sizes(device).values())
        self._metrics.models_loaded_bytes.labels(device).set(held)

    def _sizes(self, device: str) -> dict[ModelKey, int]:
        """Under the lock: what each model loaded on `device` holds there."""
        loaded = self._loaded.items()
        return {k: e.nbytes + self._held(e.model) for k, e in loaded if k.device == device}

    def _raise_if_failed_lately(self, key: ModelKey) -> None:
        """Under the lock: the remembered failure of this key, as a new error (one
        exception object raised in many threads would share its traceback)."""
        failed = self._failed.get(key)
        if failed is None:
            return
        age = time.monotonic() - failed[0]
        if age >= self._retry_failed_after_s:
            del self._failed[key]
            return
        error = failed[1]
        raise type(error)(  # permanent stays permanent: a tenant's bad upload
            error.code,
            f"{error.message} (failed {age:.0f} s ago; retried after "
            f"{self._retry_failed_after_s:.0f} s)",
        )

    def _load_entry(self, key: ModelKey) -> LoadedModel:
        started = time.perf_counter()
        try:
            model, nbytes = self._load(key)
        except GannetError:
            raise
        except BadModelFile as exc:
            if key.tenant is not None:  # only a new upload can fix it: said to the tenant
                raise PermanentError(
                    ErrorCode.TENANT_MODEL_INVALID,
                    f"tenant {key.tenant}'s own model {key.uri} (generation {key.version}) "
                    f"cannot serve: {exc}; upload a fixed one, then republish",
                ) from exc
            raise TransientError(
                ErrorCode.MODEL_UNAVAILABLE, f"cannot load model {key.uri}: {exc}"
            ) from exc
        except Exception as exc:
            raise TransientError(
                ErrorCode.MODEL_UNAVAILABLE, f"cannot load model {key.uri}: {exc}"
            ) from exc
        predictor = SplitPredictor(
            model, fixed_batch_one=key.uri.endswith(".onnx"), cpu_threads=self._cpu_threads
        )
        batcher = Batcher(
            f"{key.label()}@{key.device}",
            predictor.forward,
            self._max_batch,
            self._window_s,
            on_batch=partial(
                self._observe_batch,
                self._metrics.forward_seconds.labels(key.metric_label(), key.device),
            ),
            group=predictor.shape,
            on_start=predictor.start_forward_thread,
            on_cpu=self._metrics.stage_cpu_seconds.labels("forward").inc
            if self._stage_cpu
            else None,
        )
        self._metrics.model_loads.labels(key.metric_label(), key.device).inc()
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
            predictor=predictor,
            batcher=batcher,
            nbytes=nbytes,
            names=dict(model.names),
            task=str(model.task),
        )

    def _observe_batch(self, forward: Histogram, size: int, seconds: float) -> None:
        """After each forward pass, on its batcher thread; `forward`: the model's child of
        gannet_forward_seconds, looked up once."""
        self._metrics.batch_size.observe(size)
        forward.observe(seconds)

    def _evict_over_budget(self, keep: ModelKey) -> list[LoadedModel]:
        if self._budget is None:
            return []
        evicted: list[LoadedModel] = []
        sizes = self._sizes(keep.device)
        used = sum(sizes.values())
        for key in list(self._loaded):  # the least recently used first
            if used <= self._budget:
                break
            if key != keep and key in sizes:
                evicted.append(self._take_out(key))
                used -= sizes[key]
        return evicted

    def predict(
        self,
        key: ModelKey,
        images: Sequence[Frame],
        conf: float,
        timer: Timer | None = None,
        photo_hw: tuple[int, int] | None = None,
        max_det: int = MAX_DETECTIONS,
        classes: Sequence[str] = (),
    ) -> list[Any]:
        """Run frames through the model on its device; blocks the calling runner only.

        The calling runner letterboxes its images and does NMS on the answers itself, so
        the model's batcher thread spends its time on forward passes alone. `photo_hw`:
        see SplitPredictor.postprocess (one image, a reduced decode of the photo);
        `max_det`: the most boxes kept per image (ultralytics' max_det, the config's
        max_detections); `classes`: the class names a detector's or segmenter's answer
        keeps, before max_det (ultralytics' classes=; empty: all)."""
        timer = timer or Timer(ignore)
        for _ in range(3):
            entry = self.get(key, self.load_wait_s)
            with timer.stage("preprocess"):
                inputs = [entry.predictor.preprocess(image) for image in images]
            with timer.stage("inference"):  # waiting for the batcher's forward passes
                # Tracing on: the batch's forward span links to this stage's span.
                link = current_link() if timer.spans is not None else None
                try:
                    futures = entry.batcher.submit(inputs, link, URGENCY.get())
                except BatcherClosed:
                    continue  # evicted between get() and submit(): load it again
                outputs = [f.result() for f in futures]
            with timer.stage("postprocess"):
                return [
                    entry.predictor.postprocess(out, x, image, conf, photo_hw, max_det, classes)
                    for out, x, image in zip(outputs, inputs, images, strict=True)
                ]
        raise TransientError(ErrorCode.MODEL_UNAVAILABLE, f"model {key.uri} keeps being evicted")

    def loaded(self) -> list[ModelKey]:
        with self._lock:
            return list(self._loaded)

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the loads in flight end and every model's thread finish what it was given,
        for up to timeout_s in all. A load still running at the process's exit would be
        inside torch while the interpreter tears down ("terminate called", an abort)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
            loading = list(self._loading.values())
        futures.wait(loading, timeout=timeout_s)
        with self._lock:
            entries = list(self._loaded.values())
            self._loaded.clear()
            self._asked.clear()
        for entry in entries:
            entry.batcher.close()
        for entry in entries:
            entry.batcher.join(timeout=max(0.0, deadline - time.monotonic()))


def _predict_options(key: ModelKey) -> dict[str, Any]:
    """What every answer of this model is computed with; the warm-up sets them."""
    options: dict[str, Any] = {
        "imgsz": key.imgsz,
        "device": key.device,
        "verbose": False,
        **_precision(key.device),
    }
    if key.task == "segment":
        options["retina_masks"] = True  # masks at image resolution: areas in real pixels
    return options


def _precision(device: str) -> dict[str, Any]:
    """FP16 on GPUs (T4 tensor cores); CPUs stay FP32."""
    return {"quantize": 16} if device.startswith("cuda") else {}


def _skip_warmup(predictor: Any) -> None:
    """ultralytics' warm-up, on a CPU, runs no forward pass for the formats gannet loads
    (.pt, .onnx): it only imports torchvision, for ultralytics' NMS to use torchvision's.
    A detector's and a segmenter's answers do not go through that NMS
    (split_predictor's own, on the host), so a CPU daemon of them need not import
    torchvision at all: 1.3 s of its 4.7 s start here (torchvision.models imports
    torch._dynamo), paid at every daemon start of the test suite. Classifiers keep the
    warm-up: classify's transforms use torchvision."""
    predictor.done_warmup = True


def safe_loads() -> None:
    """Every .pt this process loads from now on is unpickled with torch's weights_only
    and ultralytics' allow-list of its own and torch's model classes: a .pt file is a
    pickle, and unpickling runs whatever it names, so a tenant's own weights
    (docs/pipelines.md) could otherwise run code in a worker that reads every tenant's
    images and rows. ultralytics' ULTRALYTICS_SAFE_LOAD, set on its module rather than
    in the environment, which it reads once, at import."""
    import ultralytics.nn.tasks as tasks

    tasks.SAFE_LOAD = True  # type: ignore[attr-defined] # imported there, not re-exported


def _passing(exc: BaseException) -> bool:
    """A failure of the host, not of the file: memory (the host's, a device's) or the
    disk. The same file may load a moment later, so its tasks are retried rather than
    refused as the tenant's bad upload."""
    if isinstance(exc, (MemoryError, OSError)):
        return True
    return "out of memory" in str(exc).lower()  # torch.cuda.OutOfMemoryError among them


def _onnx_task(path: Path) -> str | None:
    """The task an ultralytics export wrote in the ONNX file's metadata (None: no such
    entry, a model exported by other means). A detector's .onnx configured as the
    classifier loaded and failed every classification task with an IndexError."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    task = session.get_modelmeta().custom_metadata_map.get("task")
    return str(task) if task else None


def warm_model(path: Path, key: ModelKey, safe: bool = True) -> Any:
    """The YOLO in `path` loaded for `key` (refusing a model of another task than the
    key's: BadModelFile) and warmed on its device, its predictor set up with the options
    every answer uses. With `safe` (GANNET_SAFE_MODEL_LOAD), .pt files load as data only
    (`safe_loads`)."""
    from ultralytics.models import YOLO

    if safe:
        safe_loads()
    try:
        stated = _onnx_task(path) if path.suffix == ".onnx" else None
        model = YOLO(str(path), task=key.task)
    except Exception as exc:  # what ultralytics, torch or onnxruntime make of the file
        if _passing(exc):
            raise
        raise BadModelFile(f"it is not a model gannet can load: {exc}") from exc
    if (stated or model.task) != key.task:
        # A .pt file says what it is, whatever `task` asked: a classifier configured
        # as the detection model answered every image with no boxes, as successes.
        # An .onnx file's task is what `task` asks, so its export's metadata decides.
        raise BadModelFile(f"it is a {stated or model.task} model, configured as {key.task}")
    if key.device == "cpu" and key.task in ("detect", "segment"):
        model.add_callback("on_predict_start", _skip_warmup)
    # Also sets up the predictor that SplitPredictor later copies, options included.
    model.predict(_blank(key), **_predict_options(key))
    return model


def _blank(key: ModelKey) -> np.ndarray:
    return np.zeros((key.imgsz, key.imgsz, 3), dtype=np.uint8)


def yolo_loader(
    local_path: Callable[[str, str], Path],
    trace: bool = True,
    cuda_graphs: bool = True,
    safe: bool = True,
    trace_apart: threading.Event | None = None,
) -> Loader:
    """Loads weights with ultralytics (warm_model), and, with `trace`, runs its forward
    pass as a verified TorchScript trace (see traced.py), replayed as CUDA graphs on a
    GPU with `cuda_graphs` (cuda_graphs.py). Once `trace_apart` is set (the daemon sets
    it when its start-up loads are done), a model's trace is made in a process of its
    own (gannet.trace_child) and loaded here: each trace made in this process keeps
    about 18 MB of torch's global state for good, and a pod loads models for as long as
    it runs (a tenant's on first use, each generation of a model, each load after an
    idle eviction): 46 loads took a review's daemon from 1.3 to 2.1 GB."""

    def load(key: ModelKey) -> tuple[Any, int]:
        import torch

        path = local_path(key.uri, key.version)
        cuda = key.device.startswith("cuda")
        before = torch.cuda.memory_allocated(key.device) if cuda else 0
        model = warm_model(path, key, safe)
        if trace and _traced(model, path, key, cuda, cuda_graphs, safe, trace_apart):
            model.predict(_blank(key), **_predict_options(key))  # the trace's first run
            log.info("model traced", extra={"model": key.label(), "device": key.device})
        if cuda:
            nbytes = torch.cuda.memory_allocated(key.device) - before
        elif isinstance(model.model, torch.nn.Module):
            nbytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
        else:
            nbytes = path.stat().st_size
        return model, int(nbytes)

    return load


def _traced(
    model: Any,
    path: Path,
    key: ModelKey,
    cuda: bool,
    cuda_graphs: bool,
    safe: bool,
    apart: threading.Event | None,
) -> bool:
    if apart is None or not apart.is_set():
        return trace_forward(model, key.imgsz, key.device, cuda, cuda_graphs)
    command = [
        sys.executable,
        "-m",
        "gannet.trace_child",
        str(path),
        key.task,
        str(key.imgsz),
        key.device,
        "safe" if safe else "unsafe",
    ]
    return trace_apart(model, command, key.device, key.imgsz, cuda, cuda_graphs)
