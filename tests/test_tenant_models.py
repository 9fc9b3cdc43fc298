"""Per-tenant models in gs://MODELS_BUCKET/models/TENANT_ID/, on the GCS emulator.

The tenant models are the real demo detector with its class names changed (the weights
are untouched), so which copy answered a request is visible in the result: a tenant's
model answering another tenant would show up as the wrong class names.
"""

from __future__ import annotations

import time
import uuid
import warnings
from pathlib import Path

import cv2
import pytest
from conftest import SAMPLES, SCENES, expected_counts, gated_storage

from gannet import clients
from gannet import storage as storage_module
from gannet.config_sources import open_configs
from gannet.daemon import drop_download, model_file, model_version
from gannet.dev import demo
from gannet.dev.publish import make_task
from gannet.errors import ErrorCode, PermanentError, TransientError
from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, ModelKey, yolo_loader
from gannet.model_resolver import ModelResolver, tenant_model_lister
from gannet.pipeline import Limits, Pipeline
from gannet.settings import REPO_ROOT
from gannet.stages import Timer
from gannet.storage import Storage, local_version, read_local

DETECT = REPO_ROOT / "models" / "demo" / "detect.pt"
CLASSIFY = REPO_ROOT / "models" / "demo" / "classify.pt"
ORIGINAL = {0: "circle", 1: "square", 2: "triangle"}


def renamed(dst: Path, prefix: str) -> Path:
    """The demo detector with class names `prefix`-circle etc. (same weights)."""
    import torch

    ckpt = torch.load(DETECT, map_location="cpu", weights_only=False)
    for key in ("model", "ema"):
        if ckpt.get(key) is not None:
            ckpt[key].names = {i: f"{prefix}-{n}" for i, n in ORIGINAL.items()}
    torch.save(ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    """An ONNX export of a renamed detector (fixed input 416, batch 1, no simplifier so
    nothing is installed or downloaded)."""
    from ultralytics import YOLO

    pt = renamed(tmp_path_factory.mktemp("onnx") / "detect.pt", "onnx")
    with warnings.catch_warnings():
        # Ultralytics 8.4's exporter drives torch's legacy TorchScript-based ONNX exporter,
        # which warns about its own deprecation at every step and traces with
        # TracerWarnings: theirs to move, not ours (a warning raised as an error inside
        # torch's C++ tracer becomes a SystemError).
        warnings.simplefilter("ignore")
        out = YOLO(str(pt)).export(format="onnx", imgsz=416, simplify=False, dynamic=False)
    return Path(out)


@pytest.fixture
def world(services, tmp_path, request):
    """A models bucket, an industry config with the demo detector, and a Pipeline that
    resolves per-tenant models on every call (TTL 0). Parametrized indirectly: the
    detector's class filter (none by default)."""
    classes = getattr(request, "param", None)
    keep = f", classes: [{', '.join(classes)}]" if classes else ""
    settings = demo.local_settings(services)
    client = clients.storage_client(settings)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client.create_bucket(bucket)
    storage = Storage(client)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"industry: agro\nversion: 1\nmodels:\n  detection: {{path: {DETECT}, imgsz: 416,"
        " confidence_threshold: 0.5" + keep + "}\npipelines:\n  DETECTION: [detection]\n"
    )
    metrics = Metrics()
    cache_dir = tmp_path / "cache"
    # As the daemon loads: a tenant's downloaded file deleted once its load has ended.
    loader = yolo_loader(model_file(storage, cache_dir))
    cache = ModelCache(loader, metrics, discard=drop_download(cache_dir))
    resolver = ModelResolver(
        model_version(storage), ttl_s=0, list_tenant_models=tenant_model_lister(storage, bucket)
    )
    pipeline = Pipeline(
        open_configs(str(config), read_local, local_version),
        storage,
        cache,
        resolver,
        Limits(settings.allowed_buckets, 10**8, 10**8),
    )
    image = cv2.imread(str(SAMPLES / SCENES[0]["file"]))

    def run(tenant: str) -> dict:
        task = make_task(tenant, f"gs://gannet-images/{tenant}/x.jpg", "DETECTION", "t-1")
        route = pipeline.check(task)
        result = pipeline.run_image(task, route, image, "cpu", Timer(lambda s, v: None))
        return result["detection"]["counts"]

    def upload(tenant: str, path: Path, name: str) -> None:
        client.bucket(bucket).blob(f"models/{tenant}/{name}").upload_from_filename(str(path))

    yield run, upload, client.bucket(bucket), cache, resolver
    cache.close()


