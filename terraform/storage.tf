# Three buckets: images (inputs, written by the backend), models (weights and industry
# configs), results (result JSON). Uniform access, no public access, lifecycle rules.
resource "google_storage_bucket" "images" {
  # checkov:skip=CKV_GCP_62:Object access is recorded by Cloud Audit Logs (Data Access) where needed; legacy usage-log buckets add a fourth bucket and no information
  # checkov:skip=CKV_GCP_78:Inputs are written once by the backend and expire after images_retention_days; versions would only delay deletion
  name                        = "${var.project_id}-images"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  labels                      = local.labels
  # Without deletion protection (dev), a destroy empties the bucket rather than failing.
  force_destroy = !var.deletion_protection

  lifecycle_rule {
    condition {
      age = var.images_retention_days
    }
    action {
      type = "Delete"
    }
  }
  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket" "models" {
  # checkov:skip=CKV_GCP_62:Object access is recorded by Cloud Audit Logs (Data Access) where needed; legacy usage-log buckets add a fourth bucket and no information
  name                        = "${var.project_id}-models"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  labels                      = local.labels
  # Without deletion protection (dev), a destroy empties the bucket rather than failing.
  force_destroy = !var.deletion_protection

  # Weights and configs are versioned: a bad upload can be rolled back.
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      num_newer_versions = 5
      with_state         = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket" "results" {
  # checkov:skip=CKV_GCP_62:Object access is recorded by Cloud Audit Logs (Data Access) where needed; legacy usage-log buckets add a fourth bucket and no information
  # checkov:skip=CKV_GCP_78:Results are rewritten idempotently per task_id and the row in PostgreSQL is the record; old versions have no reader
  name                        = "${var.project_id}-results"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  labels                      = local.labels
  # Without deletion protection (dev), a destroy empties the bucket rather than failing.
  force_destroy = !var.deletion_protection

  lifecycle_rule {
    condition {
      age = 30
    }
    action {
      type          = "SetStorageClass"
      storage_class = "NEARLINE"
    }
  }
  lifecycle_rule {
    condition {
      age = var.results_retention_days
    }
    action {
      type = "Delete"
    }
  }
  depends_on = [google_project_service.apis]
}
