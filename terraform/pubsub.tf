resource "google_pubsub_topic" "tasks" {
  # checkov:skip=CKV_GCP_83:Google-managed encryption; task messages hold object paths and ids, not image data, and CMEK would add a KMS key and its rotation to operate
  name                       = "gannet-tasks"
  labels                     = local.labels
  message_retention_duration = "86400s"
  depends_on                 = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83:Google-managed encryption; same content as the tasks topic
  name                       = "gannet-dead-letter"
  labels                     = local.labels
  message_retention_duration = "604800s"
  depends_on                 = [google_project_service.apis]
}

resource "google_pubsub_subscription" "tasks" {
  name                       = "gannet-tasks-sub"
  topic                      = google_pubsub_topic.tasks.id
  labels                     = local.labels
  ack_deadline_seconds       = var.ack_deadline_seconds
  message_retention_duration = "604800s"

  # Transient failures are nacked; Pub/Sub backs off before redelivering.
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  # Never expire the subscription for inactivity (a quiet week must not delete it).
  expiration_policy {
    ttl = ""
  }
}

# Holds quarantined and dead-lettered messages for inspection and replay.
resource "google_pubsub_subscription" "dead_letter" {
  name                       = "gannet-dead-letter-sub"
  topic                      = google_pubsub_topic.dead_letter.id
  labels                     = local.labels
  ack_deadline_seconds       = 60
  message_retention_duration = "2678400s" # 31 days, the most Pub/Sub keeps
  expiration_policy {
    ttl = ""
  }
}

# The Pub/Sub service agent forwards undeliverable messages: it must publish to the
# dead-letter topic and subscribe (to ack the forwarded message) on the source.
locals {
  pubsub_agent = "serviceAccount:service-${local.project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

resource "google_pubsub_topic_iam_member" "agent_publishes_dead_letter" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "agent_subscribes_tasks" {
  subscription = google_pubsub_subscription.tasks.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}
