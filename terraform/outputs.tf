output "cluster_name" {
  description = "For gcloud container clusters get-credentials."
  value       = google_container_cluster.gannet.name
}

output "region" {
  description = "Region of the cluster and the registry."
  value       = var.region
}

output "image_repository" {
  description = "Where docker push goes; the k8s overlay's images.newName."
  value       = local.image_repository
}

output "worker_service_account" {
  description = "The iam.gke.io/gcp-service-account annotation of the gannet-worker KSA."
  value       = google_service_account.worker.email
}

output "subscription" {
  description = "GANNET_SUBSCRIPTION."
  value       = google_pubsub_subscription.tasks.name
}

output "buckets" {
  description = "GANNET_ALLOWED_BUCKETS, GANNET_MODELS_BUCKET, GANNET_RESULTS_BUCKET."
  value = {
    images  = google_storage_bucket.images.name
    models  = google_storage_bucket.models.name
    results = google_storage_bucket.results.name
  }
}

output "sql_private_ip" {
  description = "Host of GANNET_DATABASE_URL (private IP, reachable from the cluster only)."
  value       = google_sql_database_instance.gannet.private_ip_address
}

output "db_password_secret" {
  description = "Secret Manager secret with the password of the gannet role, which owns the tables (GANNET_OWNER_DATABASE_URL)."
  value       = google_secret_manager_secret.db_password.secret_id
}

output "db_worker_password_secret" {
  description = "Secret Manager secret with the password of the gannet_worker role, the daemon's (GANNET_DATABASE_URL)."
  value       = google_secret_manager_secret.db_worker_password.secret_id
}

output "github_actions_variables" {
  description = "Repository variables the delivery workflow reads (README, Delivery); set them with gh variable set."
  value = {
    "${upper(var.env)}_WORKLOAD_IDENTITY_PROVIDER" = google_iam_workload_identity_pool_provider.github.name
    "${upper(var.env)}_PUSH_SERVICE_ACCOUNT"       = google_service_account.push.email
    "${upper(var.env)}_DEPLOY_SERVICE_ACCOUNT"     = google_service_account.deploy.email
    "${upper(var.env)}_IMAGE_REPOSITORY"           = local.image_repository
    "${upper(var.env)}_CLUSTER"                    = google_container_cluster.gannet.name
    "${upper(var.env)}_REGION"                     = var.region
    "${upper(var.env)}_PROJECT"                    = var.project_id
  }
}
