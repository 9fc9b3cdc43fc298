"""ModelCache with the real demo model: one load per (model, device), one thread per model."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
from conftest import SAMPLES, SCENES

from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, ModelKey, yolo_loader
from gannet.settings import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "detect.pt"


def key(version: str = "v1", tenant: str | None = None) -> ModelKey:
    return ModelKey(str(MODEL), version, "cpu", 416, "detect", tenant)


def counting_loader(calls: list[str]):
    load = yolo_loader(lambda uri, version: Path(uri))

    def counted(k: ModelKey):
        calls.append(k.version)
        model, nbytes = load(k)
        original = model.predict
        threads: set[str] = set()

        def predict(*args, **kwargs):  # records who drives the model; runs the real thing
            threads.add(threading.current_thread().name)
            return original(*args, **kwargs)

        model.predict = predict
        model.driven_by = threads
        return model, nbytes

    return counted


def test_concurrent_gets_load_once_and_only_the_batcher_thread_drives_the_model():
    calls: list[str] = []
    metrics = Metrics()
    cache = ModelCache(counting_loader(calls), metrics, max_batch=8, window_s=0.02)
    images = [cv2.imread(str(SAMPLES / e["file"])) for e in SCENES]
    try:
        with ThreadPoolExecutor(8) as pool:
            entries = list(pool.map(lambda _: cache.get(key()), range(8)))
        assert calls == ["v1"], "eight runners asking at once must cause one load"
        assert len({id(e) for e in entries}) == 1

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda im: cache.predict(key(), [im], 0.5)[0], images))
        counts = [
            {
                name: sum(1 for c in r.boxes.cls.tolist() if r.names[int(c)] == name)
                for name in r.names.values()
            }
            for r in results
        ]
        for got, entry in zip(counts, SCENES, strict=True):
            assert {k: v for k, v in got.items() if v} == {
                k: v for k, v in entry["counts"].items() if v
            }, entry["file"]
        driven_by = entries[0].model.driven_by
        assert len(driven_by) == 1 and next(iter(driven_by)).startswith("batcher-")
        sizes = metrics.registry.get_sample_value("gannet_batch_size_sum")
        batches = metrics.registry.get_sample_value("gannet_batch_size_count")
        assert sizes == len(images) and batches < len(images), "concurrent requests batch"
    finally:
        cache.close()


def test_a_new_version_is_a_new_model_and_the_budget_evicts_the_oldest():
    calls: list[str] = []
    metrics = Metrics()
    one_model = cache_bytes = None
    probe = ModelCache(counting_loader(calls), metrics)
    one_model = probe.get(key("probe")).nbytes
    probe.close()
    cache_bytes = int(one_model * 1.5)  # room for one copy, not two
    cache = ModelCache(counting_loader(calls), metrics, budget_bytes=cache_bytes)
    try:
        cache.get(key("v1"))
        cache.get(key("v2"))
        assert cache.loaded() == [key("v2")]
        assert (
            metrics.registry.get_sample_value(
                "gannet_model_evictions_total", {"model": "detect.pt", "device": "cpu"}
            )
            == 1
        )
        cache.get(key("v2", tenant="acme"))  # per-tenant copies are separate entries
        assert cache.loaded() == [key("v2", tenant="acme")]
    finally:
        cache.close()
