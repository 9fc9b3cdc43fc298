data "google_project" "this" {
  project_id = var.project_id
}

locals {
  name           = "gannet-${var.env}"
  project_number = data.google_project.this.number
  workload_pool  = "${var.project_id}.svc.id.goog"
  # The worker image: docker push target and the k8s overlays' images.newName.
  image_repository = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.gannet.repository_id}/gannet-worker"
  # Workload Identity principal of a Kubernetes service account (no Google SA needed).
  wi_principal = "principal://iam.googleapis.com/projects/${local.project_number}/locations/global/workloadIdentityPools/${local.workload_pool}/subject"
  labels = merge({
    app = "gannet"
    env = var.env
  }, var.labels)
}

resource "google_project_service" "apis" {
  for_each = toset([
    "artifactregistry.googleapis.com",
    "binaryauthorization.googleapis.com",
    "cloudtrace.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "iamcredentials.googleapis.com", # service account tokens for GitHub Actions
    "sts.googleapis.com",            # Workload Identity Federation token exchange
    "telemetry.googleapis.com",      # Cloud Trace's OTLP endpoint (GANNET_TRACE_EXPORTER)
    "monitoring.googleapis.com",
    "pubsub.googleapis.com",
    "secretmanager.googleapis.com",
    "servicenetworking.googleapis.com",
    "sqladmin.googleapis.com",
    "storage.googleapis.com",
  ])
  service            = each.value
  disable_on_destroy = false
}
