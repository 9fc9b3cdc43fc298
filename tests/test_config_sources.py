"""Industry configs: validated up front, reloaded without a restart by a thread of their
own (never on a task's), bad pushes refused."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Started, gated_storage, scraped, wait_until

from gannet import clients
from gannet import storage as storage_module
from gannet.config_schema import ConfigError
from gannet.config_sources import ConfigSource, ConfigWatch, _yaml_mapping, parse_config
from gannet.dev import demo
from gannet.dev.local_services import LocalServices
from gannet.errors import ErrorCode, PermanentError
from gannet.metrics import Metrics
from gannet.settings import REPO_ROOT, Settings
from gannet.storage import Storage, local_version, read_local

VALID = """
industry: demo
version: 3
models:
  detection: {path: ../models/demo/detect.pt, confidence_threshold: 0.4, imgsz: 320}
pipelines:
  DETECTION: [detection]
"""


def test_the_shipped_demo_config_is_valid():
    loaded = ConfigSource(
        str(REPO_ROOT / "configs" / "demo.yaml"), read_local, local_version
    ).current()
    spec = loaded.config.models["detection"]
    assert loaded.model_uri(spec) == str(REPO_ROOT / "models" / "demo" / "detect.pt")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VALID.replace("confidence_threshold: 0.4", "confidence_threshold: 4"),
            "models.detection.confidence_threshold",
        ),
        (VALID.replace("[detection]", "[detection, teleport]"), "unknown step 'teleport'"),
        (VALID.replace("version: 3", "versoin: 3"), "versoin"),
        (VALID + "\n  EMPTY: []\n", "pipeline 'EMPTY' has no steps"),
        ("industry: [", "not valid YAML"),
        # YAML keeps the last of a key given twice: a second model would replace the first
        (VALID + "  DETECTION: [detection]\n", "found 'DETECTION' a second time"),
        (
            VALID.replace("imgsz: 320}", "imgsz: 320, confidence_threshold: 0.05}"),
            "found 'confidence_threshold' a second time",
        ),
        (VALID + "tenants: [0123, acme]\n", "quote tenant ids such as '0123'"),
        (VALID + "tenants: [no]\n", "tenant False is not text to YAML"),
    ],
)
def test_errors_name_the_file_and_the_field(text, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(text, "gs://models/demo/config.yaml")
    assert str(err.value).startswith("gs://models/demo/config.yaml")
    assert expected in str(err.value)


def test_a_step_needing_a_disabled_model_is_refused():
    text = VALID.replace("imgsz: 320}", "imgsz: 320, enabled: false}")
    with pytest.raises(ConfigError, match=r"needs an enabled models\.detection"):
        parse_config(text, "c.yaml")


def test_unknown_pipeline_and_tenant_are_permanent_errors():
    loaded = parse_config(VALID + "tenants: [acme]\n", "c.yaml")
    config = loaded.config
    with pytest.raises(PermanentError) as err:
        loaded.plan("NOPE")
    assert err.value.code is ErrorCode.UNKNOWN_PIPELINE and "DETECTION" in err.value.message
    with pytest.raises(PermanentError) as err:
        config.check_tenant("globex")
    assert err.value.code is ErrorCode.UNKNOWN_TENANT
    config.check_tenant("acme")


def _counted(path: Path, metrics: Metrics) -> ConfigSource:
    """A config source whose reloads are counted; the test checks it (check_now)."""
    return ConfigSource(
        str(path),
        read_local,
        local_version,
        on_reload=lambda r: metrics.config_reloads.labels(r).inc(),
    )


def test_changed_config_is_picked_up_and_a_bad_one_keeps_the_last_good(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(VALID)
    metrics = Metrics()
    source = _counted(path, metrics)
    assert source.current().config.version == 3

    path.write_text(VALID.replace("version: 3", "version: 4"))
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert source.current().config.version == 3, "served only once checked"
    source.check_now()
    assert source.current().config.version == 4

    path.write_text(VALID.replace("version: 3", "version: 5").replace("0.4", "7"))
    os.utime(path, (time.time() + 10, time.time() + 10))
    source.check_now()
    assert source.current().config.version == 4, "an invalid push must not be served"
    source.check_now()  # its version is remembered: not read, nor counted, again
    sample = metrics.registry.get_sample_value
    assert sample("gannet_config_reloads_total", {"result": "rejected"}) == 1
    assert sample("gannet_config_reloads_total", {"result": "loaded"}) == 1


def test_a_write_landing_while_the_config_is_read_is_served_at_the_next_check(
    tmp_path, monkeypatch
):
    """A write lands between the read of the bytes and the version's stat (an edit in
    place, a ConfigMap's swap): the version must describe what was read, or the new
    file is never served (the next checks see no change), here with its new pipeline's
    tasks refused as unknown_pipeline for good."""
    path = tmp_path / "config.yaml"
    path.write_text(VALID)
    source = ConfigSource(str(path), read_local, local_version)
    newer = VALID.replace("version: 3", "version: 4") + "  MORE: [detection]\n"
    read_bytes = Path.read_bytes

    def read_then_a_write_lands(self: Path) -> bytes:
        data = read_bytes(self)
        if self == path and b"MORE" not in data:
            path.write_text(newer)
            os.utime(path, (time.time() + 10, time.time() + 10))
        return data

    path.write_text(VALID.replace("version: 3", "version: 4"))
    os.utime(path, (time.time() + 5, time.time() + 5))
    monkeypatch.setattr(Path, "read_bytes", read_then_a_write_lands)
    source.check_now()
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    source.check_now()
    assert "MORE" in source.current().plans, "the file as it is now is served"


def test_a_deleted_config_says_so_and_the_last_good_one_serves(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text(VALID)
    metrics = Metrics()
    source = _counted(path, metrics)
    path.unlink()
    source.check_now()
    assert source.current().config.version == 3
    assert "config no longer exists; keeping the current one" in caplog.text
    assert (
        metrics.registry.get_sample_value("gannet_config_reloads_total", {"result": "failed"}) == 1
    )


def test_a_reload_naming_a_model_that_cannot_load_is_rejected_and_the_old_one_serves(
    tmp_path, caplog
):
    """The reload loads (warms) the new config's models, as start-up does, before it is
    served: before, a config naming a missing, corrupt, non-YOLO or wrong-kind model was
    served at once ("config reloaded"), and every task of the industry failed until it
    was dead-lettered, while the last good model was loaded. The check runs on the
    thread that checks (the daemon's ConfigWatch); tasks keep getting the old config."""
    import shutil

    import torch

    from gannet.model_cache import ModelCache, yolo_loader
    from gannet.model_resolver import ModelResolver
    from gannet.pipeline import Limits, Pipeline

    models = REPO_ROOT / "models" / "demo"
    shutil.copy(models / "detect.pt", tmp_path / "good.pt")
    shutil.copy(models / "detect.pt", tmp_path / "fixed.pt")
    shutil.copy(models / "classify.pt", tmp_path / "classifier.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint" * 100)
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "notyolo.pt")
    path = tmp_path / "config.yaml"

    def push(weights: str, version: int) -> None:
        path.write_text(
            VALID.replace("../models/demo/detect.pt", weights).replace(
                "version: 3", f"version: {version}"
            )
        )
        os.utime(path, (time.time() + version, time.time() + version))

    push("good.pt", 1)
    metrics = Metrics()
    source = _counted(path, metrics)
    cache = ModelCache(yolo_loader(lambda uri, v: Path(uri), trace=False), metrics)
    resolver = ModelResolver(local_version, ttl_s=0)
    pipeline = Pipeline(source, None, cache, resolver, Limits(["b"], 10**8, 10**8))  # type: ignore[arg-type]
    hold = threading.Event()  # set: the check waits until `go_on`
    checking, go_on = threading.Event(), threading.Event()

    def check(loaded):
        if hold.is_set():
            checking.set()
            go_on.wait(timeout=30)
        pipeline.load_models(loaded, ["cpu"])

    source.check_models_with(check)
    try:
        pipeline.warm(["cpu"])
        push("missing.pt", 2)
        hold.set()
        checker = threading.Thread(target=source.check_now)
        checker.start()
        assert checking.wait(timeout=10)
        assert source.current().config.version == 1, "tasks get the old one meanwhile"
        hold.clear()
        go_on.set()
        checker.join(timeout=60)
        for version, weights in enumerate(
            ["missing.pt", "corrupt.pt", "notyolo.pt", "classifier.pt"], start=2
        ):
            push(weights, version)
            caplog.clear()
            source.check_now()
            assert source.current().config.version == 1, weights
            rejected = [r for r in caplog.records if r.levelname == "ERROR"][-1]
            assert weights in rejected.fields["error"], rejected.fields
            assert "models.detection" in rejected.fields["error"]
            key = resolver.key(source.current(), "detection", None, "cpu")
            assert cache.get(key).key.uri == str(tmp_path / "good.pt"), "tasks are served"
        rejections = metrics.registry.get_sample_value(
            "gannet_config_reloads_total", {"result": "rejected"}
        )
        push("fixed.pt", 9)
        source.check_now()
        assert source.current().config.version == 9
        assert str(tmp_path / "fixed.pt") in {k.uri for k in cache.loaded()}, "warmed"
    finally:
        go_on.set()
        cache.close()
    assert rejections and rejections >= 4, "each check of a bad push is counted"
    sample = metrics.registry.get_sample_value
    assert sample("gannet_config_reloads_total", {"result": "loaded"}) == 1


