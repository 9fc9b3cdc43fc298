resource "google_artifact_registry_repository" "gannet" {
  # checkov:skip=CKV_GCP_84:Google-managed encryption; the images hold code and no data or weights
  repository_id = "gannet"
  location      = var.region
  format        = "DOCKER"
  description   = "Gannet worker images"
  labels        = local.labels

  # Deployments pin digests; a tag never moves once pushed.
  docker_config {
    immutable_tags = true
  }

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 20
    }
  }
  cleanup_policies {
    id     = "delete-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "1209600s"
    }
  }
  depends_on = [google_project_service.apis]
}
