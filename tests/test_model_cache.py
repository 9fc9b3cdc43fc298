"""ModelCache with the real demo model: one load per (model, device), one thread per model."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import pytest
import torch
from conftest import SAMPLES, SCENES, expected_counts, wait_until

from gannet.errors import ErrorCode, PermanentError, TransientError
from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, ModelKey, yolo_loader
from gannet.settings import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "detect.pt"
SEGMENTER = REPO_ROOT / "models" / "demo" / "segment.pt"


def key(version: str = "v1", tenant: str | None = None) -> ModelKey:
    return ModelKey(str(MODEL), version, "cpu", 416, "detect", tenant)


def counting_loader(calls: list[str]):
    load = yolo_loader(lambda uri, version: Path(uri))

    def counted(k: ModelKey):
        calls.append(k.version)
        model, nbytes = load(k)
        network = model.predictor.model
        original = network.forward
        threads: set[str] = set()

        def forward(*args, **kwargs):  # records who runs the network; runs the real thing
            threads.add(threading.current_thread().name)
            return original(*args, **kwargs)

        network.forward = forward
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
        # Each forward pass's wall time, by model, for the share of the time it runs.
        labels = {"model": entries[0].key.label(), "device": "cpu"}
        value = metrics.registry.get_sample_value
        assert value("gannet_forward_seconds_count", labels) == batches
        assert value("gannet_forward_seconds_sum", labels) > 0
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
        held = metrics.registry.get_sample_value("gannet_models_loaded_bytes", {"device": "cpu"})
        assert held == one_model, "the gauge shows what the budget counts: one model"
        cache.get(key("v2", tenant="acme"))  # per-tenant copies are separate entries
        assert cache.loaded() == [key("v2", tenant="acme")]
    finally:
        cache.close()


def test_a_model_evicted_between_its_get_and_its_forward_pass_is_loaded_again():
    """predict finds the model, pre-processes, then hands the batch to the model's
    thread: an eviction in between (another model's load over the budget) closes that
    thread. The task loads the model again instead of failing."""
    calls: list[str] = []
    metrics = Metrics()
    probe = ModelCache(counting_loader(calls), metrics)
    one_model = probe.get(key("probe")).nbytes
    probe.close()
    cache = ModelCache(counting_loader(calls), metrics, budget_bytes=int(one_model * 1.5))
    image = cv2.imread(str(SAMPLES / SCENES[0]["file"]))
    try:
        first = cache.get(key("v1"))
        preprocess = first.predictor.preprocess

        def evicted_meanwhile(frame):
            first.predictor.preprocess = preprocess
            cache.get(key("v2"))  # over the budget: v1 is evicted, its thread closed
            return preprocess(frame)

        first.predictor.preprocess = evicted_meanwhile
        [result] = cache.predict(key("v1"), [image], 0.5)
        assert len(result.boxes) > 0
        assert calls == ["probe", "v1", "v2", "v1"]
    finally:
        cache.close()


def test_a_model_nobody_asked_for_in_a_while_is_evicted_and_loads_again_when_asked():
    """With no memory budget (the default) every generation a long-running pod ever
    loaded stayed, with its thread, for good; a generation no config names any more is
    never asked for again. Idle that long (GANNET_MODEL_IDLE_EVICT_S), it is evicted,
    its thread ends, and a task that does ask for it loads it again."""
    calls: list[str] = []
    metrics = Metrics()
    cache = ModelCache(counting_loader(calls), metrics, idle_evict_s=0.4)
    try:
        old = cache.get(key("v1"))
        cache.get(key("v2"))
        time.sleep(0.5)
        cache.get(key("v2"))  # v1's last ask is over 0.4 s ago: it goes
        assert cache.loaded() == [key("v2")]
        old.batcher.join(timeout=10)
        assert not old.batcher._thread.is_alive()
        evictions = {"model": "detect.pt", "device": "cpu"}
        assert metrics.registry.get_sample_value("gannet_model_evictions_total", evictions) == 1
        cache.get(key("v1"))
        assert calls == ["v1", "v2", "v1"]
    finally:
        cache.close()


def test_the_budget_counts_what_a_model_took_on_its_device_since_it_loaded():
    """A model's CUDA graphs, recorded per input shape as batches come, hold device memory
    beside its weights: the next load counts them against the budget, so the model that
    grew is evicted where its load size alone would have fitted. This machine has no GPU
    to record graphs on, so `held` stands in for their bytes here (on a GPU it is
    traced.graph_bytes, whose figure tests/test_cuda_graphs.py checks there)."""
    calls: list[str] = []
    metrics = Metrics()
    probe = ModelCache(counting_loader(calls), metrics)
    one_model = probe.get(key("probe")).nbytes
    probe.close()
    grown: dict[int, int] = {}
    cache = ModelCache(
        counting_loader(calls),
        metrics,
        budget_bytes=int(one_model * 3.5),  # room for three copies, not four
        held=lambda model: grown.get(id(model), 0),
    )
    try:
        first = cache.get(key("v1"))
        cache.get(key("v2"))
        grown[id(first.model)] = one_model  # v1's graphs: as much again as its weights
        cache.get(key("v3"))
        assert cache.loaded() == [key("v2"), key("v3")]
        cache.get(key("v4"))  # nothing grew: three copies fit
        assert cache.loaded() == [key("v2"), key("v3"), key("v4")]
    finally:
        cache.close()


SEGMENT = REPO_ROOT / "models" / "demo" / "segment.pt"
CLASSIFY = REPO_ROOT / "models" / "demo" / "classify.pt"


@pytest.mark.parametrize(
    ("weights", "task", "imgsz", "extra"),
    [
        (MODEL, "detect", 416, {}),
        (SEGMENT, "segment", 320, {"retina_masks": True}),
        (CLASSIFY, "classify", 64, {}),
    ],
)
def test_answers_through_the_cache_are_ultralytics_own(weights, task, imgsz, extra):
    """Runners letterbox and run NMS themselves (split_predictor.py); whatever mix of
    images and thresholds runners send at once, each gets what `model.predict` gives."""
    from ultralytics import YOLO

    images = [cv2.imread(str(SAMPLES / e["file"])) for e in SCENES]
    portrait = images[0][:, :300]  # another input shape: its own forward pass
    jobs = [(image, conf) for image in [*images, portrait] for conf in (0.25, 0.6)]
    plain = YOLO(str(weights), task=task)

    def expected(image, conf):
        return plain.predict(image, imgsz=imgsz, conf=conf, verbose=False, **extra)[0]

    metrics = Metrics()
    cache = ModelCache(yolo_loader(lambda uri, version: Path(uri)), metrics, window_s=0.05)
    k = ModelKey(str(weights), "v1", "cpu", imgsz, task)
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda job: cache.predict(k, [job[0]], job[1])[0], jobs))
    finally:
        cache.close()
    boxes = 0
    for (image, conf), result in zip(jobs, got, strict=True):
        want = expected(image, conf)
        assert result.orig_shape == image.shape[:2]
        if task == "classify":
            assert result.probs.top1 == want.probs.top1
            assert float(result.probs.top1conf) == pytest.approx(float(want.probs.top1conf), 1e-3)
            continue
        boxes += len(want.boxes)
        assert result.boxes.cls.tolist() == want.boxes.cls.tolist(), f"conf {conf}"
        assert min(result.boxes.conf.tolist(), default=1.0) >= conf
        assert torch.allclose(result.boxes.xyxy, want.boxes.xyxy, atol=0.1)
        if task == "segment" and len(want.boxes):
            assert (result.masks.data == want.masks.data).float().mean() > 0.999
    assert task == "classify" or boxes > 0, "a comparison of empty answers proves nothing"
    passes = metrics.registry.get_sample_value("gannet_batch_size_count")
    assert passes < len(jobs), "same-shaped requests share forward passes"


@pytest.mark.parametrize(
    ("weights", "asked", "found"),
    [(CLASSIFY, "detect", "classify"), (MODEL, "segment", "detect")],
)
def test_a_model_of_another_kind_than_the_config_says_is_a_failed_load(weights, asked, found):
    """A classifier configured as the detection model loaded and answered every image with
    no boxes, saved as a success; now the load fails, naming both kinds."""
    cache = ModelCache(yolo_loader(lambda uri, version: Path(uri)), Metrics())
    try:
        with pytest.raises(TransientError) as err:
            cache.get(ModelKey(str(weights), "v1", "cpu", 64, asked))
    finally:
        cache.close()
    assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert f"a {found} model" in err.value.message and asked in err.value.message
    assert cache.loaded() == []


def test_a_cpu_daemon_of_detectors_and_segmenters_answers_without_loading_torchvision():
    """torchvision's import is 1.3 s of a daemon's start on a CPU (model_cache._skip_warmup),
    and a detector's and a segmenter's answers do not need it. A fresh interpreter: this
    one has it."""
    scene = SCENES[0]
    probe = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import cv2
        import gannet.daemon
        from gannet.metrics import Metrics
        from gannet.model_cache import ModelCache, ModelKey, yolo_loader
        cache = ModelCache(yolo_loader(lambda uri, version: Path(uri)), Metrics())
        photo = cv2.imread({str(SAMPLES / scene["file"])!r})
        models = [({str(MODEL)!r}, "detect", 416), ({str(SEGMENTER)!r}, "segment", 320)]
        for weights, task, imgsz in models:
            key = ModelKey(weights, "v1", "cpu", imgsz, task)
            (found,) = cache.predict(key, [photo], 0.5)
            print(len(found.boxes), 0 if found.masks is None else len(found.masks))
        cache.close()
        print("torchvision" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    detected, _, segmented, masks, loaded = done.stdout.split()
    assert int(detected) == sum(expected_counts(scene).values())
    assert int(segmented) == int(masks) == scene["patch_count"]
    assert loaded == "False", "a CPU daemon of detectors and segmenters imported torchvision"


def test_the_torch_threads_setting_reaches_the_thread_that_runs_the_model():
    """Ultralytics sets torch's CPU threads to cores - 1 in whichever thread loads a
    model, and the setting is per thread, so the cache must set it in the batcher's own."""
    seen: list[int] = []
    load = yolo_loader(lambda uri, version: Path(uri))

    def recording(k: ModelKey):
        model, nbytes = load(k)
        network = model.predictor.model
        original = network.forward

        def forward(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return original(*args, **kwargs)

        network.forward = forward
        return model, nbytes

    image = cv2.imread(str(SAMPLES / SCENES[0]["file"]))
    for threads in (1, 2):
        cache = ModelCache(recording, Metrics(), cpu_threads=threads)
        try:
            cache.predict(key(), [image], 0.5)
        finally:
            cache.close()
        assert seen[-1] == threads


def test_a_failed_load_is_remembered_for_a_while_instead_of_retried_by_every_task(tmp_path):
    """A corrupt file: every task that needed it ran the whole load again (a storm of
    loads on the device). The failure is now answered from memory until
    `retry_failed_after_s` has passed; then the next task tries again, and a fixed file
    (a new version: a new key, in the daemon) loads."""
    corrupt = tmp_path / "detect.pt"
    corrupt.write_bytes(b"\x00not a checkpoint" * 100)
    calls: list[str] = []
    load = yolo_loader(lambda uri, version: Path(uri))

    def counted(k: ModelKey):
        calls.append(k.version)
        return load(k)

    metrics = Metrics()
    cache = ModelCache(counted, metrics, retry_failed_after_s=0.5)
    k = ModelKey(str(corrupt), "v1", "cpu", 416, "detect")
    try:
        for _ in range(5):
            with pytest.raises(TransientError) as err:
                cache.get(k)
            assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
            assert "detect.pt" in err.value.message
        assert calls == ["v1"]
        failures = {"model": "detect.pt", "device": "cpu"}
        assert metrics.registry.get_sample_value("gannet_model_load_failures_total", failures) == 1
        time.sleep(0.5)
        corrupt.write_bytes(MODEL.read_bytes())
        assert cache.get(k).task == "detect"
        assert calls == ["v1", "v1"]
    finally:
        cache.close()


def test_a_weights_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    """A .pt file is a pickle, and unpickling runs what it names: a tenant's own weights
    could run code in a worker that reads every tenant's images and rows. Loaded as data
    only (GANNET_SAFE_MODEL_LOAD, on by default), such a file is refused, as a tenant's
    model that can never serve (tenant_model_invalid), and the demo models still load
    (their answers: the agreement tests)."""
    import os
    import pickle

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "detect.pt"
    evil.write_bytes(pickle.dumps(RunsCode()))
    cache = ModelCache(yolo_loader(lambda uri, version: Path(uri), trace=False), Metrics())
    try:
        with pytest.raises(PermanentError) as failed:
            cache.get(ModelKey(str(evil), "v1", "cpu", 416, "detect", "mallory"))
        assert failed.value.code is ErrorCode.TENANT_MODEL_INVALID
        assert not marker.exists(), "unpickling the weights ran their code"
        assert cache.get(key()).model is not None
    finally:
        cache.close(timeout_s=10)


def test_a_model_slow_to_load_holds_a_task_only_for_the_load_wait():
    """One tenant's model downloading slowly (here: its load held until the test lets it
    go) held every runner that took one of its tasks, each waiting for the load, and
    other tenants' tasks waited behind them. A task now waits `load_wait_s`, then is
    nacked (model_unavailable, retried), while the load goes on, once, on its own
    thread; another model answers meanwhile; the load's end serves the next task."""
    release = threading.Event()
    calls: list[str] = []
    load = yolo_loader(lambda uri, version: Path(uri))

    def slow_for_one_tenant(k: ModelKey):
        calls.append(f"{k.tenant}")
        if k.tenant == "slowco":
            assert release.wait(60)
        return load(k)

    cache = ModelCache(slow_for_one_tenant, Metrics(), load_wait_s=0.3)
    image = cv2.imread(str(SAMPLES / SCENES[0]["file"]))
    try:
        cache.get(key(tenant="acme"))  # loaded before, as a model in use is
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:  # four runners, each taking a slowco task
            waits = list(pool.map(lambda _: _refused(cache, key(tenant="slowco"), image), range(4)))
        assert all(0.25 <= w < 2.0 for w in waits), waits
        assert time.monotonic() - started < 3.0, "the runners were held"
        other = cache.predict(key(tenant="acme"), [image], 0.5)[0]
        assert len(other.boxes) > 0, "another tenant's model answers meanwhile"
        release.set()
        for _ in range(100):  # the load ends on its own thread
            if key(tenant="slowco") in cache.loaded():
                break
            time.sleep(0.1)
        assert len(cache.predict(key(tenant="slowco"), [image], 0.5)[0].boxes) > 0
        assert calls == ["acme", "slowco"], "one load, whoever waited for it"
    finally:
        release.set()
        cache.close()


def _refused(cache: ModelCache, k: ModelKey, image) -> float:
    """Seconds until predict gave up on a model still loading."""
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        cache.predict(k, [image], 0.5)
    assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert "still loading after 0.3 s (GANNET_MODEL_LOAD_WAIT_S)" in err.value.message
    return time.monotonic() - started


def test_loads_at_once_are_bounded_the_rest_queued():
    """Each download is held in memory whole: with loads off the runners, a burst of
    tasks for many tenants' own models would start as many loads. `load_threads` of
    them run at once; the others wait their turn, and each still loads once."""
    release = threading.Event()
    running: list[str] = []
    most = [0]
    lock = threading.Lock()
    load = yolo_loader(lambda uri, version: Path(uri))

    def held(k: ModelKey):
        with lock:
            running.append(str(k.tenant))
            most[0] = max(most[0], len(running))
        try:
            assert release.wait(60)
            return load(k)
        finally:
            with lock:
                running.remove(str(k.tenant))

    cache = ModelCache(held, Metrics(), load_wait_s=0.2, load_threads=2)
    tenants = [f"t{i}" for i in range(5)]
    try:
        for tenant in tenants:
            with pytest.raises(TransientError, match="still loading"):
                cache.get(key(tenant=tenant), 0.2)
        assert most[0] == 2 and len(running) == 2
        release.set()
        for tenant in tenants:  # queued, then loaded, each once
            assert cache.get(key(tenant=tenant)).task == "detect"
        assert sorted(k.tenant for k in cache.loaded()) == tenants
    finally:
        release.set()
        cache.close()


def test_tenants_models_share_one_series_per_file_name_however_many_come_and_go():
    """Tenants' own models come and go (idle, over the budget): labelled by tenant, each
    left its series (loads, evictions, forward time) for the life of the pod, four per
    tenant model and device in a review's long run. They are counted under
    `tenants/detect.pt`: as many series as kinds of model, whatever the tenants."""
    metrics = Metrics()
    # A budget of one byte: each load evicts the model loaded before it.
    cache = ModelCache(counting_loader([]), metrics, budget_bytes=1)
    image = cv2.imread(str(SAMPLES / SCENES[0]["file"]))
    sample = metrics.registry.get_sample_value
    tenants = {"model": "tenants/detect.pt", "device": "cpu"}
    try:
        for tenant in ("acme", "globex", "initech"):
            cache.predict(key(tenant=tenant), [image], 0.5)
        assert sample("gannet_model_loads_total", tenants) == 3
        assert sample("gannet_model_evictions_total", tenants) == 2
        wait_until(  # observed by each model's thread after it handed the answers over
            lambda: sample("gannet_forward_seconds_count", tenants) == 3, "three passes counted"
        )
        models = {
            s.labels["model"]
            for family in metrics.registry.collect()
            for s in family.samples
            if "model" in s.labels
        }
        assert models == {"tenants/detect.pt"}
    finally:
        cache.close()


def test_a_tenants_file_is_discarded_once_no_load_of_it_is_under_way():
    """A tenant's downloaded file is deleted once its load ends (daemon.drop_download),
    but two loads of one file (two devices, two imgsz) shared it: the first to end
    deleted it under the second, which failed (FileNotFoundError, remembered 30 s). It
    goes once the last of them has ended, failed loads' included."""
    discarded: list[ModelKey] = []
    second_started, second_may_end = threading.Event(), threading.Event()
    load = yolo_loader(lambda uri, version: Path(uri), trace=False)

    def loader(k: ModelKey):
        if k.imgsz == 416:  # the first: ends while the second is still loading
            assert second_started.wait(30)
        else:
            second_started.set()
            assert second_may_end.wait(30)
        return load(k)

    cache = ModelCache(loader, Metrics(), discard=discarded.append)
    first = ModelKey(str(MODEL), "v1", "cpu", 416, "detect", "acme")
    second = ModelKey(str(MODEL), "v1", "cpu", 320, "detect", "acme")
    try:
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(cache.get, first)
            b = pool.submit(cache.get, second)
            a.result(timeout=60)
            assert discarded == [], "the second load still reads the file"
            second_may_end.set()
            b.result(timeout=60)
        assert discarded == [second]
        cache.get(key("v1"))  # an industry model's file stays
        assert discarded == [second]
    finally:
        second_may_end.set()
        cache.close()


def test_close_waits_for_the_load_in_flight_and_starts_no_queued_one():
    """A load still running when the process exits is inside torch while the
    interpreter tears down (an abort); one started after close() returned, from the
    queue, too. close() waits for the one in flight and the queued ones are answered
    "shutting down" without loading."""
    release = threading.Event()
    calls: list[str] = []
    load = yolo_loader(lambda uri, version: Path(uri))

    def held(k: ModelKey):
        calls.append(str(k.tenant))
        assert release.wait(60)
        return load(k)

    cache = ModelCache(held, Metrics(), load_threads=1)
    for tenant in ("first", "queued"):
        with pytest.raises(TransientError, match="still loading"):
            cache.get(key(tenant=tenant), 0.1)
    closed = threading.Event()
    threading.Thread(target=lambda: (cache.close(timeout_s=30), closed.set()), daemon=True).start()
    assert not closed.wait(0.5), "close() returned with a load in flight"
    release.set()
    assert closed.wait(30)
    assert calls == ["first"], "the queued load never started"
    with pytest.raises(TransientError, match="shutting down"):
        cache.get(key(tenant="queued"))


def test_a_load_that_fails_for_want_of_memory_is_retried_not_refused(monkeypatch):
    """A tenant's file that can never serve refuses its tasks (tenant_model_invalid);
    the host running out of memory while it loads is not the file's fault: its tasks
    are retried (model_unavailable) instead of quarantined with a reason that is false.
    The out-of-memory error is simulated (ultralytics' YOLO replaced by one that raises
    MemoryError): filling this machine's 24 GiB to make a real one would take the other
    tests' memory with it."""
    import ultralytics.models

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ultralytics.models, "YOLO", out_of_memory)
    cache = ModelCache(yolo_loader(lambda uri, version: Path(uri)), Metrics())
    try:
        with pytest.raises(TransientError) as err:
            cache.get(key(tenant="acme"))
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
    finally:
        cache.close()
