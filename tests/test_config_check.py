"""`gannet config check`: the daemon's verdict on a config before it is pushed, run as
an operator runs it (a child process), on the shipped configs, broken copies of them and
a config in a bucket of the GCS emulator; the models are the real demo models."""

from __future__ import annotations

import uuid
from pathlib import Path

from gannet import clients
from gannet.dev import demo
from gannet.dev.local_services import LocalServices
from gannet.dev.stack import gannet
from gannet.settings import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
MODELS = REPO_ROOT / "models" / "demo"


def test_the_shipped_deployment_is_described_with_its_routing_and_models():
    done = gannet("config", "check", str(CONFIGS / "deployment.yaml"), timeout=180)
    assert done.returncode == 0, done.stderr
    assert "tenant demo-farm -> agro" in done.stdout
    assert "any other tenant: refused (unknown_tenant)" in done.stdout
    assert "pipelines: DETECTION, FIELD_ANALYSIS, FULL_PIPELINE" in done.stdout
    assert f"models.classification: {MODELS / 'classify.pt'}" in done.stdout


def test_what_a_pod_would_reject_is_said_and_exits_2(tmp_path: Path):
    """A class filter naming a class the model lacks is found only by loading the
    model, as a pod does before it serves a config; a schema error without it."""
    text = (CONFIGS / "demo.yaml").read_text().replace("../models", str(REPO_ROOT / "models"))
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("classes: [circle, square, triangle]", "classes: [sqaure]"))
    done = gannet("config", "check", str(typo), timeout=180)
    assert done.returncode == 2, done.stdout
    assert f"{typo} would be rejected" in done.stderr and "sqaure" in done.stderr

    skipped = gannet("config", "check", str(typo), "--no-models", timeout=180)
    assert skipped.returncode == 0, skipped.stderr
    assert "models not loaded (--no-models)" in skipped.stdout

    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("DETECTION:", "DETECTION:\n    - teleport", 1))
    done = gannet("config", "check", str(broken), "--no-models", timeout=180)
    assert done.returncode == 2
    assert "unknown step 'teleport'" in done.stderr


def test_a_config_in_a_bucket_is_checked_with_its_models_from_the_bucket(
    services: LocalServices,
):
    settings = demo.local_settings(services)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client = clients.storage_client(settings)
    client.create_bucket(bucket)
    text = (CONFIGS / "demo.yaml").read_text()  # its model: ../models/demo/detect.pt
    client.bucket(bucket).blob("demo/config.yaml").upload_from_string(text)
    uri = f"gs://{bucket}/demo/config.yaml"

    missing = gannet("config", "check", uri, env=services.env(), timeout=180)
    assert missing.returncode == 2, missing.stdout
    assert f"gs://{bucket}/models/demo/detect.pt cannot be loaded" in missing.stderr

    upload = client.bucket(bucket).blob("models/demo/detect.pt")
    upload.upload_from_filename(str(MODELS / "detect.pt"))
    done = gannet("config", "check", uri, env=services.env(), timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"ok: {uri}: industry 'demo'" in done.stdout


def test_a_gs_address_that_names_no_config_is_a_sentence(services: LocalServices):
    """A bucket without the config's path, or a name no bucket can have, was a traceback
    ending in "not a gs:// URL", which they are: it now says what is wrong with it."""
    cases = {
        "gs://gannet-models": "it names no object (expected gs://BUCKET/path/to/object)",
        "gs://b/x.yaml": "'b' is not a bucket's name",
    }
    for uri, why in cases.items():
        done = gannet("config", "check", "--no-models", uri, env=services.env(), timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"{uri} would be rejected: '{uri}': {why}" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_tenants_own_models_are_checked_as_its_first_task_would(services: LocalServices):
    """A tenant's own model loads on its first task, so a bad upload was found only by
    its tasks, refused as tenant_model_invalid. --tenant loads it as that task would
    (its file, its kind, the class filters of the industry that serves the tenant)."""
    settings = demo.local_settings(services)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client = clients.storage_client(settings)
    client.create_bucket(bucket)
    config = str(CONFIGS / "demo.yaml")
    env = {**services.env(), "GANNET_MODELS_BUCKET": bucket}
    wrong = client.bucket(bucket).blob("models/acme/detect.pt")
    wrong.upload_from_filename(str(MODELS / "classify.pt"))  # a classifier as the detector
    args = ("config", "check", config, "--no-models", "--tenant", "acme", "--tenant", "globex")
    refused = gannet(*args, env=env, timeout=180)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "tenant acme: tenant_model_invalid:" in refused.stdout
    assert "it is a classify model, configured as detect" in refused.stdout
    assert "tenant globex: no models of its own" in refused.stdout

    wrong.upload_from_filename(str(MODELS / "detect.pt"))
    done = gannet(*args, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"tenant acme: ok: gs://{bucket}/models/acme/detect.pt" in done.stdout

    unset = gannet("config", "check", config, "--no-models", "--tenant", "acme", timeout=60)
    assert unset.returncode == 2 and "GANNET_MODELS_BUCKET is not set" in unset.stderr
