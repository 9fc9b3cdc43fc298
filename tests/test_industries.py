"""Industry and deployment configs: the shipped ones are valid, step params are checked up
front, one deployment serves several industries (or one, with GANNET_INDUSTRY), configs
in gs:// reload by generation, and a bad push keeps the last good config serving."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from gannet import clients
from gannet.config_schema import ConfigError
from gannet.config_sources import (
    ConfigSource,
    DeploymentSource,
    open_configs,
    parse_config,
)
from gannet.daemon import build_configs
from gannet.dev import demo
from gannet.errors import ErrorCode, PermanentError
from gannet.metrics import Metrics
from gannet.settings import REPO_ROOT, Settings
from gannet.steps import SlicedDetectionParams
from gannet.storage import Storage, local_version, read_local

CONFIGS = REPO_ROOT / "configs"
DEMO_DETECT = REPO_ROOT / "models" / "demo" / "detect.pt"
BASE = """
industry: agro
version: 1
models:
  detection: {path: d.pt}
  segmentation: {path: s.pt}
  classification: {path: c.pt, enabled: false}
pipelines:
"""


def test_the_shipped_configs_are_valid_and_have_the_promised_pipelines():
    expected = {
        "agro": {"DETECTION", "FULL_PIPELINE", "FIELD_ANALYSIS"},
        "vending": {"DETECTION", "SHELF_AUDIT", "FULL_PIPELINE"},
        "demo": {"DETECTION"},
    }
    for industry, pipelines in expected.items():
        source = open_configs(str(CONFIGS / f"{industry}.yaml"), read_local, local_version)
        assert isinstance(source, ConfigSource)
        config = source.current().config
        assert config.industry == industry and set(config.pipelines) == pipelines
    agro = parse_config((CONFIGS / "agro.yaml").read_text(), "agro.yaml")
    assert [s.name for s in agro.plan("FULL_PIPELINE")] == [
        "segmentation",
        "detection",
        "estimation",
    ]
    field = agro.plan("FIELD_ANALYSIS")
    sliced = next(s for s in field if s.name == "sliced_detection")
    assert isinstance(sliced.params, SlicedDetectionParams) and sliced.params.slice_size == 512
    vending = parse_config((CONFIGS / "vending.yaml").read_text(), "vending.yaml")
    assert [s.name for s in vending.plan("SHELF_AUDIT")] == [
        "segmentation",
        "detection",
        "classification",
    ]


@pytest.mark.parametrize(
    ("pipeline", "expected"),
    [
        (
            "  P: [{sliced_detection: {slice_sise: 512}}]",
            "pipelines.P.0.params.slice_sise: Extra inputs are not permitted",
        ),
        ("  P: [{sliced_detection: {overlap: 0.95}}]", "pipelines.P.0.params.overlap"),
        ("  P: [detection, {estimation: {px_per_cm: -1}}]", "pipelines.P.1.params.px_per_cm"),
        (
            "  P: [{detection: {confidence_threshold: 2}}]",
            "pipelines.P.0.params.confidence_threshold",
        ),
        (
            "  P: [segmentation, estimation, {detection: {classes: circle}}]",
            "pipelines.P.2.params.classes",
        ),
        ("  P: [estimation]", "must come after one of detection, sliced_detection"),
        ("  P: [segmentation]\n  Q: [classification]", "needs an enabled models.classification"),
    ],
)
def test_step_params_and_order_are_checked_when_the_config_loads(pipeline, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + pipeline + "\n", "gs://models/agro/config.yaml")
    message = str(err.value)
    assert message.startswith("gs://models/agro/config.yaml: ")
    assert expected in message


def _deployment(
    tmp: Path, tenants: dict[str, str], default: str | None = None, version: str = "1"
) -> Path:
    lines = [
        "deployment: test",
        "industries:",
        f"  agro: {CONFIGS / 'agro.yaml'}",
        f"  vending: {CONFIGS / 'vending.yaml'}",
        "tenants:",
        *[f"  {t}: {i}" for t, i in tenants.items()],
        f"# version {version}",
    ]
    if default:
        lines.append(f"default_industry: {default}")
    path = tmp / "deployment.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_deployment_serves_each_tenant_with_its_industry(tmp_path):
    path = _deployment(tmp_path, {"farm-a": "agro", "shop-b": "vending"})
    source = open_configs(str(path), read_local, local_version)
    assert isinstance(source, DeploymentSource)
    assert source.for_tenant("farm-a").config.industry == "agro"
    assert source.for_tenant("shop-b").config.industry == "vending"
    assert sorted(c.config.industry for c in source.served()) == ["agro", "vending"]
    with pytest.raises(PermanentError) as err:
        source.for_tenant("stranger")
    assert err.value.code is ErrorCode.UNKNOWN_TENANT
    # Said to the publisher (its dead letter, its row): what to do, not where the config is.
    assert "ask its operators" in err.value.message and str(tmp_path) not in err.value.message

    with_default = open_configs(
        str(_deployment(tmp_path, {}, default="vending")), read_local, local_version
    )
    assert with_default.for_tenant("stranger").config.industry == "vending"


def test_gannet_industry_narrows_a_deployment_and_must_match_a_single_config(tmp_path):
    path = _deployment(tmp_path, {"farm-a": "agro", "shop-b": "vending"})
    only_agro = open_configs(str(path), read_local, local_version, industry="agro")
    assert [c.config.industry for c in only_agro.served()] == ["agro"]
    assert only_agro.for_tenant("farm-a").config.industry == "agro"
    with pytest.raises(PermanentError) as err:
        only_agro.for_tenant("shop-b")
    assert err.value.code is ErrorCode.UNKNOWN_TENANT and "does not serve" in err.value.message

    with pytest.raises(ConfigError, match="has no 'retail'"):
        open_configs(str(path), read_local, local_version, industry="retail")
    with pytest.raises(ConfigError, match="industry: is 'agro'"):
        open_configs(str(CONFIGS / "agro.yaml"), read_local, local_version, industry="vending")
    assert (
        open_configs(str(CONFIGS / "agro.yaml"), read_local, local_version, industry="agro")
        .served()[0]
        .config.industry
        == "agro"
    )


def test_a_deployment_change_is_picked_up_and_a_broken_one_is_rejected(tmp_path):
    path = _deployment(tmp_path, {"farm-a": "agro"})
    metrics = Metrics()
    source = open_configs(
        str(path),
        read_local,
        local_version,
        on_reload=lambda r: metrics.config_reloads.labels(r).inc(),
    )
    with pytest.raises(PermanentError):
        source.for_tenant("shop-b")

    _deployment(tmp_path, {"farm-a": "agro", "shop-b": "vending"}, version="2")
    os.utime(path, (time.time() + 5, time.time() + 5))
    source.check_now()
    assert source.for_tenant("shop-b").config.industry == "vending"

    # Names an industry config that does not exist: refused as a whole, old mapping stays.
    path.write_text(
        path.read_text()
        .replace(str(CONFIGS / "vending.yaml"), "missing.yaml")
        .replace("farm-a: agro", "farm-a: vending")
    )
    os.utime(path, (time.time() + 10, time.time() + 10))
    source.check_now()
    assert source.for_tenant("farm-a").config.industry == "agro"
    sample = metrics.registry.get_sample_value
    assert sample("gannet_config_reloads_total", {"result": "rejected"}) == 1
    assert sample("gannet_config_reloads_total", {"result": "loaded"}) == 1


def test_a_mapping_pushed_before_its_new_industry_config_is_served_once_that_config_exists(
    tmp_path,
):
    """A rollout that pushes the deployment mapping first and the new industry's config a
    moment later (`gcloud storage cp` copies in any order): the mapping is refused while
    the config it names is missing, and served once that config exists. Remembered as
    rejected, it stayed so until the mapping file itself changed again, and the new
    industry's tenants were refused as unknown (dead-lettered) meanwhile."""
    vending = tmp_path / "vending.yaml"
    path = _deployment(tmp_path, {"farm-a": "agro"})
    source = open_configs(str(path), read_local, local_version)
    _deployment(tmp_path, {"farm-a": "agro", "shop-b": "vending"}, version="2")
    path.write_text(path.read_text().replace(str(CONFIGS / "vending.yaml"), str(vending)))
    os.utime(path, (time.time() + 5, time.time() + 5))
    source.check_now()
    with pytest.raises(PermanentError):  # the config it names is not there yet
        source.for_tenant("shop-b")
    vending.write_text(
        (CONFIGS / "vending.yaml").read_text().replace("../models", str(REPO_ROOT / "models"))
    )
    source.check_now()
    assert source.for_tenant("shop-b").config.industry == "vending"


