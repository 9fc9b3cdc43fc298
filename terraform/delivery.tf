# Delivery from GitHub Actions (.github/workflows/deliver.yml) without keys: the
# workflow's OIDC token is exchanged through this Workload Identity pool for short-lived
# tokens of two service accounts, each with the least it needs:
#   gannet-push    pushes images to this environment's repository, nothing else;
#   gannet-deploy  may reach this project's cluster (get + connect); what it may change
#                  inside is Kubernetes RBAC in k8s/deployer/ (the gannet namespace only).
# The provider accepts tokens of one repository only, and only for main and v* tags, so
# a pull request or a fork's workflow cannot obtain either identity.

locals {
  github_pool = google_iam_workload_identity_pool.github.name
  # Jobs that run in a GitHub environment get the subject repo:OWNER/NAME:environment:ENV;
  # only main may use the environment (its deployment branch rule), prod needs a reviewer.
  github_environment_principal = "principal://iam.googleapis.com/${local.github_pool}/subject/repo:${var.github_repository}:environment:${var.github_environment}"
  # Any job of the repository the provider accepts: the build job, which has no environment.
  github_repository_principals = "principalSet://iam.googleapis.com/${local.github_pool}/attribute.repository/${var.github_repository}"
  # Keyed by names known at plan time: the pool's name is only known once it exists, and
  # a for_each over values built from it failed the first plan of a new project
  # ("Invalid for_each argument").
  push_principals = merge(
    { environment = local.github_environment_principal },
    var.build_pushes_here ? { repository = local.github_repository_principals } : {},
  )
}

resource "google_iam_workload_identity_pool" "github" {
  workload_identity_pool_id = "github"
  display_name              = "GitHub Actions"
  description               = "Keyless auth for ${var.github_repository}'s delivery workflow"
  depends_on                = [google_project_service.apis]
}

resource "google_iam_workload_identity_pool_provider" "github" {
  # checkov:skip=CKV_GCP_125:the condition pins the repository by name and owner id and the ref to main or v* tags, stricter than the one assertion.sub pattern this check recognises; each service account then binds its own subject
  workload_identity_pool_id          = google_iam_workload_identity_pool.github.workload_identity_pool_id
  workload_identity_pool_provider_id = "gannet-delivery"
  display_name                       = "gannet delivery"
  attribute_mapping = {
    "google.subject"                = "assertion.sub"
    "attribute.repository"          = "assertion.repository"
    "attribute.repository_owner_id" = "assertion.repository_owner_id"
    "attribute.ref"                 = "assertion.ref"
  }
  # The owner id as well as the name: a deleted and re-created repository of the same
  # name under another owner does not inherit the trust.
  attribute_condition = "assertion.repository == '${var.github_repository}' && assertion.repository_owner_id == '${var.github_repository_owner_id}' && (assertion.ref == 'refs/heads/main' || assertion.ref.startsWith('refs/tags/v'))"
  oidc {
    issuer_uri = "https://token.actions.githubusercontent.com"
  }
}

resource "google_service_account" "push" {
  account_id   = "gannet-push"
  display_name = "Gannet image push (GitHub Actions)"
}

resource "google_service_account_iam_member" "push_from_github" {
  for_each           = local.push_principals
  service_account_id = google_service_account.push.name
  role               = "roles/iam.workloadIdentityUser"
  member             = each.value
}

resource "google_artifact_registry_repository_iam_member" "push_writes" {
  location   = google_artifact_registry_repository.gannet.location
  repository = google_artifact_registry_repository.gannet.name
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.push.email}"
}

# Promotion: prod's push identity copies the digest that dev runs out of dev's repository.
resource "google_artifact_registry_repository_iam_member" "registry_readers" {
  for_each   = toset(var.registry_readers)
  location   = google_artifact_registry_repository.gannet.location
  repository = google_artifact_registry_repository.gannet.name
  role       = "roles/artifactregistry.reader"
  member     = each.value
}

resource "google_service_account" "deploy" {
  account_id   = "gannet-deploy"
  display_name = "Gannet deploy (GitHub Actions)"
}

resource "google_service_account_iam_member" "deploy_from_github" {
  service_account_id = google_service_account.deploy.name
  role               = "roles/iam.workloadIdentityUser"
  member             = local.github_environment_principal
}

# Reach the cluster and nothing more at the IAM level: roles/container.developer would
# also read every Secret in every namespace. The project holds one cluster.
resource "google_project_iam_custom_role" "cluster_connect" {
  role_id     = "gannetClusterConnect"
  title       = "Gannet cluster connect"
  description = "Get the cluster's endpoint and credentials; what the caller may do inside is Kubernetes RBAC"
  permissions = ["container.clusters.get", "container.clusters.connect"]
}

resource "google_project_iam_member" "deploy_connects" {
  project = var.project_id
  role    = google_project_iam_custom_role.cluster_connect.id
  member  = "serviceAccount:${google_service_account.deploy.email}"
}
