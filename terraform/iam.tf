# Least privilege: the nodes can only log, write metrics and pull images; the worker
# (through Workload Identity) can only pull its subscription, publish to the
# dead-letter topic, read images and models, write results and read Monitoring.

resource "google_service_account" "nodes" {
  account_id   = "${local.name}-nodes"
  display_name = "Gannet GKE nodes"
}

resource "google_project_iam_member" "nodes" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
    "roles/autoscaling.metricsWriter",
  ])
  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_artifact_registry_repository_iam_member" "nodes_pull" {
  repository = google_artifact_registry_repository.gannet.id
  location   = var.region
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_service_account" "worker" {
  account_id   = "gannet-worker"
  display_name = "Gannet worker (Workload Identity: gannet/gannet-worker)"
}

# The Kubernetes SA gannet/gannet-worker (k8s/base/serviceaccount.yaml) acts as it.
resource "google_service_account_iam_member" "worker_workload_identity" {
  service_account_id = google_service_account.worker.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[gannet/gannet-worker]"
  depends_on         = [google_container_cluster.gannet]
}

resource "google_pubsub_subscription_iam_member" "worker_subscribes" {
  subscription = google_pubsub_subscription.tasks.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.worker.email}"
}

# The worker reads its subscription at start (pubsub.subscriptions.get, which
# roles/pubsub.subscriber lacks) to fail with a clear message when it is missing.
resource "google_pubsub_subscription_iam_member" "worker_views_subscription" {
  subscription = google_pubsub_subscription.tasks.id
  role         = "roles/pubsub.viewer"
  member       = "serviceAccount:${google_service_account.worker.email}"
}

# Poison messages are quarantined by the worker itself (with error attributes).
resource "google_pubsub_topic_iam_member" "worker_quarantines" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.worker.email}"
}

# And reads it at start (pubsub.topics.get, which roles/pubsub.publisher lacks), to say
# so when it is missing rather than let the first poison message find out.
resource "google_pubsub_topic_iam_member" "worker_views_dead_letter" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.viewer"
  member = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_storage_bucket_iam_member" "worker_reads_images" {
  bucket = google_storage_bucket.images.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_storage_bucket_iam_member" "worker_reads_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.worker.email}"
}

# objectUser, not objectCreator: a redelivered task overwrites its own result object.
resource "google_storage_bucket_iam_member" "worker_writes_results" {
  bucket = google_storage_bucket.results.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.worker.email}"
}

# GANNET_BACKLOG_FROM_MONITORING: read the subscription's backlog metrics.
resource "google_project_iam_member" "worker_reads_monitoring" {
  project = var.project_id
  role    = "roles/monitoring.viewer"
  member  = "serviceAccount:${google_service_account.worker.email}"
}

# GANNET_TRACE_EXPORTER=cloud_trace: the daemon writes its task traces to Cloud Trace
# through its OTLP endpoint (telemetry.googleapis.com), which takes this role.
resource "google_project_iam_member" "worker_writes_traces" {
  project = var.project_id
  role    = "roles/telemetry.tracesWriter"
  member  = "serviceAccount:${google_service_account.worker.email}"
}

# The Custom Metrics Stackdriver Adapter (External Pub/Sub metric, Pods metric from
# Managed Prometheus) and KEDA's operator read Cloud Monitoring as their own
# Kubernetes service accounts, bound directly by Workload Identity Federation.
resource "google_project_iam_member" "metrics_readers" {
  for_each = {
    custom_metrics_adapter = "${local.wi_principal}/ns/custom-metrics/sa/custom-metrics-stackdriver-adapter"
    keda_operator          = "${local.wi_principal}/ns/keda/sa/keda-operator"
  }
  project    = var.project_id
  role       = "roles/monitoring.viewer"
  member     = each.value
  depends_on = [google_container_cluster.gannet]
}