def test_a_deployment_checks_the_models_of_each_industry_it_adds_or_reloads(tmp_path):
    """The daemon's check (Pipeline.load_models, real loads): a mapping adding an
    industry whose model does not load is rejected as a whole, and an industry config
    already served is checked on its own reloads."""
    from gannet.model_cache import ModelCache, yolo_loader
    from gannet.model_resolver import ModelResolver
    from gannet.pipeline import Limits, Pipeline

    vending = tmp_path / "vending.yaml"
    vending.write_text(
        (CONFIGS / "vending.yaml").read_text().replace("../models/demo/", "missing/")
    )
    path = _deployment(tmp_path, {"farm-a": "agro"})
    path.write_text(path.read_text().replace(f"  vending: {CONFIGS / 'vending.yaml'}\n", ""))
    source = open_configs(str(path), read_local, local_version)
    cache = ModelCache(yolo_loader(lambda uri, v: Path(uri), trace=False), Metrics())
    pipeline = Pipeline(source, None, cache, ModelResolver(local_version), Limits([], 1, 1))  # type: ignore[arg-type]
    source.check_models_with(lambda loaded: pipeline.load_models(loaded, ["cpu"]))
    try:
        _deployment(tmp_path, {"farm-a": "agro", "shop-b": "vending"}, version="2")
        path.write_text(path.read_text().replace(str(CONFIGS / "vending.yaml"), str(vending)))
        os.utime(path, (time.time() + 5, time.time() + 5))
        source.check_now()
        with pytest.raises(PermanentError):
            source.for_tenant("shop-b")  # still the old mapping

        agro = tmp_path / "agro.yaml"
        agro.write_text(
            (CONFIGS / "agro.yaml")
            .read_text()
            .replace("../models/demo/", f"{REPO_ROOT}/models/demo/")
        )
        first = _deployment(tmp_path, {"farm-a": "agro"}, version="3")
        first.write_text(
            first.read_text()
            .replace(str(CONFIGS / "agro.yaml"), str(agro))
            .replace(f"  vending: {CONFIGS / 'vending.yaml'}\n", "")
        )
        os.utime(path, (time.time() + 10, time.time() + 10))
        source.check_now()
        assert source.for_tenant("farm-a").config.industry == "agro"
        agro.write_text(
            agro.read_text().replace("version: 1", "version: 2").replace("detect.pt", "gone.pt")
        )
        os.utime(agro, (time.time() + 15, time.time() + 15))
        source.check_now()  # the mapping unchanged, its industry config checked
        assert source.for_tenant("farm-a").config.version == 1
    finally:
        cache.close()