@pytest.mark.parametrize("world", [["circle", "square", "triangle"]], indirect=True)
def test_a_tenant_model_without_the_classes_its_filter_names_is_not_served(world, tmp_path):
    """The config keeps circles, squares and triangles: an industry model must have
    them to be served at all (load_models), and a tenant's own model, loaded on first
    use, must too. One trained with other names (acme-circle, ...) answered every
    task with no detections, as successes; now its tasks are refused
    (tenant_model_invalid: a failed row and a dead letter naming the model and the
    classes, to replay) while other tenants are served, and a corrected upload serves
    the tenant."""
    run, upload, _, _, _ = world
    want = expected_counts(SCENES[0])
    upload("acme", renamed(tmp_path / "a.pt", "acme"), "detect.pt")
    for _ in range(2):  # and not only on the model's first use
        with pytest.raises(PermanentError) as refused:
            run("acme")
        assert refused.value.code == ErrorCode.TENANT_MODEL_INVALID
        said = refused.value.message
        assert "models/acme/detect.pt" in said and "models.detection.classes" in said
        assert "'circle', 'square', 'triangle' are not classes" in said
        assert "acme-circle" in said
    assert run("globex") == want
    upload("acme", DETECT, "detect.pt")  # the same names as the filter's
    assert run("acme") == want


@pytest.mark.parametrize(
    ("weights", "said"),
    [
        (b"\x00not a checkpoint" * 100, "cannot serve: it is not a model gannet can load"),
        (CLASSIFY.read_bytes(), "cannot serve: it is a classify model, configured as detect"),
    ],
)
def test_a_tenant_model_that_can_never_serve_is_said_to_the_tenant(world, tmp_path, weights, said):
    """A tenant's corrupt upload, or one of another kind, failed every task of the
    tenant as a transient error: five quick retries, then a dead letter saying only
    retries_exhausted, with no row; the reason was in the daemon's logs. Only a new
    upload can fix it: the task is refused (tenant_model_invalid, its row and dead
    letter naming the model and why), other tenants are served, a fixed upload serves."""
    run, upload, _, _, _ = world
    bad = tmp_path / "bad.pt"
    bad.write_bytes(weights)
    upload("acme", bad, "detect.pt")
    for _ in range(2):  # the load's failure is remembered, and stays permanent
        with pytest.raises(PermanentError) as refused:
            run("acme")
        assert refused.value.code is ErrorCode.TENANT_MODEL_INVALID
        assert "tenant acme's own model gs://" in refused.value.message
        assert said in refused.value.message and "upload a fixed one" in refused.value.message
    assert run("globex") == expected_counts(SCENES[0])
    # Nor is the bad upload's file kept on the pod's disk (each tenant's stayed for good).
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    upload("acme", renamed(tmp_path / "fixed.pt", "fixed"), "detect.pt")
    assert run("acme") == {f"fixed-{k}": v for k, v in expected_counts(SCENES[0]).items()}


def test_only_a_downloaded_copy_is_ever_deleted(tmp_path):
    """drop_download deletes the copy download_to made of a gs:// model, never a local
    model file: that is the only copy."""
    local = tmp_path / "detect.pt"
    local.write_bytes(b"weights")
    drop = drop_download(tmp_path / "cache")
    drop(ModelKey(str(local), "1", "cpu", 416, "detect", tenant="acme"))
    assert local.exists()
    copy = storage_module.local_copy("gs://bkt/models/acme/detect.pt", "7", tmp_path / "cache")
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"weights")
    drop(ModelKey("gs://bkt/models/acme/detect.pt", "7", "cpu", 416, "detect", tenant="acme"))
    assert not copy.exists()