def test_a_push_whose_model_is_not_there_yet_is_logged_once_not_at_every_check(
    tmp_path, caplog, monkeypatch
):
    """A valid config whose weights are not uploaded yet is checked again at every check
    (5 s by default): each check logged the rejection and counted it, 12 errors a minute
    until fixed. Logged and counted once per stored version, logged again after
    REJECTION_REPEAT_S while it stays rejected, and served once its weights are there."""
    import shutil

    from gannet import config_sources
    from gannet.model_cache import ModelCache, yolo_loader
    from gannet.model_resolver import ModelResolver
    from gannet.pipeline import load_models

    shutil.copy(REPO_ROOT / "models" / "demo" / "detect.pt", tmp_path / "good.pt")
    path = tmp_path / "config.yaml"
    path.write_text(VALID.replace("../models/demo/detect.pt", "good.pt"))
    metrics = Metrics()
    source = _counted(path, metrics)
    cache = ModelCache(
        yolo_loader(lambda uri, v: Path(uri), trace=False), metrics, retry_failed_after_s=0
    )
    resolver = ModelResolver(local_version, ttl_s=0)
    source.check_models_with(lambda loaded: load_models(loaded, cache, resolver, ["cpu"]))
    sample = metrics.registry.get_sample_value
    try:
        path.write_text(
            VALID.replace("../models/demo/detect.pt", "later.pt").replace(
                "version: 3", "version: 4"
            )
        )
        os.utime(path, (time.time() + 5, time.time() + 5))
        caplog.clear()
        for _ in range(3):
            source.check_now()
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "later.pt" in errors[0].fields["error"]
        assert sample("gannet_config_reloads_total", {"result": "rejected"}) == 1
        assert source.rejected() == [str(path)], "still rejected, for gannet_configs_rejected"

        monkeypatch.setattr(config_sources, "REJECTION_REPEAT_S", 0.0)
        source.check_now()
        assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 2, "said again"
        assert sample("gannet_config_reloads_total", {"result": "rejected"}) == 1

        shutil.copy(tmp_path / "good.pt", tmp_path / "later.pt")
        source.check_now()
        assert source.current().config.version == 4
        assert source.rejected() == []
    finally:
        cache.close()