def test_configs_in_gcs_reload_by_generation_and_a_bad_push_keeps_serving(services):
    """gs://MODELS_BUCKET/INDUSTRY/config.yaml, derived from GANNET_INDUSTRY and
    GANNET_MODELS_BUCKET, on the GCS emulator."""
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    base = demo.local_settings(services)
    client = clients.storage_client(base)
    client.create_bucket(bucket)
    blob = client.bucket(bucket).blob("agro/config.yaml")
    text = (
        (CONFIGS / "agro.yaml").read_text().replace("../models/demo/", f"{REPO_ROOT}/models/demo/")
    )
    blob.upload_from_string(text)
    settings = Settings(
        **{**base.model_dump(exclude={"config_uri"}), "industry": "agro", "models_bucket": bucket}
    )
    assert settings.config_location() == f"gs://{bucket}/agro/config.yaml"
    metrics = Metrics()
    source = build_configs(settings, Storage(client), metrics)
    assert source.for_tenant("any").config.version == 1

    def served() -> list[tuple[str, str]]:
        """gannet_config_info's series: (version, generation) of the config served."""
        [family] = [f for f in metrics.registry.collect() if f.name == "gannet_config_info"]
        return [(x.labels["version"], x.labels["generation"]) for x in family.samples]

    blob.reload()
    assert served() == [("1", str(blob.generation))]

    sample = metrics.registry.get_sample_value
    assert sample("gannet_configs_rejected") == 0
    blob.upload_from_string(text.replace("confidence_threshold: 0.5", "confidence_threshold: 5"))
    source.check_now()  # the daemon's ConfigWatch: every 30 s
    assert source.for_tenant("any").config.version == 1
    assert served()[0][0] == "1", "a rejected push does not show as served"
    source.check_now()
    assert sample("gannet_configs_rejected") == 1, "for as long as it is stored"
    blob.upload_from_string(text.replace("version: 1", "version: 2"))
    source.check_now()
    assert source.for_tenant("any").config.version == 2
    blob.reload()
    assert served() == [("2", str(blob.generation))], "the new version replaces the old"
    assert sample("gannet_configs_rejected") == 0
    assert sample("gannet_config_reloads_total", {"result": "rejected"}) == 1
    assert sample("gannet_config_reloads_total", {"result": "loaded"}) == 1