def test_tenants_listings_are_not_kept_past_their_time():
    """Each tenant that ever had a task kept its listing of models/TENANT/ for the life
    of the pod (a review's long run: one entry per tenant, thousands); one past its ttl
    is listed afresh anyway, so the expired go at the next look a ttl later."""
    listed: list[str] = []

    def list_models(tenant: str) -> dict[str, str]:
        listed.append(tenant)
        return {}

    resolver = ModelResolver(lambda uri: "1", ttl_s=0.2, list_tenant_models=list_models)
    for n in range(100):
        assert resolver.tenant_models(f"t{n}") == {}
    resolver.tenant_models("t0")
    assert listed.count("t0") == 1, "within its ttl a listing is kept"
    time.sleep(0.25)
    resolver.tenant_models("late")
    assert set(resolver._listings) == {"late"}
    assert resolver.tenant_models("t0") == {} and listed.count("t0") == 2


def test_a_tenant_model_serves_only_its_tenant_and_others_fall_back(world, tmp_path):
    run, upload, _, cache, _ = world
    want = expected_counts(SCENES[0])
    upload("acme", renamed(tmp_path / "a.pt", "acme"), "detect.pt")
    assert run("acme") == {f"acme-{k}": v for k, v in want.items()}
    # Same prefix, different tenant: 'acme-west' must not see models/acme/.
    assert run("acme-west") == want
    assert run("globex") == want
    keys = {k.tenant: k for k in cache.loaded()}
    assert set(keys) == {None, "acme"}
    assert keys["acme"].uri.endswith("/models/acme/detect.pt")
    assert keys[None].uri == str(DETECT)
    # Loaded, it needs no file: each tenant's stayed on the pod's disk (an emptyDir of
    # 10 GiB, past which the kubelet evicts the pod), hundreds of tenants' models.
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_an_uploaded_new_model_is_used_without_restart(world, tmp_path):
    run, upload, bucket, cache, _ = world
    want = expected_counts(SCENES[0])
    upload("acme", renamed(tmp_path / "v1.pt", "v1"), "detect.pt")
    assert run("acme") == {f"v1-{k}": v for k, v in want.items()}
    upload("acme", renamed(tmp_path / "v2.pt", "v2"), "detect.pt")
    assert run("acme") == {f"v2-{k}": v for k, v in want.items()}
    versions = {k.version for k in cache.loaded() if k.tenant == "acme"}
    assert len(versions) == 2, "a new generation is a new cache key"
    bucket.blob("models/acme/detect.pt").delete()
    assert run("acme") == want, "without its own model the tenant gets the industry's"


def test_onnx_tenant_models_load_and_agree_with_pt(world, onnx_model):
    run, upload, _, cache, _ = world
    upload("initech", onnx_model, "detect.onnx")
    want = expected_counts(SCENES[0])
    assert run("initech") == {f"onnx-{k}": v for k, v in want.items()}
    (key,) = [k for k in cache.loaded() if k.tenant == "initech"]
    assert key.uri.endswith("/models/initech/detect.onnx") and key.task == "detect"


def test_pt_wins_over_onnx_for_the_same_kind(world, tmp_path, onnx_model):
    _run, upload, _, _, resolver = world
    upload("hooli", onnx_model, "detect.onnx")
    upload("hooli", renamed(tmp_path / "h.pt", "hooli"), "detect.pt")
    uri, _ = resolver.tenant_override("detection", "hooli")
    assert uri.endswith("/models/hooli/detect.pt")
    assert resolver.tenant_override("segmentation", "hooli") is None


def test_only_the_exact_tenant_model_names_are_taken(world, tmp_path):
    """A tenant can upload any object name under models/TENANT/: only
    models/TENANT/{detect,segment,classify}.{pt,onnx} is its model, not a deeper name
    that ends the same way, nor one that walks back out with `../`."""
    run, upload, _, cache, _ = world
    upload("acme", renamed(tmp_path / "deep.pt", "deep"), "x/models/acme/detect.pt")
    assert run("acme") == expected_counts(SCENES[0]), "the tenant gets the industry's model"
    assert {k.tenant for k in cache.loaded()} == {None}
    # The emulator cannot store a name with '..' (it drops the connection); GCS can, so
    # the listing is written out as the lister would return it.
    escaping = {"gs://b/models/acme/../../escaped/models/acme/detect.pt": "7"}
    resolver = ModelResolver(local_version, list_tenant_models=lambda tenant: escaping)
    assert resolver.tenant_override("detection", "acme") is None