@pytest.mark.parametrize(
    ("model", "step", "field"),
    [
        ("classes: [circle, sqaure, triangle]", "detection", "models.detection.classes"),
        ("classes: []", "{detection: {classes: [sqaure]}}", "pipelines.DETECTION.0.params.classes"),
    ],
    ids=["model", "step"],
)
def test_a_class_filter_naming_a_class_the_model_lacks_is_refused(tmp_path, model, step, field):
    """A filter keeps the boxes of the classes it names: one with a typo (`sqaure`) never
    matches, and the config served every task of the industry without a square, as
    successes. It is refused where the models are loaded (start-up, and a reload's
    check), naming the field and the model's classes."""
    from gannet.config_sources import open_configs
    from gannet.model_cache import ModelCache, yolo_loader
    from gannet.model_resolver import ModelResolver
    from gannet.pipeline import Limits, Pipeline

    path = tmp_path / "config.yaml"
    path.write_text(
        VALID.replace("../models/demo/", f"{REPO_ROOT}/models/demo/")
        .replace("imgsz: 320}", f"imgsz: 320, {model}}}")
        .replace("[detection]", f"[{step}]")
    )
    cache = ModelCache(yolo_loader(lambda uri, v: Path(uri), trace=False), Metrics())
    configs = open_configs(str(path), read_local, local_version)
    pipeline = Pipeline(configs, None, cache, ModelResolver(local_version), Limits([], 1, 1))  # type: ignore[arg-type]
    try:
        with pytest.raises(ConfigError) as err:
            pipeline.warm(["cpu"])
    finally:
        cache.close()
    assert f"{field}: 'sqaure' is not a class of" in str(err.value)
    assert "(its classes: circle, square, triangle)" in str(err.value)


