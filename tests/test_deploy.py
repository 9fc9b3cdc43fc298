"""`gannet ops deploy`: the overlay rendered by the real `kubectl kustomize`, the image
pinned to a digest, applied, the rollout awaited, the status shown.

No API server is reachable here. Rendering and pinning are real; for the apply and the
rollout wait, a stand-in `kubectl` on PATH hands `kustomize` to the real kubectl and
records what it was asked to apply and wait for (a cluster cannot run here); the status
comes from the HTTP server of tests/test_ops.py that plays the API server.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from test_ops import FakeApiServer, cli, kubeconfig, server  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "0123456789abcdef" * 4
PROD_REPO = "us-central1-docker.pkg.dev/gannet-prod/gannet/gannet-worker"
DEV_REPO = "us-central1-docker.pkg.dev/gannet-dev/gannet/gannet-worker"


def deploy(argv: list[str]) -> int:
    args = cli(["ops", "deploy", *argv])
    return int(args.func(args))


def worker_images(text: str) -> list[str]:
    """The images of the worker's init containers, then its containers."""
    objects = [d for d in yaml.safe_load_all(text) if d]
    (pod,) = [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"]
    return [c["image"] for c in [*pod["initContainers"], *pod["containers"]]]


@pytest.mark.parametrize(("overlay", "repo"), [("prod", PROD_REPO), ("dev", DEV_REPO)])
def test_dry_run_pins_the_worker_to_the_digest(
    overlay: str, repo: str, capsys: pytest.CaptureFixture
) -> None:
    image = f"{repo}@{DIGEST}"
    assert deploy([str(ROOT / "k8s" / "overlays" / overlay), "--image", image, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # The migrate init container runs the release's migrations with the same image.
    assert worker_images(out) == [image, image]
    kinds = {d["kind"] for d in yaml.safe_load_all(out) if d}
    assert {"Deployment", "ConfigMap", "ServiceAccount", "Namespace"} <= kinds


def test_a_tag_is_refused(capsys: pytest.CaptureFixture) -> None:
    overlay = str(ROOT / "k8s" / "overlays" / "prod")
    assert deploy([overlay, "--image", f"{PROD_REPO}:0.1.0", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "not REPOSITORY@sha256" in err and "not a tag" in err


def test_an_image_from_another_registry_is_refused_before_anything_is_applied(
    capsys: pytest.CaptureFixture,
) -> None:
    """The dev image on prod's overlay: drift between terraform and the overlay."""
    overlay = str(ROOT / "k8s" / "overlays" / "prod")
    assert deploy([overlay, "--image", f"{DEV_REPO}@{DIGEST}", "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert f"the overlay runs {PROD_REPO}, not {DEV_REPO}" in captured.err
    assert captured.out == ""  # no manifest printed


def fake_kubectl(tmp_path: Path, rollout_rc: int) -> Path:
    """A kubectl that passes `kustomize` to the real one and records everything else."""
    real = shutil.which("kubectl")
    assert real, "kubectl is needed for `kubectl kustomize`"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "kubectl"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == kustomize ]]; then exec {real} "$@"; fi\n'
        f'printf "%s\\n" "$*" >> {tmp_path}/calls\n'
        f'if [[ " $* " == *" apply "* ]]; then cat > {tmp_path}/applied.yaml; '
        'echo "deployment.apps/gannet-worker configured"; exit 0; fi\n'
        'if [[ " $* " == *" rollout "* ]]; then '
        f'echo "rollout output"; [[ {rollout_rc} == 0 ]] || echo "timed out" >&2; '
        f"exit {rollout_rc}; fi\n"
        "exit 3\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_deploy_applies_waits_and_shows_status(
    server: FakeApiServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    bindir = fake_kubectl(tmp_path, rollout_rc=0)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    config = kubeconfig(tmp_path, server.url)
    image = f"{PROD_REPO}@{DIGEST}"
    rc = deploy(
        [str(ROOT / "k8s" / "overlays" / "prod"), "--image", image, "--kubeconfig", str(config)]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert worker_images((tmp_path / "applied.yaml").read_text()) == [image, image]
    apply_call, rollout_call = (tmp_path / "calls").read_text().splitlines()
    assert apply_call == f"--kubeconfig {config} apply -f -"
    assert rollout_call == (
        f"--kubeconfig {config} --namespace gannet rollout status deployment/gannet-worker "
        "--timeout=900s"
    )
    # The status an operator reads after a deploy, from the API server.
    assert "deploying " + image in out
    assert "deployment gannet/gannet-worker: 3/4 ready" in out
    assert "backlog: 1230 undelivered messages (interactive 30, bulk 1200)" in out
    assert {r.authorization for r in server.requests} == {"Bearer test-token"}


def test_a_rollout_that_does_not_finish_fails_and_says_how_to_go_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    bindir = fake_kubectl(tmp_path, rollout_rc=1)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    image = f"{PROD_REPO}@{DIGEST}"
    rc = deploy([str(ROOT / "k8s" / "overlays" / "prod"), "--image", image, "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "did not finish within 5 s" in err
    assert "kubectl -n gannet rollout undo deployment/gannet-worker" in err


def test_help_explains_deploy(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli(["ops", "deploy", "--help"])
    text = capsys.readouterr().out
    for option in ("--image", "--dry-run", "--timeout", "digest", "overlay"):
        assert option in text