def test_download_to_refuses_an_object_name_that_leaves_the_cache_dir(services, tmp_path):
    """The last line of defence, whatever the caller checked: refused before any request
    (so the emulator, which cannot store such a name, need not hold one)."""
    storage = Storage(clients.storage_client(demo.local_settings(services)))
    cache = tmp_path / "cache"
    for name in ("../../../../escaped.pt", "../../../other/models/detect.pt"):
        with pytest.raises(ValueError, match="outside the model cache"):
            storage.download_to(f"gs://bkt/models/acme/{name}", "7", cache)
    assert list(tmp_path.iterdir()) == []


def test_weights_over_the_size_limit_are_refused_before_they_are_downloaded(services, tmp_path):
    """A tenant's upload is downloaded into memory whole: one of gigabytes took the
    pod's memory (and, its deadline growing with it, outlasted the stall watch). Over
    GANNET_MAX_MODEL_MB it is refused from its metadata, with nothing read or written."""
    settings = demo.local_settings(services)
    client = clients.storage_client(settings)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client.create_bucket(bucket)
    client.bucket(bucket).blob("models/acme/detect.pt").upload_from_string(b"w" * 3 * 2**20)
    storage = Storage(client)
    generation = storage.generation(f"gs://{bucket}/models/acme/detect.pt")
    with pytest.raises(ValueError, match=r"is 3 MB, over the 2 MB limit \(GANNET_MAX_MODEL_MB\)"):
        model_file(storage, tmp_path, 2 * 2**20)(f"gs://{bucket}/models/acme/detect.pt", generation)
    assert list(tmp_path.iterdir()) == []
    path = model_file(storage, tmp_path, 4 * 2**20)(
        f"gs://{bucket}/models/acme/detect.pt", generation
    )
    assert path.stat().st_size == 3 * 2**20


def test_a_tenant_listing_on_a_gcs_that_never_answers_gives_up_within_its_bound(
    services, monkeypatch
):
    """A tenant's model listing runs on a task's thread (every GANNET_MODEL_CHECK_S per
    tenant): against a GCS that takes connections and never answers it ran on the client
    library's defaults, about 2 minutes, the task and its runner waiting all along. It
    now gives up at storage.METADATA_DEADLINE_S (20 s; here 2 s) as a retryable
    model_unavailable. So does a model's version check, on the same thread, which was
    an untyped error (logged as unexpected, with its traceback)."""
    monkeypatch.setattr(storage_module, "METADATA_DEADLINE_S", 2.0)
    settings = demo.local_settings(services)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    clients.storage_client(settings).create_bucket(bucket)
    with gated_storage(services, settings) as (gate, client):
        lister = tenant_model_lister(Storage(client), bucket)
        assert lister("acme") == {}  # answered while GCS answers
        gate.hang()
        started = time.monotonic()
        with pytest.raises(TransientError) as err:
            lister("acme")
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
        assert time.monotonic() - started < 10  # about 3 s (2 minutes before)
        uri = f"gs://{bucket}/models/detect.pt"
        with pytest.raises(TransientError) as err:
            ModelResolver(model_version(Storage(client)), ttl_s=0).version(uri)
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
        assert f"cannot read model {uri}'s version" in err.value.message


@pytest.mark.parametrize("asked", ["classify", "segment"])
def test_an_onnx_model_of_another_kind_than_its_key_is_a_failed_load(onnx_model, asked):
    """An .onnx file is loaded as the task it is asked for (it has no pickled class to
    say otherwise): a detector's export configured as the classifier loaded and failed
    every classification task with an IndexError, and as the segmenter failed with
    torch's internals as the reason. Its export's metadata names its task."""
    cache = ModelCache(yolo_loader(lambda uri, version: Path(uri)), Metrics())
    try:
        with pytest.raises(TransientError) as err:
            cache.get(ModelKey(str(onnx_model), "v1", "cpu", 416, asked))
        assert f"detect.onnx: it is a detect model, configured as {asked}" in err.value.message
        assert cache.get(ModelKey(str(onnx_model), "v1", "cpu", 416, "detect")).task == "detect"
    finally:
        cache.close()
