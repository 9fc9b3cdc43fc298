# The lanes after the first (GANNET_LANES, docs/architecture.md "Lanes"): each is a topic,
# a subscription and a dead-letter topic of its own, shaped like the first lane's in
# pubsub.tf, so a bulk backfill waits in its own queue while interactive work is served
# by weight. Names follow the daemon: the first lane's name plus "-LANE".

resource "google_pubsub_topic" "lane" {
  # checkov:skip=CKV_GCP_83:Google-managed encryption; same content as the tasks topic
  for_each                   = toset(var.extra_lanes)
  name                       = "gannet-tasks-${each.key}"
  labels                     = merge(local.labels, { lane = each.key })
  message_retention_duration = "86400s"
  depends_on                 = [google_project_service.apis]
}

resource "google_pubsub_topic" "lane_dead_letter" {
  # checkov:skip=CKV_GCP_83:Google-managed encryption; same content as the tasks topic
  for_each                   = toset(var.extra_lanes)
  name                       = "gannet-dead-letter-${each.key}"
  labels                     = merge(local.labels, { lane = each.key })
  message_retention_duration = "604800s"
  depends_on                 = [google_project_service.apis]
}

resource "google_pubsub_subscription" "lane" {
  for_each                   = toset(var.extra_lanes)
  name                       = "gannet-tasks-sub-${each.key}"
  topic                      = google_pubsub_topic.lane[each.key].id
  labels                     = merge(local.labels, { lane = each.key })
  ack_deadline_seconds       = var.ack_deadline_seconds
  message_retention_duration = "604800s"

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.lane_dead_letter[each.key].id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = ""
  }
}

resource "google_pubsub_subscription" "lane_dead_letter" {
  for_each                   = toset(var.extra_lanes)
  name                       = "gannet-dead-letter-${each.key}-sub"
  topic                      = google_pubsub_topic.lane_dead_letter[each.key].id
  labels                     = merge(local.labels, { lane = each.key })
  ack_deadline_seconds       = 60
  message_retention_duration = "2678400s" # 31 days, the most Pub/Sub keeps
  expiration_policy {
    ttl = ""
  }
}

# The Pub/Sub service agent forwards each lane's undeliverable messages (pubsub.tf).
resource "google_pubsub_topic_iam_member" "agent_publishes_lane_dead_letter" {
  for_each = toset(var.extra_lanes)
  topic    = google_pubsub_topic.lane_dead_letter[each.key].id
  role     = "roles/pubsub.publisher"
  member   = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "agent_subscribes_lane" {
  for_each     = toset(var.extra_lanes)
  subscription = google_pubsub_subscription.lane[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# The worker pulls every lane and quarantines poison to the lane's own dead-letter topic.
resource "google_pubsub_subscription_iam_member" "worker_subscribes_lane" {
  for_each     = toset(var.extra_lanes)
  subscription = google_pubsub_subscription.lane[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_pubsub_subscription_iam_member" "worker_views_subscription_lane" {
  for_each     = toset(var.extra_lanes)
  subscription = google_pubsub_subscription.lane[each.key].id
  role         = "roles/pubsub.viewer"
  member       = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_pubsub_topic_iam_member" "worker_quarantines_lane" {
  for_each = toset(var.extra_lanes)
  topic    = google_pubsub_topic.lane_dead_letter[each.key].id
  role     = "roles/pubsub.publisher"
  member   = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_pubsub_topic_iam_member" "worker_views_dead_letter_lane" {
  for_each = toset(var.extra_lanes)
  topic    = google_pubsub_topic.lane_dead_letter[each.key].id
  role     = "roles/pubsub.viewer"
  member   = "serviceAccount:${google_service_account.worker.email}"
}
