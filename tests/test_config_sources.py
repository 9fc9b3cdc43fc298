"""Industry configs: validated up front, reloaded without a restart, bad pushes refused."""

from __future__ import annotations

import os
import time

import pytest

from gannet.config_schema import ConfigError
from gannet.config_sources import ConfigSource, parse_config
from gannet.errors import ErrorCode, PermanentError
from gannet.metrics import Metrics
from gannet.settings import REPO_ROOT
from gannet.storage import local_version, read_local

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


def test_changed_config_is_picked_up_and_a_bad_one_keeps_the_last_good(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(VALID)
    metrics = Metrics()
    source = ConfigSource(
        str(path),
        read_local,
        local_version,
        check_every_s=0,
        on_reload=lambda r: metrics.config_reloads.labels(r).inc(),
    )
    assert source.current().config.version == 3

    path.write_text(VALID.replace("version: 3", "version: 4"))
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert source.current().config.version == 4

    path.write_text(VALID.replace("version: 3", "version: 5").replace("0.4", "7"))
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert source.current().config.version == 4, "an invalid push must not be served"
    sample = metrics.registry.get_sample_value
    assert sample("gannet_config_reloads_total", {"result": "rejected"}) == 1
    assert sample("gannet_config_reloads_total", {"result": "loaded"}) == 1