def test_relative_model_paths_in_a_gcs_config_resolve_inside_its_bucket(services):
    """The shipped configs' `../models/...` paths, unchanged, from a config in a bucket:
    they name the bucket's models/ objects (not `agro/../models/...`, an object that
    does not exist), and a path that climbs above the bucket is refused when loaded."""
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client = clients.storage_client(demo.local_settings(services))
    client.create_bucket(bucket)
    blobs = client.bucket(bucket)
    blobs.blob("models/demo/detect.pt").upload_from_filename(str(DEMO_DETECT))
    text = (CONFIGS / "agro.yaml").read_text()
    blobs.blob("agro/config.yaml").upload_from_string(text)
    storage = Storage(client)
    uri = f"gs://{bucket}/agro/config.yaml"
    loaded = ConfigSource(uri, storage.read_url, storage.generation).current()
    model = loaded.model_uri(loaded.config.models["detection"])
    assert model == f"gs://{bucket}/models/demo/detect.pt"
    assert storage.generation(model), "the object the config names exists"

    blobs.blob("agro/config.yaml").upload_from_string(text.replace("../models", "../../models"))
    with pytest.raises(ConfigError, match="climbs above gs://"):
        ConfigSource(uri, storage.read_url, storage.generation)


def test_one_daemon_serves_two_industries_and_rls_keeps_their_rows_apart(stack, tmp_path):
    """The real daemon on a deployment config: an agro tenant and a vending tenant, each
    gets its industry's pipeline; then, as a non-superuser with app.current_tenant set to
    one of them, the other's row can be neither read nor written."""
    import psycopg
    from conftest import SCENES, expected_counts

    farm, shop = f"{stack.tenant}-farm", f"{stack.tenant}-shop"
    path = _deployment(tmp_path, {farm: "agro", shop: "vending"})
    entry = next(e for e in SCENES if e["patches"] and e["shapes"])
    tasks = []
    for tenant, pipeline in ((farm, "FULL_PIPELINE"), (shop, "SHELF_AUDIT"), (shop, "NOPE")):
        stack.tenant = tenant
        tasks.append(stack.task(stack.upload(entry["file"]), pipeline=pipeline))
    stack.start_daemon(GANNET_CONFIG_URI=str(path))
    stack.publish(tasks)
    rows = demo.wait_for_rows(
        stack.settings.database_url,
        {farm: [tasks[0].task_id], shop: [tasks[1].task_id, tasks[2].task_id]},
        timeout_s=120,
        progress=False,
    )
    agro, vending, unknown = (rows[t.task_id] for t in tasks)
    assert agro["status"] == "succeeded" and agro["result"]["industry"] == "agro"
    assert agro["result"]["estimation"]["counts"] == expected_counts(entry)
    assert "classification" not in agro["result"]
    assert vending["status"] == "succeeded" and vending["result"]["industry"] == "vending"
    assert vending["result"]["classification"]["counts"] == {
        k: v for k, v in entry["color_counts"].items() if v
    }
    assert "estimation" not in vending["result"]
    assert (unknown["status"], unknown["error_code"]) == ("failed", "unknown_pipeline")

    with psycopg.connect(stack.settings.database_url) as conn:
        conn.execute("SELECT set_config('app.current_tenant', %s, false)", (farm,))
        visible = conn.execute("SELECT task_id FROM task_results").fetchall()
        assert visible == [(tasks[0].task_id,)]
        updated = conn.execute(
            "UPDATE task_results SET callback_status = 'x' WHERE task_id = %s", (tasks[1].task_id,)
        ).rowcount
        assert updated == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO task_results (task_id, tenant_id, status) VALUES (%s, %s, 'failed')",
                (f"forged-{shop}", shop),
            )


