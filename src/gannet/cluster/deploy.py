"""`gannet ops deploy`: put one image digest on a cluster through a kustomize overlay.

The delivery workflow (.github/workflows/deliver.yml) and an operator by hand take the
same path: render the overlay, pin the worker's image to a digest (never a tag: a digest
names exactly the bytes that were built and tested, and prod runs what dev ran), apply,
wait for the rollout, show `gannet ops status`. Pinning checks that the image comes from
the repository the overlay already names, so a mismatch between terraform's registry and
the overlay fails here, before anything is applied, instead of deploying the old image.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gannet.cluster import ops

DIGEST_REF = re.compile(r"^(?P<repository>[a-z0-9][a-z0-9._/-]*)@sha256:[0-9a-f]{64}$")
WORKLOADS = ("Deployment",)


class DeployError(Exception):
    """Nothing was applied; the message says what to fix."""


def repository_of(image: str) -> str:
    """`host/path/name` of an image reference, without its tag or digest."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: name.rindex(":")]
    return name


def render(overlay: Path) -> list[dict[str, Any]]:
    kubectl = _kubectl()
    proc = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise DeployError(f"kubectl kustomize {overlay} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def pin_image(objects: list[dict[str, Any]], image: str) -> list[str]:
    """Points every container of the overlay's workloads that runs `image`'s repository at
    `image` (a digest reference), in place; returns the containers changed."""
    match = DIGEST_REF.match(image)
    if match is None:
        raise DeployError(
            f"{image!r} is not REPOSITORY@sha256:<64 hex>; deploy the digest the build "
            "pushed (docker buildx's `digest` output), not a tag"
        )
    repository = match["repository"]
    changed: list[str] = []
    seen: set[str] = set()
    for obj in objects:
        if obj.get("kind") not in WORKLOADS:
            continue
        pod = obj["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            runs = repository_of(container["image"])
            seen.add(runs)
            if runs == repository:
                container["image"] = image
                changed.append(f"{obj['kind']}/{obj['metadata']['name']}:{container['name']}")
    if not changed:
        raise DeployError(
            f"the overlay runs {', '.join(sorted(seen)) or 'no container'}, not {repository}: "
            "push to the repository the overlay names (terraform output image_repository) "
            "or fix images.newName in the overlay"
        )
    return changed


def manifest(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def apply(text: str, kube_args: list[str]) -> None:
    proc = subprocess.run(
        [_kubectl(), *kube_args, "apply", "-f", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(proc.stdout, end="")
    if proc.returncode != 0:
        raise DeployError(f"kubectl apply failed:\n{proc.stderr.strip()}")


def wait_for_rollout(namespace: str, deployment: str, timeout_s: int, kube_args: list[str]) -> None:
    proc = subprocess.run(
        [
            _kubectl(),
            *kube_args,
            "--namespace",
            namespace,
            "rollout",
            "status",
            f"deployment/{deployment}",
            f"--timeout={timeout_s}s",
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )
    print(proc.stdout, end="")
    if proc.returncode != 0:
        raise DeployError(
            f"the rollout did not finish within {timeout_s} s: {proc.stderr.strip()}\n"
            "The old pods keep serving while new ones are not ready. Look at "
            f"`kubectl -n {namespace} get pods` and their logs; to go back: "
            f"`kubectl -n {namespace} rollout undo deployment/{deployment}`"
        )


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise DeployError("kubectl is not on PATH; install it (gcloud components install kubectl)")
    return path


def _kube_args(args: argparse.Namespace) -> list[str]:
    out = []
    if args.kubeconfig:
        out += ["--kubeconfig", args.kubeconfig]
    if args.context:
        out += ["--context", args.context]
    return out


def run_deploy(args: argparse.Namespace) -> int:
    try:
        objects = render(Path(args.overlay))
        changed = pin_image(objects, args.image)
        text = manifest(objects)
        if args.dry_run:
            print(text, end="")
            return 0
        print(f"deploying {args.image} to {', '.join(changed)} ({args.overlay})", flush=True)
        apply(text, _kube_args(args))
        wait_for_rollout(args.namespace, args.deployment, args.timeout, _kube_args(args))
        api = ops.load_api_client(args.kubeconfig, args.context)
        status = ops.get_status(api, args.namespace, args.deployment, args.subscription)
    except (DeployError, ops.OpsError) as exc:
        print(f"gannet ops deploy: {exc}", file=sys.stderr)
        return 1
    print(ops.format_status(status))
    return 0