def _gs_config(services: LocalServices) -> tuple[Any, str, Any]:
    """The local settings, and VALID uploaded as demo/config.yaml to a new bucket on the
    GCS emulator: (settings, bucket, the config's blob)."""
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    settings = demo.local_settings(services)
    client = clients.storage_client(settings)
    client.create_bucket(bucket)
    blob = client.bucket(bucket).blob("demo/config.yaml")
    blob.upload_from_string(VALID)
    return settings, bucket, blob


def test_a_task_never_waits_for_the_config_check_on_a_slow_gcs(services: LocalServices):
    """A gs:// config, its bucket reached through a relay that adds 1 s to each round
    trip (GCS slow, or far): the periodic check (the object's generation, one metadata
    request) and the reload of a changed config take seconds. A task thread asking for
    its config (Pipeline.check on a stream's callback thread, a runner) must get the
    current one at once, and the changed one once it is loaded, never wait for either.
    Before the watch thread, the check ran on the thread that asked when it was due
    (here made due at every call): that call took 3.0 s."""
    settings, bucket, blob = _gs_config(services)
    slow_gcs = Started("gannet.dev.relay", str(services.ports.gcs), "--latency-ms=1000")
    try:
        slow = settings.model_copy(
            update={"storage_emulator_host": f"http://127.0.0.1:{slow_gcs.port}"}
        )
        storage = Storage(clients.storage_client(slow))
        source = ConfigSource(
            f"gs://{bucket}/demo/config.yaml", storage.read_url, storage.generation
        )
        watch = ConfigWatch(source, every_s=0.1)  # the daemon's: every 30 s
        watch.start()
        try:
            blob.upload_from_string(VALID.replace("version: 3", "version: 4"))
            waits = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                started = time.perf_counter()
                version = source.for_tenant("acme").config.version
                waits.append(time.perf_counter() - started)
                if version == 4:
                    break
                time.sleep(0.01)
        finally:
            watch.stop(timeout_s=10)
        assert version == 4, "the changed config is served"
        assert max(waits) < 0.1, f"the task waited {max(waits):.2f} s for the check"
    finally:
        slow_gcs.stop()


@pytest.mark.parametrize("fault", ["hang", "drip"])
def test_a_config_check_on_a_gcs_that_does_not_answer_gives_up_within_its_deadline(
    services: LocalServices, caplog, monkeypatch, fault: str
):
    """A gs:// config behind a GCS that takes connections and never answers, or answers
    a byte at a time: a check (a metadata request) ran on the client library's defaults,
    60 s a read retried for up to 120 s, about 2 minutes when nothing came, and for good
    against the drip, whose reads each got a byte in time; the next checks waited behind
    it on the one watch thread. Each request now ends at storage.METADATA_DEADLINE_S
    (20 s; 2 s here, so the test does not wait 20), the check is logged and counted as
    failed, the current config serves on, and a later check, once GCS answers again,
    picks up a change."""
    assert storage_module.METADATA_DEADLINE_S <= 20
    monkeypatch.setattr(storage_module, "METADATA_DEADLINE_S", 2.0)
    settings, bucket, blob = _gs_config(services)
    with gated_storage(services, settings) as (gate, client):
        storage = Storage(client)
        metrics = Metrics()
        source = ConfigSource(
            f"gs://{bucket}/demo/config.yaml",
            storage.read_url,
            storage.generation,
            lambda r: metrics.config_reloads.labels(r).inc(),
        )
        if fault == "hang":
            gate.hang()
        else:
            gate.drip(0.2)
        check = threading.Thread(target=source.check_now, daemon=True)
        started = time.monotonic()
        check.start()
        check.join(timeout=20)
        took = time.monotonic() - started
        assert not check.is_alive(), "the check was still waiting for GCS after 20 s"
        assert took < 10, f"the check took {took:.1f} s"
        assert source.for_tenant("acme").config.version == 3, "the current config serves on"
        sample = metrics.registry.get_sample_value
        assert sample("gannet_config_reloads_total", {"result": "failed"}) == 1
        assert any("config check failed" in r.getMessage() for r in caplog.records)

        gate.answer()
        blob.upload_from_string(VALID.replace("version: 3", "version: 4"))
        source.check_now()
        assert source.for_tenant("acme").config.version == 4, "the change, once GCS answers"