def test_a_tenant_is_never_sent_to_an_industry_whose_config_leaves_it_out(tmp_path):
    """A mapping that sends a tenant to an industry whose `tenants:` does not list it is
    rejected (every task of that tenant would have been refused as unknown_tenant and
    dead-lettered), and served once the industry's config lists it; an industry config
    that drops a tenant the mapping sends to it is not served until the mapping moves
    the tenant. Either order of a rollout works."""
    agro = tmp_path / "agro.yaml"
    shipped = (CONFIGS / "agro.yaml").read_text().replace("../models", str(REPO_ROOT / "models"))
    agro.write_text(shipped + "tenants: [farm-a]\n")
    path = _deployment(tmp_path, {"farm-a": "agro"})
    path.write_text(path.read_text().replace(str(CONFIGS / "agro.yaml"), str(agro)))
    source = open_configs(str(path), read_local, local_version)

    path.write_text(path.read_text().replace("farm-a: agro", "farm-a: agro\n  farm-b: agro"))
    os.utime(path, (time.time() + 5, time.time() + 5))
    source.check_now()
    with pytest.raises(PermanentError) as err:  # the old mapping serves: not routed
        source.for_tenant("farm-b")
    assert "not mapped" in err.value.message

    agro.write_text(shipped + "tenants: [farm-a, farm-b]\n")
    os.utime(agro, (time.time() + 10, time.time() + 10))
    source.check_now()  # the mapping (still refused), then the industry config
    source.check_now()  # the mapping again: served
    assert source.for_tenant("farm-b").config.industry == "agro"

    # The other way round: the industry config drops farm-b before the mapping does.
    agro.write_text(shipped + "tenants: [farm-a]\n")
    os.utime(agro, (time.time() + 15, time.time() + 15))
    source.check_now()
    assert source.for_tenant("farm-b").config.industry == "agro", "still served"
    path.write_text(path.read_text().replace("\n  farm-b: agro", ""))
    os.utime(path, (time.time() + 20, time.time() + 20))
    source.check_now()  # the mapping first, then the industry config it now allows
    assert source.for_tenant("farm-a").config.tenants == ["farm-a"]


def test_tenants_swapped_between_two_industries_roll_out_on_a_running_pod(tmp_path):
    """farm-a moves from vending to agro and shop-b from agro to vending: the mapping
    and both industries' tenants: change. Checked each against the others' served
    versions, every file waited for another and a running pod never rolled out, while
    one started then served the new state. The mapping is checked against the
    industries' files as stored now, and all three serve together."""
    shipped = {
        name: (CONFIGS / f"{name}.yaml").read_text().replace("../models", str(REPO_ROOT / "models"))
        for name in ("agro", "vending")
    }
    files = {name: tmp_path / f"{name}.yaml" for name in shipped}

    def write(agro: str, vending: str, stamp: float) -> None:
        for name, tenant in (("agro", agro), ("vending", vending)):
            files[name].write_text(shipped[name] + f"tenants: [{tenant}]\n")
            os.utime(files[name], (stamp, stamp))

    write("shop-b", "farm-a", time.time())
    path = _deployment(tmp_path, {"farm-a": "vending", "shop-b": "agro"})
    text = path.read_text()
    for name in files:
        text = text.replace(str(CONFIGS / f"{name}.yaml"), str(files[name]))
    path.write_text(text)
    source = open_configs(str(path), read_local, local_version)
    assert source.for_tenant("farm-a").config.industry == "vending"

    write("farm-a", "shop-b", time.time() + 10)
    path.write_text(
        text.replace("farm-a: vending", "farm-a: agro").replace("shop-b: agro", "shop-b: vending")
    )
    os.utime(path, (time.time() + 10, time.time() + 10))
    source.check_now()
    assert source.for_tenant("farm-a").config.industry == "agro"
    assert source.for_tenant("shop-b").config.industry == "vending"
    source.check_now()  # and it stays so
    assert source.for_tenant("shop-b").config.tenants == ["shop-b"]