def test_the_watch_outlives_a_failing_check_and_stops_without_waiting_for_a_hung_one(
    tmp_path, caplog
):
    """An unexpected error in a check (here the model check raising what it should not)
    is logged and counted, and the next check serves the config. stop() returns at once
    while a check hangs (GCS not answering), and no check starts after it."""
    path = tmp_path / "config.yaml"
    path.write_text(VALID)
    hold, hung, release = threading.Event(), threading.Event(), threading.Event()

    def version_of(uri: str) -> str:
        if hold.is_set():
            hung.set()
            release.wait(timeout=30)
        return local_version(uri)

    metrics = Metrics()
    source = ConfigSource(
        str(path), read_local, version_of, lambda r: metrics.config_reloads.labels(r).inc()
    )
    failures = [RuntimeError("a bug in the model check")]

    def check(loaded: object) -> None:
        if failures:
            raise failures.pop()

    source.check_models_with(check)
    watch = ConfigWatch(source, every_s=0.01)
    watch.start()
    try:
        path.write_text(VALID.replace("version: 3", "version: 4"))
        os.utime(path, (time.time() + 5, time.time() + 5))
        wait_until(lambda: source.current().config.version == 4, "the next check serves it")
        sample = metrics.registry.get_sample_value
        assert sample("gannet_config_reloads_total", {"result": "failed"}) == 1
        logged = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
        assert logged and logged[0].exc_info and logged[0].threadName == "gannet-config-watch"

        hold.set()
        assert hung.wait(timeout=10)
        started = time.perf_counter()
        watch.stop()
        assert time.perf_counter() - started < 0.1, "stop() waited for the hung check"
        hold.clear()
    finally:
        release.set()
    watch._thread.join(timeout=10)
    assert not watch._thread.is_alive(), "no check after stop()"


def test_a_daemon_picks_up_a_changed_config_with_no_task_arriving(stack, tmp_path):
    """The real daemon on a local config (checked every 0.5 s here, GANNET_CONFIG_CHECK_S;
    5 s by default): the change is loaded and served on its watch thread while no message
    arrives. Before, only a task asking for its config could notice it, so an idle pod
    served the old config, and its first task after the change took the reload and its
    model loads."""
    config = tmp_path / "demo.yaml"
    demo_yaml = (REPO_ROOT / "configs" / "demo.yaml").read_text()
    config.write_text(demo_yaml.replace("../models/", f"{REPO_ROOT}/models/"))
    daemon = stack.start_daemon(GANNET_CONFIG_URI=str(config), GANNET_CONFIG_CHECK_S="0.5")
    config.write_text(config.read_text().replace("version: 1", "version: 2"))
    wait_until(
        lambda: scraped(daemon.metrics_port, "gannet_config_reloads_total", result="loaded"),
        "the changed config is loaded",
        timeout_s=30,
    )
    reloaded = [e for e in daemon.log_entries() if e["message"] == "config reloaded"]
    assert [e["thread"] for e in reloaded] == ["gannet-config-watch"]
    assert daemon.stop() == 0


def test_the_config_is_checked_every_30_s_from_gcs_and_5_s_from_a_file_unless_set():
    """The watch's interval: a metadata request per config and pod on gs://, a stat on
    a local file; GANNET_CONFIG_CHECK_S, when set, for either."""
    on_gcs, local = "gs://models/demo/config.yaml", "/etc/gannet/config.yaml"
    assert Settings(config_uri=on_gcs).config_every_s() == 30.0
    assert Settings(config_uri=local).config_every_s() == 5.0
    assert Settings(config_uri=on_gcs, config_check_s=0.5).config_every_s() == 0.5
    assert Settings(config_uri=local, config_check_s=60.0).config_every_s() == 60.0
    # Served from the models bucket by industry: a gs:// config.
    assert Settings(industry="agro", models_bucket="models").config_every_s() == 30.0


def test_anchors_and_merge_keys_load_as_yaml_reads_them():
    """Keys given twice are refused, but a merge key's (`<<:`) are meant to be
    overridden, nested merges and two merges in one mapping included."""
    text = """
x-detector: &detector {path: d.pt, confidence_threshold: 0.4, imgsz: 320}
x-tuned: &tuned
  <<: *detector
  confidence_threshold: 0.5
x-classes: &classes {classes: [circle]}
models:
  detection:
    <<: *tuned
    <<: *classes
    imgsz: 416
"""
    spec = _yaml_mapping(text, "c.yaml")["models"]["detection"]
    assert spec == {
        "path": "d.pt",
        "confidence_threshold": 0.5,
        "imgsz": 416,
        "classes": ["circle"],
    }
